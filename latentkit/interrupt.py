"""Ctrl-C during training: the first press stops after the current step with a checkpoint, the second at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Self


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after a step and wrote a checkpoint; the message says how to resume."""


class StopRequest:
    """While entered, SIGINT sets `requested` (once) and the next SIGINT raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Self:
        # signal handlers can only be set from the main thread (a notebook's worker thread keeps Python's own)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
