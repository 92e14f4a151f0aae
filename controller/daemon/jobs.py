"""What a scheduled job is and what it returns, for jobs written in other modules.

A job is ``async def job() -> JobResult``. It should catch what it can act on and say so
in its result; anything it raises is caught by the daemon, logged and counted as
``result="error"``, and the job runs again at its next slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
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


class SkipReason(StrEnum):
    """Why a job did not run: only ``IDLE`` means it had nothing to do (a success)."""

    IDLE = "idle"
    """Nothing declares the job, or nothing is due yet (no fleet has rebalancing)."""
    NOT_READY = "not-ready"
    """No valid manifests to act on yet (the reconcile result says why)."""
    BUSY = "busy"
    """The previous run of the same job is still in progress; it runs again after it."""
    STOPPING = "stopping"
    """The daemon is shutting down."""


@dataclass(frozen=True)
class JobResult:
    """``result`` is the ``finops_job_runs_total{result}`` label; ``fields`` go to the log.
    ``skip`` says why a ``skipped`` job did not run (see :class:`SkipReason`)."""

    result: str = OK
    message: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    skip: SkipReason | None = None

    @property
    def ok(self) -> bool:
        return self.result == OK

    @property
    def succeeded(self) -> bool:
        """Ran cleanly, or had nothing to do: what ``finops run --once`` exits 0 on."""
        return self.result == OK or (self.result == SKIPPED and self.skip is SkipReason.IDLE)

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
    def skipped(cls, message: str = "", reason: SkipReason = SkipReason.IDLE, **fields: Any) -> JobResult:
        return cls(SKIPPED, message, fields, reason)


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
    deadline_s: float | None = None
    """How long one run may take before ``/healthz`` fails (default: :func:`job_deadline`)."""

    @property
    def deadline(self) -> float:
        return self.deadline_s if self.deadline_s is not None else job_deadline(self.interval_s)


JOB_DEADLINE_FLOOR_S = 900.0
JOB_DEADLINE_INTERVALS = 3


def job_deadline(interval_s: float) -> float:
    """How long a run may take before the process counts as stuck: three intervals, at least
    15 minutes (a 10,000-agent apply takes about 2.5 minutes; every network call, git
    command and sink command has its own timeout well below this). Past it ``/healthz``
    answers 503 so a supervisor restarts finops; durable intents make that restart safe."""
    return max(JOB_DEADLINE_FLOOR_S, JOB_DEADLINE_INTERVALS * interval_s)
