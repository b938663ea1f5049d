"""Helpers for the cluster tests: the cluster host process (``cluster_host.py``), ``lorafleet workers``
processes connected to it, and reading which Ray node ran a job from its ``lease_owner``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.tiny import (
    TINY_TRAINING as TINY_TRAINING,  # re-exported: the tests here import it from this module
)

HOST_SCRIPT = Path(__file__).with_name("cluster_host.py")


_NODE_IN_WORKER_ID = re.compile(r"-node([0-9a-f]{8})-")


def node_prefix(worker_id: str | None) -> str:
    """The 8 hex digits of the Ray node id a trainer's worker id names (``trainer-<host>-node<8>-...``)."""
    match = _NODE_IN_WORKER_ID.search(worker_id or "")
    assert match, f"no Ray node in worker id {worker_id!r}"
    return match.group(1)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without LORAFLEET_* settings, one torch thread per process (each Ray node offers
    one CPU), loopback-only Ray, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


class _Lines:
    """The lines a process writes to one stream, collected by a thread; ``wait_for`` a matching one."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def count(self, pattern: str) -> int:
        with self._changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def wait_for(self, pattern: str, *, n: int = 1, timeout: float) -> list[str]:
        """The first ``n`` lines matching ``pattern``; AssertionError (with the output) after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if re.search(pattern, line)]
                if len(found) >= n:
                    return found[:n]
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no {n} line(s) matching {pattern!r} within {timeout} s:\n{tail}")
                self._changed.wait(min(left, 1.0))

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


class ClusterHost:
    """``cluster_host.py`` in its own process: a head and worker nodes on 127.0.0.1."""

    def __init__(self, config: Mapping[str, Any], *, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOST_SCRIPT), json.dumps(dict(config))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        self.output = _Lines(self.proc.stdout)
        (line,) = self.output.wait_for(r'^\{"address"', timeout=timeout)
        info = json.loads(line)
        self.address: str = info["address"]
        self.head: str = info["head"]
        self.workers: list[str] = list(info["workers"])

    def remove(self, node_id: str, *, timeout: float = 60.0) -> None:
        """Kill a worker node's processes, as when its machine is lost."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"remove": node_id}) + "\n")
        self.proc.stdin.flush()
        self.output.wait_for(rf'"removed": "{node_id}"', timeout=timeout)
        self.workers.remove(node_id)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WorkersProcess:
    """``lorafleet workers`` in its own process, connected to the cluster through ``LORAFLEET_RAY_ADDRESS``."""

    def __init__(self, settings_env: Mapping[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.entrypoints.cli", "workers", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(**settings_env),
        )
        self.output = _Lines(self.proc.stdout)

    def ready_nodes(self, n: int, *, timeout: float = 120.0) -> list[str]:
        """The Ray node ids of the first ``n`` trainer actors that reported ready."""
        lines = self.output.wait_for(r"trainer actor \S+ ready on node [0-9a-f]+", n=n, timeout=timeout)
        return [re.search(r"ready on node ([0-9a-f]+)", line).group(1) for line in lines]  # type: ignore[union-attr]

    def stop(self, *, timeout: float = 60.0) -> int:
        """SIGTERM, as a deployment stops it; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"lorafleet workers did not stop on SIGTERM:\n{self.output.text()[-3000:]}"
            ) from None

    def wait(self, *, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)
