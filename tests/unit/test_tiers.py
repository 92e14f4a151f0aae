"""Tier resolution (policies.tiers): precedence rules and budget invariants, by example and
by property."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import event, given, settings
from hypothesis import strategies as st

from policies.tiers import (
    AgentDecl,
    FleetDecl,
    FundingDecl,
    GroupDecl,
    Origin,
    TierDecl,
    resolve,
    resolve_agent,
)

# --- builders and strategies -----------------------------------------------------------------

cents = st.integers(min_value=0, max_value=50_000).map(lambda c: Decimal(c).scaleb(-2))
maybe_cents = st.none() | cents
fundings = st.builds(FundingDecl, floor=maybe_cents, target=maybe_cents)
thresholds = st.lists(st.integers(1, 1000), min_size=1, max_size=4, unique=True).map(lambda v: tuple(sorted(v)))
labels = st.dictionaries(st.sampled_from(["team", "env", "role"]), st.sampled_from(["a", "b", "c"]), max_size=3)
TIER_NAMES = ["orchestrator", "researcher", "summarizer", "classifier"]


def _origin(path: str, line: int = 1) -> Origin:
    return Origin("fleet.yaml", path, line)


@st.composite
def tiers(draw: st.DrawFn) -> dict[str, TierDecl]:
    names = draw(st.lists(st.sampled_from(TIER_NAMES), min_size=1, max_size=4, unique=True))
    out: dict[str, TierDecl] = {}
    for name in names:
        daily = draw(cents)
        monthly = daily * draw(st.integers(0, 40)) if draw(st.booleans()) else draw(cents)
        out[name] = TierDecl(name, daily, monthly, draw(fundings), _origin(f"spec.tiers.{name}"))
    return out


@st.composite
def agents(draw: st.DrawFn, tier_names: list[str], count: int, prefix: str = "a") -> tuple[AgentDecl, ...]:
    out = []
    for i in range(count):
        out.append(
            AgentDecl(
                agent_id=f"{prefix}-{i:02d}",
                tier=draw(
                    st.sampled_from([*tier_names, "unknown-tier"])
                    if draw(st.booleans()) and i == 0
                    else st.sampled_from(tier_names)
                ),
                daily_cap=draw(maybe_cents),
                monthly_cap=draw(maybe_cents),
                funding=draw(fundings),
                thresholds=draw(st.none() | thresholds),
                labels=draw(labels),
                origin=_origin(f"spec.agents[{i}]", line=100 + i),
            )
        )
    return tuple(out)


@st.composite
def fleets(draw: st.DrawFn) -> FleetDecl:
    tier_map = draw(tiers())
    members = draw(agents(list(tier_map), draw(st.integers(0, 8))))
    return FleetDecl(
        name="research",
        currency="USD",
        daily_total=draw(cents),
        funding_ceiling=draw(cents),
        tiers=tier_map,
        agents=members,
        thresholds=draw(thresholds),
        default_funding=draw(fundings),
        default_labels=draw(labels),
        origin=Origin("fleet.yaml", "", 4, {"spec.dailyBudgetTotal": 7}),
    )


@st.composite
def plausible_fleets(draw: st.DrawFn) -> FleetDecl:
    """Fleets that are mostly well-formed, so the "resolves cleanly" branch is really exercised;
    the total is drawn around the caps' sum so it lands on both sides of the limit."""
    small = st.integers(0, 10_000).map(lambda c: Decimal(c).scaleb(-2))
    tier_map: dict[str, TierDecl] = {}
    for name in draw(st.lists(st.sampled_from(TIER_NAMES), min_size=1, max_size=4, unique=True)):
        daily = draw(small)
        floor = draw(st.none() | small)
        funding = FundingDecl(floor, None if floor is None else floor + draw(small))
        tier_map[name] = TierDecl(name, daily, daily * draw(st.integers(1, 31)), funding, _origin(f"spec.tiers.{name}"))
    members = []
    for i in range(draw(st.integers(1, 8))):
        tier = tier_map[draw(st.sampled_from(sorted(tier_map)))]
        override = draw(st.none() | small)
        members.append(
            AgentDecl(
                f"a-{i:02d}",
                tier.name,
                daily_cap=override,
                monthly_cap=None if override is None else override * 31,
                labels=draw(labels),
                origin=_origin(f"spec.agents[{i}]", 100 + i),
            )
        )
    caps = sum(((a.daily_cap if a.daily_cap is not None else tier_map[a.tier].daily_cap) for a in members), Decimal(0))
    total = Decimal(draw(st.integers(int(caps * 50), int(caps * 300) + 1))).scaleb(-2)
    default_floor = draw(small)
    return FleetDecl(
        name="research",
        currency="USD",
        daily_total=total,
        funding_ceiling=total,
        tiers=tier_map,
        agents=tuple(members),
        default_funding=FundingDecl(default_floor, default_floor + draw(small)),
        default_labels=draw(labels),
        origin=Origin("fleet.yaml", "", 4, {"spec.dailyBudgetTotal": 7}),
    )


any_fleets = fleets() | plausible_fleets()


def _first(*values: Decimal | None) -> Decimal | None:
    return next((v for v in values if v is not None), None)


# --- properties ------------------------------------------------------------------------------


@given(any_fleets)
def test_override_precedence(fleet: FleetDecl) -> None:
    for agent in fleet.agents:
        spec, issues = resolve_agent(fleet, agent)
        if spec is None:
            assert issues
            continue
        tier = fleet.tiers[agent.tier]
        assert spec.daily_cap == _first(agent.daily_cap, tier.daily_cap)
        assert spec.monthly_cap == _first(agent.monthly_cap, tier.monthly_cap)
        assert spec.funding_floor == _first(agent.funding.floor, tier.funding.floor, fleet.default_funding.floor)
        assert spec.funding_target == _first(agent.funding.target, tier.funding.target, fleet.default_funding.target)
        assert spec.alert_thresholds == (agent.thresholds if agent.thresholds is not None else fleet.thresholds)
        assert dict(spec.labels) == {**fleet.default_labels, **agent.labels}
        assert {k: spec.labels[k] for k in agent.labels} == dict(agent.labels)  # the agent wins


@given(any_fleets)
def test_a_fleet_that_resolves_cleanly_never_exceeds_its_total(fleet: FleetDecl) -> None:
    result = resolve([fleet])
    event(f"ok={result.ok}, agents={bool(fleet.agents)}")
    if not result.ok:
        return
    (spec,) = result.state.fleets
    assert len(spec.agents) == len(fleet.agents)
    assert sum((a.daily_cap for a in spec.agents), Decimal(0)) <= fleet.daily_total
    for agent in spec.agents:
        assert agent.daily_cap <= fleet.daily_total
        assert agent.monthly_cap >= agent.daily_cap
        assert agent.funding_floor <= agent.funding_target


@given(any_fleets)
def test_over_budget_is_always_reported_at_the_total(fleet: FleetDecl) -> None:
    result = resolve([fleet])
    resolved = [resolve_agent(fleet, a)[0] for a in fleet.agents]
    total = sum((s.daily_cap for s in resolved if s is not None), Decimal(0))
    over = [i for i in result.issues if i.field == "spec.dailyBudgetTotal"]
    if total > fleet.daily_total:
        (issue,) = over
        assert issue.line == 7
        assert f"sum to {total:.2f} USD, {total - fleet.daily_total:.2f} over" in issue.message
    else:
        assert over == []


@given(fleets())
@settings(max_examples=50)
def test_resolution_is_deterministic(fleet: FleetDecl) -> None:
    assert resolve([fleet]) == resolve([fleet])


@given(fleets(), st.data())
def test_agent_ids_are_unique_across_fleets_and_groups(fleet: FleetDecl, data: st.DataObject) -> None:
    if not fleet.agents:
        return
    victim = data.draw(st.sampled_from(fleet.agents))
    clone = AgentDecl(victim.agent_id, victim.tier, origin=Origin("group.yaml", "spec.agents[0]", 9))
    group = GroupDecl("extra", "research", (clone,), Origin("group.yaml", "", 3))
    result = resolve([fleet], [group])
    dupes = [i for i in result.issues if i.message.startswith("duplicate agent id")]
    assert [(i.file, i.line, i.field) for i in dupes] == [("group.yaml", 9, "spec.agents[0].id")]
    assert f"already declared at fleet.yaml:{victim.origin.line}" in dupes[0].message


# --- examples --------------------------------------------------------------------------------


def _fleet(**overrides: object) -> FleetDecl:
    base: dict[str, object] = {
        "name": "research",
        "currency": "USD",
        "daily_total": Decimal("200.00"),
        "funding_ceiling": Decimal("500.00"),
        "tiers": {
            "researcher": TierDecl(
                "researcher",
                Decimal("30.00"),
                Decimal("600.00"),
                FundingDecl(Decimal("40.00"), Decimal("75.00")),
                Origin("f.yaml", "spec.tiers.researcher", 12, {"dailyCap": 13}),
            )
        },
        "origin": Origin("f.yaml", "", 4, {"spec.dailyBudgetTotal": 7}),
    }
    base.update(overrides)
    return FleetDecl(**base)  # type: ignore[arg-type]


def test_missing_funding_is_reported_at_the_agent_naming_the_field() -> None:
    tier = TierDecl("bare", Decimal("10.00"), Decimal("100.00"), origin=Origin("f.yaml", "spec.tiers.bare", 12))
    agent = AgentDecl("a-1", "bare", funding=FundingDecl(target=Decimal("5.00")),
                      origin=Origin("f.yaml", "spec.agents[0]", 20, {"funding.target": 22}))  # fmt: skip
    spec, issues = resolve_agent(_fleet(tiers={"bare": tier}), agent)
    assert spec is None
    assert [(i.line, i.field) for i in issues] == [(20, "spec.agents[0].funding.floor")]
    assert "funding floor is not set for agent 'a-1'" in issues[0].message


def test_tier_problem_is_reported_once_not_per_agent() -> None:
    tier = TierDecl("big", Decimal("250.00"), Decimal("9000.00"), FundingDecl(Decimal("1"), Decimal("2")),
                    Origin("f.yaml", "spec.tiers.big", 12, {"dailyCap": 13}))  # fmt: skip
    members = tuple(AgentDecl(f"a-{i}", "big", origin=Origin("f.yaml", f"spec.agents[{i}]", 20 + i)) for i in range(3))
    result = resolve([_fleet(tiers={"big": tier}, agents=members)])
    capped = [i for i in result.issues if "exceeds the fleet's dailyBudgetTotal" in i.message]
    assert [(i.line, i.field) for i in capped] == [(13, "spec.tiers.big.dailyCap")]


def test_unknown_fleet_is_not_reported_when_the_fleet_could_not_be_checked() -> None:
    group = GroupDecl("g", "other", (AgentDecl("x-1", "t"),), Origin("g.yaml", "", 3, {"spec.fleet": 6}))
    assert resolve([_fleet()], [group], unchecked_fleets={"other"}).ok
    assert resolve([_fleet()], [group], complete=False).ok
    (issue,) = resolve([_fleet()], [group]).issues
    assert (issue.file, issue.line, issue.field) == ("g.yaml", 6, "spec.fleet")
