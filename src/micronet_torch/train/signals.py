"""Signals during training: SIGINT / SIGTERM ask the loop to stop after the current step and save its state."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved. ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class StopFlag:
    """SIGINT/SIGTERM handlers that ask the loop to stop after the current step."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()
