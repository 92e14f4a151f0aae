"""The scheduled reconcilers as daemon jobs, stepped with an injected clock: rebalancing
moves budget and the reconcile pass that follows keeps it; rotation and alerts run as jobs."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from controller.alerting.deliver import DEFAULT_POLICY
from controller.daemon.command import DaemonContext
from controller.daemon.scheduled import alerts_job, rebalance_job, rotation_job
from controller.daemon.source import DirectorySource
from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed
from controller.io.target import Target
from controller.reconcile.status import fleet_status
from controller.sandbox.store import to_atomic
from tests.integration.conftest import FinopsClock, Harness
from tests.integration.test_daemon import Rig, budget, rig_factory
from tests.integration.test_keys import manager

GATEWAY_GRACE_S = 300
"""How long the gateway keeps accepting a rotated-out key (API.md)."""

__all__ = ["rig_factory"]  # the fixture, re-exported for pytest


def _context(rig: Rig, harness: Harness, tmp_path: Path) -> DaemonContext:
    target = Target("sandbox", harness.sandbox.url, harness.sandbox.admin_key, embedded=False, state_dir=tmp_path)
    return DaemonContext(
        daemon=rig.daemon,
        target=target,
        store=harness.store,
        sink=harness.sink,
        metrics=rig.metrics,
        client_factory=harness.client,
    )


def _spend(harness: Harness, agent: str, usd: str) -> None:
    harness.sandbox.store.record_usage_and_charge(
        agent, "best_match", to_atomic(Decimal(usd) * 100), None, now=harness.sandbox.clock()
    )


async def test_rebalance_job_moves_budget_and_the_next_reconcile_keeps_it(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness, tmp_path: Path
) -> None:
    rig = rig_factory(DirectorySource(manifests_dir))
    ctx = _context(rig, harness, tmp_path)
    rig.daemon.add_job("rebalance", rebalance_job(ctx, now=rig.clock), interval_s=60, jitter_s=0)
    rig.daemon.add_job("rotation", rotation_job(ctx), interval_s=3600, jitter_s=0)
    looked_up: list[str] = []
    slept: list[float] = []

    async def no_such_host(host: str, port: int) -> list[str]:  # the receivers do not exist here
        looked_up.append(host)
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def backoff(seconds: float) -> None:  # recorded, not waited through
        slept.append(seconds)

    alerts = alerts_job(ctx, now=rig.clock, resolver=no_such_host, sleep=backoff)
    rig.daemon.add_job("alerts", alerts, interval_s=60, jitter_s=0, exclusive=False)
    assert (await rig.step())["reconcile"].ok
    agents = ("orch-01", "res-01", "res-02", "sum-01", "cls-01")
    before = {a: budget(harness, a) for a in agents}

    _spend(harness, "sum-01", "1.00")  # 5 %
    _spend(harness, "res-01", "28.50")  # 95 %
    for agent, usd in (("orch-01", "40.00"), ("res-02", "15.00"), ("cls-01", "7.50")):
        _spend(harness, agent, usd)
    ran = await rig.step(60)
    assert ran["rebalance"].ok, ran["rebalance"].message
    after = {a: budget(harness, a) for a in agents}
    assert after["res-01"] > before["res-01"] and after["sum-01"] < before["sum-01"]
    assert sum(after.values()) == sum(before.values())  # to the cent, in credits
    assert rig.sample("finops_rebalanced_amount") == float((after["res-01"] - before["res-01"]) / 100)
    # res-01 crossed 75 % of its (rebalanced) cap; the canonical receivers do not exist here,
    # so the alert is queued for retry and the job says so instead of claiming success.
    assert ran["alerts"].result == "partial" and ran["alerts"].fields["fired"] >= 1
    assert "res-01" in ran["alerts"].message and ran["alerts"].fields["pending"] >= 1
    assert "cannot resolve alerts.example.com" in ran["alerts"].message
    assert set(looked_up) <= {"alerts.example.com", "pager.example.com"} and "alerts.example.com" in looked_up
    # the tries within the check backed off as the delivery policy says, without waiting
    assert len(slept) >= DEFAULT_POLICY.attempts_per_check - 1
    assert all(0 < seconds <= DEFAULT_POLICY.backoff_max for seconds in slept)
    # The next reconcile pass plans nothing for the caps: it does not fight the rebalancer.
    await rig.step(60)
    assert {a: budget(harness, a) for a in agents} == after
    assert rig.last.applied.get("set_budget", 0) == 0

    # The rotation job rotates nothing before keys are due, then everything a week later.
    ran = await rig.step(3600)
    assert ran["rotation"].message.startswith("0 rotated")
    assert rig.sample("finops_keys_due_rotation") == 0


async def test_the_scheduled_rotation_job_rotates_the_keys_a_week_later(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness, tmp_path: Path
) -> None:
    """The job reads finops' injected clock (and the sandbox its own), so a week passes
    without waiting: nothing is due on the day the keys were issued, every key a week on."""
    rig = rig_factory(DirectorySource(manifests_dir))
    assert (await rig.step())["reconcile"].ok
    clock = FinopsClock()
    rotate = rotation_job(replace(_context(rig, harness, tmp_path), clock=clock), now=clock)
    agents = ("orch-01", "res-01", "res-02", "sum-01", "cls-01")
    issued = {a: harness.sink.load(a) for a in agents}
    assert all(issued.values())

    today = await rotate()
    assert today.ok and today.message.startswith("0 rotated"), today.message

    week = 7 * 24 * 3600 + 3600
    clock.advance(week)
    harness.sandbox.clock.advance(week)
    later = await rotate()
    assert later.ok and later.message.startswith(f"{len(agents)} rotated"), later.message
    rotated = {a: harness.sink.load(a) for a in agents}
    assert all(rotated[a] and rotated[a] != issued[a] for a in agents)
    harness.sandbox.clock.advance(GATEWAY_GRACE_S + 1)  # the old keys' grace at the gateway ends
    for agent in agents:
        new_key, old_key = rotated[agent], issued[agent]
        assert new_key is not None and old_key is not None
        async with GatewayClient(harness.sandbox.url, new_key) as own:
            assert await own.get_balance(agent) is not None  # the new key is the agent's key
        async with GatewayClient(harness.sandbox.url, old_key, max_attempts=1) as stale:
            with pytest.raises(AuthenticationFailed):
                await stale.get_balance(agent)
    assert rig.sample("finops_keys_due_rotation") == 0  # none due right after rotating


def _with_ladder(manifests_dir: Path) -> None:
    """Uncomment the canonical fleet's 75/90/100 ladder (pause at 90, freeze at 100)."""
    path = manifests_dir / "research-fleet.yaml"
    lines = path.read_text().splitlines()
    start = lines.index("    # escalation:")
    lines[start : start + 3] = [line.replace("    # ", "    ", 1) for line in lines[start : start + 3]]
    path.write_text("\n".join(lines) + "\n")


async def test_the_alerts_job_pauses_then_freezes_and_the_reconcile_pass_never_undoes_it(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness, tmp_path: Path
) -> None:
    _with_ladder(manifests_dir)
    rig = rig_factory(DirectorySource(manifests_dir))
    ctx = _context(rig, harness, tmp_path)

    async def no_such_host(host: str, port: int) -> list[str]:  # the canonical receivers do not exist
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def no_wait(seconds: float) -> None:
        return None

    rig.daemon.add_job(
        "alerts", alerts_job(ctx, now=rig.clock, resolver=no_such_host, sleep=no_wait), interval_s=60, jitter_s=0
    )
    assert (await rig.step())["reconcile"].ok
    declared = budget(harness, "res-01")
    key = harness.sink.load("res-01")
    assert key is not None
    _spend(harness, "res-01", str(Decimal("0.92") * declared / 100))  # 92 % of the daily cap
    ran = await rig.step(60)
    assert ran["alerts"].fields["fired"] == 2  # 75 and 90, one alert each
    assert budget(harness, "res-01") == Decimal("0.92") * declared  # paused at what it spent
    assert rig.sample("finops_escalations_total", action="pause", outcome="executed") == 1
    assert rig.sample("finops_escalations_active", action="pause") == 1
    with httpx.Client(base_url=harness.sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert http.get("/v1/marketplace/match", params={"query": "x"}).status_code == 402

    async with harness.client() as admin:
        status = await fleet_status(
            admin, rig.daemon.reconciler.desired, harness.store, manager(harness, admin), target="sandbox"
        )
    [row] = [a for a in status.agents if a.agent_id == "res-01"]
    assert [(e["action"], e["release"]) for e in row.escalations] == [("pause", "auto")]
    assert any(f.startswith("PAUSED since") and "below 85 % of the declared daily cap" in f for f in row.flags)

    ran = await rig.step(60)  # a reconcile pass and an alert check later: nothing undone, nothing redone
    assert ran["reconcile"].ok and rig.last.applied.get("set_budget", 0) == 0
    assert budget(harness, "res-01") == Decimal("0.92") * declared
    assert ran["alerts"].fields["fired"] == 0
    assert rig.sample("finops_escalations_total", action="pause", outcome="executed") == 1

    _spend(harness, "res-01", str(Decimal("0.08") * declared / 100))  # 100 % (as /v1/batch could)
    ran = await rig.step(60)
    assert ran["alerts"].fields["fired"] == 1
    assert harness.store.holds()["res-01"].reason == "auto: 100 % of daily cap"
    assert budget(harness, "res-01") == 0
    assert rig.sample("finops_escalations_active", action="freeze") == 1
    assert harness.sink.is_quarantined("res-01"), ran["alerts"].message  # the key rotated into quarantine
    await rig.step(60)
    assert budget(harness, "res-01") == 0 and rig.last.applied.get("set_budget", 0) == 0
