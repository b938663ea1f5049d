"""``lorafleet serve-deploy``: deploy or update the Ray Serve inference app (``lorafleet.runtime.ray_serve``)."""

from __future__ import annotations

import argparse
import threading

from lorafleet.config import Settings, load_settings
from lorafleet.errors import ConfigError
from lorafleet.runtime.ray_runtime import init_ray
from lorafleet.runtime.ray_serve import ReplicaOptions, deploy


def serve_deploy_command(args: argparse.Namespace) -> int:
    """``lorafleet serve-deploy``: deploy or update the app on the configured Ray; exit, or ``--block``."""
    settings = load_settings()
    if not args.block and not settings.ray_address:
        raise ConfigError(
            "LORAFLEET_RAY_ADDRESS is empty, so the app would run on a local Ray that stops when this "
            "command exits: set it to a running Ray cluster, or pass --block"
        )
    options = ReplicaOptions(n_slots=args.slots, max_rank=args.max_rank, num_cpus=args.replica_cpus)
    deploy(settings, options, http_port=args.http_port)
    address = init_ray(settings)
    print(
        f"Ray Serve app {settings.serve_app_name!r} is running on the Ray cluster at {address}; point the "
        f"API at it with LORAFLEET_SERVING=ray-serve LORAFLEET_RAY_ADDRESS={address}"
    )
    if args.block:
        _wait_for_interrupt(settings)
    return 0


def _wait_for_interrupt(settings: Settings) -> None:
    print("serving until interrupted (Ctrl-C)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        if not settings.ray_address:
            from ray import serve  # Ray itself: ray_runtime and ray_serve import it only when they start it

            serve.shutdown()
