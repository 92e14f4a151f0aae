"""``finops run``: the long-lived reconcile daemon.

Public API: ``run`` (the click command), ``Daemon`` (``add_job``, ``request``,
``run_pending``/``step``, ``serve``), ``JobResult``, ``writer_lock``, ``DaemonMetrics``,
``DaemonContext`` (what the scheduled jobs of ``controller.daemon.scheduled`` are built from).
With shared PostgreSQL state, several replicas run; ``controller.daemon.leader`` decides which
one is active (the writer lock) and ``controller.daemon.replicas`` records each one's role,
heartbeat and last pass in the state database.

The names are loaded on first use (PEP 562): importing ``controller.daemon.lock`` (the
writer lock every writing command takes) must not load the scheduler (APScheduler) or the
metrics server stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.daemon.command import DaemonContext, run
    from controller.daemon.jobs import SLOT_INTERVALS, JobResult, SkipReason
    from controller.daemon.lock import WriterLocked, writer_lock
    from controller.daemon.metrics import DaemonMetrics
    from controller.daemon.scheduler import Daemon

_HOMES = {
    "DaemonContext": "controller.daemon.command",
    "run": "controller.daemon.command",
    "SLOT_INTERVALS": "controller.daemon.jobs",
    "JobResult": "controller.daemon.jobs",
    "SkipReason": "controller.daemon.jobs",
    "WriterLocked": "controller.daemon.lock",
    "writer_lock": "controller.daemon.lock",
    "DaemonMetrics": "controller.daemon.metrics",
    "Daemon": "controller.daemon.scheduler",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "SLOT_INTERVALS",
    "Daemon",
    "DaemonContext",
    "DaemonMetrics",
    "JobResult",
    "SkipReason",
    "WriterLocked",
    "run",
    "writer_lock",
]
