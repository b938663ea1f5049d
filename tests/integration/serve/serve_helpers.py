"""Helpers for the Ray Serve tests and benchmark: the replicas' engine options and a free loopback port."""

from __future__ import annotations

import os
import socket

from lorafleet.config import Settings
from lorafleet.runtime.ray_serve import ReplicaOptions

#: the engine of every replica and of the in-process reference: 16 slots (more than a batch's adapters) up to
#: rank 8 (the test adapters have 4); half a CPU per replica, since trainer actors of other tests need CPUs too
REPLICA_OPTIONS = ReplicaOptions(n_slots=16, max_rank=8, max_batch_size=8, max_wait_ms=5.0, num_cpus=0.5)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the Serve proxy of a local Ray)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_local_ray(settings: Settings) -> bool:
    """``init_ray`` on a Ray of this process: the one running, or a new local one. ``ray.init()`` without an
    address joins any cluster another process started on this machine (``/tmp/ray/ray_current_cluster``); on
    a machine shared with other test runs, ``RAY_ADDRESS=local`` makes it start our own. True if started here."""
    import ray

    from lorafleet.runtime.ray_runtime import init_ray

    if ray.is_initialized():
        init_ray(settings)
        return False
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    try:
        init_ray(settings)
    finally:
        if before is None:
            del os.environ["RAY_ADDRESS"]
        else:
            os.environ["RAY_ADDRESS"] = before
    return True
