"""The replica's roles (``controller.daemon.leader``) with a fake lock and fake jobs, and the
replica rows (``controller.daemon.replicas``) on the embedded SQLite backend. The real lock
on a real PostgreSQL server, with real processes, is ``tests/integration/test_ha.py``."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from controller.daemon.leader import FENCED_STOP_S, Replica
from controller.daemon.metrics import DaemonMetrics
from controller.daemon.replicas import ReplicaIdentity, ReplicaRegistry, Role, replica_statuses
from controller.state.db import StateUnavailable
from controller.state.location import StateLocation
from controller.state.lock import Fenced, WriterLock


class FakeLock(WriterLock):
    backend = "fake"

    def __init__(self, answers: list[bool] | None = None, hang: threading.Event | None = None) -> None:
        super().__init__("finops run", "fake")
        self.answers = list(answers or [])
        self.hang = hang
        self.lost = False
        self.released = False

    def held(self) -> bool:
        if self.hang is not None:
            self.hang.wait(10)
        if self.lost:
            return False
        return self.answers.pop(0) if self.answers else True

    def mark_lost(self) -> None:
        self.lost = True

    def release(self) -> None:
        self.released = True


class FakeJobs:
    def __init__(self) -> None:
        self.stops: list[float | None] = []

    def ready(self, now: float | None = None) -> tuple[bool, str]:
        return True, "last reconcile completed 1s ago"

    def healthy(self, now: float | None = None) -> tuple[bool, str]:
        return True, "idle"

    def stop(self, *, timeout_s: float | None = None) -> None:
        self.stops.append(timeout_s)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def registry(tmp_path: Path, clock: Clock, name: str = "me") -> ReplicaRegistry:
    return ReplicaRegistry(tmp_path / "state.db", ReplicaIdentity(f"host/{name}", "host", 1), clock=clock)


def sample(metrics: DaemonMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_standby_is_ready_not_leader_until_it_takes_the_lock(tmp_path: Path) -> None:
    clock, metrics = Clock(), DaemonMetrics()
    lock = FakeLock()
    answers: list[WriterLock | None] = [None, None, lock]
    seen: list[tuple[bool, str, float]] = []
    other = registry(tmp_path, clock, "other")
    other.heartbeat(Role.ACTIVE)

    def acquire(_: StateLocation) -> WriterLock | None:
        if seen or answers[0] is None:
            seen.append((*replica.readiness(), sample(metrics, "finops_leader")))
        return answers.pop(0)

    with registry(tmp_path, clock) as rows:
        replica = Replica(
            StateLocation(tmp_path / "state.db"), metrics=metrics, registry=rows, poll_s=0.001, acquire=acquire,
            clock=clock,
        )  # fmt: skip
        assert replica.readiness()[0] is False  # not yet connected to the state database
        got = await replica.wait_for_lock(install_signals=False)
        assert got is lock and replica.role is Role.ACTIVE
        assert seen[0][0] is False and all(ready for ready, _, _ in seen[1:])
        assert all("standby: the active replica is host/other" in why for _, why, _ in seen[1:])
        assert {leader for _, _, leader in seen} == {0.0}
        assert sample(metrics, "finops_leader") == 1
        assert sample(metrics, "finops_leader_transitions_total", to="active") == 1
        replica.activate(FakeJobs())
        assert replica.readiness() == (True, "active: last reconcile completed 1s ago")
        mine = next(r for r in rows.replicas() if r.replica_id == "host/me")
        assert mine.role is Role.ACTIVE and mine.active_since == clock.now
    other.close()


async def test_an_unreachable_database_makes_a_standby_not_ready_until_it_answers_again(tmp_path: Path) -> None:
    clock, metrics = Clock(), DaemonMetrics()
    calls = {"n": 0}
    views: list[tuple[bool, str]] = []

    def acquire(_: StateLocation) -> WriterLock | None:
        calls["n"] += 1
        if calls["n"] == 1:
            return None  # reachable, lock taken by someone else
        if calls["n"] <= 3:
            clock.now += 60  # the database stays away for minutes
            views.append(replica.readiness())
            raise StateUnavailable("state database postgresql://h/db is unavailable: connection refused")
        views.append(replica.readiness())
        return FakeLock()

    replica = Replica(StateLocation(tmp_path / "s.db"), metrics=metrics, poll_s=0.001, acquire=acquire, clock=clock)
    assert await replica.wait_for_lock(install_signals=False) is not None
    assert views[0][0] is False and "no successful look at the writer lock" in views[0][1]
    assert "connection refused" in views[-1][1]


async def test_losing_the_lock_fences_at_once_and_stops_the_jobs(tmp_path: Path) -> None:
    metrics = DaemonMetrics()
    lock = FakeLock(answers=[True, True, False])
    replica = Replica(
        StateLocation(tmp_path / "s.db"), metrics=metrics, poll_s=1, sleep=no_sleep, acquire=lambda _: lock
    )
    assert await replica.wait_for_lock(install_signals=False) is lock
    jobs = FakeJobs()
    replica.activate(jobs)
    await asyncio.wait_for(replica.watch(lock), 5)
    assert replica.role is Role.FENCED and lock.lost
    assert jobs.stops == [FENCED_STOP_S]
    assert sample(metrics, "finops_leader") == 0
    assert sample(metrics, "finops_leader_transitions_total", to="fenced") == 1
    ready, why = replica.readiness()
    assert not ready and why.startswith("fenced: lost the writer lock")
    with pytest.raises(Fenced):
        lock.check()  # the gateway client's fence refuses every further write


async def test_a_lock_check_that_gets_no_answer_counts_as_lost(tmp_path: Path) -> None:
    hang = threading.Event()
    lock = FakeLock(hang=hang)
    replica = Replica(
        StateLocation(tmp_path / "s.db"),
        metrics=DaemonMetrics(),
        poll_s=1,
        check_timeout_s=0.05,
        sleep=no_sleep,
        acquire=lambda _: lock,
    )
    await replica.wait_for_lock(install_signals=False)
    jobs = FakeJobs()
    replica.activate(jobs)
    try:
        await asyncio.wait_for(replica.watch(lock), 5)
    finally:
        hang.set()
    assert replica.role is Role.FENCED and lock.lost and jobs.stops == [FENCED_STOP_S]
    assert replica.fenced_reason is not None and "did not answer within 0.05s" in replica.fenced_reason


async def test_a_stop_while_standing_by_returns_no_lock(tmp_path: Path) -> None:
    def acquire(_: StateLocation) -> WriterLock | None:
        replica.request_stop()
        return None

    replica = Replica(StateLocation(tmp_path / "s.db"), metrics=DaemonMetrics(), poll_s=30, acquire=acquire)
    assert await asyncio.wait_for(replica.wait_for_lock(install_signals=False), 5) is None
    assert replica.role is Role.STOPPED and replica.readiness() == (False, "stopped")


async def test_a_lock_won_after_a_stop_was_requested_is_given_back(tmp_path: Path) -> None:
    lock = FakeLock()

    def acquire(_: StateLocation) -> WriterLock | None:
        replica.request_stop()
        return lock

    replica = Replica(StateLocation(tmp_path / "s.db"), metrics=DaemonMetrics(), poll_s=30, acquire=acquire)
    assert await replica.wait_for_lock(install_signals=False) is None
    assert lock.released and replica.role is Role.STOPPED


def test_replica_rows_heartbeat_pass_and_pruning(tmp_path: Path) -> None:
    clock = Clock()
    with registry(tmp_path, clock, "a") as a, registry(tmp_path, clock, "b") as b:
        a.heartbeat(Role.STANDBY)
        b.heartbeat(Role.ACTIVE)
        assert a.active() is not None and a.active().replica_id == "host/b"  # type: ignore[union-attr]
        assert b.active() is None  # itself does not count
        clock.now += 5
        b.record_pass(result="ok", at=clock.now, last_success_at=clock.now, status={"planned": 0})
        rows = {r.replica_id: r for r in replica_statuses(tmp_path / "state.db")}
        assert rows["host/b"].last_pass_result == "ok" and rows["host/b"].status == {"planned": 0}
        assert rows["host/b"].active_since == 1_000.0 and rows["host/b"].heartbeat_at == 1_005.0
        b.heartbeat(Role.STANDBY)
        assert a.active() is None
        clock.now += 8 * 86_400
        a.heartbeat(Role.STANDBY)
        assert a.forget_stale() == 1
        assert [r.replica_id for r in a.replicas()] == ["host/a"]
