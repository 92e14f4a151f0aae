"""The change feed and the rolling resync, driving the observation store.

``FeedSync.sync`` is what a daemon job calls before reading through the store: at most once
per ``min_gap_s`` it polls the leaderboard of call counts (one request; raised and asked
again, a few times at most, when the answer may be cut off), marks the agents that moved
(``policies.feed.moved_agents``) stale, and marks the rolling resync's share of this interval
(``policies.feed.resync_due``) stale. A failed poll marks everything stale: the jobs then read
every agent, as they did before the feed existed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from controller.observation.store import Freshness, ObservationStore, SharedRead
from policies.feed import Board, moved_agents, next_limit, resync_due

logger = logging.getLogger("finops.feed")

DEFAULT_RESYNC_PERIOD_S = 600.0
MAX_RAISES = 3
"""Extra polls with a doubled ``limit`` within one sync, when the board came back full."""


@dataclass(frozen=True)
class SyncResult:
    """What one sync decided; ``moved`` is ``None`` when the feed could not tell (first poll,
    failed poll): every agent may have moved."""

    polled: bool
    moved: frozenset[str] | None
    resynced: frozenset[str]
    requests: int
    error: str | None = None

    @property
    def stale(self) -> frozenset[str] | None:
        """Every agent this sync marked stale (``None``: all)."""
        return None if self.moved is None else self.moved | self.resynced


class FeedSync:
    """The feed's memory between polls: the last counts and the ``limit`` that fits."""

    def __init__(
        self,
        store: ObservationStore,
        *,
        interval_s: float,
        resync_period_s: float = DEFAULT_RESYNC_PERIOD_S,
        min_gap_s: float | None = None,
        enabled: bool = True,
        authoritative: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.store = store
        self.authoritative = authoritative
        """The agents every job reads authoritatively (unresolved intents, holds, backoff):
        one set for every job, so an agent's release from it is seen once."""
        self._lock = asyncio.Lock()
        self.interval_s = interval_s
        self.resync_period_s = resync_period_s
        self.min_gap_s = interval_s / 2 if min_gap_s is None else min_gap_s
        self.enabled = enabled
        self.limit = 0
        self.previous: Mapping[str, int] | None = None
        self.last_sync: float | None = None
        """When the feed was last polled (finops' clock)."""
        self.last_resync: float | None = None
        self._since_owner: frozenset[str] | None = None
        """Agents moved since the owner's last poll (``None``: unknown, e.g. never polled)."""
        self.last: SyncResult | None = None

    async def _poll(self, client: GatewayClient, declared: int) -> tuple[Board, int]:
        requests = 0
        self.limit = next_limit(self.limit, 0, True, declared)
        for _ in range(1 + MAX_RAISES):
            requests += 1
            board = await client.leaderboard("calls", limit=self.limit)
            counts = {e.agent_id: int(e.value) for e in board.entries}
            self.limit = next_limit(self.limit, len(counts), board.complete, declared)
            if board.complete:
                break
        return Board(counts, board.complete), requests

    def shared(self, need: Freshness) -> SharedRead:
        """How a job reads through the store: ``need``, and today's authoritative agents."""
        return SharedRead(self.store, need, frozenset(self.authoritative()))

    def freshness(self, *, balance: bool = True) -> Freshness:
        """The reconcile pass's (``balance``) or the alerts job's need: whatever the feed and
        the resync did not mark stale, and nothing older than the resync period."""
        period = self.resync_period_s + self.interval_s
        return Freshness(balance=period if balance else None, budget=period)

    async def sync(self, client: GatewayClient, declared: Collection[str], *, owner: bool = False) -> SyncResult:
        """Poll the feed and mark what must be read. The ``owner`` (the alerts job: the
        latency of a crossing is its interval) polls every time and gets the agents moved
        since its own last poll, whoever polled meanwhile; the rolling resync's share is
        marked in its polls. Other jobs (reconcile, rebalancing) poll only when the last
        poll is at least ``min_gap_s`` old, so a spend reaches them promptly too, and take
        over the resync when no owner has polled for 1.5 intervals. Jobs running at once
        share one poll."""
        async with self._lock:
            return await self._sync(client, frozenset(declared), owner=owner)

    async def _sync(self, client: GatewayClient, agents: frozenset[str], *, owner: bool) -> SyncResult:
        now = self.store.clock()
        self.store.forget_except(agents)
        if not owner and self.last_sync is not None and now - self.last_sync < self.min_gap_s:
            return SyncResult(False, self._since_owner, frozenset(), 0)
        self.last_sync = now
        board: Board | None = None
        error: str | None = None
        requests = 0
        if self.enabled:
            try:
                board, requests = await self._poll(client, len(agents))
            except (AuthenticationFailed, NotAdmin):
                raise
            except GatewayError as exc:
                error = f"change feed poll failed, reading every agent: {exc}"
                logger.warning("%s", error)
        moved: frozenset[str] | None = None  # the feed cannot tell: everything may have moved
        if board is not None and self.previous is not None:
            moved = moved_agents(self.previous, board, agents)
        self.store.mark_stale(agents if moved is None else moved)
        if board is not None:  # only declared agents are remembered: the board may list many more
            self.previous = {a: c for a, c in board.counts.items() if a in agents}
        if self._since_owner is not None:
            self._since_owner = None if moved is None else self._since_owner | moved
        resynced: frozenset[str] = frozenset()
        lapsed = self.last_resync is None or now - self.last_resync >= 1.5 * self.interval_s
        if owner or lapsed:
            elapsed = self.interval_s if self.last_resync is None else now - self.last_resync
            self.last_resync = now
            resynced = resync_due(
                self.store.read_at(agents),
                now=now,
                interval_s=min(max(elapsed, 1.0), self.resync_period_s),
                period_s=self.resync_period_s,
                exclude=agents if moved is None else moved,
            )
            self.store.mark_stale(resynced)
        result = SyncResult(True, self._since_owner if owner else moved, resynced, requests, error)
        if owner:
            self._since_owner = frozenset()
        self.last = result
        return result


__all__ = ["DEFAULT_RESYNC_PERIOD_S", "FeedSync", "SyncResult"]
