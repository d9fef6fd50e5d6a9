"""SIGTERM / SIGINT: ask the training loop to stop at the next step boundary.

The handler only records the signal; the loop checks ``requested`` after each step, saves a
checkpoint and returns (SIGTERM: the process then exits with code 0, as a preempted job that
saved its state should; SIGINT: ``KeyboardInterrupt`` is raised after the save, the usual Ctrl-C
outcome). A second SIGINT before the step ends raises ``KeyboardInterrupt`` at once, for a user
who does not want to wait for the save.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

from unpg.distributed import DistContext, any_rank

__all__ = ["StopSignals"]


class StopSignals:
    """Context manager installing the handlers (main thread only; elsewhere a no-op)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def agreed(self, ctx: DistContext) -> bool:
        """Whether any rank received a signal (one host-side all-reduce of a CPU flag, no
        device sync): every rank stops after the same step and saves together."""
        return any_rank(self.requested, ctx)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
