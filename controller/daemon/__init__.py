"""``finops run``: the long-lived reconcile daemon and the job registry other modules plug into.

Public API: ``run`` (the click command), ``Daemon`` (``add_job``, ``request``,
``run_pending``/``step``, ``serve``), ``JobResult``, ``writer_lock``, ``DaemonMetrics``,
``register_jobs``/``DaemonContext`` (job factories called for every ``finops run``).
"""

from controller.daemon.command import DaemonContext, register_jobs, run
from controller.daemon.jobs import SLOT_INTERVALS, JobResult, SkipReason
from controller.daemon.lock import WriterLocked, writer_lock
from controller.daemon.metrics import DaemonMetrics
from controller.daemon.scheduler import Daemon

__all__ = [
    "SLOT_INTERVALS",
    "Daemon",
    "DaemonContext",
    "DaemonMetrics",
    "JobResult",
    "SkipReason",
    "WriterLocked",
    "register_jobs",
    "run",
    "writer_lock",
]
