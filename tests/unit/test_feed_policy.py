"""The change feed's and the rolling resync's pure decisions (``policies.feed``), property-tested."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.feed import (
    HIDDEN_PREFIXES,
    MIN_LIMIT,
    Board,
    hidden,
    moved_agents,
    next_limit,
    resync_count,
    resync_due,
)

names = st.builds(
    lambda prefix, n: f"{prefix}{n}",
    st.sampled_from(["agent-", "bot-", *HIDDEN_PREFIXES]),
    st.integers(0, 30),
)
counts = st.dictionaries(names, st.integers(0, 50), max_size=25)


@given(previous=counts, current=counts, declared=st.sets(names, max_size=25), complete=st.booleans())
def test_any_declared_agent_whose_count_differs_is_selected(
    previous: dict[str, int], current: dict[str, int], declared: set[str], complete: bool
) -> None:
    moved = moved_agents(previous, Board(current, complete), declared)
    assert moved <= declared
    for agent in declared:
        if agent in current and previous.get(agent) != current[agent]:
            assert agent in moved  # moved up, down, or newly on the board
        if agent in previous and agent not in current:
            assert agent in moved  # vanished
        if hidden(agent):
            assert agent in moved  # the feed never sees it
        if not complete and agent not in current:
            assert agent in moved  # maybe cut off


@given(previous=counts, current=counts, declared=st.sets(names, max_size=25))
def test_only_unchanged_or_usage_free_visible_agents_are_skipped(
    previous: dict[str, int], current: dict[str, int], declared: set[str]
) -> None:
    moved = moved_agents(previous, Board(current, True), declared)
    for agent in declared - moved:
        assert not hidden(agent)
        assert previous.get(agent) == current.get(agent)  # same count, or absent from both


@given(previous=st.none() | counts, declared=st.sets(names, max_size=25))
def test_a_failed_poll_or_no_baseline_selects_everyone(previous: dict[str, int] | None, declared: set[str]) -> None:
    assert moved_agents(previous, None, declared) == declared
    assert moved_agents(None, Board({}, True), declared) == declared


def test_a_quiet_fleet_selects_only_what_the_feed_cannot_see() -> None:
    board = Board({"a": 3, "b": 7}, complete=True)
    assert moved_agents({"a": 3, "b": 7}, board, ["a", "b", "c", "test-x"]) == {"test-x"}
    assert moved_agents({"a": 3, "b": 6}, board, ["a", "b", "c"]) == {"b"}


@given(current=st.integers(0, 10_000), rows=st.integers(0, 10_000), declared=st.integers(0, 20_000))
def test_the_limit_grows_past_a_truncated_board_and_covers_the_fleet(current: int, rows: int, declared: int) -> None:
    grown = next_limit(current, rows, False, declared)
    assert grown > max(current, rows) and grown >= 2 * declared
    kept = next_limit(current, rows, True, declared)
    assert kept >= max(MIN_LIMIT, 2 * declared, current)


@given(
    agents=st.integers(1, 400),
    interval=st.sampled_from([10.0, 30.0, 60.0]),
    periods=st.integers(1, 20),
    extra=st.lists(st.lists(st.integers(0, 399), max_size=10), max_size=60),
)
@settings(max_examples=60, deadline=None)
def test_every_agent_is_read_within_the_period_and_the_load_is_even(
    agents: int, interval: float, periods: int, extra: list[list[int]]
) -> None:
    """A simulated daemon: each interval the resync's share plus random reads by the feed."""
    period = interval * periods
    ids = [f"agent-{i:03d}" for i in range(agents)]
    last: dict[str, float | None] = dict.fromkeys(ids)
    share = resync_count(agents, interval, period)
    assert share == min(agents, math.ceil(agents * interval / period))
    now = 1_000_000.0
    for step in range(3 * periods + 2):
        moved = {ids[i] for i in (extra[step] if step < len(extra) else []) if i < agents}
        due = resync_due(last, now=now, interval_s=interval, period_s=period, exclude=moved)
        assert not due & moved
        for agent in ids:  # nobody is older than the period once read
            at = last[agent]
            assert at is None or now - at <= period
        if step > 0:
            assert len(due) <= share  # spread: never more than the share once everyone was read once
        for agent in due | moved:
            last[agent] = now
        now += interval
    # with no feed reads at all, the share is exactly what is read each interval
    quiet: dict[str, float | None] = dict.fromkeys(ids, 0.0)
    counts = []
    for step in range(periods):
        due = resync_due(quiet, now=interval * (step + 1), interval_s=interval, period_s=period)
        counts.append(len(due))
        for agent in due:
            quiet[agent] = interval * (step + 1)
    assert all(c <= share for c in counts)
    assert sum(counts) >= agents  # and in one period every agent came round


def test_never_read_agents_are_read_at_once() -> None:
    due = resync_due({"a": None, "b": 5.0, "c": None}, now=10.0, interval_s=60, period_s=600)
    assert {"a", "c"} <= due
