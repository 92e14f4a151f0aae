"""Plans a reviewer reads (issue 12, items 2-4), pure parts: units, the spending authority a
plan changes, the PR-ready markdown (size cap, escaping) and GitHub annotations."""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal
from html import unescape

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from controller.cli.github import annotation, escape_data, escape_property
from controller.cli.views import DEFAULT_MAX_CHARS, marker_comment, render_markdown, render_text
from policies.display import escape_controls, escape_markdown
from policies.issues import ManifestIssue
from policies.live import LiveAgent, LiveFleet
from policies.plan_exposure import CapMove, exposure_change
from policies.plan_types import Plan, plan_from_dict, plan_to_dict
from policies.planner import Memory, make_plan
from policies.spec import DesiredState, FleetSpec
from policies.units import DiffUnit, Units, percent, show_change
from tests.unit.test_plan import WHEN, agent, budget, desired, live

D = Decimal
USD = Units("USD", D("100"))

# --- units ---------------------------------------------------------------------------------------


def test_money_reads_in_the_fleet_currency_with_credits_alongside() -> None:
    assert show_change(DiffUnit.CREDITS, "3000.00", "3500.00", USD) == "30.00 → 35.00 USD (3000.00 → 3500.00 credits)"
    assert show_change(DiffUnit.CREDITS, None, "3000.00", USD) == "none → 30.00 USD (none → 3000.00 credits)"
    # A CREDITS fleet: the same figure is not shown twice.
    assert show_change(DiffUnit.CREDITS, "3000.00", "3500.00", Units("CREDITS", D(1))) == "3000.00 → 3500.00 credits"
    # A rate that does not divide the amount: the currency figure is marked as rounded.
    assert Units("EUR", D("3")).amount(D("100.00")) == "≈33.33 EUR (100.00 credits)"
    assert Units("EUR", D("3")).amount(D("99.00")) == "33.00 EUR (99.00 credits)"


def test_thresholds_read_as_percentages_never_rounded() -> None:
    assert show_change(DiffUnit.RATIO, "0.75", "0.9", None) == "75 % → 90 %"
    assert show_change(DiffUnit.RATIO, None, "0.825", None) == "none → 82.5 %"
    assert percent(D("1")) == "100 %"
    # Not a number (a corrupt plan file): shown as written, never a crash.
    assert show_change(DiffUnit.RATIO, "x", "0.9", None) == "x → 0.9"


@given(st.decimals(min_value=0, max_value=D("92233720368.54"), places=2), st.sampled_from(["1", "3", "100", "0.85"]))
def test_a_currency_figure_is_exact_or_marked(credits: Decimal, rate: str) -> None:
    text = Units("EUR", D(rate)).currency_text(credits)
    value = D(text.removeprefix("≈"))
    assert text.startswith("≈") is (value * D(rate) != credits)
    assert abs(value * D(rate) - credits) <= D(rate) / 200  # rounded to the cent, half-even


def test_the_plan_json_labels_both_units_and_reads_back() -> None:
    plan = make_plan(
        desired(agent("res-01")), live(LiveAgent("res-01", exists=False, ledger_anchor="none")), Memory(), now=WHEN
    )
    data = plan_to_dict(plan)
    [caps] = [c for c in data["changes"] if c["kind"] == "set_budget"]
    by_field = {d["field"]: d for d in caps["diff"]}
    assert by_field["daily_cap"]["after"] == "3000.00" and by_field["daily_cap"]["after_in_currency"] == "30.00"
    assert by_field["daily_cap"]["unit"] == "credits" and by_field["daily_cap"]["currency"] == "USD"
    assert by_field["alert_threshold"]["after"] == "0.75" and by_field["alert_threshold"]["after_percent"] == "75"
    assert plan_from_dict(data) == plan  # the labels are derived: reading them back changes nothing


# --- the exposure a plan changes --------------------------------------------------------------------


def test_caps_count_live_to_planned_a_new_wallet_from_zero_and_an_uncapped_agent_apart() -> None:
    change = exposure_change(
        {"research": USD},
        [
            CapMove("research", "new-01", "daily_cap", None, D("3000.00"), new_wallet=True),
            CapMove("research", "res-01", "daily_cap", D("3000.00"), D("3500.00"), new_wallet=False),
            CapMove("research", "drift", "daily_cap", D("9000.00"), D("3000.00"), new_wallet=False),
            CapMove("research", "open", "daily_cap", None, D("3000.00"), new_wallet=False),
            CapMove("research", "res-01", "monthly_cap", D("60000.00"), D("150000.00"), new_wallet=False),
        ],
        {"research": D("4500.00")},
        {"research": ["new-01"]},
        None,
        complete=True,
    )
    [fleet] = change.fleets
    assert fleet.daily_caps == D("3000.00") + D("500.00") - D("6000.00")
    assert fleet.monthly_caps == D("90000.00")
    assert fleet.uncapped_before == ("open",)
    assert fleet.to_dict()["daily_caps"] == "-25.00" and fleet.to_dict()["daily_caps_credits"] == "-2500.00"
    assert fleet.caps_sentence() == (
        "authorizes up to +900.00 USD/month (+90000.00 credits) more in caps; lowers caps by 25.00 USD/day "
        "(2500.00 credits); caps 1 agent(s) that have no cap on the gateway today"
    )
    assert "puts in 45.00 USD (4500.00 credits) now" in fleet.sentence()


def test_the_issue_example_reads_as_the_issue_wrote_it() -> None:
    change = exposure_change(
        {"research": USD},
        [
            CapMove("research", f"res-0{i}", cap, D(before), D(after), new_wallet=False)
            for i, (cap, before, after) in enumerate(
                [("daily_cap", "3000.00", "7500.00"), ("monthly_cap", "60000.00", "150000.00")]
            )
        ],
        {},
        {},
        None,
        complete=True,
    )
    assert change.fleets[0].caps_sentence() == (
        "authorizes up to +45.00 USD/day (+4500.00 credits) and +900.00 USD/month (+90000.00 credits) more in caps"
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.decimals(min_value=0, max_value=10_000, places=2),
            st.decimals(min_value=0, max_value=10_000, places=2),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_plans_cap_delta_is_what_the_gateway_enforces_after_minus_before(
    agents: list[tuple[bool, Decimal, Decimal]],
) -> None:
    """Through the real planner: live caps → manifest caps, summed, equals the plan's figure;
    applying the planned caps to the live view and planning again gives zero."""
    specs, lives = [], []
    for i, (new, live_daily, want_daily) in enumerate(agents):
        agent_id = f"a-{i:02d}"
        specs.append(agent(agent_id, daily=str(want_daily), monthly="600.00", floor="0.00", target="0.00"))
        lives.append(
            LiveAgent(agent_id, exists=False, ledger_anchor="none")
            if new
            else LiveAgent(agent_id, True, D("0.00"), budget(str(live_daily * 100), "60000.00"))
        )
    state = desired(*specs, total="1000000.00")
    plan = make_plan(state, live(*lives), Memory(), now=WHEN)
    expected = sum((want * 100 - (D(0) if new else live * 100) for new, live, want in agents), D(0))
    [fleet] = plan.exposure_change().fleets
    assert fleet.daily_caps == expected
    assert fleet.registered == tuple(f"a-{i:02d}" for i, (new, _, _) in enumerate(agents) if new)


# --- PR-ready markdown -----------------------------------------------------------------------------


def big_plan(fleets: int, agents_per_fleet: int) -> Plan:
    specs = []
    for f in range(fleets):
        specs.append(
            FleetSpec(
                name=f"fleet-{f}",
                currency="USD",
                daily_total=D("1000000.00"),
                funding_ceiling=D("1000000.00"),
                agents=tuple(
                    replace(agent(f"f{f}-agent-{i:04d}"), fleet=f"fleet-{f}") for i in range(agents_per_fleet)
                ),
            )
        )
    state = DesiredState(fleets=tuple(specs))
    new = {a.agent_id: LiveAgent(a.agent_id, exists=False, ledger_anchor="none") for a in state.agents()}
    return make_plan(state, LiveFleet("sandbox", new, {"USD": D("100")}), Memory(), now=WHEN)


def rows(markdown: str) -> int:
    return len(re.findall(r"^\| [+~-] \| ", markdown, flags=re.MULTILINE))


def test_a_1000_agent_plan_fits_a_comment_summary_first_and_the_rest_summarised() -> None:
    plan = big_plan(1, 1000)
    assert len(plan.changes) == 3000
    full = render_markdown(plan, max_chars=0)
    assert rows(full) == 3000 and len(full) > 5 * DEFAULT_MAX_CHARS  # the issue's 500 KB comment

    capped = render_markdown(plan)
    assert len(capped) <= DEFAULT_MAX_CHARS
    assert capped.startswith(marker_comment() + "\n### finops plan")
    # Summary first: the exposure change with the whole fleet's figures, whatever is cut.
    summary = capped[: capped.index("<details>")]
    assert "authorizes up to +30000.00 USD/day (+3000000.00 credits)" in summary
    assert "| fleet-0 | 1000 | 3000 |" in summary
    shown = int(re.search(r"Truncated to stay under 60000 characters: (\d+) of 3000 change\(s\) shown", capped)[1])
    assert shown == rows(capped) and 100 < shown < 3000
    assert f"fleet-0: {3000 - shown} of its 3000 change(s) not shown" in capped
    assert capped.count("<details>") == capped.count("</details>")
    assert "The full plan: `finops plan --format markdown --max-chars 0`" in capped


def test_fleets_that_do_not_fit_are_named_and_the_artifact_is_pointed_to() -> None:
    plan = big_plan(3, 400)
    hint = "https://github.com/o/r/actions/runs/1/artifacts/2 <b>x</b>"
    capped = render_markdown(plan, max_chars=20_000, artifact_hint=hint)
    assert len(capped) <= 20_000
    assert "fleet-2: 1200 change(s) not shown" in capped
    assert f"The full plan: {escape_markdown(hint)}" in capped and "<b>" not in capped
    assert capped.count("<details>") == capped.count("</details>")
    # Every fleet is in the summary table, even those whose details were cut.
    assert all(f"| fleet-{f} | 400 | 1200 |" in capped for f in range(3))


@pytest.mark.parametrize("limit", [1_000, 2_000, 5_000])
def test_the_cap_holds_even_below_the_summary(limit: int) -> None:
    out = render_markdown(big_plan(2, 50), max_chars=limit)
    assert len(out) <= limit and out.startswith(marker_comment())
    with pytest.raises(ValueError, match="at least 1000"):
        render_markdown(big_plan(1, 1), max_chars=999)


def test_a_small_plan_is_shown_whole_with_one_details_per_fleet() -> None:
    plan = big_plan(2, 3)
    out = render_markdown(plan)
    assert "Truncated" not in out and rows(out) == len(plan.changes) == 18
    assert out.count("<details><summary>Fleet ") == 2
    assert "daily\\_cap: none → 30.00 USD (none → 3000.00 credits)" in out
    text = render_text(plan)
    assert text.splitlines()[0].startswith("Exposure: this plan raises spending authority")


@pytest.mark.parametrize("bad", ["", "x -->", "a b", "-->", "x" * 65, "é"])
def test_a_marker_cannot_close_its_comment(bad: str) -> None:
    with pytest.raises(ValueError):
        marker_comment(bad)


MD = MarkdownIt("commonmark").enable("table").enable("strikethrough")
INLINE_TAGS = re.compile(r"<(?!/?(p|ul|li|table|thead|tbody|tr|th|td)>)[^>]*>")


def text_of(html: str) -> str:
    return unescape(re.sub(r"<[^>]*>", "", html))


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("1. a nested list")
@example("- item")
@example("+ item")
@example("---")
@example("     indented code")
@example("</details><script>alert(1)</script>")
@example("[click](https://evil.example.com) ![img](x)")
@example("@org/admins please merge")
@example("`code` *em* _em_ ~~gone~~ # h | col")
@example("&amp; &#64; \\| \\")
@example("line\nbreak\r\x1b[2J\u202e")
def test_escaped_markdown_renders_as_the_text_itself_and_nothing_else(text: str) -> None:
    inline = escape_markdown(text)
    assert "\n" not in inline and "<" not in inline and "@" not in inline
    item = MD.render(f"- {inline}\n")
    assert not INLINE_TAGS.search(item), item  # no link, emphasis, code, image or raw HTML
    assert text_of(item).strip() == escape_controls(text).strip()
    table = MD.render(f"| a | b |\n|---|---|\n| {inline} | z |\n")
    assert not INLINE_TAGS.search(table), table
    assert table.count("<td>") == 2  # a '|' in the value opens no column
    assert text_of(table.split("<td>")[1]).strip() == escape_controls(text).strip()


@given(st.text())
def test_annotation_values_cannot_break_out(text: str) -> None:
    prop, data = escape_property(text), escape_data(text)
    assert not set(prop) & {":", ",", "\n", "\r"} and not set(data) & {"\n", "\r"}
    for escaped in (prop, data):
        back = escaped.replace("%2C", ",").replace("%3A", ":").replace("%0A", "\n").replace("%0D", "\r")
        assert back.replace("%25", "%") == text


def test_an_annotation_names_file_line_and_field() -> None:
    line = annotation(ManifestIssue("manifests/a,b:c.yaml", 12, "spec.tiers.x.dailyCap", "50% more\nthan: allowed"))
    assert line == (
        "::error file=manifests/a%2Cb%3Ac.yaml,line=12,title=finops%3A spec.tiers.x.dailyCap::"
        "spec.tiers.x.dailyCap: 50%25 more\\x0athan: allowed"
    )
    assert annotation(ManifestIssue("m.yaml", None, "", "bad")) == "::error file=m.yaml,title=finops::bad"
