from __future__ import annotations

from collections import defaultdict
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.rebalance import AgentBudget, Rebalance, RebalanceInputError, RebalancePolicy, Transfer, rebalance

D = Decimal
CENT = D("0.01")
NAMES = ["orch-01", "res-01", "res-02", "sum-01", "cls-01", "a", "b.c", "Z_9"]
properties = settings(max_examples=100, derandomize=True, deadline=None)


def cents(n: int) -> Decimal:
    return D(n).scaleb(-2)


AMOUNT = st.integers(0, 20_000)  # cents
PERMILLE = st.integers(0, 1000)
BAND = st.integers(0, 2)


@st.composite
def agent_budgets(draw: st.DrawFn, agent_id: str) -> AgentBudget:
    # Fixed strategies scaled by hand (not st.integers(0, baseline)) keep generation cheap.
    baseline = draw(AMOUNT)
    band, at = draw(BAND), draw(PERMILLE)
    # Bias spend towards the interesting bands: idle, busy (up to twice the baseline), anything.
    spend = [
        baseline * 3 * at // 10_000,
        baseline * 8 // 10 + (baseline * 12 // 10 + 100) * at // 1000,
        (baseline * 2 + 100) * at // 1000,
    ][band]
    minimum = [0, baseline, baseline * draw(PERMILLE) // 1000][draw(BAND)]
    maximum = baseline + [0, draw(AMOUNT), draw(AMOUNT)][draw(BAND)]
    held = draw(st.integers(0, 9)) == 0
    return AgentBudget(agent_id, cents(baseline), cents(spend), cents(minimum), cents(maximum), held)


@st.composite
def fleets(draw: st.DrawFn, min_size: int = 0, lively: bool = False) -> list[AgentBudget]:
    """Up to eight agents. ``lively`` makes the first an idle lender and the second a busy
    borrower with room to grow, so that most examples actually move money."""
    size = draw(st.integers(max(min_size, 2 if lively else 0), len(NAMES)))
    ids = draw(st.permutations(NAMES))[:size]
    fleet = [draw(agent_budgets(agent_id)) for agent_id in ids]
    if lively:
        idle, busy = draw(st.integers(100, 20_000)), draw(st.integers(100, 20_000))
        fleet[0] = AgentBudget(ids[0], cents(idle), D("0.00"), D("0.00"), cents(idle))
        fleet[1] = AgentBudget(ids[1], cents(busy), cents(busy * 2), cents(busy), cents(busy * 3))
    return fleet


@st.composite
def policies(draw: st.DrawFn) -> RebalancePolicy:
    if draw(st.booleans()):
        return RebalancePolicy()
    receiver_above = draw(st.integers(1, 100))
    donor_below = draw(st.integers(0, receiver_above - 1))
    share = draw(st.integers(0, 100))
    return RebalancePolicy(True, cents(donor_below), cents(receiver_above), cents(share))


def total_of(fleet: list[AgentBudget]) -> Decimal:
    return sum((a.baseline for a in fleet), D("0.00"))


def is_donor(a: AgentBudget, p: RebalancePolicy) -> bool:
    return not a.held and a.baseline > 0 and a.spend / a.baseline < p.donor_below


def is_receiver(a: AgentBudget, p: RebalancePolicy) -> bool:
    return not a.held and a.baseline > 0 and a.spend / a.baseline > p.receiver_above


def capacity(a: AgentBudget, p: RebalancePolicy) -> Decimal:
    """Reference: what a donor may give, written the way the issue states it."""
    share_of_unused = ((a.baseline - a.spend) * p.share).quantize(CENT, rounding=ROUND_FLOOR)
    return max(D("0.00"), min(share_of_unused, a.baseline - a.minimum))


def need(a: AgentBudget, p: RebalancePolicy) -> Decimal:
    """Reference: what brings a receiver back to the receiver threshold, within its maximum."""
    with localcontext() as ctx:
        ctx.prec = 60
        wanted = (a.spend / p.receiver_above).quantize(CENT, rounding=ROUND_CEILING) - a.baseline
    return max(D("0.00"), min(wanted, a.maximum - a.baseline))


def flows(result: Rebalance) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    out: dict[str, Decimal] = defaultdict(lambda: D("0.00"))
    into: dict[str, Decimal] = defaultdict(lambda: D("0.00"))
    for t in result.transfers:
        out[t.donor] += t.amount
        into[t.receiver] += t.amount
    return out, into


@properties
@given(fleet=st.one_of(fleets(), fleets(lively=True)), policy=policies(), slack=st.integers(0, 10_000))
def test_conserves_the_fleet_total_to_the_cent_within_every_agents_bounds(
    fleet: list[AgentBudget], policy: RebalancePolicy, slack: int
) -> None:
    fleet_total = total_of(fleet) + cents(slack)
    result = rebalance(fleet, policy, fleet_total)

    assert set(result.caps) == set(result.adjustments) == {a.agent_id for a in fleet}
    assert sum(result.caps.values(), D("0.00")) == total_of(fleet)
    for a in fleet:
        cap = result.caps[a.agent_id]
        assert a.minimum <= cap <= a.maximum
        assert cap <= fleet_total
        assert cap == a.baseline + result.adjustments[a.agent_id]
    for amount in [*result.caps.values(), *result.adjustments.values(), *(t.amount for t in result.transfers)]:
        assert amount.as_tuple().exponent == -2
    assert all(t.amount >= CENT and t.donor != t.receiver for t in result.transfers)


@properties
@given(fleet=st.one_of(fleets(), fleets(lively=True)), policy=policies())
def test_only_donors_give_only_receivers_get_and_never_more_than_the_rule_allows(
    fleet: list[AgentBudget], policy: RebalancePolicy
) -> None:
    result = rebalance(fleet, policy, total_of(fleet))
    out, into = flows(result)

    for a in fleet:
        adjustment = result.adjustments[a.agent_id]
        assert adjustment == into[a.agent_id] - out[a.agent_id]
        assert not (out[a.agent_id] and into[a.agent_id])
        if out[a.agent_id]:
            assert is_donor(a, policy)
            assert out[a.agent_id] <= capacity(a, policy)
            assert result.caps[a.agent_id] >= a.spend, "a donor is never cut below what it already spent"
        if into[a.agent_id]:
            assert is_receiver(a, policy)
            assert into[a.agent_id] <= need(a, policy)
        if a.held:
            assert adjustment == 0

    donors = [capacity(a, policy) for a in fleet if is_donor(a, policy)]
    receivers = [need(a, policy) for a in fleet if is_receiver(a, policy)]
    assert result.moved == min(sum(donors, D("0.00")), sum(receivers, D("0.00")))
    assert result.changed == (result.moved > 0)


@properties
@given(data=st.data(), fleet=st.one_of(fleets(), fleets(lively=True)), policy=policies())
def test_result_does_not_depend_on_input_order_or_the_decimal_context(
    data: st.DataObject, fleet: list[AgentBudget], policy: RebalancePolicy
) -> None:
    fleet_total = total_of(fleet)
    result = rebalance(fleet, policy, fleet_total)
    shuffled = data.draw(st.permutations(fleet))
    with localcontext() as ctx:
        ctx.prec = 3  # would round 10.01 to 10.0 if anything used the ambient context
        again = rebalance(shuffled, policy, fleet_total)
        assert again == result
        assert [again.explain(a.agent_id) for a in fleet] == [result.explain(a.agent_id) for a in fleet]


@properties
@given(fleet=fleets(), policy=policies())
def test_disabled_policy_changes_nothing(fleet: list[AgentBudget], policy: RebalancePolicy) -> None:
    disabled = RebalancePolicy(False, policy.donor_below, policy.receiver_above, policy.share)
    result = rebalance(fleet, disabled, total_of(fleet))
    assert result.caps == {a.agent_id: a.baseline for a in fleet}
    assert not result.changed and result.transfers == ()
    assert result.notes == ("rebalancing disabled by policy",)


@properties
@given(fleet=fleets(min_size=1), policy=policies(), drop=st.sampled_from(["donors", "receivers"]))
def test_without_donors_or_without_receivers_nothing_moves(
    fleet: list[AgentBudget], policy: RebalancePolicy, drop: str
) -> None:
    # Hold one whole side: with nobody to give (or nobody to take), every cap stays put.
    side = is_donor if drop == "donors" else is_receiver
    fleet = [
        AgentBudget(a.agent_id, a.baseline, a.spend, a.minimum, a.maximum, held=a.held or side(a, policy))
        for a in fleet
    ]
    result = rebalance(fleet, policy, total_of(fleet))
    assert result.caps == {a.agent_id: a.baseline for a in fleet}
    assert not result.changed and result.transfers == ()
    assert any(note.startswith(f"no {drop[:-1]}") for note in result.notes)


@properties
@given(fleet=fleets(min_size=1), policy=policies(), over=st.integers(1, 10_000))
def test_baselines_over_the_fleet_total_change_nothing(
    fleet: list[AgentBudget], policy: RebalancePolicy, over: int
) -> None:
    fleet_total = total_of(fleet) - cents(over)
    if fleet_total < 0:
        fleet_total = D("0.00")
        if total_of(fleet) == 0:
            return
    result = rebalance(fleet, policy, fleet_total)
    assert result.caps == {a.agent_id: a.baseline for a in fleet}
    assert not result.changed
    assert "over the fleet daily total" in result.notes[0]


def research_fleet(**spend: str) -> list[AgentBudget]:
    """The canonical research fleet (README): baselines 80/30/30/20/15, total 200."""
    baselines = {"orch-01": "80.00", "res-01": "30.00", "res-02": "30.00", "sum-01": "20.00", "cls-01": "15.00"}
    return [
        AgentBudget(agent_id, D(b), D(spend.get(agent_id.replace("-", "_"), str(D(b) / 2))), D("5.00"), D(b) * 2)
        for agent_id, b in baselines.items()
    ]


def test_research_fleet_lends_the_idle_summarizer_budget_to_the_busy_researcher() -> None:
    fleet = research_fleet(sum_01="1.00", res_01="28.50")  # 5 % and 95 % utilization
    result = rebalance(fleet, RebalancePolicy(), D("200.00"))

    # res-01 asks for 28.50 / 0.80 = 35.625 → 35.63 (+5.63); sum-01 could give 9.50.
    assert result.transfers == (Transfer("sum-01", "res-01", D("5.63")),)
    assert result.caps == {
        "orch-01": D("80.00"),
        "res-01": D("35.63"),
        "res-02": D("30.00"),
        "sum-01": D("14.37"),
        "cls-01": D("15.00"),
    }
    assert sum(result.caps.values()) == D("175.00") == total_of(fleet)
    assert result.explain("res-01") == "res-01 daily cap 30.00 → 35.63: rebalanced +5.63 from sum-01"
    assert result.explain("sum-01") == "sum-01 daily cap 20.00 → 14.37: rebalanced -5.63 to res-01"
    assert result.explain("orch-01") == "orch-01 daily cap 80.00: baseline, not rebalanced"
    assert result.explain("res-01", "USD") == (
        "res-01 daily cap 30.00 USD → 35.63 USD: rebalanced +5.63 USD from sum-01"
    )


def test_two_donors_share_the_load_in_proportion_to_what_they_can_give() -> None:
    fleet = research_fleet(sum_01="1.00", cls_01="1.50", res_01="30.00")
    result = rebalance(fleet, RebalancePolicy(), D("200.00"))

    # Capacities 9.50 and 6.75; 7.50 split 438.46 : 311.54 cents; the leftover cent goes to
    # the larger remainder (cls-01).
    assert result.adjustments["sum-01"] == D("-4.38")
    assert result.adjustments["cls-01"] == D("-3.12")
    assert result.explain("res-01") == "res-01 daily cap 30.00 → 37.50: rebalanced +7.50 from sum-01, cls-01"
    assert result.moved == D("7.50")


def test_a_donor_floored_at_its_minimum_gives_only_down_to_it_and_the_total_still_holds() -> None:
    # The naive version takes 50 % of sum-01's unused 20.00 (10.00), floors sum-01 at its
    # 18.00 minimum, and still hands res-01 the full 10.00: 8.00 appears from nowhere.
    fleet = [
        AgentBudget("sum-01", D("20.00"), D("0.00"), D("18.00"), D("20.00")),
        AgentBudget("res-01", D("30.00"), D("30.00"), D("30.00"), D("60.00")),
    ]
    result = rebalance(fleet, RebalancePolicy(), D("50.00"))
    assert result.caps == {"sum-01": D("18.00"), "res-01": D("32.00")}


def test_receiver_capped_at_its_maximum_takes_only_what_fits() -> None:
    fleet = [
        AgentBudget("sum-01", D("40.00"), D("0.00"), D("0.00"), D("40.00")),
        AgentBudget("res-01", D("30.00"), D("30.00"), D("0.00"), D("31.00")),
        AgentBudget("res-02", D("30.00"), D("30.00"), D("0.00"), D("30.00")),
    ]
    result = rebalance(fleet, RebalancePolicy(), D("100.00"))
    assert result.caps == {"sum-01": D("39.00"), "res-01": D("31.00"), "res-02": D("30.00")}


def test_adjustments_expire_when_spend_recovers_and_grow_while_demand_persists() -> None:
    policy = RebalancePolicy()
    busy = rebalance(research_fleet(sum_01="1.00", cls_01="1.50", res_01="30.00"), policy, D("200.00"))
    assert busy.caps["res-01"] == D("37.50")

    # res-01 keeps spending into its raised cap: measured against its baseline it now asks for more.
    busier = rebalance(research_fleet(sum_01="1.00", cls_01="1.50", res_01="37.50"), policy, D("200.00"))
    # It asks for 37.50 / 0.80 - 30.00 = +16.88; the donors can give only 9.50 + 6.75.
    assert busier.caps["res-01"] == D("46.25")
    assert busier.moved == D("16.25")

    # Next pass after the busy hours aged out of the 24 h window: everyone back at baseline.
    calm = rebalance(research_fleet(sum_01="10.00", res_01="20.00"), policy, D("200.00"))
    assert not calm.changed
    assert calm.caps == {a.agent_id: a.baseline for a in research_fleet()}


def test_held_agents_neither_lend_nor_borrow() -> None:
    fleet = [
        AgentBudget("sum-01", D("20.00"), D("0.00"), D("0.00"), D("20.00"), held=True),
        AgentBudget("cls-01", D("20.00"), D("0.00"), D("0.00"), D("20.00")),
        AgentBudget("res-01", D("30.00"), D("30.00"), D("0.00"), D("60.00"), held=True),
        AgentBudget("res-02", D("30.00"), D("30.00"), D("0.00"), D("60.00")),
    ]
    result = rebalance(fleet, RebalancePolicy(), D("100.00"))
    assert result.transfers == (Transfer("cls-01", "res-02", D("7.50")),)
    assert result.explain("sum-01") == "sum-01 daily cap 20.00: baseline, held"


def test_a_zero_baseline_is_a_deliberate_stop_and_never_receives() -> None:
    fleet = [
        AgentBudget("sum-01", D("20.00"), D("0.00"), D("0.00"), D("20.00")),
        AgentBudget("res-01", D("0.00"), D("5.00"), D("0.00"), D("60.00")),
    ]
    result = rebalance(fleet, RebalancePolicy(), D("100.00"))
    assert not result.changed
    assert any(note.startswith("no receiver (no agent above 80 %") for note in result.notes)


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        (AgentBudget("a", D("-1.00"), D("0"), D("0"), D("1")), "baseline daily cap must not be negative"),
        (AgentBudget("a", D("10.001"), D("0"), D("0"), D("20")), "more than 2 decimal places"),
        (AgentBudget("a", D("10"), D("0.005"), D("0"), D("20")), "'a' spend has more than 2 decimal places"),
        (AgentBudget("a", D("10"), D("0"), D("11"), D("20")), "minimum daily cap 11.00 is above its baseline 10.00"),
        (AgentBudget("a", D("10"), D("0"), D("0"), D("9.99")), "maximum daily cap 9.99 is below its baseline 10.00"),
        (AgentBudget("a", D("NaN"), D("0"), D("0"), D("1")), "must be finite"),
        (AgentBudget("a", 10.0, D("0"), D("0"), D("20")), "must be a Decimal, got float"),  # type: ignore[arg-type]
        (AgentBudget("", D("10"), D("0"), D("0"), D("20")), "non-empty string"),
    ],
)
def test_bad_agents_are_refused_with_a_message_that_names_them(agent: AgentBudget, message: str) -> None:
    with pytest.raises(RebalanceInputError, match=message):
        rebalance([agent], RebalancePolicy(), D("100.00"))


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (RebalancePolicy(share=D("1.01")), "share must be between 0 and 1"),
        (RebalancePolicy(receiver_above=D("0")), "receiver_above must be above 0"),
        (RebalancePolicy(donor_below=D("0.80")), "donor_below must be at least 0 and below receiver_above"),
        (RebalancePolicy(donor_below=D("-0.10")), "donor_below must be at least 0"),
        (RebalancePolicy(share=0.5), "share must be a finite Decimal"),  # type: ignore[arg-type]
    ],
)
def test_bad_policies_are_refused(policy: RebalancePolicy, message: str) -> None:
    with pytest.raises(RebalanceInputError, match=message):
        rebalance([], policy, D("100.00"))


def test_duplicate_agents_and_a_bad_fleet_total_are_refused() -> None:
    a = AgentBudget("res-01", D("10"), D("0"), D("0"), D("20"))
    with pytest.raises(RebalanceInputError, match="'res-01' appears twice"):
        rebalance([a, a], RebalancePolicy(), D("100.00"))
    with pytest.raises(RebalanceInputError, match="fleet daily total must not be negative"):
        rebalance([a], RebalancePolicy(), D("-1"))
    assert issubclass(RebalanceInputError, ValueError)
