"""What a scheduled job is and what it returns, for jobs written in other modules.

A job is ``async def job() -> JobResult``. It should catch what it can act on and say so
in its result; anything it raises is caught by the daemon, logged and counted as
``result="error"``, and the job runs again at its next slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

OK = "ok"
PARTIAL = "partial"
ERROR = "error"
SKIPPED = "skipped"

RECONCILE = "reconcile"
GIT_POLL = "git-poll"

SLOT_INTERVALS: Mapping[str, float] = {
    "alerts": 60.0,
    "rotation": 60.0,
    "rebalance": 900.0,
}
"""Named slots for jobs wired from other modules, with their default intervals (seconds)."""

BUILTIN_JOBS = frozenset({RECONCILE, GIT_POLL})


@dataclass(frozen=True)
class JobResult:
    """``result`` is the ``finops_job_runs_total{result}`` label; ``fields`` go to the log."""

    result: str = OK
    message: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result == OK

    @classmethod
    def success(cls, message: str = "", **fields: Any) -> JobResult:
        return cls(OK, message, fields)

    @classmethod
    def partial(cls, message: str = "", **fields: Any) -> JobResult:
        return cls(PARTIAL, message, fields)

    @classmethod
    def error(cls, message: str = "", **fields: Any) -> JobResult:
        return cls(ERROR, message, fields)

    @classmethod
    def skipped(cls, message: str = "", **fields: Any) -> JobResult:
        return cls(SKIPPED, message, fields)


JobFn = Callable[[], Awaitable[JobResult]]


@dataclass(frozen=True)
class JobSpec:
    name: str
    fn: JobFn
    interval_s: float
    jitter_s: float
    exclusive: bool
    """Exclusive jobs (the default) take the daemon's write lock, so two jobs that write to
    the gateway (reconcile, rebalance, rotation) never interleave within one process."""
    run_at_start: bool = False
