"""``policies.report``: periods, grouping, totals and the views (pure; hypothesis for the
invariants: group totals are the sum of their agents, the label partition is complete, the
CSV round-trips through the csv module)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.report import (
    CSV_COLUMNS,
    MAX_PERIOD_DAYS,
    NO_LABEL,
    TOTAL,
    AgentUsage,
    DayUsage,
    GroupBy,
    InconsistentUsage,
    Period,
    PeriodError,
    UsageTotal,
    build_report,
    parse_group_by,
    parse_period,
    period_usage,
    render_csv,
    render_json,
    render_markdown,
    render_text,
)

NOW = datetime(2026, 11, 29, 18, 0, 0, tzinfo=UTC).timestamp()
NOV = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
DEC = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
OCT = datetime(2026, 10, 1, tzinfo=UTC).timestamp()
DAY = 86_400.0


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- periods


def test_a_past_month_is_its_calendar_bounds_start_inclusive_end_exclusive() -> None:
    period = parse_period("2026-10", None, NOW)
    assert (period.start, period.end, period.partial) == (OCT, NOV, False)
    assert (period.start_iso, period.end_iso) == ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")


def test_december_ends_on_the_first_of_january() -> None:
    period = parse_period("2025-12", None, NOW)
    assert period.end_iso == "2026-01-01T00:00:00Z"


def test_the_current_month_ends_now_and_says_so() -> None:
    period = parse_period("2026-11", None, NOW)
    assert (period.start, period.end, period.partial) == (NOV, NOW, True)


def test_no_option_is_the_current_month_to_date() -> None:
    assert parse_period(None, None, NOW) == parse_period("2026-11", None, NOW)


def test_a_day_and_since_forms() -> None:
    day = parse_period("2026-11-05", None, NOW)
    assert (day.start, day.end) == (ts("2026-11-05T00:00:00"), ts("2026-11-06T00:00:00"))
    last = parse_period(None, "30d", NOW)
    assert (last.start, last.end, last.label) == (NOW - 30 * DAY, NOW, "last 30d")
    assert parse_period(None, "12h", NOW).start == NOW - 12 * 3600
    assert parse_period(None, "2w", NOW).start == NOW - 14 * DAY
    since_day = parse_period(None, "2026-11-20", NOW)
    assert (since_day.start, since_day.end) == (ts("2026-11-20T00:00:00"), NOW)


@pytest.mark.parametrize(
    ("period", "since", "fragment"),
    [
        ("2026-12", None, "future"),
        ("2027-01-01", None, "future"),
        (None, "2026-11-30", "future"),
        ("2026-13", None, "not a valid date"),
        ("2026-02-30", None, "not a valid date"),
        ("2026/11", None, "expected a month"),
        ("nov", None, "expected a month"),
        (None, "30", "expected a duration"),
        (None, "0d", "longer than 0"),
        (None, "-3d", "expected a duration"),
        (None, f"{MAX_PERIOD_DAYS + 1}d", f"{MAX_PERIOD_DAYS} days"),
        ("2024-01", None, f"more than {MAX_PERIOD_DAYS} days ago"),
        ("2026-11", "30d", "not both"),
    ],
)
def test_bad_periods_are_refused_with_the_reason(period: str | None, since: str | None, fragment: str) -> None:
    with pytest.raises(PeriodError, match=fragment):
        parse_period(period, since, NOW)


def test_group_by_parsing() -> None:
    assert parse_group_by("fleet") == GroupBy("fleet")
    assert parse_group_by("label:team") == GroupBy("label", "team")
    for bad in ("team", "label:", "label:a b", "labels:team"):
        with pytest.raises(PeriodError):
            parse_group_by(bad)


# --------------------------------------------------------------------------- aggregation

NOV_PERIOD = Period(OCT, NOV, "2026-10")

money = st.decimals(min_value=0, max_value=Decimal("100000"), places=2, allow_nan=False, allow_infinity=False)
sub_cent = st.decimals(min_value=0, max_value=Decimal("1000"), places=3, allow_nan=False, allow_infinity=False)


@st.composite
def agent_usages(draw: st.DrawFn) -> list[AgentUsage]:
    count = draw(st.integers(min_value=0, max_value=12))
    out = []
    for index in range(count):
        fleet = draw(st.sampled_from(["prod", "dev", "eu"]))
        currency, rate = {"prod": ("USD", Decimal(100)), "dev": ("CREDITS", Decimal(1)), "eu": ("EUR", Decimal(3))}[
            fleet
        ]
        labels = draw(st.dictionaries(st.sampled_from(["team", "env"]), st.sampled_from(["a", "b", "=x"]), max_size=2))
        days = draw(st.dictionaries(st.integers(0, 30).map(lambda d: OCT + d * DAY), sub_cent, max_size=5))
        spend = sum(days.values(), Decimal(0))
        out.append(
            AgentUsage(
                agent_id=f"agent-{index}",
                fleet=fleet,
                currency=currency,
                rate=rate,
                labels=labels,
                daily_cap=draw(money),
                calls=draw(st.integers(0, 10_000)),
                spend=spend,
                daily_spend=days,
                top_ups=draw(money),
                top_up_count=draw(st.integers(0, 20)),
                rebalanced=draw(st.decimals(min_value=-500, max_value=500, places=2)),
                hold=draw(st.sampled_from([None, "runaway"])),
                error=draw(st.sampled_from([None, None, None, "gateway 500"])),
            )
        )
    return out


group_bys = st.sampled_from([GroupBy("fleet"), GroupBy("agent"), GroupBy("label", "team"), GroupBy("label", "env")])


@settings(max_examples=150, deadline=None)
@given(agents=agent_usages(), by=group_bys)
def test_group_totals_are_the_sum_of_their_agents(agents: list[AgentUsage], by: GroupBy) -> None:
    report = build_report(NOV_PERIOD, by, agents, generated_at=NOW)
    ok = [a for a in agents if a.error is None]
    for group in report.groups:
        members = [a for a in ok if a.agent_id in group.agents]
        assert group.calls == sum(a.calls for a in members)
        assert group.spend == sum((a.spend for a in members), Decimal(0))
        assert group.top_ups == sum((a.top_ups for a in members), Decimal(0))
        assert group.rebalanced == sum((a.rebalanced for a in members), Decimal(0))
    assert report.total.key == TOTAL
    assert report.total.calls == sum(g.calls for g in report.groups) == sum(a.calls for a in ok)
    assert report.total.spend == sum((g.spend for g in report.groups), Decimal(0))
    assert report.total.top_up_count == sum(g.top_up_count for g in report.groups)
    assert set(report.errors) == {a.agent_id for a in agents if a.error is not None}
    assert report.ok == all(a.error is None for a in agents)


@settings(max_examples=150, deadline=None)
@given(agents=agent_usages(), by=group_bys)
def test_every_agent_is_in_exactly_one_group_and_unlabelled_ones_in_none(agents: list[AgentUsage], by: GroupBy) -> None:
    report = build_report(NOV_PERIOD, by, agents, generated_at=NOW)
    placed = [agent for group in report.groups for agent in group.agents]
    assert sorted(placed) == sorted(a.agent_id for a in agents)
    groups = {g.key: g for g in report.groups}
    for agent in agents:
        if by.kind == "label":
            assert by.label is not None
            expected = agent.labels.get(by.label, NO_LABEL)
            assert agent.agent_id in groups[expected].agents
            if expected != NO_LABEL:
                assert groups[expected].tags[by.label] == expected
    if by.kind == "label" and NO_LABEL in groups:
        assert report.groups[-1].key == NO_LABEL  # last, after the real values
    assert len(report.groups) == len({by.key(a) for a in agents})


def test_a_label_valued_like_the_none_group_is_not_merged_with_unlabelled_agents() -> None:
    agents = [_agent("a1", labels={"team": NO_LABEL}, spend=Decimal(1)), _agent("a2", spend=Decimal(2))]
    report = build_report(NOV_PERIOD, GroupBy("label", "team"), agents, generated_at=NOW)
    assert [(g.agents, dict(g.tags)) for g in report.groups] == [(("a1",), {"team": NO_LABEL}), (("a2",), {})]


@settings(max_examples=150, deadline=None)
@given(agents=agent_usages(), by=group_bys)
def test_csv_round_trips_through_the_csv_module(agents: list[AgentUsage], by: GroupBy) -> None:
    report = build_report(NOV_PERIOD, by, agents, generated_at=NOW)
    reader = csv.DictReader(io.StringIO(render_csv(report), newline=""))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    rows = list(reader)
    assert len(rows) == len(report.groups)  # no totals row: summing the rows is the total
    for row, group in zip(rows, report.groups, strict=True):
        credits = Decimal(row["x_BilledCostCredits"])
        assert (row["PricingCurrency"], Decimal(row["PricingCurrencyEffectiveCost"])) == ("CREDITS", credits)
        assert credits == group.spend.quantize(Decimal("0.01"))
        assert (row["x_BilledCostCreditsExact"] == "true") == (credits == group.spend)
        assert int(row["x_Calls"]) == group.calls
        assert json.loads(row["Tags"]) == dict(group.tags)
        assert (row["ChargePeriodStart"], row["ChargePeriodEnd"]) == ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")
        assert row["BillingCurrency"] == group.currency
        billed = Decimal(row["BilledCost"])
        if group.currency == "CREDITS":
            assert billed == credits
        else:
            exact = row["x_BilledCostExact"] == "true"
            assert exact == (billed * group.rate == group.spend)
            assert abs(billed * group.rate - group.spend) <= group.rate / 200  # half a cent of the currency
        key = row["x_Group"]
        assert key == group.key or (key == "'" + group.key and group.key[0] in "=+-@")
        if by.kind == "agent":
            assert row["ResourceId"] == group.key
    assert sum((Decimal(r["x_BilledCostCredits"]) for r in rows), Decimal(0)) == sum(
        (g.spend.quantize(Decimal("0.01")) for g in report.groups), Decimal(0)
    )


def _agent(agent_id: str, **kw: object) -> AgentUsage:
    base: dict[str, object] = {"fleet": "prod", "currency": "USD", "rate": Decimal(100)}
    base.update(kw)
    return AgentUsage(agent_id, **base)  # type: ignore[arg-type]


def test_cap_utilization_peak_is_the_busiest_day_and_mean_the_average_day() -> None:
    days = {OCT: Decimal("10.00"), OCT + DAY: Decimal("40.00")}
    agent = _agent("a1", daily_cap=Decimal("50.00"), spend=Decimal("50.00"), daily_spend=days)
    other = _agent("a2", daily_cap=Decimal("50.00"), spend=Decimal("31.00"), daily_spend={OCT + DAY: Decimal("31.00")})
    report = build_report(NOV_PERIOD, GroupBy("fleet"), [agent, other], generated_at=NOW)
    (prod,) = report.groups
    assert prod.peak_utilization == Decimal("71.00") / Decimal("100.00")  # day 2: 40 + 31 of 100
    assert prod.mean_utilization == Decimal("81.00") / 31 / Decimal("100.00")
    assert "71.00 % / ≈2.61 %" in render_text(report)


def test_no_cap_means_no_utilization_rather_than_a_division_by_zero() -> None:
    report = build_report(NOV_PERIOD, GroupBy("agent"), [_agent("a1", spend=Decimal(5))], generated_at=NOW)
    assert report.groups[0].peak_utilization is None
    assert "no cap" in render_text(report)


def test_a_rounded_conversion_is_declared_never_silent() -> None:
    agent = _agent("a1", currency="EUR", rate=Decimal(3), spend=Decimal("1.00"), calls=10)
    report = build_report(NOV_PERIOD, GroupBy("agent"), [agent], generated_at=NOW)
    assert "≈0.33 EUR (1.00 credits)" in render_text(report)
    assert "≈0.33 EUR (1.00 credits)" in render_markdown(report)
    (row,) = csv.DictReader(io.StringIO(render_csv(report)))
    assert (row["BilledCost"], row["x_BilledCostExact"], row["x_BilledCostCredits"]) == ("0.33", "false", "1.00")
    data = json.loads(render_json(report))
    assert data["format_version"] == 1
    assert (data["groups"][0]["spend"], data["groups"][0]["spend_exact"]) == ("0.33", False)


def test_sub_cent_credits_are_declared_too() -> None:
    agent = _agent("a1", currency="CREDITS", rate=Decimal(1), spend=Decimal("0.015"))
    report = build_report(NOV_PERIOD, GroupBy("agent"), [agent], generated_at=NOW)
    assert "≈0.02 credits" in render_text(report)
    (row,) = csv.DictReader(io.StringIO(render_csv(report)))
    assert (row["BilledCost"], row["x_BilledCostExact"]) == ("0.02", "false")


def test_a_group_of_fleets_in_different_currencies_is_shown_in_credits() -> None:
    agents = [
        _agent("a1", labels={"team": "x"}, spend=Decimal("200.00")),
        _agent("a2", fleet="eu", currency="EUR", rate=Decimal(3), labels={"team": "x"}, spend=Decimal("3.00")),
    ]
    report = build_report(NOV_PERIOD, GroupBy("label", "team"), agents, generated_at=NOW)
    (team,) = report.groups
    assert (team.currency, team.spend, team.fleets) == ("CREDITS", Decimal("203.00"), ("eu", "prod"))
    assert "2.00 USD (200.00 credits)" in render_text(
        build_report(NOV_PERIOD, GroupBy("agent"), agents, generated_at=NOW)
    )


def test_a_failed_agent_is_reported_and_counts_nowhere() -> None:
    agents = [
        _agent("a1", spend=Decimal("5.00"), calls=3),
        _agent("a2", spend=Decimal("9.00"), rate=Decimal(1), error="gateway 503"),  # no rate could be read
    ]
    report = build_report(NOV_PERIOD, GroupBy("fleet"), agents, generated_at=NOW)
    assert report.groups[0].currency == "USD"  # the failed agent's missing rate does not change the group's
    assert not report.ok and report.errors == {"a2": "gateway 503"}
    assert (report.total.spend, report.total.calls, report.total.failed) == (Decimal("5.00"), 3, ("a2",))
    assert "FAILED a2: gateway 503" in render_text(report)
    assert json.loads(render_json(report))["errors"] == {"a2": "gateway 503"}


def test_incomplete_top_ups_are_a_lower_bound() -> None:
    agent = _agent("a1", top_ups=Decimal("100.00"), top_up_count=1, top_ups_complete=False)
    report = build_report(NOV_PERIOD, GroupBy("agent"), [agent], generated_at=NOW)
    assert "≥ 1.00 USD (100.00 credits) in 1" in render_text(report)
    (row,) = csv.DictReader(io.StringIO(render_csv(report)))
    assert row["x_TopUpsComplete"] == "false"


def test_hostile_labels_are_inert_in_every_view() -> None:
    agent = _agent("a1", labels={"team": '=HYPERLINK("x")\x1b[2J|**@here**'}, spend=Decimal(1))
    report = build_report(NOV_PERIOD, GroupBy("label", "team"), [agent], generated_at=NOW)
    text = render_text(report)
    assert "\x1b" not in text and "\\x1b" in text
    md = render_markdown(report)
    assert "@here" not in md and "\\|" in md
    (row,) = csv.DictReader(io.StringIO(render_csv(report)))
    assert row["x_Group"].startswith("'=")


# --------------------------------------------------------------------------- reading a period

OCT_DAYS = [DayUsage(OCT + d * DAY, 2, Decimal("0.20")) for d in range(31)]
NEXT = [DayUsage(NOV, 5, Decimal("0.50")), DayUsage(NOV + DAY, 1, Decimal("0.10"))]


def test_period_usage_keeps_the_days_before_the_end_only() -> None:
    total = UsageTotal(68, Decimal("6.80"))
    figures = period_usage([*OCT_DAYS, *NEXT], NOV_PERIOD, total, total)
    assert (figures.calls, figures.spend) == (62, Decimal("6.20"))
    assert len(figures.daily_spend) == 31 and NOV not in figures.daily_spend


def test_usage_landing_during_the_read_is_tolerated() -> None:
    figures = period_usage(
        [*OCT_DAYS, *NEXT], NOV_PERIOD, UsageTotal(66, Decimal("6.60")), UsageTotal(70, Decimal("7.00"))
    )
    assert figures.spend == Decimal("6.20")


@pytest.mark.parametrize(
    ("days", "before", "after"),
    [
        (OCT_DAYS[5:], UsageTotal(62, Decimal("6.20")), UsageTotal(62, Decimal("6.20"))),  # a capped limit
        (OCT_DAYS, UsageTotal(62, Decimal("6.30")), UsageTotal(62, Decimal("6.30"))),  # a cost that does not add up
        (OCT_DAYS, UsageTotal(10, Decimal("1.00")), UsageTotal(10, Decimal("1.00"))),  # more than usage knows
    ],
)
def test_buckets_that_do_not_add_up_to_usage_are_refused(
    days: list[DayUsage], before: UsageTotal, after: UsageTotal
) -> None:
    with pytest.raises(InconsistentUsage, match="does not add up"):
        period_usage(days, NOV_PERIOD, before, after)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 50), sub_cent), max_size=40, unique_by=lambda t: t[0]),
    st.integers(1, 60),
)
def test_period_usage_partitions_the_days_at_the_end(rows: list[tuple[int, int, Decimal]], cut: int) -> None:
    days = [DayUsage(OCT + d * DAY, calls, cost) for d, calls, cost in rows]
    total = UsageTotal(sum(d.calls for d in days), sum((d.cost for d in days), Decimal(0)))
    period = Period(OCT, OCT + cut * DAY, "x")
    inside = period_usage(days, period, total, total)
    outside = [d for d in days if d.start >= period.end]
    assert inside.calls + sum(d.calls for d in outside) == total.calls
    assert inside.spend + sum((d.cost for d in outside), Decimal(0)) == total.cost
    assert sum(inside.daily_spend.values(), Decimal(0)) == inside.spend
