"""``finops status`` for a large fleet: one screenful, flagged agents first, counts, and never
"all clear" while an agent is at (or over) its daily cap. Pure renderers over a synthetic
``FleetStatus``; the progress bar of long applies."""

from __future__ import annotations

import io
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from controller.cli.progress import PROGRESS_MIN_AGENTS, ApplyProgress
from controller.reconcile.status import AgentStatus, FleetStatus, render_status, render_summary, screen_rows
from policies.plan_types import Change, ChangeKind, Plan, RegisterArgs

SCREEN_LINES = 50
SCREEN_WIDTH = 120


def agent(
    i: int, *, used: str = "12.5", cap: str = "30.00", flags: tuple[str, ...] = (), error: str | None = None
) -> AgentStatus:
    row = AgentStatus(f"agent-{i:04d}", f"fleet-{i % 3}", "USD", True)
    if error is not None:
        row.error = error
        return row
    row.balance, row.daily_cap, row.percent_used = "40.00", cap, used
    row.spent_today = str((Decimal(cap) * Decimal(used) / 100).quantize(Decimal("0.01")))
    row.thresholds = (75, 90, 100)
    row.flags = list(flags)
    return row


def fleet(agents: list[AgentStatus]) -> FleetStatus:
    return FleetStatus("sandbox", agents, [], [])


def big_fleet() -> FleetStatus:
    """1,000 agents: 2 not observed, 40 flagged (3 flags each, one very long), 25 at or over
    their cap, the rest fine."""
    rows = []
    for i in range(1000):
        if i < 2:
            rows.append(agent(i, error="gateway 503: unavailable"))
        elif i < 42:
            rows.append(agent(i, flags=("CAP DRIFT: " + "x" * 300, "KEY ROTATION DUE", "NO ALERT ROUTES")))
        elif i < 67:
            rows.append(agent(i, used="100.0" if i % 2 else "104.2"))
        else:
            rows.append(agent(i, used=str(i % 90)))
    return fleet(rows)


def test_a_thousand_agents_fit_one_screen_flagged_first() -> None:
    status = big_fleet()
    text = render_summary(status)
    lines = text.splitlines()
    assert sum(screen_rows(line, SCREEN_WIDTH) for line in lines) <= SCREEN_LINES
    assert lines[0] == "1000 agent(s) in 3 fleet(s) on sandbox:"
    assert lines[1].startswith("  42 need attention (2 not observed), 25 at or over the daily cap, 0 with alerts")
    # Not observed first, then flagged ones; no fine agent is listed.
    listed = [line.split()[0] for line in lines[3:] if line.startswith("agent-")]
    assert listed[:2] == ["agent-0000", "agent-0001"]
    assert all(int(a.split("-")[1]) < 42 for a in listed)
    assert "… and " in text and "finops status --all" in text
    assert "all clear" not in text and "25 at or over the daily cap" in lines[-2]
    # --all is everything: every agent, every flag in full.
    everything = render_status(status)
    assert all(f"agent-{i:04d}" in everything for i in range(1000))
    assert "x" * 300 in everything


def test_agents_at_their_cap_come_after_flagged_ones_with_the_most_used_first() -> None:
    rows = [agent(1, used="100.0"), agent(2, used="104.2"), agent(3, flags=("HELD since …",)), agent(4, used="50.0")]
    lines = render_summary(fleet(rows)).splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("agent-")]
    assert listed == ["agent-0003", "agent-0002", "agent-0001"]
    assert sum("AT CAP" in line for line in lines) == 2


def test_an_agent_at_exactly_100_percent_is_never_all_clear() -> None:
    at_cap = fleet([agent(1), agent(2, used="100.0")])
    for render in (render_summary, render_status):
        text = render(at_cap)
        assert "all clear" not in text
        assert "1 at or over the daily cap" in text
    assert at_cap.to_dict()["at_cap"] == ["agent-0002"]
    assert at_cap.to_dict()["format_version"] == 1
    # The control: the same fleet under its cap is all clear.
    assert "all clear" in render_summary(fleet([agent(1), agent(2, used="99.9")]))
    assert "all clear" in render_status(fleet([agent(1), agent(2, used="99.9")]))


def test_a_zero_cap_is_at_cap() -> None:
    # A cap of 0 (no percentage can be computed) means the agent cannot spend at all.
    zero = agent(1, used="0", cap="0.00")
    zero.percent_used = None
    assert zero.at_cap
    assert "all clear" not in render_summary(fleet([zero]))


@given(
    st.lists(
        st.tuples(
            st.decimals(min_value=0, max_value=150, places=1),
            st.sampled_from(["30.00", "0.00", "5.00"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_all_clear_exactly_when_nothing_is_flagged_and_no_agent_is_at_its_cap(
    rows: list[tuple[Decimal, str, bool]],
) -> None:
    agents = [
        agent(i, used=str(used), cap=cap, flags=("KEY ROTATION DUE",) if flagged else ())
        for i, (used, cap, flagged) in enumerate(rows)
    ]
    expected_clear = all(not flagged and used < 100 and cap != "0.00" for used, cap, flagged in rows)
    status = fleet(agents)
    for render in (render_summary, render_status):
        assert ("all clear" in render(status)) is expected_clear
    assert sum(screen_rows(line, SCREEN_WIDTH) for line in render_summary(status).splitlines()) <= SCREEN_LINES


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def plan_for(agents: int) -> Plan:
    changes = tuple(
        Change(ChangeKind.REGISTER, "f", f"agent-{i}", "", (), RegisterArgs(Decimal("500.00"))) for i in range(agents)
    )
    return Plan("sandbox", "2026-01-01T00:00:00Z", "basis", (), changes)


def test_progress_is_drawn_on_a_terminal_for_a_long_apply() -> None:
    stream = Terminal()
    progress = ApplyProgress(stream)
    progress.start(plan_for(12))
    assert progress.shown
    for _ in range(12):
        progress.advance()
    progress.close()
    out = stream.getvalue()
    assert "Applying to 12 agent(s)" in out and "12/12" in out


def test_no_progress_off_a_terminal_or_for_a_short_apply() -> None:
    pipe = io.StringIO()  # a pipe, a CI log
    progress = ApplyProgress(pipe)
    progress.start(plan_for(200))
    progress.advance()
    progress.close()
    assert pipe.getvalue() == "" and not progress.shown
    short = Terminal()
    quick = ApplyProgress(short)
    quick.start(plan_for(PROGRESS_MIN_AGENTS - 1))
    quick.close()
    assert short.getvalue() == ""
