"""The daemon's one observation of the fleet: per agent and field, the value and when it was read.

Every daemon job (reconcile, alerts, rebalancing, the escalation actions) reads agents through
this store. A job says how fresh it needs each field (``Freshness``); ``ensure`` reads only the
fields that are older, marked stale (by the change feed, the rolling resync or a write finops
made) or never read, with ``client.concurrency`` workers (never one task per agent), one
agent's failure isolated (authentication failures stop everything, as in ``observe``).

A read that overlaps an invalidation of the same agent is not kept (a per-agent generation):
a value read before finops' own write, answered after it, never passes for fresh. The clock is
finops' injected clock; a reading is stamped with the time its read *started*.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Generic, TypeVar

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from policies.live import BudgetStatus

T = TypeVar("T")


class Field(StrEnum):
    """What the store keeps per agent: the two reads every pass needs."""

    BALANCE = "balance"
    BUDGET = "budget"


ALL_FIELDS: frozenset[Field] = frozenset(Field)


@dataclass(frozen=True)
class Freshness:
    """How old (seconds) each field may be for a job; ``None``: the job does not need it."""

    balance: float | None = None
    budget: float | None = None

    def max_age(self, name: Field) -> float | None:
        return self.balance if name is Field.BALANCE else self.budget

    def fields(self) -> frozenset[Field]:
        return frozenset(f for f in Field if self.max_age(f) is not None)


@dataclass(frozen=True)
class Reading(Generic[T]):
    value: T
    at: float
    """finops' clock when the read that returned ``value`` started."""


@dataclass
class _Entry:
    balance: Reading[Decimal | None] | None = None
    """``value`` ``None``: the agent has no wallet."""
    budget: Reading[BudgetStatus] | None = None
    stale: set[Field] = field(default_factory=set)
    generation: int = 0
    error: str | None = None


@dataclass(frozen=True)
class AgentView:
    """What the store knows of one agent, as of the last ``ensure``."""

    agent_id: str
    balance: Reading[Decimal | None] | None
    budget: Reading[BudgetStatus] | None
    error: str | None
    """Why the last read of a field this agent needed failed (the values may be older)."""


@dataclass(frozen=True)
class Ensured:
    """What one ``ensure`` did: per agent the fields it read, and the agents it could not read."""

    read: Mapping[str, frozenset[Field]]
    errors: Mapping[str, str]

    @property
    def requests(self) -> int:
        return sum(len(fields) for fields in self.read.values())


class ObservationStore:
    """Per-agent balance and budget status with their ages (module docstring). In memory: it
    lives as long as the daemon, and a restart starts with nothing known (a full read)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._authoritative: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ marking

    def _entry(self, agent_id: str) -> _Entry:
        entry = self._entries.get(agent_id)
        if entry is None:
            entry = self._entries[agent_id] = _Entry()
        return entry

    def invalidate(self, agent_id: str, fields: Iterable[Field] = ALL_FIELDS) -> None:
        """finops wrote to this agent (or is about to): its fields must be read again, and a
        read in flight is not kept."""
        entry = self._entry(agent_id)
        entry.stale.update(fields)
        entry.generation += 1

    def invalidate_all(self) -> None:
        for agent_id in list(self._entries):
            self.invalidate(agent_id)

    def mark_stale(self, agents: Iterable[str], fields: Iterable[Field] = ALL_FIELDS) -> None:
        """The feed or the resync says these agents may have changed."""
        wanted = frozenset(fields)
        for agent_id in agents:
            self._entry(agent_id).stale.update(wanted)

    def forget_except(self, agents: Collection[str]) -> None:
        """Drop agents no longer declared (memory stays bounded by the fleet)."""
        for agent_id in [a for a in self._entries if a not in agents]:
            del self._entries[agent_id]

    def record_budget(self, agent_id: str, value: BudgetStatus, at: float) -> None:
        """An authoritative read made elsewhere (``observe``'s full path)."""
        entry = self._entry(agent_id)
        entry.budget = Reading(value, at)
        entry.stale.discard(Field.BUDGET)

    def record_balance(self, agent_id: str, value: Decimal | None, at: float) -> None:
        entry = self._entry(agent_id)
        entry.balance = Reading(value, at)
        entry.stale.discard(Field.BALANCE)

    # ------------------------------------------------------------------ reading

    def view(self, agent_id: str) -> AgentView:
        entry = self._entries.get(agent_id) or _Entry()
        return AgentView(agent_id, entry.balance, entry.budget, entry.error)

    def generation(self, agent_id: str) -> int:
        return self._entry(agent_id).generation

    def read_at(self, agent_ids: Iterable[str]) -> dict[str, float | None]:
        """When each agent was last fully read (the older of its two fields; ``None``: one of
        them never was): what the rolling resync orders by."""
        out: dict[str, float | None] = {}
        for agent_id in agent_ids:
            entry = self._entries.get(agent_id)
            if entry is None or entry.balance is None or entry.budget is None:
                out[agent_id] = None
            else:
                out[agent_id] = min(entry.balance.at, entry.budget.at)
        return out

    def due(self, agent_id: str, need: Freshness, now: float, *, authoritative: bool = False) -> frozenset[Field]:
        """The fields of ``need`` that must be read now for this agent."""
        entry = self._entries.get(agent_id)
        out: set[Field] = set()
        for name in need.fields():
            max_age = need.max_age(name)
            assert max_age is not None
            reading = None if entry is None else (entry.balance if name is Field.BALANCE else entry.budget)
            if (
                authoritative
                or reading is None
                or entry is None
                or name in entry.stale
                or entry.error is not None
                or now - reading.at > max_age
            ):
                out.add(name)
        return frozenset(out)

    async def ensure(
        self,
        client: GatewayClient,
        agent_ids: Sequence[str],
        need: Freshness,
        *,
        authoritative: Collection[str] = (),
    ) -> Ensured:
        """Read the fields of ``need`` that are due for ``agent_ids``. Agents in
        ``authoritative`` (unresolved outcomes, holds, backoff) are read whatever their age;
        an agent that leaves that set is read once more (what happened while it was there,
        e.g. ``finops unfreeze`` restoring its caps, is not in the store)."""
        now = self.clock()
        forced = frozenset(authoritative)
        for released in self._authoritative - forced:
            self.invalidate(released)
        self._authoritative = forced
        work = [(a, f) for a in agent_ids if (f := self.due(a, need, now, authoritative=a in forced))]
        errors: dict[str, str] = {}
        pending = iter(work)

        async def worker() -> None:
            for agent_id, fields in pending:
                problem = await self._read(client, agent_id, fields)
                if problem is not None:
                    errors[agent_id] = problem

        await asyncio.gather(*(worker() for _ in range(min(client.concurrency, len(work)))))
        return Ensured({a: f for a, f in work}, errors)

    async def _read(self, client: GatewayClient, agent_id: str, fields: frozenset[Field]) -> str | None:
        entry = self._entry(agent_id)
        generation, started = entry.generation, self.clock()
        balance: Decimal | None = None
        budget: BudgetStatus | None = None
        try:
            if Field.BALANCE in fields:
                balance = await client.get_balance(agent_id)
            if Field.BUDGET in fields:
                budget = await client.get_budget(agent_id)
        except (AuthenticationFailed, NotAdmin):
            raise
        except GatewayError as exc:
            entry.error = f"cannot read {agent_id}: {exc}"
            entry.stale.update(fields)
            return entry.error
        entry.error = None
        if entry.generation != generation:
            return None  # finops wrote to it meanwhile: stays stale, read again next time
        if Field.BALANCE in fields:
            self.record_balance(agent_id, balance, started)
        if budget is not None:
            self.record_budget(agent_id, budget, started)
        return None


@dataclass(frozen=True)
class SharedRead:
    """How a daemon job reads agents through the shared store (``observe(shared=...)``,
    ``check_alerts(shared=...)``): the store, the job's freshness, and the agents it must
    read authoritatively whatever their age."""

    store: ObservationStore
    freshness: Freshness
    authoritative: frozenset[str] = frozenset()

    def with_authoritative(self, agents: Iterable[str]) -> SharedRead:
        return SharedRead(self.store, self.freshness, self.authoritative | frozenset(agents))


__all__ = [
    "ALL_FIELDS",
    "AgentView",
    "Ensured",
    "Field",
    "Freshness",
    "ObservationStore",
    "Reading",
    "SharedRead",
]
