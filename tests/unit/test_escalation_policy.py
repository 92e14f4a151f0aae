"""The escalation ladder's pure decisions (``policies.escalation``): at most one action per
crossing, release only below the re-arm level, the ratchet, caps restored = declared."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.manifest.loader import load_manifests
from policies.alerts import BudgetReading, SlotKey, SlotState, WindowReading, evaluate, rearm_below, utilization
from policies.escalation import (
    ACTIVE,
    OPEN,
    PENDING,
    RELEASING,
    SUPERSEDED,
    Caps,
    Escalation,
    Spend,
    decide,
    pause_cap,
    reason_for,
    should_release,
    wanted_caps,
)
from policies.live import BudgetStatus as LiveBudget
from policies.live import LiveAgent, LiveFleet
from policies.plan_types import ChangeKind, Plan
from policies.planner import Memory, make_plan
from policies.records import BudgetWrite
from policies.spec import AgentSpec, DesiredState, EscalationRule, FleetSpec

D = Decimal
CANONICAL = Path(__file__).resolve().parents[2] / "manifests"
CAP = D("10.00")
LADDER = (EscalationRule(90, "daily", "pause", "auto"), EscalationRule(100, "daily", "freeze", "manual"))
DECLARED = Caps(CAP, D("100.00"))


def reading(spend: Decimal, cap: Decimal = CAP) -> BudgetReading:
    return BudgetReading("a", "f", (75, 90, 100), WindowReading(spend, cap), WindowReading(spend, D("100.00")))


def pause(cap: str | None, window: str = "daily", status: str = ACTIVE, threshold: int = 90) -> Escalation:
    return Escalation(
        alert_id=f"x{window}{threshold}{cap}",
        agent_id="a",
        window=window,
        threshold=threshold,
        action="pause",
        release="auto",
        status=status,
        reason=reason_for(threshold, window),
        decided_at=0.0,
        cap=None if cap is None else D(cap),
    )


spends = st.decimals(min_value=0, max_value=20, places=2)


def _run(seq: list[Decimal]) -> tuple[list[Escalation], int]:
    """Drive evaluate + decide as the engine does, with declared caps (the agent's own
    escalations persist across checks); returns every row decided and the crossings seen."""
    slots: dict[SlotKey, SlotState] = {}
    rows: list[Escalation] = []
    crossings = 0
    for now, spend in enumerate(seq):
        ev = evaluate([reading(spend)], slots, now=float(now))
        slots = dict(ev.state)
        crossings += sum(1 for e in ev.events if e.type == "budget.threshold" and e.threshold in (90, 100))
        decision = decide(
            ev.events,
            {"a": LADDER},
            [r for r in rows if r.status in (PENDING, ACTIVE, RELEASING)],
            {"a": Spend(spend, spend)},
            {"a": DECLARED},
            now=float(now),
        )
        ids = {r.alert_id for r in rows}
        assert not ids & {r.alert_id for r in decision.started}, "a crossing was decided twice"
        rows += decision.started
        released = {r.alert_id for r in decision.releasing}
        rows = [replace(r, status="released") if r.alert_id in released else r for r in rows]
        rows = [replace(r, status=ACTIVE) if r.status == PENDING else r for r in rows]  # executed
    return rows, crossings


@settings(max_examples=300, deadline=None)
@given(st.lists(spends, min_size=1, max_size=30))
def test_one_decision_per_crossing_with_a_rule_never_more(seq: list[Decimal]) -> None:
    rows, crossings = _run(seq)
    assert len(rows) == crossings
    assert len({r.alert_id for r in rows}) == len(rows)


@settings(max_examples=300, deadline=None)
@given(st.lists(spends, min_size=1, max_size=30))
def test_at_most_one_freeze_in_force_and_a_pause_never_executes_beside_a_fresh_freeze(seq: list[Decimal]) -> None:
    rows, _ = _run(seq)
    assert sum(1 for r in rows if r.action == "freeze" and r.status in OPEN) <= 1
    for r in rows:
        if r.status == SUPERSEDED:
            assert r.action == "pause" or any(o.action == "freeze" and o.alert_id != r.alert_id for o in rows)


def test_one_check_crossing_pause_and_freeze_supersedes_the_pause() -> None:
    ev = evaluate([reading(D("10.50"))], {}, now=1.0)
    decision = decide(ev.events, {"a": LADDER}, [], {}, {}, now=1.0)
    assert {(r.action, r.status) for r in decision.started} == {("pause", SUPERSEDED), ("freeze", PENDING)}
    assert sorted(decision.actions.values()) == ["freeze", "pause"]  # both alerts still name their action


def test_a_threshold_without_a_rule_only_alerts() -> None:
    ev = evaluate([reading(D("8.00"))], {}, now=1.0)
    decision = decide(ev.events, {"a": LADDER}, [], {}, {}, now=1.0)
    assert decision.started == () and decision.actions == {}


@settings(max_examples=300, deadline=None)
@given(spend=spends, threshold=st.integers(min_value=1, max_value=200))
def test_release_only_below_the_rearm_level_of_the_declared_cap(spend: Decimal, threshold: int) -> None:
    row = pause("9.00", threshold=threshold)
    released = should_release(row, Spend(spend, D(0)), DECLARED)
    pct = utilization(spend, CAP)
    assert pct is not None
    assert released == (pct < rearm_below(threshold))


def test_never_released_without_a_reading_a_declared_cap_or_when_manual() -> None:
    row = pause("9.00")
    assert not should_release(row, None, DECLARED)
    assert not should_release(row, Spend(D(0), D(0)), Caps(None, None))
    assert not should_release(row, Spend(D(0), D(0)), Caps(D(0), D(0)))  # a cap of 0 is not judged
    assert not should_release(replace(row, release="manual"), Spend(D(0), D(0)), DECLARED)
    assert not should_release(replace(row, status=RELEASING), Spend(D(0), D(0)), DECLARED)


@settings(max_examples=300, deadline=None)
@given(st.lists(spends, min_size=1, max_size=20), st.sampled_from(["daily", "monthly"]))
def test_the_ratchet_only_goes_down_and_never_to_no_cap(seq: list[Decimal], window: str) -> None:
    open_pause = pause("20.00", window=window)
    previous = D("20.00")
    for spend in seq:
        caps, lowered = wanted_caps(DECLARED, Spend(spend, spend), [open_pause])
        cap = lowered[window]
        assert cap is not None and D(0) <= cap <= previous
        assert cap <= spend and cap <= (DECLARED.window(window) or cap)
        assert caps.window(window) == cap
        other = "monthly" if window == "daily" else "daily"
        assert caps.window(other) == DECLARED.window(other)  # the other window is declared, exactly
        open_pause = replace(open_pause, cap=cap)
        previous = cap


@given(spends, spends)
def test_without_an_open_pause_the_caps_are_exactly_the_declared_ones(daily: Decimal, monthly: Decimal) -> None:
    for rows in ([], [pause("1.00", status=RELEASING)], [pause("1.00", status="released")]):
        caps, lowered = wanted_caps(DECLARED, Spend(daily, monthly), rows)
        assert caps == DECLARED and lowered == {}


def test_pause_cap_rounds_spend_down_to_the_cent_and_two_pauses_share_the_lowest() -> None:
    assert pause_cap(None, D("0.905"), D("10.00")) == D("0.90")
    assert pause_cap(D("0.50"), D("0.90"), D("10.00")) == D("0.50")
    assert pause_cap(None, D("12.00"), D("10.00")) == D("10.00")  # never above the declared cap
    _, lowered = wanted_caps(DECLARED, Spend(D("9.50"), D(0)), [pause("9.20"), pause("9.00", threshold=80)])
    assert lowered == {"daily": D("9.00")}


def test_the_recovery_that_releases_a_pause_carries_the_release_action() -> None:
    state: dict[SlotKey, SlotState] = {}
    ev = evaluate([reading(D("9.00"))], state, now=1.0)
    [started] = decide(ev.events, {"a": LADDER}, [], {}, {}, now=1.0).started
    active = replace(started, status=ACTIVE)
    ev2 = evaluate([reading(D("1.00"))], ev.state, now=2.0)
    decision = decide(ev2.events, {"a": LADDER}, [active], {"a": Spend(D("1.00"), D("1.00"))}, {"a": DECLARED}, now=2.0)
    [releasing] = decision.releasing
    recovered = {e.id: e for e in ev2.events if e.type == "budget.recovered" and e.threshold == 90}
    [rid] = recovered
    assert decision.actions[rid] == "release" and releasing.status == RELEASING


def test_reason_reads_like_a_hold() -> None:
    assert reason_for(90, "daily") == "auto: 90 % of daily cap"


def test_the_canonical_fleets_commented_ladder_loads_when_uncommented(tmp_path: Path) -> None:
    """The example in manifests/ is the one the README shows: it must be valid as written."""
    source = (CANONICAL / "research-fleet.yaml").read_text()
    lines = source.splitlines()
    start = lines.index("    # escalation:")
    block = [line.replace("    # ", "    ", 1) for line in lines[start : start + 3]]
    assert block[0] == "    escalation:"
    shutil.copytree(CANONICAL, tmp_path / "m")
    (tmp_path / "m" / "research-fleet.yaml").write_text("\n".join([*lines[:start], *block, *lines[start + 3 :]]))
    desired = load_manifests(tmp_path / "m")
    ladders = {a.agent_id: a.escalation for a in desired.agents()}
    inherited = (EscalationRule(90, "daily", "pause", "auto"), EscalationRule(100, "daily", "freeze", "manual"))
    assert ladders and all(ladder == inherited for ladder in ladders.values())
    assert load_manifests(CANONICAL).agents()[0].escalation == ()  # as shipped: alerts only


def _plan_for(escalations: tuple[Escalation, ...], live_daily: str) -> Plan:
    spec = AgentSpec(
        agent_id="a",
        fleet="f",
        tier="t",
        daily_cap=D("30.00"),
        monthly_cap=D("600.00"),
        funding_floor=D("40.00"),
        funding_target=D("75.00"),
        alert_thresholds=(75, 90, 100),
        escalation=LADDER,
    )
    desired = DesiredState((FleetSpec("f", "CREDITS", D("200.00"), D("500.00"), (spec,)),))
    status = LiveBudget(D(live_daily), D("600.00"), D("28.00"), D("28.00"), 0, 0, False, False)
    live = LiveFleet(
        "sandbox", {"a": LiveAgent("a", True, D("1.00"), status, ledger_anchor="none", ledger=())}, {"CREDITS": D(1)}
    )
    memory = Memory(budget_writes={"a": BudgetWrite(D("30.00"), D("600.00"), D("0.75"))}, escalations=escalations)
    return make_plan(desired, live, memory, now=datetime(2026, 11, 1, tzinfo=UTC))


def test_the_planner_keeps_a_pause_lowers_a_raised_cap_back_and_does_not_fund_a_paused_agent() -> None:
    unpaused = _plan_for((), "30.00")
    assert [c.kind for c in unpaused.changes] == [ChangeKind.TOP_UP]  # the control: funded when not paused

    paused = pause("27.00")
    kept = _plan_for((paused,), "27.00")
    assert kept.changes == ()  # the pause cap is in place: nothing to do, and no funding
    assert [(e.action, e.cap) for e in kept.escalated] == [("pause", D("27.00"))]

    raised = _plan_for((paused,), "45.00")  # the agent raised its own cap
    [change] = raised.changes
    assert change.kind is ChangeKind.SET_BUDGET and change.args.wire()["daily_cap"] == "27.00"

    lower = _plan_for((paused,), "25.00")  # already lower (a ratchet not yet recorded): never raised
    assert lower.changes == ()

    released = _plan_for((replace(paused, status=RELEASING),), "27.00")  # release decided: declared caps
    assert [c.args.wire()["daily_cap"] for c in released.changes if c.kind is ChangeKind.SET_BUDGET] == ["30.00"]


def test_plan_views_show_the_pause_and_how_it_is_released() -> None:
    from controller.cli.views import render_markdown, render_text

    plan = _plan_for((pause("27.00"),), "27.00")
    text = render_text(plan)
    assert "# ESCALATED a: paused since" in text and "(auto: 90 % of daily cap)" in text
    assert "daily cap held at 27.00 credits" in text and "below 85 % of the declared daily cap" in text
    manual = _plan_for((replace(pause("27.00"), release="manual"),), "27.00")
    assert "release with \\`finops unfreeze a\\`" in render_markdown(manual)  # markdown-escaped
