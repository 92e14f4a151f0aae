"""Several ``finops run`` replicas on one shared PostgreSQL state: one active, the others
standing by.

The writer lock (``controller.state.lock``: a session-level PostgreSQL advisory lock) is the
leadership. A replica starts as a **standby**: it serves ``/healthz``, ``/readyz`` and
``/metrics`` (``finops_leader`` 0), writes nothing to the gateway, and tries to take the lock
every ``poll_s`` seconds. The one that gets it becomes **active**: it builds its services
with ``fence=lock.check`` (the gateway client proves the lock is still held, by a round trip
on the lock's own session, before every write), starts the jobs, and its first pass is a
full reconcile that re-reads everything (intents left pending by a dead leader are resolved
by looking, as after a crash).

While active, a watchdog proves every ``poll_s`` seconds that the lock is still held (a
check that gets no answer within ``check_timeout_s`` counts as lost). When the lock is lost
(the database connection dropped, an operator terminated the session), the replica is
**fenced**: no further gateway write can pass the fence, the jobs are stopped (in-flight
ones get ``FENCED_STOP_S`` seconds, then are cancelled) and the process exits with code 1,
so its supervisor restarts it and it comes back as a standby. Exiting, rather than going
back to standby in-process, leaves no half-state behind: every cache, backoff, client
connection and in-flight task of the old term dies with the process.

Readiness: a standby answers ``/readyz`` 200 (``ready: standby …``, naming the active
replica) while it can reach the state database, and 503 when it cannot. A standby is ready
*to take over*, and a Kubernetes rollout or PodDisruptionBudget must not wait for a standby
that by design never becomes active; the role is in the body and in ``finops_leader``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from controller.daemon.logs import log_event
from controller.daemon.metrics import DaemonMetrics
from controller.daemon.replicas import ReplicaRegistry, Role
from controller.errors import FinopsError
from controller.state.location import StateLocation
from controller.state.lock import CHECK_TIMEOUT_S, DAEMON_PURPOSE, WriterLock, try_writer_lock

DEFAULT_POLL_S = 2.0
"""How often a standby tries to take the lock, and the active replica proves it still holds it."""
FENCED_STOP_S = 5.0
"""After losing the lock, in-flight jobs get this long (their writes are fenced) before being cancelled."""
STALE_POLL_INTERVALS = 5
"""A standby whose last successful poll is older than this many intervals is not ready."""

Acquire = Callable[[StateLocation], WriterLock | None]
Sleep = Callable[[float], Awaitable[None]]


class ActiveJobs(Protocol):
    """What the leader needs of the running daemon (``controller.daemon.scheduler.Daemon``)."""

    def ready(self, now: float | None = None) -> tuple[bool, str]: ...
    def healthy(self, now: float | None = None) -> tuple[bool, str]: ...
    def stop(self, *, timeout_s: float | None = None) -> None: ...


def acquire_daemon_lock(location: StateLocation) -> WriterLock | None:
    return try_writer_lock(location, purpose=DAEMON_PURPOSE)


class Replica:
    """One replica's role: standby until it holds the writer lock, active while it does,
    fenced once it lost it. ``readiness``/``liveness`` are called from the metrics thread."""

    def __init__(
        self,
        location: StateLocation,
        *,
        metrics: DaemonMetrics,
        registry: ReplicaRegistry | None = None,
        poll_s: float = DEFAULT_POLL_S,
        check_timeout_s: float = CHECK_TIMEOUT_S,
        log: logging.Logger | None = None,
        acquire: Acquire = acquire_daemon_lock,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if poll_s <= 0:
            raise ValueError("poll_s must be positive")
        self.location = location
        self.metrics = metrics
        self.registry = registry
        self.poll_s = float(poll_s)
        self.check_timeout_s = float(check_timeout_s)
        self.log = log or logging.getLogger("finops.daemon")
        self._acquire = acquire
        self._sleep = sleep
        self._clock = clock
        self.role = Role.STANDBY
        self.fenced_reason: str | None = None
        self.jobs: ActiveJobs | None = None
        self._polled_at: float | None = None
        self._poll_error: str | None = None
        self._active_hint = "none yet"
        self._stop = asyncio.Event()
        self._beat: asyncio.Future[None] | None = None
        self.metrics.leader.set(0)

    # ------------------------------------------------------------------ probes

    def readiness(self) -> tuple[bool, str]:
        role, jobs = self.role, self.jobs
        if role is Role.ACTIVE:
            if jobs is None:
                return False, "active: starting the jobs"
            ready, why = jobs.ready()
            return ready, f"active: {why}"
        if role is Role.FENCED:
            return False, f"fenced: {self.fenced_reason}; exiting"
        if role is Role.STOPPED:
            return False, "stopped"
        polled, error = self._polled_at, self._poll_error
        if polled is None:
            return False, "standby: not yet connected to the state database" + (f" ({error})" if error else "")
        age = self._clock() - polled
        limit = STALE_POLL_INTERVALS * self.poll_s + CHECK_TIMEOUT_S
        if age > limit:
            return False, f"standby: no successful look at the writer lock for {age:.0f}s ({error or 'no answer'})"
        return True, f"standby: the active replica is {self._active_hint}"

    def liveness(self) -> tuple[bool, str]:
        role, jobs = self.role, self.jobs
        if role is Role.ACTIVE and jobs is not None:
            return jobs.healthy()
        return True, role.value

    # ------------------------------------------------------------------ standby

    def request_stop(self) -> None:
        """SIGTERM while standing by: stop polling and exit (0)."""
        self._stop.set()

    async def wait_for_lock(self, *, install_signals: bool = True) -> WriterLock | None:
        """Stand by until this replica holds the writer lock (then it is active), or until a
        stop was requested (``None``). An unreachable database is logged and retried."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if install_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        told = False
        try:
            while not self._stop.is_set():
                try:
                    lock = await asyncio.to_thread(self._acquire, self.location)
                except FinopsError as exc:
                    if self._poll_error is None:  # logged when it starts failing, not every poll
                        log_event(self.log, logging.WARNING, "standby: cannot reach the state database", error=str(exc))
                    self._poll_error = str(exc)[:300]
                    lock = None
                else:
                    if self._poll_error is not None:
                        log_event(self.log, logging.INFO, "standby: the state database answers again")
                    self._polled_at = self._clock()
                    self._poll_error = None
                if lock is not None:
                    if self._stop.is_set():
                        lock.release()
                        return None
                    self._become_active()
                    return lock
                await asyncio.to_thread(self._standby_heartbeat)
                if not told:
                    log_event(
                        self.log,
                        logging.INFO,
                        "standing by: another replica holds the writer lock",
                        active=self._active_hint,
                        poll_s=self.poll_s,
                    )
                    told = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=self.poll_s)
            return None
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self._stop.is_set() and self.role is Role.STANDBY:
                self.stopped()

    def _on_signal(self, signum: int) -> None:
        log_event(self.log, logging.INFO, f"received {signal.Signals(signum).name} while standing by: stopping")
        self.request_stop()

    def _standby_heartbeat(self) -> None:
        if self.registry is None:
            return
        try:
            self.registry.heartbeat(Role.STANDBY)
            active = self.registry.active()
        except FinopsError:
            return  # the status rows are for people; the lock poll decides readiness
        if active is not None:
            ago = max(0.0, self._clock() - active.heartbeat_at)
            self._active_hint = f"{active.replica_id} (heard from {ago:.0f}s ago)"
        else:
            self._active_hint = "not known yet"

    def _become_active(self) -> None:
        self.role = Role.ACTIVE
        self.metrics.leader.set(1)
        self.metrics.leader_transitions.labels(to=Role.ACTIVE.value).inc()
        log_event(self.log, logging.INFO, "took the writer lock: this replica is active")
        self._heartbeat(Role.ACTIVE)

    # ------------------------------------------------------------------ active

    def activate(self, jobs: ActiveJobs) -> None:
        """The daemon this replica now runs (its probes answer for it)."""
        self.jobs = jobs

    async def watch(self, lock: WriterLock) -> None:
        """While active: prove every ``poll_s`` seconds that the lock is still held; when it
        is not (or the proof takes longer than ``check_timeout_s``), fence and stop."""
        while self.role is Role.ACTIVE:
            await self._sleep(self.poll_s)
            if self.role is not Role.ACTIVE:
                return
            try:
                held = await asyncio.wait_for(asyncio.to_thread(lock.held), timeout=self.check_timeout_s)
                why = "the state database session holding it ended (connection lost or terminated)"
            except TimeoutError:
                held, why = False, f"the lock's session did not answer within {self.check_timeout_s:g}s"
            if not held:
                lock.mark_lost()
                self.fence(why)
                return
            if self._beat is None or self._beat.done():  # never pile up behind a hung database
                self._beat = asyncio.ensure_future(asyncio.to_thread(self._heartbeat, Role.ACTIVE))

    def fence(self, reason: str) -> None:
        """The lock is lost: no further gateway write (the fence refuses them), stop the jobs."""
        if self.role is Role.FENCED:
            return
        self.role = Role.FENCED
        self.fenced_reason = f"lost the writer lock: {reason}"
        self.metrics.leader.set(0)
        self.metrics.leader_transitions.labels(to=Role.FENCED.value).inc()
        log_event(
            self.log,
            logging.ERROR,
            f"{self.fenced_reason}; another replica may be active now: no further gateway write from this one; "
            "stopping the jobs and exiting (the supervisor restarts it as a standby)",
        )
        if self.jobs is not None:
            self.jobs.stop(timeout_s=FENCED_STOP_S)
        # The database may be what failed: record it without ever waiting on it.
        threading.Thread(target=self._heartbeat, args=(Role.FENCED, self.fenced_reason), daemon=True).start()

    def stopped(self) -> None:
        if self.role is Role.ACTIVE or self.role is Role.STANDBY:
            self.role = Role.STOPPED
            self.metrics.leader.set(0)
            self._heartbeat(Role.STOPPED)

    def _heartbeat(self, role: Role, detail: str = "") -> None:
        if self.registry is None:
            return
        try:
            self.registry.heartbeat(role, detail)
        except FinopsError as exc:
            log_event(self.log, logging.WARNING, "cannot record this replica's heartbeat", error=str(exc)[:300])


__all__ = ["DEFAULT_POLL_S", "FENCED_STOP_S", "ActiveJobs", "Replica", "acquire_daemon_lock"]
