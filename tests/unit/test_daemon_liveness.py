"""The daemon can always be stopped and always tells the truth about being stuck:
``/healthz`` fails once a job runs past its deadline, SIGTERM ends a stuck job after the stop
timeout, and ``--once`` treats a job with nothing to do as a success."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from controller.daemon.jobs import JOB_DEADLINE_FLOOR_S, JobResult, SkipReason, job_deadline
from controller.daemon.metrics import MetricsServer
from controller.io.blocking import off_loop
from tests.unit.test_daemon_scheduler import FakeClock, FakeReconciler, make


@pytest.mark.parametrize(
    ("skip", "code"),
    [(SkipReason.IDLE, 0), (SkipReason.NOT_READY, 1), (SkipReason.BUSY, 1), (SkipReason.STOPPING, 1)],
)
async def test_once_exit_code_depends_on_why_a_job_was_skipped(skip: SkipReason, code: int) -> None:
    daemon = make(rec=FakeReconciler("ok"))

    async def rebalance() -> JobResult:
        return JobResult.skipped("no fleet declares rebalancing", skip)

    daemon.add_job("rebalance", rebalance, run_at_start=True)
    assert await daemon.serve(once=True, install_signals=False) == code


async def test_once_fails_when_any_job_fails_even_if_reconcile_succeeded() -> None:
    daemon = make(rec=FakeReconciler("ok"))

    async def alerts() -> JobResult:
        return JobResult.partial("a receiver is down")

    daemon.add_job("alerts", alerts, run_at_start=True)
    assert await daemon.serve(once=True, install_signals=False) == 1


def test_deadlines_are_a_multiple_of_the_interval_with_a_floor() -> None:
    assert job_deadline(60) == JOB_DEADLINE_FLOOR_S
    assert job_deadline(3600) == 3 * 3600
    daemon = make()
    assert daemon.add_job("rotation", _never_called).deadline == JOB_DEADLINE_FLOOR_S  # every 60 s
    assert daemon.add_job("rebalance", _never_called, interval_s=3600).deadline == 3 * 3600
    assert daemon.add_job("alerts", _never_called, deadline_s=5).deadline == 5


async def _never_called() -> JobResult:  # pragma: no cover - only registered
    raise AssertionError


async def test_healthz_fails_while_a_job_runs_past_its_deadline() -> None:
    clock = FakeClock()
    rec = FakeReconciler()
    rec.gate = asyncio.Event()
    daemon = make(clock, rec)
    with MetricsServer(daemon.metrics, daemon.ready, liveness=daemon.healthy, port=0) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/healthz")).status_code == 200
            stepping = asyncio.create_task(daemon.step())
            await rec.started.wait()
            clock.advance(JOB_DEADLINE_FLOOR_S - 1)
            ok = await http.get("/healthz")
            assert ok.status_code == 200 and "running: reconcile" in ok.text
            clock.advance(2)
            stuck = await http.get("/healthz")
            assert stuck.status_code == 503
            assert "reconcile has been running for 901s (deadline 900s)" in stuck.text
            rec.gate.set()
            await stepping
            assert (await http.get("/healthz")).status_code == 200


async def test_sigterm_stops_the_daemon_even_when_a_job_is_stuck() -> None:
    """The job blocks a thread forever (what a read of a FIFO used to do); the signal is still
    handled at once, the job is cancelled after the stop timeout, and serve returns."""
    release = threading.Event()
    rec = FakeReconciler()
    started = asyncio.Event()

    async def stuck_pass() -> object:
        started.set()
        await off_loop(release.wait)
        raise AssertionError("never released")

    rec.run = stuck_pass  # type: ignore[method-assign]
    daemon = make(rec=rec, stop_timeout_s=0.3)
    try:
        serving = asyncio.create_task(daemon.serve())
        await started.wait()
        began = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the loop
        code = await asyncio.wait_for(serving, timeout=10)
        assert time.monotonic() - began < 5
        assert code == 1 and daemon.forced_stop
    finally:
        release.set()


async def test_a_job_that_finishes_within_the_stop_timeout_is_not_cancelled() -> None:
    rec = FakeReconciler()
    rec.gate = asyncio.Event()
    daemon = make(rec=rec, stop_timeout_s=30)
    serving = asyncio.create_task(daemon.serve(install_signals=False))
    await rec.started.wait()
    daemon.stop()
    await asyncio.sleep(0)
    rec.gate.set()
    assert await serving == 0 and not daemon.forced_stop and rec.finished == 1
