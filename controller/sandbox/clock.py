"""The sandbox's clock: every time read of the sandbox goes through one of these, so a
test can move rolling budget windows, key grace periods and rate windows without sleeping."""

from __future__ import annotations

import threading
import time


class MutableClock:
    """Unix-seconds clock that tests can move.

    ``frozen=False`` (default) follows real time plus an offset, which suits a long-running
    sandbox; ``frozen=True`` stands still until moved, which makes tests exact.
    """

    def __init__(self, start: float | None = None, *, frozen: bool = False) -> None:
        self._lock = threading.Lock()
        self._frozen = frozen
        base = time.time() if start is None else float(start)
        self._offset = base - time.time()
        self._fixed = base

    def __call__(self) -> float:
        with self._lock:
            return self._fixed if self._frozen else time.time() + self._offset

    def now(self) -> float:
        return self()

    def advance(self, seconds: float) -> float:
        """Move forward (or back, if negative) and return the new time."""
        with self._lock:
            self._offset += seconds
            self._fixed += seconds
            return self._fixed if self._frozen else time.time() + self._offset

    def set(self, timestamp: float) -> None:
        with self._lock:
            self._fixed = float(timestamp)
            self._offset = float(timestamp) - time.time()
