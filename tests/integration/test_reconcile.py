"""observe → plan → apply against a real sandbox over HTTP, with requests counted there."""

from __future__ import annotations

import stat
from decimal import Decimal

import httpx
import pytest

from controller.gateway.errors import NotAdmin
from policies.keyprint import key_prefix
from policies.plan_types import ChangeKind
from policies.spec import DesiredState
from tests.integration.conftest import Harness

TARGET_CREDITS = {
    "orch-01": Decimal("20000.00"),
    "res-01": Decimal("7500.00"),
    "res-02": Decimal("7500.00"),
    "sum-01": Decimal("5000.00"),
    "cls-01": Decimal("4000.00"),
}
DAILY_CAPS = {"orch-01": 8000, "res-01": 3000, "res-02": 3000, "sum-01": 2000, "cls-01": 1500}


def balance(h: Harness, agent: str) -> Decimal:
    with h.admin() as http:
        return Decimal(http.get(f"/v1/billing/wallets/{agent}/balance").json()["balance"])


def deposits(h: Harness, agent: str) -> list[dict[str, object]]:
    with h.admin() as http:
        rows = http.get(f"/v1/billing/wallets/{agent}/transactions", params={"limit": 1000}).json()["transactions"]
    return [r for r in rows if r["tx_type"] == "deposit"]


async def test_fresh_fleet_converges_and_second_apply_makes_zero_writes(
    harness: Harness, canonical: DesiredState
) -> None:
    plan = await harness.plan(canonical)
    kinds = [c.kind for c in plan.changes]
    assert kinds.count(ChangeKind.REGISTER) == 5
    assert kinds.count(ChangeKind.TOP_UP) == 5
    assert kinds.count(ChangeKind.SET_BUDGET) == 5
    assert plan.fleets[0].rate_to_credits == Decimal("100")

    result = await harness.apply(plan)
    assert result.ok, result.to_dict()

    for agent, target in TARGET_CREDITS.items():
        assert balance(harness, agent) == target
        assert len(deposits(harness, agent)) == 1
        with harness.admin() as http:
            budget = http.get(f"/v1/billing/wallets/{agent}/budget").json()
        assert budget["daily_cap"] == DAILY_CAPS[agent]
        key_file = harness.sink.path_for(agent)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        raw = key_file.read_text().strip()
        assert harness.store.key_prefixes()[agent] == key_prefix(raw)
        with httpx.Client(base_url=harness.sandbox.url, headers={"Authorization": f"Bearer {raw}"}) as agent_http:
            assert agent_http.get(f"/v1/billing/wallets/{agent}/balance").status_code == 200

    harness.reset_stats()
    again = await harness.plan(canonical)
    assert again.empty, [c.reason for c in again.changes]
    second = await harness.apply(again)
    assert second.ok and second.writes == 0
    stats = harness.stats()
    assert stats["writes"] == 0, stats["by_route"]
    assert stats["reads"] > 0


async def test_drift_on_the_gateway_is_planned_exactly_and_corrected(harness: Harness, canonical: DesiredState) -> None:
    assert (await harness.apply(await harness.plan(canonical))).ok
    with harness.admin() as http:  # the agent (or anyone) raises its own cap
        http.put("/v1/billing/wallets/res-01/budget", json={"daily_cap": "99999", "monthly_cap": "60000.00"})
    plan = await harness.plan(canonical)
    [change] = plan.changes
    assert change.agent_id == "res-01" and change.kind is ChangeKind.SET_BUDGET
    assert [(d.field, d.before, d.after) for d in change.diff] == [("daily_cap", "99999.00", "3000.00")]
    assert (await harness.apply(plan)).ok
    assert (await harness.plan(canonical)).empty


async def test_spent_wallet_below_floor_is_topped_up_to_target_once(harness: Harness, canonical: DesiredState) -> None:
    assert (await harness.apply(await harness.plan(canonical))).ok
    harness.spend("cls-01", Decimal("2500.00"))  # metered spend (a withdrawal is not refunded: test_funding_limits)
    plan = await harness.plan(canonical)
    [change] = plan.changes
    assert change.kind is ChangeKind.TOP_UP and str(change.args.amount) == "2500.00"
    assert (await harness.apply(plan)).ok
    assert balance(harness, "cls-01") == TARGET_CREDITS["cls-01"]
    assert len(deposits(harness, "cls-01")) == 2  # the initial funding and this top-up, with distinct keys


async def test_unmanaged_agents_are_reported_and_never_touched(harness: Harness, canonical: DesiredState) -> None:
    with httpx.Client(base_url=harness.sandbox.url) as http:
        assert http.post("/v1/register", json={"agent_id": "bot-7"}).status_code == 201
    plan = await harness.plan(canonical)
    assert plan.unmanaged_agents == ("bot-7",)
    assert all(c.agent_id != "bot-7" for c in plan.changes)
    assert (await harness.apply(plan)).ok
    assert balance(harness, "bot-7") == Decimal("500.00")


async def test_one_failing_agent_does_not_stop_the_others(harness: Harness, canonical: DesiredState) -> None:
    plan = await harness.plan(canonical)
    with httpx.Client(base_url=harness.sandbox.url) as http:  # someone registers res-02 behind our back
        assert http.post("/v1/register", json={"agent_id": "res-02"}).status_code == 201
    result = await harness.apply(plan)
    assert not result.ok
    [failed] = result.failed()
    assert failed.agent_id == "res-02" and "re-plan" in (failed.error or "")
    assert {a.agent_id for a in result.agents if a.ok} == set(TARGET_CREDITS) - {"res-02"}
    # the next pass adopts res-02 as it is and converges
    assert (await harness.apply(await harness.plan(canonical))).ok
    assert balance(harness, "res-02") == TARGET_CREDITS["res-02"]


async def test_a_non_admin_key_is_refused_with_a_clear_message(harness: Harness, canonical: DesiredState) -> None:
    with httpx.Client(base_url=harness.sandbox.url) as http:
        agent_key = http.post("/v1/register", json={"agent_id": "someone"}).json()["api_key"]
    from controller.gateway.client import GatewayClient
    from controller.reconcile.observe import observe

    async with GatewayClient(harness.sandbox.url, agent_key) as client:
        with pytest.raises(NotAdmin, match="not admin-scoped") as info:
            await observe(client, canonical, target="sandbox")
    assert agent_key not in str(info.value)
