"""The daemon: a registry of periodic jobs, run by APScheduler in production and stepped
by hand in tests.

Every run of every job goes through one wrapper, ``Daemon.run_job``, which owns the rules
that matter: a job never overlaps itself (a second start while one runs is skipped and
folded into one re-run afterwards), jobs that write to the gateway take one in-process
write lock, failures are caught, logged and counted, and nothing new starts once shutdown
has begun. Only *when* jobs run differs between the two drivers:

- ``serve()``: an ``AsyncIOScheduler`` fires each job on an ``IntervalTrigger`` with jitter,
  ``max_instances=1`` and ``coalesce=True``. ``misfire_grace_time`` is ``None`` on purpose:
  after the process was suspended or the loop was busy past a slot, the job still runs
  (once, thanks to coalescing) however late. A level-triggered pass has nothing to catch up
  on per missed slot; it only needs to run again, and dropping late runs would leave the
  fleet unreconciled for another full interval.
- ``run_pending(now)`` / ``step()``: the same jobs, due times computed from an injected
  clock and RNG, run one after another. Tests call it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from controller.daemon.jobs import (
    BUILTIN_JOBS,
    ERROR,
    GIT_POLL,
    OK,
    RECONCILE,
    SKIPPED,
    SLOT_INTERVALS,
    JobFn,
    JobResult,
    JobSpec,
    SkipReason,
)
from controller.daemon.logs import LOGGER_NAME, log_event
from controller.daemon.metrics import DaemonMetrics
from controller.daemon.passes import PassResult, Reconciler, record_pass
from controller.errors import FinopsError
from controller.exitcodes import EXIT_ERROR, EXIT_OK
from controller.io.secretfile import write_secret_file

MISFIRE_GRACE_TIME: float | None = None
"""Late runs are never dropped; see the module docstring."""
DEFAULT_READY_INTERVALS = 3
DEFAULT_STOP_TIMEOUT_S = 90.0
"""How long SIGTERM waits for in-flight jobs before cancelling them (below the 120 s that the
systemd unit and the Kubernetes manifest in the README give before SIGKILL)."""
CANCEL_GRACE_S = 5.0

JobListener = Callable[[str, JobResult], None]


def default_jitter(interval_s: float) -> float:
    """10% of the interval, at most a minute: enough to spread many daemons' requests."""
    return min(interval_s * 0.1, 60.0)


class Daemon:
    """``finops run``: reconcile on an interval, poll git, and run other modules' jobs."""

    def __init__(
        self,
        reconciler: Reconciler,
        *,
        metrics: DaemonMetrics | None = None,
        interval_s: float = 60.0,
        jitter_s: float | None = None,
        git_poll_s: float = 30.0,
        ready_intervals: int = DEFAULT_READY_INTERVALS,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        log: logging.Logger | None = None,
        status_file: Path | None = None,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    ) -> None:
        if interval_s <= 0 or git_poll_s <= 0:
            raise ValueError("intervals must be positive")
        self.reconciler = reconciler
        self.metrics = metrics or DaemonMetrics()
        self.interval_s = float(interval_s)
        self.jitter_s = default_jitter(interval_s) if jitter_s is None else float(jitter_s)
        self.ready_intervals = ready_intervals
        self.clock = clock
        self.log = log or logging.getLogger(LOGGER_NAME)
        self.status_file = status_file
        self.stop_timeout_s = float(stop_timeout_s)
        self._job_started: dict[str, float] = {}
        """Clock time each running job's current run started (for the liveness deadline)."""
        self.forced_stop = False
        """True once a shutdown had to cancel jobs that outlived ``stop_timeout_s``."""
        self._rng = rng or random.Random()
        self._jobs: dict[str, JobSpec] = {}
        self._next_run: dict[str, float] = {}
        self._requested: set[str] = set()
        self._running: set[str] = set()
        self._rerun: set[str] = set()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._spawned: set[asyncio.Task[Any]] = set()
        self._write_lock = asyncio.Lock()
        self._stopping = False
        self._started = False
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._signals = 0
        self.listeners: list[JobListener] = []
        """Called as ``listener(job_name, result)`` after every job run (tests, hooks)."""
        self.status_hooks: list[Callable[[dict[str, Any]], None]] = []
        """Called with ``status()`` after every reconcile pass, besides the status file
        (the replica's row in the state database: ``controller.daemon.replicas``)."""
        self.last_pass: PassResult | None = None
        self.last_success_at: float | None = None
        self.last_results: dict[str, JobResult] = {}
        if reconciler.source.remote:
            self._register(
                JobSpec(GIT_POLL, self._git_poll, float(git_poll_s), 0.0, exclusive=False, run_at_start=True)
            )
        self._register(JobSpec(RECONCILE, self._reconcile, self.interval_s, self.jitter_s, True, run_at_start=True))

    # ------------------------------------------------------------------ registry

    def _register(self, spec: JobSpec) -> None:
        self._jobs[spec.name] = spec

    def add_job(
        self,
        name: str,
        fn: JobFn,
        interval_s: float | None = None,
        jitter_s: float | None = None,
        *,
        exclusive: bool = True,
        run_at_start: bool = False,
        deadline_s: float | None = None,
    ) -> JobSpec:
        """Schedule ``fn`` every ``interval_s`` seconds (+ up to ``jitter_s``) until shutdown.

        ``name`` is the job's label in logs and ``finops_job_runs_total``. The slots
        "alerts", "rotation" and "rebalance" have default intervals (60 s, 1 h, 15 min).
        ``exclusive`` jobs (the default: anything that writes to the gateway) never run at
        the same time as reconcile or each other; read-only jobs may pass ``False``.
        """
        if self._started:
            raise RuntimeError("add jobs before the daemon starts")
        if name in BUILTIN_JOBS or name in self._jobs:
            raise ValueError(f"a job named {name!r} is already registered")
        if interval_s is None:
            if name not in SLOT_INTERVALS:
                raise ValueError(f"job {name!r} needs an interval (only {sorted(SLOT_INTERVALS)} have defaults)")
            interval_s = SLOT_INTERVALS[name]
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        jitter = default_jitter(interval_s) if jitter_s is None else jitter_s
        spec = JobSpec(name, fn, float(interval_s), float(jitter), exclusive, run_at_start, deadline_s)
        self._register(spec)
        return spec

    @property
    def jobs(self) -> dict[str, JobSpec]:
        return dict(self._jobs)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------------ running one job

    def request(self, name: str) -> None:
        """Run ``name`` as soon as possible (a new git commit requests a reconcile)."""
        if name not in self._jobs:
            raise KeyError(name)
        self._requested.add(name)
        if self._scheduler is not None and self._loop is not None and not self._stopping:
            task = self._loop.create_task(self.run_job(name, reason="requested"))
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)

    async def run_job(self, name: str, *, reason: str = "schedule") -> JobResult:
        """Run one job now, under the daemon's rules (see the module docstring)."""
        spec = self._jobs[name]
        if self._stopping:
            return self._finish(name, JobResult.skipped("shutting down", SkipReason.STOPPING), quiet=True)
        if name in self._running:
            self._rerun.add(name)
            return self._finish(
                name, JobResult.skipped("previous run still in progress; will run again after it", SkipReason.BUSY)
            )
        self._running.add(name)
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            while True:
                self._requested.discard(name)
                self._rerun.discard(name)
                lock = self._write_lock if spec.exclusive else contextlib.nullcontext()
                async with lock:
                    result = await self._call(spec, reason)
                if name not in self._rerun or self._stopping:
                    return result
                reason = "requested during the previous run"
        finally:
            self._running.discard(name)
            if task is not None:
                self._inflight.discard(task)

    async def _call(self, spec: JobSpec, reason: str) -> JobResult:
        level = logging.INFO if spec.name == RECONCILE else logging.DEBUG
        log_event(self.log, level, f"{spec.name} started", job=spec.name, reason=reason)
        started = time.perf_counter()
        self._job_started[spec.name] = self.clock()
        try:
            result = await spec.fn()
        except FinopsError as exc:
            result = JobResult.error(str(exc))
        except Exception as exc:
            self.log.exception("job %s crashed", spec.name, extra={"finops_fields": {"job": spec.name}})
            result = JobResult.error(f"{type(exc).__name__}: {exc}")
        finally:
            self._job_started.pop(spec.name, None)
        return self._finish(spec.name, result, duration_s=time.perf_counter() - started)

    def _finish(
        self, name: str, result: JobResult, *, duration_s: float | None = None, quiet: bool = False
    ) -> JobResult:
        self.metrics.job_runs.labels(job=name, result=result.result).inc()
        self.last_results[name] = result
        if not quiet:
            if result.result == ERROR:
                level = logging.ERROR
            elif result.result == OK and name == GIT_POLL and not result.fields.get("new_revision"):
                level = logging.DEBUG
            elif result.result in (OK, SKIPPED):
                level = logging.INFO
            else:
                level = logging.WARNING
            fields = dict(result.fields)
            if duration_s is not None:
                fields.setdefault("duration_s", round(duration_s, 3))
            log_event(
                self.log,
                level,
                f"{name} {'skipped' if result.result == SKIPPED else 'finished'}: {result.message or result.result}",
                job=name,
                result=result.result,
                **fields,
            )
        for listener in list(self.listeners):
            listener(name, result)
        return result

    # ------------------------------------------------------------------ built-in jobs

    async def _reconcile(self) -> JobResult:
        try:
            result = await self.reconciler.run()
        except Exception:  # a bug, not an outcome: count it, let run_job log the traceback
            self.metrics.reconcile_total.labels(result=ERROR).inc()
            raise
        self.last_pass = result
        if result.completed:
            self.last_success_at = self.clock()
            self.metrics.last_success.set(self.last_success_at)
        record_pass(self.metrics, result)
        self._write_status()
        return result.to_job_result()

    async def _git_poll(self) -> JobResult:
        head = await self.reconciler.source.fetch()
        # Before the first pass has run there is nothing to bring forward: it is due anyway.
        if head != self.reconciler.seen_revision and RECONCILE in self.last_results:
            self.request(RECONCILE)
            return JobResult.success("new revision; reconcile requested", revision=head, new_revision=True)
        return JobResult.success("no new revision", revision=head)

    # ------------------------------------------------------------------ stepping (tests)

    def _draw_jitter(self, spec: JobSpec) -> float:
        return self._rng.uniform(0, spec.jitter_s) if spec.jitter_s > 0 else 0.0

    def next_run_times(self) -> dict[str, float]:
        return dict(self._next_run)

    async def run_pending(self, now: float | None = None) -> dict[str, JobResult]:
        """Run every job due at ``now`` (default: the clock), each at most once, in
        registration order; a job requested meanwhile (a new commit) runs in the same call.
        The first call treats ``run_at_start`` jobs as due and schedules the others."""
        now = self.clock() if now is None else now
        for spec in self._jobs.values():
            if spec.name not in self._next_run:
                start = now if spec.run_at_start else now + spec.interval_s + self._draw_jitter(spec)
                self._next_run[spec.name] = start
        ran: dict[str, JobResult] = {}
        while not self._stopping:
            due = [
                s
                for s in self._jobs.values()
                if s.name not in ran and (s.name in self._requested or self._next_run[s.name] <= now)
            ]
            if not due:
                break
            spec = due[0]
            if self._next_run[spec.name] <= now:
                self._next_run[spec.name] = now + spec.interval_s + self._draw_jitter(spec)
            reason = "requested" if spec.name in self._requested else "schedule"
            ran[spec.name] = await self.run_job(spec.name, reason=reason)
        return ran

    async def step(self) -> dict[str, JobResult]:
        return await self.run_pending(self.clock())

    # ------------------------------------------------------------------ readiness and status

    def ready(self, now: float | None = None) -> tuple[bool, str]:
        """Ready when the newest manifests are valid and a pass completed recently."""
        now = self.clock() if now is None else now
        rec = self.reconciler
        if not rec.manifest_valid:
            first = rec.manifest_errors[0] if rec.manifest_errors else "invalid"
            return False, f"manifest revision {rec.seen_revision} is invalid ({first})"
        if rec.awaiting is not None:
            return False, rec.awaiting.reason(rec.good_revision)
        if self.last_success_at is None:
            return False, "no reconcile pass has completed yet"
        age = now - self.last_success_at
        limit = self.ready_intervals * self.interval_s + self.jitter_s
        if age > limit:
            return False, f"last completed reconcile was {age:.0f}s ago (limit {limit:.0f}s)"
        return True, f"last reconcile completed {age:.0f}s ago at revision {rec.good_revision}"

    def healthy(self, now: float | None = None) -> tuple[bool, str]:
        """Live unless a job has been running past its deadline (``JobSpec.deadline``): then
        the process is stuck, and ``/healthz`` answers 503 so a supervisor restarts it.
        Called from the metrics thread, so it reads a snapshot and never waits on the loop."""
        now = self.clock() if now is None else now
        overdue = []
        for name, started in sorted(dict(self._job_started).items()):
            spec = self._jobs.get(name)
            if spec is not None and now - started > spec.deadline:
                overdue.append(f"{name} has been running for {now - started:.0f}s (deadline {spec.deadline:.0f}s)")
        if overdue:
            return False, "stuck: " + "; ".join(overdue)
        running = sorted(self._job_started)
        return True, f"running: {', '.join(running)}" if running else "idle"

    def status(self) -> dict[str, Any]:
        now = self.clock()
        ready, why = self.ready(now)
        return {
            "updated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "target": self.reconciler.target,
            "source": self.reconciler.source.label,
            "applied_revision": self.reconciler.good_revision,
            "seen_revision": self.reconciler.seen_revision,
            "manifest_valid": self.reconciler.manifest_valid,
            "manifest_errors": list(self.reconciler.manifest_errors),
            "awaiting_approval": self.reconciler.awaiting.to_dict() if self.reconciler.awaiting else None,
            "ready": ready,
            "ready_reason": why,
            "last_success_at": self.last_success_at,
            "last_pass": self.last_pass.to_dict() if self.last_pass else None,
            "backoff": self.reconciler.backoff.snapshot(now),
        }

    def _write_status(self) -> None:
        if self.status_hooks:
            status = self.status()
            for hook in list(self.status_hooks):
                try:
                    hook(status)
                except Exception as exc:  # status is for people: never fail a pass over it
                    log_event(self.log, logging.WARNING, "cannot record the daemon status", error=str(exc)[:300])
        if self.status_file is None:
            return
        try:
            write_secret_file(self.status_file, json.dumps(self.status(), indent=2, default=str) + "\n")
        except OSError as exc:
            log_event(
                self.log,
                logging.WARNING,
                "cannot write the status file",
                path=str(self.status_file),
                error=exc.strerror,
            )

    # ------------------------------------------------------------------ production loop

    def build_scheduler(self) -> AsyncIOScheduler:
        """The APScheduler wiring, not started (``serve`` starts it; tests inspect it)."""
        scheduler = AsyncIOScheduler(timezone=UTC)
        for spec in self._jobs.values():
            scheduler.add_job(
                self.run_job,
                trigger=IntervalTrigger(seconds=spec.interval_s, jitter=spec.jitter_s or None, timezone=UTC),
                args=[spec.name],
                id=spec.name,
                name=spec.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=MISFIRE_GRACE_TIME,
                replace_existing=True,
            )
        return scheduler

    def stop(self, *, timeout_s: float | None = None) -> None:
        """Begin a graceful shutdown: start nothing new, let in-flight jobs finish (within
        ``timeout_s``, default ``stop_timeout_s``; then they are cancelled)."""
        if timeout_s is not None:
            self.stop_timeout_s = min(self.stop_timeout_s, float(timeout_s))
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log_event(
                self.log,
                logging.INFO,
                f"received {name}: stopping; in-flight jobs finish first (send again to force exit)",
                signal=name,
                in_flight=sorted(self._running),
            )
            self.stop()
            return
        log_event(
            self.log,
            logging.WARNING,
            f"received {name} again: forcing exit",
            signal=name,
            in_flight=sorted(self._running),
        )
        for handler in self.log.handlers:
            handler.flush()
        os._exit(128 + signum)

    async def _startup(self) -> list[JobResult]:
        results = []
        for spec in self._jobs.values():
            if spec.run_at_start and not self._stopping:
                results.append(await self.run_job(spec.name, reason="startup"))
        return results

    async def serve(self, *, once: bool = False, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (or ``stop()``); with ``once``, run the start-up jobs
        (git poll, reconcile) a single time. Returns the process exit code."""
        self._started = True
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        signals = (signal.SIGTERM, signal.SIGINT) if install_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        log_event(
            self.log,
            logging.INFO,
            "daemon started" if not once else "single pass started",
            pid=os.getpid(),
            target=self.reconciler.target,
            source=self.reconciler.source.label,
            interval_s=self.interval_s,
            jobs=sorted(self._jobs),
        )
        exit_code = EXIT_OK
        try:
            if once:
                startup = loop.create_task(self._startup())
                stopped = loop.create_task(self._stop_event.wait())
                await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                await self._drain(startup)
                results = startup.result() if startup.done() and not startup.cancelled() else []
                # A job with nothing to do (no fleet declares rebalancing) is not a failure;
                # one that failed, or did not run because of a shutdown, is.
                # Enforcing the last good revision while the newest one is refused is not a
                # success either: cron must hear about the invalid commit.
                failed = any(not r.succeeded for r in results) or not self.reconciler.manifest_valid
                if not results or self._stopping or failed:
                    exit_code = EXIT_ERROR
            else:
                scheduler = self.build_scheduler()
                self._scheduler = scheduler
                scheduler.start()
                startup = loop.create_task(self._startup())
                await self._stop_event.wait()
                scheduler.pause()
                await self._drain(startup)
                scheduler.shutdown(wait=False)
                self._scheduler = None
            if self.forced_stop:
                exit_code = EXIT_ERROR
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        log_event(self.log, logging.INFO, "shutdown complete", exit_code=exit_code)
        return exit_code

    async def _drain(self, *extra: asyncio.Task[Any]) -> None:
        """Wait for in-flight jobs, at most ``stop_timeout_s`` once a stop was requested;
        then cancel them (their durable intents make the next run safe) so a stuck job can
        never keep the process from exiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout_s

        def pending() -> set[asyncio.Task[Any]]:
            return {t for t in (*self._inflight, *self._spawned, *extra) if not t.done()}

        waiting = pending()
        if waiting:
            log_event(self.log, logging.INFO, "waiting for in-flight jobs", jobs=sorted(self._running))
        while waiting:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            await asyncio.wait(waiting, timeout=timeout)
            waiting = pending()
        if not waiting:
            return
        self.forced_stop = True
        log_event(
            self.log,
            logging.WARNING,
            f"in-flight jobs did not finish within {self.stop_timeout_s:.0f}s of the stop: cancelling them",
            jobs=sorted(self._running),
        )
        for task in waiting:
            task.cancel()
        await asyncio.wait(waiting, timeout=CANCEL_GRACE_S)
