"""Rebalancing against a real sandbox: spend is simulated in the sandbox's own ledger."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controller.errors import GuardrailViolation
from controller.gateway.client import GatewayClient
from controller.manifest.loader import load_manifests
from controller.reconcile.rebalancer import RebalanceRun, run_rebalance
from controller.sandbox.store import to_atomic
from policies.plan_types import ChangeKind, Plan
from policies.spec import DesiredState
from tests.integration.conftest import Harness

RATE = Decimal(100)  # the sandbox's USD → credits rate


def _spend(h: Harness, agent: str, usd: str) -> None:
    credits = Decimal(usd) * RATE
    h.sandbox.store.record_usage_and_charge(agent, "best_match", to_atomic(credits), None, now=h.sandbox.clock())


def _daily_caps(h: Harness, desired: DesiredState) -> dict[str, Decimal]:
    with h.admin() as http:
        return {
            a.agent_id: Decimal(str(http.get(f"/v1/billing/wallets/{a.agent_id}/budget").json()["daily_cap"])) / RATE
            for a in desired.agents()
        }


async def _rebalance(
    h: Harness, desired: DesiredState, *, dry_run: bool = False, now: float | None = None
) -> RebalanceRun:
    async with h.client() as client:
        return await run_rebalance(
            client, desired, h.store, h.sink, "sandbox", dry_run=dry_run, now=lambda: now or time.time()
        )


async def _converge(h: Harness, desired: DesiredState) -> None:
    assert (await h.apply(await h.plan(desired))).ok
    assert (await h.plan(desired)).empty


async def test_busy_agent_borrows_from_idle_one_total_unchanged_and_reconcile_keeps_it(
    harness: Harness, manifests_dir: Path
) -> None:
    desired = load_manifests(manifests_dir)
    await _converge(harness, desired)
    before = _daily_caps(harness, desired)
    _spend(harness, "sum-01", "1.00")  # 5 % of 20.00
    _spend(harness, "res-01", "28.50")  # 95 % of 30.00
    for agent, usd in (("orch-01", "40.00"), ("res-02", "15.00"), ("cls-01", "7.50")):
        _spend(harness, agent, usd)  # 50 %: neither idle nor busy

    dry = await _rebalance(harness, desired, dry_run=True)
    assert _daily_caps(harness, desired) == before  # a dry run writes nothing
    assert dry.applied is None

    run = await _rebalance(harness, desired)
    after = _daily_caps(harness, desired)
    assert after["res-01"] > before["res-01"] and after["sum-01"] < before["sum-01"]
    assert sum(after.values()) == sum(before.values()) == Decimal("175.00")
    assert {a for a in after if after[a] != before[a]} == {"res-01", "sum-01"}
    assert run.moved == after["res-01"] - before["res-01"]

    plan = await harness.plan(desired)
    assert plan.empty, [c.reason for c in plan.changes]  # the reconcile loop does not fight it
    assert any(line.startswith("res-01 daily cap 30.00 USD → ") and "from sum-01" in line for line in plan.rebalanced)

    # An agent raising its own cap is drift against baseline + adjustment, and is put back.
    with harness.admin() as http:
        http.put("/v1/billing/wallets/res-01/budget", json={"daily_cap": "9000.00", "monthly_cap": "60000.00"})
    drift = await harness.plan(desired)
    [change] = [c for c in drift.changes if c.kind is ChangeKind.SET_BUDGET]
    assert change.agent_id == "res-01" and str(change.args.daily_cap) == f"{after['res-01'] * RATE:.2f}"
    assert "rebalanc" in change.reason


async def test_adjustments_expire_when_spend_ages_out_and_after_24h(harness: Harness, manifests_dir: Path) -> None:
    desired = load_manifests(manifests_dir)
    await _converge(harness, desired)
    baseline = _daily_caps(harness, desired)
    _spend(harness, "sum-01", "1.00")
    _spend(harness, "res-01", "28.50")
    await _rebalance(harness, desired)
    assert _daily_caps(harness, desired) != baseline

    # Spend ages out of the rolling 24 h window: the next pass returns everyone to baseline.
    harness.sandbox.clock.advance(86_401)
    await _rebalance(harness, desired)
    assert _daily_caps(harness, desired) == baseline
    assert harness.store.adjustments() == {}

    # A stored adjustment that nobody recomputed for 24 h is ignored by the planner.
    _spend(harness, "sum-01", "1.00")
    _spend(harness, "res-01", "28.50")
    await _rebalance(harness, desired)
    adjusted = set(harness.store.adjustments())
    assert {"res-01", "sum-01"} <= adjusted
    fresh = await harness.plan(desired)
    assert not [c for c in fresh.changes if c.kind is ChangeKind.SET_BUDGET]
    later = await _plan_at(harness, desired, time.time() + 86_401)
    assert {c.agent_id for c in later.changes if c.kind is ChangeKind.SET_BUDGET} == adjusted
    assert not later.rebalanced


async def _plan_at(h: Harness, desired: DesiredState, at: float) -> Plan:
    from datetime import UTC, datetime

    from controller.reconcile.decide import build_memory
    from controller.reconcile.observe import observe
    from policies.planner import make_plan

    async with GatewayClient(h.sandbox.url, h.sandbox.admin_key) as client:
        live = await observe(client, desired, target="sandbox", webhooks_owned=True)
    return make_plan(desired, live, build_memory(h.store, desired), now=datetime.fromtimestamp(at, UTC))


async def test_a_rebalance_whose_plan_breaks_a_guardrail_writes_nothing_not_even_adjustments(
    harness: Harness, manifests_dir: Path
) -> None:
    desired = load_manifests(manifests_dir)
    await _converge(harness, desired)
    before = _daily_caps(harness, desired)
    logged = _apply_log(harness)
    _spend(harness, "sum-01", "1.00")
    _spend(harness, "res-01", "28.50")
    # A funding target the gateway cannot store (in credits, at its rate) is refused at plan time.
    fleet_file = manifests_dir / "research-fleet.yaml"
    text = fleet_file.read_text()
    assert 'funding: {floor: "20.00", target: "40.00"}' in text
    fleet_file.write_text(
        text.replace('funding: {floor: "20.00", target: "40.00"}', 'funding: {floor: "20.00", target: "999999999.00"}')
    )
    lowered = load_manifests(manifests_dir)
    assert (await harness.plan(lowered)).violations

    with pytest.raises(GuardrailViolation, match="rebalanced caps break a guardrail"):
        await _rebalance(harness, lowered)
    assert _daily_caps(harness, desired) == before
    assert harness.store.adjustments() == {}  # not stored: the reconcile loop must not enforce it later
    assert _apply_log(harness) == logged  # no apply ran


async def test_a_rebalance_apply_is_in_the_apply_log(harness: Harness, manifests_dir: Path) -> None:
    desired = load_manifests(manifests_dir)
    await _converge(harness, desired)
    logged = len(_apply_log(harness))
    _spend(harness, "sum-01", "1.00")
    _spend(harness, "res-01", "28.50")
    run = await _rebalance(harness, desired)
    assert run.applied is not None and run.applied.ok
    entries = _apply_log(harness)[logged:]
    caps_set = sum(len(a.applied_kinds) for a in run.applied.agents)
    assert caps_set >= 2 and all(k is ChangeKind.SET_BUDGET for a in run.applied.agents for k in a.applied_kinds)
    assert [(e["by"], e["changes"], e["writes"]) for e in entries] == [("rebalance", caps_set, caps_set)]


def _apply_log(h: Harness) -> list[dict[str, Any]]:
    rows = h.store._db.execute("SELECT summary FROM apply_log ORDER BY id").fetchall()  # either backend
    return [json.loads(row[0]) for row in rows]
