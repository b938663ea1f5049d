"""The service as an operator runs it (``lorafleet serve``), in a subprocess of the test, so a test can kill it
for real (``kill -9``, SIGTERM) and start it again on the same database, object store and port.

``ServiceProcess`` starts, waits for ``/healthz``, kills, terminates and restarts; its output goes to a log file
that a failing test prints. ``fault_recovery`` prints the line the closing notes collect (``FAULT-RECOVERY ...``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fault_recovery(scenario: str, **figures: object) -> None:
    """One ``FAULT-RECOVERY <scenario>: name=value ...`` line on stdout (seconds as ``1.23s``); never asserted."""
    shown = " ".join(
        f"{name}={value:.2f}s" if isinstance(value, float) else f"{name}={value}"
        for name, value in figures.items()
    )
    print(f"FAULT-RECOVERY {scenario}: {shown}", flush=True)


class ServiceProcess:
    """``lorafleet serve --port <port> --workers <workers> --no-scheduler --no-migrate`` with ``env`` (the
    ``LORAFLEET_*`` settings), started and stopped by the test. Each start appends to ``log_path``."""

    def __init__(
        self, env: Mapping[str, str], *, log_path: Path, workers: int = 0, extra_args: Sequence[str] = ()
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.workers = workers
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, timeout: float = 180.0) -> float:
        """Start the process and wait until ``/healthz`` answers 200; the seconds that took."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        args = ["serve", "--port", str(self.port), "--workers", str(self.workers), "--no-scheduler"]
        args += ["--no-migrate", *self.extra_args]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorafleet.entrypoints.cli", *args],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the service did not answer /healthz in {timeout:g} s:\n{self.log()}")
            time.sleep(0.1)

    def kill9(self) -> None:
        """``kill -9`` the service (no shutdown of any kind runs) and reap it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, *, timeout: float = 120.0) -> int:
        """SIGTERM, then wait for the process to exit; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Whatever state it is in: SIGTERM, and SIGKILL if it does not exit in 60 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return "(no log)"


def service_env(
    *,
    data_dir: Path,
    database_url: str,
    object_store_url: str,
    s3_endpoint: str,
    admin_key: str,
    tmp_dir: Path,
    **settings: str,
) -> dict[str, str]:
    """The environment of a service subprocess: ``LORAFLEET_*`` settings (``settings`` adds more, by field name),
    AWS test credentials, a local Ray on loopback (its session folder in ``/tmp/ray``, as by default), and
    ``TMPDIR`` = ``tmp_dir`` (where the scratch folders of jobs go)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_dir)),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "TMPDIR": str(tmp_dir),
        "RAY_TMPDIR": "/tmp",  # Ray's session folder: under TMPDIR its socket paths would be too long
        "OMP_NUM_THREADS": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORAFLEET_DATA_DIR": str(data_dir),
        "LORAFLEET_DATABASE_URL": database_url,
        "LORAFLEET_OBJECT_STORE_URL": object_store_url,
        "LORAFLEET_S3_ENDPOINT_URL": s3_endpoint,
        "LORAFLEET_ADMIN_KEY": admin_key,
        "LORAFLEET_BACKBONE": "builtin:tiny",
        "LORAFLEET_BACKBONE_QUANTIZATION": "nf4",
        "LORAFLEET_DEVICE": "cpu",
        "LORAFLEET_PROMOTE_RULE": "never",
    }
    env.update({f"LORAFLEET_{name.upper()}": value for name, value in settings.items()})
    return env
