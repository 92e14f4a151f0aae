"""Properties of the pure planner (``policies.planner.make_plan``) over arbitrary desired and
live fleets, against a small model of the gateway (what each change does to a wallet, a
budget and finops' records, as ``controller.reconcile.apply`` does it on the real gateway):

- applying a plan to the model and planning again yields no changes (convergence in one
  apply), and planning twice from the same inputs gives the same plan (no hidden input);
- a top-up is planned only below the floor and never takes the balance above the target;
- the fleet's funding in one plan never exceeds what its rolling 24 h limit has left;
- an agent under an operator hold is never registered or funded: the only write it gets is
  caps of 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.currency import SIGNUP_BONUS_CREDITS, to_credits
from policies.funding import needs_top_up
from policies.funding_window import FundingEvent, FundingKind, LedgerRow, bonus_ref
from policies.live import BudgetStatus, LiveAgent, LiveFleet
from policies.money import format_money
from policies.plan_types import ChangeKind, Plan, RegisterArgs, SetBudgetArgs, TopUpArgs, plan_from_dict, plan_to_dict
from policies.planner import Memory, make_plan
from policies.records import BudgetWrite, Hold
from policies.spec import AgentSpec, DesiredState, FleetSpec

D = Decimal
FLEET = "research"
WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@dataclass
class Wallet:
    """One agent as the model gateway holds it."""

    balance: Decimal
    daily_cap: Decimal | None
    monthly_cap: Decimal | None
    ledger: list[LedgerRow] = field(default_factory=list)
    last_deposit_id: int | None = None


@dataclass
class World:
    """The model gateway plus finops' records: what observe and ``build_memory`` would read."""

    rate: Decimal
    wallets: dict[str, Wallet]
    memory: Memory
    next_tx: int = 1000

    def observe(self, desired: DesiredState) -> LiveFleet:
        """Like ``controller.reconcile.observe``: the ledger is read exactly when a top-up is needed."""
        agents: dict[str, LiveAgent] = {}
        for spec in desired.agents():
            w = self.wallets.get(spec.agent_id)
            if w is None:
                agents[spec.agent_id] = LiveAgent(spec.agent_id, exists=False, ledger_anchor="none")
                continue
            budget = BudgetStatus(w.daily_cap, w.monthly_cap, D("0.00"), D("0.00"), 0.0, 0.0, False, False)
            if needs_top_up(spec, w.balance, self.rate):
                anchor = str(w.last_deposit_id) if w.last_deposit_id is not None else "none"
                agents[spec.agent_id] = LiveAgent(
                    spec.agent_id, True, w.balance, budget, anchor, tuple(reversed(w.ledger)), True
                )
            else:
                agents[spec.agent_id] = LiveAgent(spec.agent_id, True, w.balance, budget)
        return LiveFleet(target="model", agents=agents, rates={"USD": self.rate})

    def apply(self, plan: Plan, at: float) -> None:
        """Every change as the gateway and ``controller.reconcile.apply`` carry it out (all succeed)."""
        m = self.memory
        budget_writes, holds = dict(m.budget_writes), dict(m.holds)
        events, last = list(m.funding_events), dict(m.last_deposits)
        for c in plan.changes:
            a = c.args
            if isinstance(a, RegisterArgs):
                assert c.agent_id not in self.wallets and a.expected_balance == SIGNUP_BONUS_CREDITS
                self.wallets[c.agent_id] = Wallet(
                    SIGNUP_BONUS_CREDITS, None, None, [LedgerRow(SIGNUP_BONUS_CREDITS, "signup_bonus", None, at)]
                )
                events.append(
                    FundingEvent(
                        bonus_ref(c.agent_id), c.agent_id, FLEET, FundingKind.SIGNUP_BONUS, SIGNUP_BONUS_CREDITS, at
                    )
                )
            elif isinstance(a, SetBudgetArgs):
                w = self.wallets[c.agent_id]
                w.daily_cap = a.daily_cap if a.daily_cap is not None else w.daily_cap
                w.monthly_cap = a.monthly_cap if a.monthly_cap is not None else w.monthly_cap
                budget_writes[c.agent_id] = BudgetWrite(w.daily_cap, w.monthly_cap, a.alert_threshold)
                hold = holds.get(c.agent_id)
                if hold is not None and hold.auto:
                    del holds[c.agent_id]  # caps in place: finops lifts its own hold
            elif isinstance(a, TopUpArgs):
                w = self.wallets[c.agent_id]
                assert w.balance == a.expected_balance
                w.balance += a.amount
                self.next_tx += 1
                w.last_deposit_id = self.next_tx
                w.ledger.append(LedgerRow(a.amount, "deposit", a.idempotency_key, at))
                last[c.agent_id] = self.next_tx
                events.append(FundingEvent(a.idempotency_key, c.agent_id, FLEET, FundingKind.DEPOSIT, a.amount, at))
            else:  # pragma: no cover - no webhooks are declared here
                raise AssertionError(c.kind)
        self.memory = replace(
            m, budget_writes=budget_writes, holds=holds, funding_events=tuple(events), last_deposits=last
        )


money = st.integers(min_value=0, max_value=200_000).map(lambda cents: D(cents).scaleb(-2))


@st.composite
def agent_cases(
    draw: st.DrawFn, index: int, rate: Decimal
) -> tuple[AgentSpec, Wallet | None, BudgetWrite | None, Hold | None]:
    floor = draw(money)
    target = floor + draw(money)
    spec = AgentSpec(
        agent_id=f"agent-{index}",
        fleet=FLEET,
        tier="researcher",
        daily_cap=draw(money),
        monthly_cap=draw(money),
        funding_floor=floor,
        funding_target=target,
        alert_thresholds=tuple(sorted(draw(st.sets(st.integers(1, 100), max_size=3)))),
    )
    wallet = None
    if draw(st.booleans()):
        caps = st.one_of(st.none(), money)
        edges = [to_credits(x, rate) + d for x in (floor, target) for d in (D("-0.01"), D("0.00"), D("0.01"))]
        balance = draw(st.one_of(money.map(lambda m: m * 10), st.sampled_from([e for e in edges if e >= 0])))
        wallet = Wallet(balance, draw(caps), draw(caps))
    remembered = None
    if draw(st.booleans()):
        remembered = BudgetWrite(None, None, draw(st.sampled_from([D("0.75"), D("0.8"), D("0.01"), D("1")])))
    hold = draw(
        st.sampled_from(
            [None, Hold(spec.agent_id, "incident", WHEN.timestamp() - 60), Hold(spec.agent_id, "caps", 0.0, auto=True)]
        )
    )
    return spec, wallet, remembered, hold


@st.composite
def worlds(draw: st.DrawFn) -> tuple[DesiredState, World]:
    n = draw(st.integers(min_value=1, max_value=4))
    rate = draw(st.sampled_from([D("1"), D("100"), D("0.5")]))
    cases = [draw(agent_cases(i, rate)) for i in range(n)]
    limit = draw(st.one_of(st.none(), money.map(lambda m: m * 100)))
    fleet = FleetSpec(
        name=FLEET,
        currency="USD",
        daily_total=D("1000000.00"),
        funding_ceiling=D("1000000.00"),
        agents=tuple(spec for spec, _, _, _ in cases),
        daily_funding_limit=limit,
    )
    memory = Memory(
        budget_writes={s.agent_id: r for s, _, r, _ in cases if r is not None},
        holds={s.agent_id: h for s, _, _, h in cases if h is not None},
    )
    wallets = {s.agent_id: w for s, w, _, _ in cases if w is not None}
    return DesiredState(fleets=(fleet,)), World(rate, wallets, memory)


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_applying_the_plan_to_the_gateway_model_converges(case: tuple[DesiredState, World]) -> None:
    """One apply converges; an agent under finops' own (auto) hold needs a second one by
    design: its caps are confirmed first, the hold lifted, and only then is it funded."""
    desired, world = case
    auto_held = {a for a, h in world.memory.holds.items() if h.auto}
    at = WHEN
    plan = make_plan(desired, world.observe(desired), world.memory, now=at)
    assert make_plan(desired, world.observe(desired), world.memory, now=at) == plan  # no hidden input
    for applies in range(3):
        if not plan.changes:
            break
        assert applies == 0 or {c.agent_id for c in plan.changes} <= auto_held, [
            (c.kind.value, c.agent_id, c.args) for c in plan.changes
        ]
        world.apply(plan, at.timestamp())
        at += timedelta(seconds=30)
        plan = make_plan(desired, world.observe(desired), world.memory, now=at)
    assert plan.changes == ()


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_funding_never_starts_at_or_above_the_floor_nor_ends_above_the_target(case: tuple[DesiredState, World]) -> None:
    desired, world = case
    plan = make_plan(desired, world.observe(desired), world.memory, now=WHEN)
    specs = {s.agent_id: s for s in desired.agents()}
    for c in plan.changes:
        if c.kind is not ChangeKind.TOP_UP:
            continue
        top_up = c.args_as(TopUpArgs)
        spec, before, amount = specs[c.agent_id], top_up.expected_balance, top_up.amount
        assert amount > 0
        assert before < to_credits(spec.funding_floor, world.rate)
        assert before + amount <= to_credits(spec.funding_target, world.rate)
        assert str(top_up.floor) == format_money(to_credits(spec.funding_floor, world.rate))
        assert str(top_up.target) == format_money(to_credits(spec.funding_target, world.rate))
        assert str(amount) == format_money(amount)  # what the plan file carries: 2 decimals


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_one_plan_never_funds_beyond_the_rolling_limit_left(case: tuple[DesiredState, World]) -> None:
    desired, world = case
    plan = make_plan(desired, world.observe(desired), world.memory, now=WHEN)
    [window] = plan.funding
    funded = sum(
        (
            c.args.amount if isinstance(c.args, TopUpArgs) else SIGNUP_BONUS_CREDITS
            for c in plan.changes
            if c.kind in (ChangeKind.TOP_UP, ChangeKind.REGISTER)
        ),
        D("0.00"),
    )
    assert funded == window.planned
    assert funded <= window.available


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_an_agent_under_an_operator_hold_only_ever_gets_caps_of_zero(case: tuple[DesiredState, World]) -> None:
    desired, world = case
    held = {a for a, h in world.memory.holds.items() if not h.auto}
    for _ in range(2):  # before and after an apply
        plan = make_plan(desired, world.observe(desired), world.memory, now=WHEN)
        assert {h.agent_id for h in plan.held} == set(world.memory.holds) & {s.agent_id for s in desired.agents()}
        for c in plan.changes:
            if c.agent_id in held:
                assert c.kind is ChangeKind.SET_BUDGET
                caps = c.args_as(SetBudgetArgs)
                assert (str(caps.daily_cap), str(caps.monthly_cap)) == ("0.00", "0.00")
        world.apply(plan, WHEN.timestamp())
    for agent_id in held:
        w = world.wallets.get(agent_id)
        assert w is None or (w.daily_cap, w.monthly_cap) == (D("0.00"), D("0.00"))


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_every_plan_survives_its_plan_file(case: tuple[DesiredState, World]) -> None:
    """A saved plan reads back to the same typed value and writes the same JSON."""
    desired, world = case
    plan = make_plan(desired, world.observe(desired), world.memory, now=WHEN)
    data = json.loads(json.dumps(plan_to_dict(plan)))
    assert plan_from_dict(data) == plan
    assert plan_to_dict(plan_from_dict(data)) == data
