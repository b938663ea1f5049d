"""What every process started from the command line shares (``lorafleet``, ``python -m services.api``,
``python -m services.scheduler``): its logging set-up, and one way for a long-running one to hear SIGINT and
SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

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


def configure_logging(*, verbose: bool) -> None:
    """Log lines with time, level and logger name to stderr; debug with ``-v``, else info."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
