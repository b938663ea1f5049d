"""``lorafleet serve`` as a process: it starts the API service, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """``lorafleet serve`` (no workers, no scheduler: no Ray) migrates, serves /healthz, exits 0 on SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    env = {"LORAFLEET_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # the checkout under test, when it is set
    args = ["serve", "--port", str(port), "--workers", "0", "--no-scheduler"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.entrypoints.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /healthz"
            time.sleep(0.2)
        assert (tmp_path / "lorafleet.db").exists()  # migrated at start
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "shutting down" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
