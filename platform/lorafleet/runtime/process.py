"""What every process started from the command line shares (``lorafleet``, ``python -m services.api``,
``python -m services.scheduler``): its argument parser's ``-v`` flag and logging set-up, one way for a
long-running one to hear SIGINT and SIGTERM, and a way to end processes a crashed predecessor left behind
(``end_processes``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

#: the signals that ask a process to stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(on_signal: Callable[[int], None]) -> bool:
    """Call ``on_signal(signum)`` on SIGINT and SIGTERM. Only the main thread can install handlers: from any
    other thread nothing is installed and False is returned."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def handle(signum: int, _frame: FrameType | None) -> None:
        on_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)
    return True


def process_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of such a process, with the ``-v``/``--verbose`` flag ``configure_logging`` reads."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def configure_logging(*, verbose: bool) -> None:
    """Log lines with time, level and logger name to stderr; debug with ``-v``, else info."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def end_processes(procs: Sequence[Any], *, grace_seconds: float = 3.0) -> list[int]:
    """End ``procs`` (``psutil.Process`` objects): SIGTERM, then SIGKILL for those still running after
    ``grace_seconds``. Returns the pids of those that were running and are gone now (a zombie counts as gone:
    its parent, often init, reaps it)."""
    import psutil  # Ray's dependency, not lorafleet's

    signalled = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
            signalled.append(proc)
    alive = _wait_gone(signalled, grace_seconds)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    alive = _wait_gone(alive, grace_seconds)
    return [p.pid for p in signalled if p not in alive]


def _wait_gone(procs: Sequence[Any], seconds: float) -> list[Any]:
    """Those of ``procs`` still running (and not zombies) after up to ``seconds``."""
    import psutil  # Ray's dependency, not lorafleet's

    def running(proc: Any) -> bool:
        try:
            return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + seconds
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if running(p)]
    return alive
