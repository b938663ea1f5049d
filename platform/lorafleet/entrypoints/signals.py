"""One way for a long-running process (``lorafleet serve``, ``lorafleet workers``, ``services.scheduler``) to
hear SIGINT and SIGTERM."""

from __future__ import annotations

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
