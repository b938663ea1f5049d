"""``lorafleet demo`` in a subprocess of the test session, running in the background (``conftest.py`` says why);
``BackgroundDemo.result()`` waits for it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: the test that checks the background demo (``test_cli_demo.py``)
DEMO_TEST = "test_demo_personalises_the_real_model_serves_rolls_back_and_prints_a_lineage"
#: users in the CI run of the demo: the whole flow at about two thirds of the time of ``make demo``'s four (the
#: four-user run, with its time against the 6-minute target, is ``tests/benchmarks/bench_demo.py``)
DEMO_USERS = ("ada", "bruno")
#: the demo's own limit, from its start (on a loaded 2-core machine it has taken up to about 15 minutes)
DEMO_TIMEOUT_SECONDS = 2300.0


def demo_env(data_dir: Path) -> dict[str, str]:
    """The environment the demo runs in: a data dir of its own and nothing else of the test session's."""
    return {"LORAFLEET_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}


@dataclass
class BackgroundDemo:
    """``lorafleet demo --users N`` running in a subprocess; ``result()`` waits for it."""

    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started: float

    def result(self) -> subprocess.CompletedProcess[str]:
        """Wait until the demo ends (at most ``DEMO_TIMEOUT_SECONDS`` from its start) and return what it printed;
        a demo that runs past its limit is stopped and fails the test."""
        remaining = max(1.0, DEMO_TIMEOUT_SECONDS - (time.monotonic() - self.started))
        try:
            code = self.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the demo ran past {DEMO_TIMEOUT_SECONDS:.0f} s:\n{self._tail(self.stdout_path)}")
        return subprocess.CompletedProcess(
            self.proc.args,
            code,
            self.stdout_path.read_text(encoding="utf-8", errors="replace"),
            self.stderr_path.read_text(encoding="utf-8", errors="replace"),
        )

    def stop(self) -> None:
        """SIGTERM (the demo shuts its service and Ray down), then SIGKILL to the whole process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    @staticmethod
    def _tail(path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")[-3000:]


def start_background_demo(data_dir: Path) -> BackgroundDemo:
    """``lorafleet demo --users 2`` on ``data_dir`` (which holds the converted backbone), at the lowest CPU
    priority, in a process group of its own, printing to files in ``data_dir``."""
    stdout_path, stderr_path = data_dir / "demo.stdout", data_dir / "demo.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.entrypoints.cli", "demo", "--users", str(len(DEMO_USERS))],
            env=demo_env(data_dir),
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, so a stop reaches its Ray processes too
            preexec_fn=lambda: os.nice(19),  # noqa: PLW1509  (only os.nice: safe before exec)
        )
    return BackgroundDemo(proc, stdout_path, stderr_path, time.monotonic())
