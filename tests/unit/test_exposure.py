"""The exposure policy: what a desired state authorizes, per fleet, and when an increase
waits for a person. Pure; hypothesis drives generated fleets."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from policies.exposure import (
    AGENTS,
    CURRENCY,
    DAILY_CAPS,
    DAILY_FUNDING_LIMIT,
    FUNDING_TARGETS,
    INFINITY,
    MONEY_DIMENSIONS,
    PER_RUN_CEILING,
    Exposure,
    ExposureReview,
    diff,
    exposure_of,
    review,
)
from policies.spec import AgentSpec, ApprovalPolicy, DesiredState, FleetSpec

cents = st.decimals(min_value=0, max_value=10**6, places=2, allow_nan=False, allow_infinity=False)


def agent(
    agent_id: str, fleet: str = "f", daily: str = "10.00", monthly: str = "100.00", target: str = "50.00"
) -> AgentSpec:
    return AgentSpec(agent_id, fleet, "t", Decimal(daily), Decimal(monthly), Decimal("0.00"), Decimal(target), (75,))


def fleet(
    *agents: AgentSpec,
    name: str = "f",
    currency: str = "USD",
    ceiling: str = "100.00",
    policy: ApprovalPolicy | None = None,
) -> FleetSpec:
    return FleetSpec(
        name, currency, Decimal("1000000.00"), Decimal(ceiling), tuple(agents), approval=policy or ApprovalPolicy()
    )


@st.composite
def agents_st(draw: st.DrawFn, fleet_name: str = "f") -> tuple[AgentSpec, ...]:
    ids = draw(st.lists(st.sampled_from([f"a{i}" for i in range(8)]), unique=True, max_size=6))
    out = []
    for agent_id in ids:
        daily = draw(cents)
        out.append(
            AgentSpec(agent_id, fleet_name, "t", daily, daily + draw(cents), Decimal("0.00"), draw(cents), (75,))
        )
    return tuple(out)


@st.composite
def desired_st(draw: st.DrawFn) -> DesiredState:
    fleets = []
    for name in draw(st.lists(st.sampled_from(["f", "g", "h"]), unique=True, max_size=3)):
        fleets.append(
            FleetSpec(
                name,
                draw(st.sampled_from(["USD", "EUR"])),
                Decimal("1000000.00"),
                draw(cents),
                draw(agents_st(name)),
                approval=ApprovalPolicy(draw(cents), draw(cents), draw(cents), draw(st.integers(0, 5))),
            )
        )
    return DesiredState(tuple(fleets))


def test_exposure_sums_caps_targets_and_the_ceiling_per_fleet_in_its_currency() -> None:
    desired = DesiredState(
        (
            fleet(
                agent("a", daily="30.00", monthly="600.00", target="75.00"),
                agent("b", daily="15.00", monthly="300.00", target="40.00"),
                ceiling="500.00",
            ),
            fleet(agent("c", fleet="g"), name="g", currency="EUR"),
        )
    )
    exposure = exposure_of(desired)
    f = exposure.fleet("f")
    assert f is not None and f.currency == "USD"
    assert (f.daily_caps, f.monthly_caps, f.funding_targets, f.per_run_ceiling) == (
        Decimal("45.00"),
        Decimal("900.00"),
        Decimal("115.00"),
        Decimal("500.00"),
    )
    assert f.agents == {"a", "b"}
    g = exposure.fleet("g")
    assert g is not None and g.currency == "EUR" and g.daily_caps == Decimal("10.00")
    assert Exposure.from_dict(exposure.to_dict()) == exposure


def test_the_repro_raising_target_and_ceiling_needs_approval_and_lowering_does_not() -> None:
    policy = ApprovalPolicy(Decimal("50.00"), Decimal("1000.00"), Decimal("100.00"), 1)
    approved = exposure_of(DesiredState((fleet(agent("a"), policy=policy),)))
    raised = exposure_of(DesiredState((fleet(agent("a", target="1000000.00"), ceiling="1000000.00", policy=policy),)))
    verdict = review(approved, raised)
    assert verdict.requires_approval
    # The default rolling daily funding limit is perRunCeiling + dailyBudgetTotal: raising the
    # ceiling raises it by as much, and that is an increase of its own.
    assert {e.dimension for e in verdict.excesses} == {FUNDING_TARGETS, PER_RUN_CEILING, DAILY_FUNDING_LIMIT}
    assert "+999950.00 USD in funding targets" in verdict.lines()[0]
    assert (
        verdict.deltas[0].delta(DAILY_FUNDING_LIMIT) == verdict.deltas[0].delta(PER_RUN_CEILING) == Decimal("999900.00")
    )
    # With an explicit dailyLimit that stays put, the ceiling and targets still wait, the limit does not.
    pinned = exposure_of(
        DesiredState(
            (
                replace(
                    fleet(agent("a", target="1000000.00"), ceiling="1000000.00", policy=policy),
                    daily_funding_limit=approved.fleets[0].daily_funding_limit,
                ),
            )
        )
    )
    assert {e.dimension for e in review(approved, pinned).excesses} == {FUNDING_TARGETS, PER_RUN_CEILING}
    lowered = exposure_of(
        DesiredState((fleet(agent("a", daily="5.00", target="10.00"), ceiling="50.00", policy=policy),))
    )
    assert not review(approved, lowered).requires_approval
    small = exposure_of(DesiredState((fleet(agent("a", daily="45.00", monthly="150.00"), policy=policy),)))
    assert not review(approved, small).requires_approval  # +35/day, +50/month: within the bound


def test_a_commit_cannot_raise_its_own_bound_rename_its_fleet_or_switch_currency() -> None:
    approved = exposure_of(DesiredState((fleet(agent("a")),)))  # bound 0
    generous = ApprovalPolicy(Decimal("1000000.00"), Decimal("1000000.00"), Decimal("1000000.00"), 100)
    own_bound = exposure_of(DesiredState((fleet(agent("a", daily="90.00"), policy=generous),)))
    assert review(approved, own_bound).requires_approval
    renamed = exposure_of(DesiredState((fleet(agent("a", fleet="new"), name="new", policy=generous),)))
    assert review(approved, renamed).requires_approval  # a new fleet gets a zero bound
    switched = exposure_of(DesiredState((fleet(agent("a"), currency="CREDITS"),)))
    # USD → CREDITS with the same figures is 100× less, but amounts cannot be compared: waits.
    verdict = review(approved, switched)
    assert verdict.requires_approval and CURRENCY in {e.dimension for e in verdict.excesses}


def test_removing_a_rolling_funding_limit_is_an_unbounded_increase() -> None:
    with_limit = replace(
        exposure_of(DesiredState((fleet(agent("a")),))).fleets[0], daily_funding_limit=Decimal("100.00")
    )
    without = replace(with_limit, daily_funding_limit=None)
    delta = diff(Exposure((with_limit,)), Exposure((without,)))[0]
    assert delta.delta(DAILY_FUNDING_LIMIT) == INFINITY
    assert review(Exposure((with_limit,)), Exposure((without,))).requires_approval
    assert not review(Exposure((without,)), Exposure((with_limit,))).requires_approval


def test_bootstrap_judges_the_first_revision_over_zero_with_its_own_bound() -> None:
    policy = ApprovalPolicy(Decimal("15.00"), Decimal("200.00"), Decimal("100.00"), 1)
    first = exposure_of(DesiredState((fleet(agent("a"), policy=policy),)))
    verdict = review(None, first)
    assert verdict.bootstrap and not verdict.requires_approval
    two = exposure_of(DesiredState((fleet(agent("a"), agent("b"), policy=policy),)))
    assert {e.dimension for e in review(None, two).excesses} == {AGENTS, DAILY_CAPS}
    assert review(None, exposure_of(DesiredState((fleet(agent("a")),)))).requires_approval  # default bound 0


@given(desired_st(), desired_st())
def test_delta_is_antisymmetric_when_currencies_agree(a: DesiredState, b: DesiredState) -> None:
    ea, eb = exposure_of(a), exposure_of(b)
    forward, backward = diff(ea, eb), diff(eb, ea)
    assert [d.fleet for d in forward] == [d.fleet for d in backward]
    for f, r in zip(forward, backward, strict=True):
        if f.currency_changed:
            assert r.currency_changed
            continue
        for dim in MONEY_DIMENSIONS:
            assert f.delta(dim) == -r.delta(dim)
        assert f.agents_added == r.agents_removed and f.agents_removed == r.agents_added


@given(desired_st())
def test_no_change_never_needs_approval_and_lowering_never_waits(d: DesiredState) -> None:
    e = exposure_of(d)
    assert not review(e, e).requires_approval and not review(e, e).increases
    halved = DesiredState(
        tuple(
            replace(
                f,
                funding_ceiling=f.funding_ceiling / 2,
                agents=tuple(
                    replace(
                        a, daily_cap=a.daily_cap / 2, monthly_cap=a.monthly_cap / 2, funding_target=a.funding_target / 2
                    )
                    for a in f.agents[1:]
                ),
            )
            for f in d.fleets[1:]
        )
    )
    assert not review(e, exposure_of(halved)).requires_approval


@given(desired_st(), agents_st("f"))
def test_adding_an_agent_never_lowers_exposure(d: DesiredState, extra: tuple[AgentSpec, ...]) -> None:
    if not d.fleets:
        return
    first = d.fleets[0]
    ids = {a.agent_id for a in first.agents}
    new = tuple(
        replace(a, fleet=first.name, agent_id="new-" + a.agent_id) for a in extra if "new-" + a.agent_id not in ids
    )
    if not new:
        return
    grown = DesiredState((replace(first, agents=first.agents + new), *d.fleets[1:]))
    delta = next(x for x in diff(exposure_of(d), exposure_of(grown)) if x.fleet == first.name)
    assert all(delta.delta(dim) >= 0 for dim in MONEY_DIMENSIONS)
    assert len(delta.agents_added) == len(new) and delta.increases
    verdict = review(exposure_of(d), exposure_of(grown))
    assert verdict.requires_approval == (
        len(new) > first.approval.agents
        or delta.delta(DAILY_CAPS) > first.approval.daily_caps
        or delta.delta("monthly_caps") > first.approval.monthly_caps
        or delta.delta(FUNDING_TARGETS) > first.approval.funding
    )


@given(desired_st(), desired_st())
def test_review_survives_its_saved_form(a: DesiredState, b: DesiredState) -> None:
    verdict = review(exposure_of(a), exposure_of(b))
    back = ExposureReview.from_dict(verdict.to_dict())
    assert back.requires_approval == verdict.requires_approval
    assert back == verdict and back.lines() == verdict.lines()
