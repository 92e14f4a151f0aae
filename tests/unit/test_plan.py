"""The planner is pure: hand-built desired and live state in, a Plan value out."""

import json
from datetime import UTC, datetime
from decimal import Decimal

from controller.gateway.models import BudgetStatus
from controller.reconcile.observe import LiveAgent, LiveFleet
from controller.state import BudgetWrite
from policies.plan_types import ChangeKind, PlanError, PlanErrorKind, plan_from_dict, plan_to_dict
from policies.planner import Memory, make_plan
from policies.spec import AgentSpec, DesiredState, FleetSpec

WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
"""The planner's clock in these tests (it never reads the wall clock)."""

D = Decimal
RATE = D("100")


def agent(
    agent_id: str, daily: str = "30.00", monthly: str = "600.00", floor: str = "40.00", target: str = "75.00"
) -> AgentSpec:
    return AgentSpec(
        agent_id=agent_id,
        fleet="research",
        tier="researcher",
        daily_cap=D(daily),
        monthly_cap=D(monthly),
        funding_floor=D(floor),
        funding_target=D(target),
        alert_thresholds=(75, 90, 100),
    )


def desired(*agents: AgentSpec, ceiling: str = "500.00", total: str = "200.00") -> DesiredState:
    return DesiredState(
        fleets=(
            FleetSpec(name="research", currency="USD", daily_total=D(total), funding_ceiling=D(ceiling), agents=agents),
        )
    )


def budget(daily: str | None, monthly: str | None) -> BudgetStatus:
    return BudgetStatus(
        daily_cap=D(daily) if daily else None,
        monthly_cap=D(monthly) if monthly else None,
        daily_spend=D("0"),
        monthly_spend=D("0"),
        daily_pct=0,
        monthly_pct=0,
        alert_triggered=False,
        cap_exceeded=False,
    )


def live(*agents: LiveAgent, keys: frozenset[str] = frozenset(), admins: frozenset[str] = frozenset()) -> LiveFleet:
    return LiveFleet(
        target="sandbox",
        agents={a.agent_id: a for a in agents},
        rates={"USD": RATE},
        key_agents=keys,
        admin_agents=admins,
    )


CONVERGED_MEMORY = Memory(budget_writes={"res-01": BudgetWrite(D("3000.00"), D("60000.00"), D("0.75"))})


def converged_agent() -> LiveAgent:
    return LiveAgent("res-01", exists=True, balance=D("7500.00"), budget=budget("3000.00", "60000.00"))


def test_new_agent_is_registered_capped_then_funded_net_of_bonus_in_credits() -> None:
    plan = make_plan(
        desired(agent("res-01")), live(LiveAgent("res-01", exists=False, ledger_anchor="none")), Memory(), now=WHEN
    )
    kinds = [c.kind for c in plan.changes]
    assert kinds == [ChangeKind.REGISTER, ChangeKind.SET_BUDGET, ChangeKind.TOP_UP]  # caps before money
    top_up = plan.changes[2]
    assert str(top_up.args.amount) == "7000.00"  # 75 USD = 7500 credits, minus the 500 signup bonus
    assert str(top_up.args.expected_balance) == "500.00"
    caps = plan.changes[1].args
    assert caps.wire() == {"daily_cap": "3000.00", "monthly_cap": "60000.00", "alert_threshold": "0.75"}
    assert plan.summary()["top_up_credits"] == "7000.00"


def test_converged_fleet_plans_nothing() -> None:
    plan = make_plan(desired(agent("res-01")), live(converged_agent()), CONVERGED_MEMORY, now=WHEN)
    assert plan.empty
    assert plan_to_dict(plan)["changes"] == []


def test_cap_drift_plans_only_the_drifted_field() -> None:
    drifted = LiveAgent("res-01", exists=True, balance=D("7500.00"), budget=budget("9999.00", "60000.00"))
    [change] = make_plan(desired(agent("res-01")), live(drifted), CONVERGED_MEMORY, now=WHEN).changes
    assert change.kind is ChangeKind.SET_BUDGET
    assert [(d.field, d.before, d.after) for d in change.diff] == [("daily_cap", "9999.00", "3000.00")]
    # budget PUT replaces the record: every field is always sent
    assert set(change.args.wire()) == {"daily_cap", "monthly_cap", "alert_threshold"}


def test_unobservable_threshold_without_a_record_is_unverified_not_a_change() -> None:
    # A fresh state directory against a converged gateway: the caps match, and the gateway
    # cannot report alert_threshold. Not a change (CI would see phantom drift forever).
    plan = make_plan(desired(agent("res-01")), live(converged_agent()), Memory(), now=WHEN)
    assert plan.empty
    [u] = plan.unverified
    assert (u.fleet, u.agent_id, u.field, u.desired) == ("research", "res-01", "alert_threshold", "0.75")
    assert plan.summary()["unverified"] == 1
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))).unverified == plan.unverified


def test_unobservable_threshold_with_a_differing_record_is_a_change() -> None:
    memory = Memory(budget_writes={"res-01": BudgetWrite(D("3000.00"), D("60000.00"), D("0.90"))})
    plan = make_plan(desired(agent("res-01")), live(converged_agent()), memory, now=WHEN)
    [change] = plan.changes
    assert change.kind is ChangeKind.SET_BUDGET
    assert [(d.field, d.before, d.after) for d in change.diff] == [("alert_threshold", "0.90", "0.75")]
    assert plan.unverified == ()


def test_caps_change_without_a_record_carries_the_threshold() -> None:
    drifted = LiveAgent("res-01", exists=True, balance=D("7500.00"), budget=budget("9999.00", "60000.00"))
    plan = make_plan(desired(agent("res-01")), live(drifted), Memory(), now=WHEN)
    [change] = plan.changes
    assert {d.field for d in change.diff} == {"daily_cap", "alert_threshold"}
    assert change.args.wire()["alert_threshold"] == "0.75"
    assert plan.unverified == ()  # the write settles it


def test_balance_between_floor_and_target_is_left_alone() -> None:
    mid = LiveAgent("res-01", exists=True, balance=D("4000.00"), budget=budget("3000.00", "60000.00"))
    assert make_plan(desired(agent("res-01")), live(mid), CONVERGED_MEMORY, now=WHEN).empty


def test_funding_ceiling_violation_is_part_of_the_plan() -> None:
    agents = [agent(f"a{i}", floor="300.00", target="300.00") for i in range(2)]
    news = [LiveAgent(a.agent_id, exists=False) for a in agents]
    plan = make_plan(desired(*agents, ceiling="500.00"), live(*news), Memory(), now=WHEN)
    [violation] = plan.violations
    assert violation.rule == "funding-ceiling"
    # The signup bonuses are finops' credits too: 2 x (5.00 bonus + 295.00 top-up).
    assert "600.00 USD" in violation.message and "100.00 USD over" in violation.message


def test_unmanaged_agents_exclude_declared_and_admin() -> None:
    plan = make_plan(
        desired(agent("res-01")),
        live(converged_agent(), keys=frozenset({"res-01", "bot-7", "root"}), admins=frozenset({"root"})),
        CONVERGED_MEMORY,
        now=WHEN,
    )
    assert plan.unmanaged_agents == ("bot-7",)
    assert plan.empty


def test_unobservable_agent_is_an_error_not_a_guess() -> None:
    broken = LiveAgent("res-02", exists=False, error="gateway 500: boom")
    plan = make_plan(
        desired(agent("res-01"), agent("res-02")), live(converged_agent(), broken), CONVERGED_MEMORY, now=WHEN
    )
    assert plan.errors == (PlanError("res-02", PlanErrorKind.UNOBSERVED, "gateway 500: boom"),)
    assert plan_to_dict(plan)["errors"] == ["res-02: could not observe: gateway 500: boom"]
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))).errors == plan.errors
    assert all(c.agent_id != "res-02" for c in plan.changes)


def test_plan_round_trips_through_json_and_basis_tracks_live_state() -> None:
    d = desired(agent("res-01"))
    plan = make_plan(d, live(LiveAgent("res-01", exists=False, ledger_anchor="none")), Memory(), now=WHEN)
    again = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert again == plan
    other = make_plan(d, live(converged_agent()), Memory(), now=WHEN)
    assert other.basis != plan.basis
