"""The daemon's change feed and rolling resync: which agents to re-read (pure decisions).

The gateway has no change events. Its leaderboard of call counts (one free request for the
whole fleet) is the watch: an agent whose cumulative call count did not move made no paid
call (its own cap changes, deposits and withdrawals are calls too), so its spend, and with it
its utilization, cannot have risen. What the feed cannot show (an admin's cap change, money
moved by someone else, rolling-window decay) the rolling resync catches: every agent is
re-read within the resync period, a few per interval (client-go's "watch, then resync").

Every rule errs towards reading: a failed poll selects everyone, a count that went down or
vanished is a move, an agent the board hides or may have cut off is always selected.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

HIDDEN_PREFIXES = ("test-", "perf-", "audit-", "stress-")
"""Agent ids the gateway leaves off its leaderboard (API.md §5): never seen by the feed."""

MIN_LIMIT = 100
"""The smallest leaderboard page asked for (the gateway's default is 10)."""


def hidden(agent_id: str) -> bool:
    """Whether the leaderboard never shows this agent."""
    return agent_id.startswith(HIDDEN_PREFIXES)


@dataclass(frozen=True)
class Board:
    """One leaderboard poll, as the feed uses it: each listed agent's cumulative call count."""

    counts: Mapping[str, int]
    complete: bool
    """Fewer rows than asked for: every agent with usage is listed (an agent absent from a
    complete board has no usage at all)."""


def moved_agents(previous: Mapping[str, int] | None, board: Board | None, declared: Iterable[str]) -> frozenset[str]:
    """The declared agents that may have spent since the ``previous`` poll.

    ``previous`` is the last successful poll's counts (``None``: no baseline yet) and
    ``board`` this poll (``None``: the poll failed). Selected: everyone when either is
    missing; hidden agents always; an agent whose count differs in either direction, appeared
    or vanished; an agent absent from an incomplete board (it may be cut off). Not selected:
    an agent listed with the same count, or absent from a complete board and from the
    baseline (no usage, then or now)."""
    agents = frozenset(declared)
    if previous is None or board is None:
        return agents
    out: set[str] = set()
    for agent in agents:
        if hidden(agent):
            out.add(agent)
        elif agent in board.counts:
            if previous.get(agent) != board.counts[agent]:
                out.add(agent)
        elif not board.complete or agent in previous:
            out.add(agent)
    return frozenset(out)


def next_limit(current: int, board_rows: int, complete: bool, declared: int) -> int:
    """The ``limit`` for the next poll: room for every declared agent and then some (other
    agents share the board), doubled past a truncated answer (the gateway has no upper bound
    on ``limit``), never shrinking below what was last needed."""
    floor = max(MIN_LIMIT, 2 * declared)
    if not complete:
        return max(floor, 2 * max(current, board_rows))
    return max(floor, current)


def resync_count(agents: int, interval_s: float, period_s: float) -> int:
    """How many agents one interval re-reads so that all ``agents`` are read within
    ``period_s``: ceil(N × interval / period), at most N."""
    if agents <= 0:
        return 0
    if period_s <= interval_s:
        return agents
    return min(agents, math.ceil(agents * interval_s / period_s))


def resync_due(
    last_read: Mapping[str, float | None],
    *,
    now: float,
    interval_s: float,
    period_s: float,
    exclude: Collection[str] = (),
) -> frozenset[str]:
    """The agents this interval's rolling resync re-reads: the ``resync_count`` read longest
    ago (never read first, ties by id), plus any whose age would pass ``period_s`` before
    the next interval (so the bound holds while agents are added). ``last_read`` maps every
    declared agent to when it was last fully read (``None``: never). Agents in ``exclude``
    (read this interval anyway, e.g. the feed's moves) are not counted against the share."""
    candidates = [(at, agent) for agent, at in last_read.items() if agent not in exclude]
    share = resync_count(len(last_read), interval_s, period_s)
    candidates.sort(key=lambda item: (-math.inf if item[0] is None else item[0], item[1]))
    due = {agent for _, agent in candidates[:share]}
    due.update(agent for at, agent in candidates if at is None or now - at + interval_s > period_s)
    return frozenset(due)


__all__ = [
    "HIDDEN_PREFIXES",
    "MIN_LIMIT",
    "Board",
    "hidden",
    "moved_agents",
    "next_limit",
    "resync_count",
    "resync_due",
]
