"""The planner bounds funding over time: hand-built desired, live and memory in, a Plan out."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from controller.cli.views import render_markdown, render_text
from controller.reconcile.observe import LiveAgent
from policies.funding_window import WINDOW_SECONDS, DeferReason, FundingEvent, FundingKind, LedgerRow, bonus_ref
from policies.plan_types import ChangeKind, plan_from_dict, plan_to_dict
from policies.planner import Memory, make_plan
from policies.spec import AgentSpec, DesiredState
from tests.unit.test_plan import CONVERGED_MEMORY, agent, budget, desired, live

D = Decimal
NOW = 1_800_000_000.0
WHEN = datetime.fromtimestamp(NOW, UTC)


def poor(agent_id: str, balance: str = "1000.00", ledger: tuple[LedgerRow, ...] = ()) -> LiveAgent:
    """Below its floor (40.00 USD = 4000 credits): the planner wants a top-up to 7500."""
    return LiveAgent(
        agent_id,
        exists=True,
        balance=D(balance),
        budget=budget("3000.00", "60000.00"),
        ledger_anchor="7",
        ledger=ledger,
    )


def deposit(ref: str, credits: str, age: float, agent_id: str = "res-01") -> FundingEvent:
    return FundingEvent(ref, agent_id, "research", FundingKind.DEPOSIT, D(credits), NOW - age)


def with_limit(limit: str, *agents: AgentSpec) -> DesiredState:
    state = desired(*agents)
    return replace(state, fleets=tuple(replace(f, daily_funding_limit=D(limit)) for f in state.fleets))


def test_default_daily_limit_is_one_full_run_plus_a_day_of_capped_spend() -> None:
    fleet = desired(agent("res-01"), ceiling="500.00", total="200.00").fleets[0]
    assert fleet.funding_daily_limit == D("700.00")


def test_funding_in_the_last_24_h_cuts_the_top_up_and_defers_the_rest() -> None:
    memory = replace(CONVERGED_MEMORY, funding_events=(deposit("k1", "4000.00", 3600),))
    state = with_limit("100.00", agent("res-01"))
    plan = make_plan(state, live(poor("res-01")), memory, now=WHEN)
    [change] = [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]
    assert str(change.args.amount) == "6000.00"  # 10000 limit - 4000 used; 6500 wanted
    [window] = plan.funding
    assert (window.limit, window.used, window.planned, window.left) == (D("10000.00"), D("4000.00"), D("6000.00"), 0)
    [deferred] = plan.deferred
    assert deferred.reason is DeferReason.FLEET_DAILY_LIMIT and deferred.credits == D("500.00")
    full = make_plan(with_limit("1000.00", agent("res-01")), live(poor("res-01")), memory, now=WHEN)
    [uncut] = [c for c in full.changes if c.kind is ChangeKind.TOP_UP]
    # One funding decision, one key (the funding epoch's), cut or not: they can never both land.
    assert str(uncut.args.amount) == "6500.00" and uncut.args.idempotency_key == change.args.idempotency_key


def test_funding_older_than_24_h_no_longer_counts() -> None:
    memory = replace(CONVERGED_MEMORY, funding_events=(deposit("k1", "10000.00", WINDOW_SECONDS),))
    plan = make_plan(with_limit("100.00", agent("res-01")), live(poor("res-01")), memory, now=WHEN)
    assert [str(c.args.amount) for c in plan.changes if c.kind is ChangeKind.TOP_UP] == ["6500.00"]
    assert not plan.deferred


def test_a_used_up_limit_plans_no_funding_but_caps_still_converge() -> None:
    memory = replace(CONVERGED_MEMORY, funding_events=(deposit("k1", "10000.00", 60),))
    drifted = replace(poor("res-01"), budget=budget("99999.00", "60000.00"))
    plan = make_plan(with_limit("100.00", agent("res-01")), live(drifted), memory, now=WHEN)
    assert [c.kind for c in plan.changes] == [ChangeKind.SET_BUDGET]
    assert not plan.violations  # deferring is not a refusal: the rest of the plan applies
    assert "0.00 USD left" in render_text(plan)


def test_registrations_count_their_signup_bonus_and_wait_when_it_does_not_fit() -> None:
    agents = [agent(f"new-{i}", floor="1.00", target="2.00") for i in range(5)]  # the bonus funds them
    news = [LiveAgent(a.agent_id, exists=False) for a in agents]
    plan = make_plan(with_limit("15.00", *agents), live(*news), Memory(), now=WHEN)
    registered = [c.agent_id for c in plan.changes if c.kind is ChangeKind.REGISTER]
    assert registered == ["new-0", "new-1", "new-2"]  # 3 x 500 credits = 15.00 USD
    waiting = {d.agent_id for d in plan.deferred}
    assert waiting == {"new-3", "new-4"} and all(d.kind is ChangeKind.REGISTER for d in plan.deferred)
    assert not [c for c in plan.changes if c.agent_id in waiting]  # no caps for a wallet that does not exist
    assert plan.funding[0].planned == D("1500.00")


def test_the_per_run_ceiling_counts_signup_bonuses() -> None:
    agents = [agent(f"new-{i}", floor="1.00", target="2.00") for i in range(3)]
    plan = make_plan(
        desired(*agents, ceiling="0.00"), live(*[LiveAgent(a.agent_id, exists=False) for a in agents]),
        Memory(),
        now=WHEN,
    )
    [violation] = plan.violations
    assert violation.rule == "funding-ceiling" and "15.00 USD" in violation.message


def test_unexplained_outflow_is_flagged_and_not_refunded_by_default() -> None:
    ledger = (LedgerRow(D("-6500.00"), "withdrawal", None, NOW - 30), LedgerRow(D("-0.10"), "charge", None, NOW - 20))
    plan = make_plan(desired(agent("res-01")), live(poor("res-01", ledger=ledger)), CONVERGED_MEMORY, now=WHEN)
    assert not [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]
    [flag] = plan.outflow
    assert flag.unexplained == D("6500.00") and flag.limit == 0 and flag.refunding_stopped
    [deferred] = plan.deferred
    assert deferred.reason is DeferReason.UNEXPLAINED_OUTFLOW and deferred.credits == D("6500.00")
    assert "UNEXPLAINED OUTFLOW" in render_text(plan) and "Unexplained outflow" in render_markdown(plan)
    assert plan.empty and "No changes now: 1 funding step(s) deferred" in render_text(plan)


def test_unexplained_outflow_is_refunded_up_to_the_declared_limit() -> None:
    spec = replace(agent("res-01"), max_unexplained_per_day=D("80.00"))  # 8000 credits
    ledger = (LedgerRow(D("-6500.00"), "withdrawal", None, NOW - 30),)
    plan = make_plan(desired(spec), live(poor("res-01", ledger=ledger)), CONVERGED_MEMORY, now=WHEN)
    [top_up] = [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]
    assert str(top_up.args.amount) == "1500.00"  # 8000 allowed - 6500 already gone
    assert not plan.outflow[0].refunding_stopped


def test_metered_spend_is_not_unexplained() -> None:
    ledger = tuple(LedgerRow(D("-100.00"), "charge", None, NOW - i) for i in range(65))
    plan = make_plan(desired(agent("res-01")), live(poor("res-01", ledger=ledger)), CONVERGED_MEMORY, now=WHEN)
    assert not plan.outflow and [str(c.args.amount) for c in plan.changes] == ["6500.00"]


def test_ledger_shows_finops_credits_a_fresh_state_does_not_know() -> None:
    ledger = (
        LedgerRow(D("3000.00"), "deposit", "finops-topup-abc", NOW - 600),
        LedgerRow(D("500.00"), "signup_bonus", None, NOW - 700),
    )
    plan = make_plan(with_limit("50.00", agent("res-01")), live(poor("res-01", ledger=ledger)), Memory(), now=WHEN)
    assert plan.funding[0].used == D("3500.00")
    assert [str(c.args.amount) for c in plan.changes if c.kind is ChangeKind.TOP_UP] == ["1500.00"]
    memory = Memory(funding_events=(deposit("finops-topup-abc", "3000.00", 600),))
    again = make_plan(with_limit("50.00", agent("res-01")), live(poor("res-01", ledger=ledger)), memory, now=WHEN)
    assert again.funding[0].used == D("3500.00")  # the same deposit seen twice counts once
    assert bonus_ref("res-01") == "signup_bonus:res-01"


def test_funding_window_and_deferrals_survive_a_saved_plan() -> None:
    ledger = (LedgerRow(D("-6500.00"), "withdrawal", None, NOW - 30),)
    plan = make_plan(desired(agent("res-01")), live(poor("res-01", ledger=ledger)), CONVERGED_MEMORY, now=WHEN)
    data = plan_to_dict(plan)
    assert data["funding"][0]["left"] == "700.00" and data["funding"][0]["limit_credits"] == "70000.00"
    assert data["unexplained_outflow"][0]["refunding_stopped"] is True
    assert plan_from_dict(data) == plan
