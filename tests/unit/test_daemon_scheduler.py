"""The daemon's job registry and its two drivers: stepped with an injected clock (tests) and
APScheduler (production). The reconcile pass is replaced by a stand-in here; the real one
runs against the sandbox in tests/integration/test_daemon.py."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta
from random import Random

import pytest

from controller.daemon.backoff import AgentBackoff
from controller.daemon.jobs import JobResult
from controller.daemon.passes import PassResult
from controller.daemon.scheduler import MISFIRE_GRACE_TIME, Daemon


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSource:
    remote = False
    versioned = False
    label = "fake"


class FakeReconciler:
    """Stands in for ``Reconciler``: ``result`` decides the pass outcome; ``gate`` can hold it."""

    def __init__(self, result: str = "ok") -> None:
        self.source = FakeSource()
        self.target = "fake"
        self.result = result
        self.runs = 0
        self.finished = 0
        self.manifest_valid = True
        self.manifest_errors: tuple[str, ...] = ()
        self.seen_revision: str | None = "r1"
        self.good_revision: str | None = "r1"
        self.backoff = AgentBackoff()
        self.desired = None
        self.awaiting = None
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def run(self) -> PassResult:
        self.runs += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        self.finished += 1
        return PassResult(
            result=self.result,
            message="stand-in pass",
            revision="r1",
            seen_revision="r1",
            manifest_valid=self.manifest_valid,
            planned=0,
        )


def make(clock: FakeClock | None = None, rec: FakeReconciler | None = None, **kw: object) -> Daemon:
    kw.setdefault("interval_s", 60.0)
    kw.setdefault("jitter_s", 0.0)
    return Daemon(rec or FakeReconciler(), clock=clock or FakeClock(), rng=Random(7), **kw)  # type: ignore[arg-type]


def counter(calls: list[str], name: str, result: JobResult | None = None):  # type: ignore[no-untyped-def]
    async def job() -> JobResult:
        calls.append(name)
        return result or JobResult.success()

    return job


def runs(daemon: Daemon, job: str, result: str) -> float:
    value = daemon.metrics.registry.get_sample_value("finops_job_runs_total", {"job": job, "result": result})
    return value or 0.0


async def test_first_step_runs_start_jobs_and_schedules_the_others_one_interval_later() -> None:
    clock = FakeClock(1_000.0)
    daemon = make(clock)
    calls: list[str] = []
    daemon.add_job("alerts", counter(calls, "alerts"))  # slot default: 60 s, jitter up to 6 s
    daemon.add_job("rotation", counter(calls, "rotation"), jitter_s=0)
    ran = await daemon.step()
    assert list(ran) == ["reconcile"] and calls == []
    due = daemon.next_run_times()
    assert due["reconcile"] == 1_060.0
    assert due["rotation"] == 1_000.0 + 60.0  # often enough to retry within a key's 300 s grace
    assert 1_060.0 <= due["alerts"] <= 1_066.0


async def test_a_job_runs_when_due_and_not_before() -> None:
    clock = FakeClock()
    daemon = make(clock)
    calls: list[str] = []
    daemon.add_job("rebalance", counter(calls, "rebalance"), jitter_s=0)
    await daemon.step()
    clock.advance(899)
    assert "rebalance" not in await daemon.step()
    clock.advance(1)
    assert (await daemon.step())["rebalance"].ok
    assert calls == ["rebalance"]
    assert runs(daemon, "rebalance", "ok") == 1


async def test_missed_slots_coalesce_into_one_run() -> None:
    clock = FakeClock()
    daemon = make(clock)
    calls: list[str] = []
    daemon.add_job("alerts", counter(calls, "alerts"), jitter_s=0)
    await daemon.step()
    clock.advance(5 * 60)  # the process was suspended for five slots
    await daemon.step()
    assert calls == ["alerts"]
    assert daemon.next_run_times()["alerts"] == clock.now + 60


async def test_jitter_comes_from_the_injected_rng_and_stays_within_bounds() -> None:
    first = make(FakeClock(0.0), interval_s=60.0, jitter_s=10.0)
    second = make(FakeClock(0.0), interval_s=60.0, jitter_s=10.0)
    await first.step()
    await second.step()
    schedule = first.next_run_times()
    assert schedule == second.next_run_times()  # same seed, same schedule
    assert 60.0 <= schedule["reconcile"] <= 70.0


async def test_a_crashing_job_is_contained_logged_and_counted() -> None:
    clock = FakeClock()
    daemon = make(clock)
    calls: list[str] = []

    async def broken() -> JobResult:
        raise RuntimeError("boom")

    daemon.add_job("alerts", broken, jitter_s=0)
    daemon.add_job("rebalance", counter(calls, "rebalance"), 60, jitter_s=0)
    await daemon.step()
    clock.advance(60)
    ran = await daemon.step()
    assert ran["alerts"].result == "error" and "RuntimeError: boom" in ran["alerts"].message
    assert ran["rebalance"].ok and calls == ["rebalance"]
    assert runs(daemon, "alerts", "error") == 1
    clock.advance(60)
    assert (await daemon.step())["alerts"].result == "error"  # and it keeps its schedule


async def test_a_job_never_overlaps_itself_and_overlapping_starts_fold_into_one_rerun() -> None:
    daemon = make()
    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    async def slow() -> JobResult:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        return JobResult.success()

    daemon.add_job("rebalance", slow, 900, 0)
    first = asyncio.create_task(daemon.run_job("rebalance"))
    await started.wait()
    for _ in range(3):
        assert (await daemon.run_job("rebalance")).result == "skipped"
    gate.set()
    assert (await first).ok
    assert calls == 2  # the running one, then exactly one re-run for the three skipped starts
    assert runs(daemon, "rebalance", "skipped") == 3


async def test_exclusive_jobs_never_interleave_but_read_only_jobs_may() -> None:
    daemon = make()
    gate, a_started = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def writer_a() -> JobResult:
        order.append("a-start")
        a_started.set()
        await gate.wait()
        order.append("a-end")
        return JobResult.success()

    async def writer_b() -> JobResult:
        order.append("b")
        return JobResult.success()

    async def reader() -> JobResult:
        order.append("read")
        return JobResult.success()

    daemon.add_job("rebalance", writer_a, 900, 0)
    daemon.add_job("rotation", writer_b, 3600, 0)
    daemon.add_job("alerts", reader, 60, 0, exclusive=False)
    task_a = asyncio.create_task(daemon.run_job("rebalance"))
    await a_started.wait()
    task_b = asyncio.create_task(daemon.run_job("rotation"))
    await daemon.run_job("alerts")  # runs to completion while writer a holds the write lock
    assert order == ["a-start", "read"] and not task_b.done()
    gate.set()
    await asyncio.gather(task_a, task_b)
    assert order == ["a-start", "read", "a-end", "b"]


async def test_a_requested_job_runs_at_the_next_step_even_when_not_due() -> None:
    clock = FakeClock()
    daemon = make(clock)
    calls: list[str] = []
    daemon.add_job("rebalance", counter(calls, "rebalance"), jitter_s=0)
    await daemon.step()
    daemon.request("rebalance")
    assert "rebalance" in await daemon.step()
    assert "rebalance" not in await daemon.step()  # a request runs once
    with pytest.raises(KeyError):
        daemon.request("nope")


def test_add_job_slots_defaults_and_refusals() -> None:
    daemon = make()

    async def job() -> JobResult:
        return JobResult.success()

    assert daemon.add_job("alerts", job).interval_s == 60
    assert daemon.add_job("rotation", job).interval_s == 60
    assert daemon.add_job("rebalance", job).interval_s == 900
    assert daemon.add_job("custom", job, 5, 0).interval_s == 5
    with pytest.raises(ValueError, match="needs an interval"):
        daemon.add_job("other", job)
    with pytest.raises(ValueError, match="already registered"):
        daemon.add_job("alerts", job)
    with pytest.raises(ValueError, match="already registered"):
        daemon.add_job("reconcile", job, 10)
    with pytest.raises(ValueError, match="positive"):
        daemon.add_job("zero", job, 0)


async def test_after_stop_nothing_new_starts() -> None:
    clock = FakeClock()
    daemon = make(clock)
    calls: list[str] = []
    daemon.add_job("alerts", counter(calls, "alerts"), jitter_s=0)
    daemon.stop()
    assert (await daemon.run_job("alerts")).result == "skipped"
    assert await daemon.step() == {}
    assert calls == []


def test_the_apscheduler_wiring_never_overlaps_coalesces_and_never_drops_late_runs() -> None:
    daemon = make(interval_s=60.0, jitter_s=6.0)

    async def job() -> JobResult:
        return JobResult.success()

    daemon.add_job("rebalance", job)
    scheduler = daemon.build_scheduler()
    jobs = {j.id: j for j in scheduler.get_jobs()}
    assert set(jobs) == {"reconcile", "rebalance"}
    for job_ in jobs.values():
        assert job_.max_instances == 1
        assert job_.coalesce is True
        assert job_.misfire_grace_time is MISFIRE_GRACE_TIME is None
    assert jobs["reconcile"].trigger.interval == timedelta(seconds=60)
    assert jobs["reconcile"].trigger.jitter == 6.0
    assert jobs["rebalance"].trigger.interval == timedelta(seconds=900)
    assert jobs["rebalance"].args == ("rebalance",)


async def test_readiness_needs_valid_manifests_and_a_recent_pass() -> None:
    clock = FakeClock()
    rec = FakeReconciler()
    daemon = make(clock, rec, interval_s=60.0, jitter_s=0.0)
    ready, why = daemon.ready()
    assert not ready and "no reconcile" in why
    await daemon.step()
    assert daemon.ready()[0]
    clock.advance(3 * 60)
    assert daemon.ready()[0]
    clock.advance(1)
    ready, why = daemon.ready()
    assert not ready and "181s ago" in why
    await daemon.step()
    assert daemon.ready()[0]
    rec.manifest_valid, rec.manifest_errors = False, ("m.yaml:3: spec: bad",)
    ready, why = daemon.ready()
    assert not ready and "m.yaml:3" in why


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.waiting = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.getMessage() == "waiting for in-flight jobs":
            self.waiting.set()


async def test_serve_stops_scheduling_and_lets_the_in_flight_pass_finish() -> None:
    rec = FakeReconciler()
    rec.gate = asyncio.Event()
    log = logging.getLogger("test.daemon.serve")
    log.setLevel(logging.INFO)
    capture = Capture()
    log.addHandler(capture)
    daemon = Daemon(rec, interval_s=3600, jitter_s=0, log=log)  # type: ignore[arg-type]
    serving = asyncio.create_task(daemon.serve(install_signals=False))
    await rec.started.wait()  # the start-up pass is in flight
    daemon.stop()
    await capture.waiting.wait()
    assert not serving.done() and rec.finished == 0
    rec.gate.set()
    assert await serving == 0
    assert rec.runs == rec.finished == 1  # finished, not cancelled, and nothing new started
    assert capture.messages[-1] == "shutdown complete"


async def test_serve_once_exit_code_follows_the_pass() -> None:
    assert await make(rec=FakeReconciler("ok")).serve(once=True, install_signals=False) == 0
    assert await make(rec=FakeReconciler("partial")).serve(once=True, install_signals=False) == 1


def test_a_second_signal_forces_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr("controller.daemon.scheduler.os._exit", exits.append)
    daemon = make()
    daemon._on_signal(signal.SIGTERM)
    assert daemon.stopping and exits == []
    daemon._on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


async def test_a_crashing_pass_is_counted_as_an_error_pass() -> None:
    rec = FakeReconciler()

    async def broken() -> PassResult:
        raise RuntimeError("bug")

    rec.run = broken  # type: ignore[method-assign]
    daemon = make(rec=rec)
    result = (await daemon.step())["reconcile"]
    assert result.result == "error" and "bug" in result.message
    assert daemon.metrics.registry.get_sample_value("finops_reconcile_total", {"result": "error"}) == 1
