"""Per-route request counters (``GET /_sandbox/stats``), kept in memory."""

from __future__ import annotations

import threading
from collections import Counter


class RequestStats:
    """Per-route request counters for tests and benchmarks (sandbox-only routes excluded).

    Kept in memory rather than in SQLite so counting never adds a write to the request
    being counted.
    """

    _WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_route: Counter[str] = Counter()
        self._reads = 0
        self._writes = 0

    def count(self, method: str, route: str) -> None:
        with self._lock:
            self._by_route[f"{method} {route}"] += 1
            if method in self._WRITE_METHODS:
                self._writes += 1
            else:
                self._reads += 1

    def snapshot(self) -> dict[str, object]:
        """``{"requests", "reads", "writes", "by_route"}``, the shape of ``GET /_sandbox/stats``."""
        with self._lock:
            return {
                "requests": self._reads + self._writes,
                "reads": self._reads,
                "writes": self._writes,
                "by_route": dict(sorted(self._by_route.items())),
            }

    def reset(self) -> None:
        with self._lock:
            self._by_route.clear()
            self._reads = 0
            self._writes = 0
