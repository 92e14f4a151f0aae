"""Observe the live gateway for every declared agent (the manifests are the inventory).

Reads per agent on a converged fleet: balance and budget (2). The ledger is read only for
agents that need a top-up: finops' newest landed deposit in it is the funding epoch of the
deposit idempotency key (``policies.funding.funding_epoch``), and its last 24 h show finops'
own credits (for the rolling funding limit) and unexplained outflow (for refunding it). The
fleet-wide key listing (1 call) finds agents nobody declared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from controller.observation.store import Field, SharedRead
from policies.currency import CREDITS
from policies.detect import CreditCollector, LedgerCredit
from policies.funding import DEPOSIT_KEY_PREFIX, NO_DEPOSIT_EPOCH, needs_top_up
from policies.funding_window import ChargeTotal, LedgerRow, in_window, matters, parse_ledger_time
from policies.live import NEW_WALLET_ANCHOR, LiveAgent, LiveFleet
from policies.spec import AgentSpec, DesiredState

__all__ = ["NEW_WALLET_ANCHOR", "LedgerRead", "LiveAgent", "LiveFleet", "observe", "observe_agent", "read_ledger"]

LEDGER_PAGE = 100
"""Ledger rows per read; the first page is always read whole, so finops' newest deposit is
searched in at least the newest 100 rows (an older one is still known from finops' own
records, ``StateStore.last_deposit_ids``)."""
LEDGER_MAX_PAGES = 5
"""At most 500 ledger rows per agent and pass (5 reads): enough for a day of an agent that
is not busy; a busier ledger is read partially and said so (``ledger_complete``)."""


@dataclass(frozen=True)
class LedgerRead:
    rows: tuple[LedgerRow, ...]
    """The last 24 h, newest first, but the ``charge`` rows (summed in ``charges``)."""
    anchor: str
    """The id of finops' newest landed deposit among the rows read (its key carries
    ``DEPOSIT_KEY_PREFIX``), else ``NO_DEPOSIT_EPOCH``: the deposit key's funding epoch.
    Other rows (spend, the signup bonus, anyone else's deposits) never move it."""
    complete: bool
    charges: Decimal
    charge_rows: int
    credits: tuple[LedgerCredit, ...] = ()
    """The rows of the last 24 h that put money in, newest first, with ids and balance
    snapshots (``policies.detect``: what ``status`` examines)."""


async def read_ledger(client: GatewayClient, agent_id: str, now: float) -> LedgerRead:
    """The ledger back to 24 h ago, at most ``LEDGER_MAX_PAGES`` pages."""
    rows: list[LedgerRow] = []
    anchor: str | None = None
    charges, charge_rows = Decimal("0.00"), 0
    credits = CreditCollector()
    for page in range(LEDGER_MAX_PAGES):
        batch = await client.transactions(agent_id, limit=LEDGER_PAGE, offset=page * LEDGER_PAGE)
        if anchor is None:
            ours = (tx for tx in batch if tx.idempotency_key and tx.idempotency_key.startswith(DEPOSIT_KEY_PREFIX))
            anchor = next((str(tx.id) for tx in ours), None)
        page_rows = [
            LedgerRow(tx.amount, tx.tx_type, tx.idempotency_key, parse_ledger_time(tx.created_at)) for tx in batch
        ]
        recent = [r for r in page_rows if r.at is None or in_window(r.at, now)]
        for tx, r in zip(batch, page_rows, strict=True):
            if r.at is None or in_window(r.at, now):
                credits.add(tx.id, tx.amount, r.tx_type, tx.idempotency_key, r.at, tx.new_balance)
        rows += [r for r in recent if matters(r)]
        for r in recent:
            if not matters(r) and r.amount < 0:
                charges, charge_rows = charges - r.amount, charge_rows + 1
        oldest = page_rows[-1].at if page_rows else None
        if len(batch) < LEDGER_PAGE or (oldest is not None and not in_window(oldest, now)):
            return LedgerRead(
                tuple(rows), anchor or NO_DEPOSIT_EPOCH, True, charges, charge_rows, tuple(credits.credits)
            )
    return LedgerRead(tuple(rows), anchor or NO_DEPOSIT_EPOCH, False, charges, charge_rows, tuple(credits.credits))


async def observe_agent(client: GatewayClient, spec: AgentSpec, rate: Decimal, now: float | None = None) -> LiveAgent:
    balance = await client.get_balance(spec.agent_id)
    if balance is None:
        return LiveAgent(agent_id=spec.agent_id, exists=False, ledger_anchor=NEW_WALLET_ANCHOR)
    budget = await client.get_budget(spec.agent_id)
    if needs_top_up(spec, balance, rate):
        read = await read_ledger(client, spec.agent_id, time.time() if now is None else now)
        return LiveAgent(
            agent_id=spec.agent_id,
            exists=True,
            balance=balance,
            budget=budget,
            ledger_anchor=read.anchor,
            ledger=read.rows,
            ledger_complete=read.complete,
            charges=ChargeTotal(read.charges, read.charge_rows, budget.daily_spend),
            credits=read.credits,
        )
    return LiveAgent(agent_id=spec.agent_id, exists=True, balance=balance, budget=budget)


async def _observe_isolated(client: GatewayClient, spec: AgentSpec, rate: Decimal, now: float | None) -> LiveAgent:
    """One agent's failure is that agent's problem; auth failures stop everything."""
    try:
        return await observe_agent(client, spec, rate, now)
    except (AuthenticationFailed, NotAdmin):
        raise
    except GatewayError as exc:
        return LiveAgent(agent_id=spec.agent_id, exists=False, error=str(exc))


async def _observe_agents(
    client: GatewayClient, specs: Sequence[AgentSpec], rates: Mapping[str, Decimal], now: float | None = None
) -> list[LiveAgent]:
    """Observe every agent with as many workers as the client has requests in flight, not
    one task per agent: a pending agent task holds ~10 KB (100 MB at 10,000 agents), and
    only ``client.concurrency`` of them can make progress at a time anyway."""
    observed: dict[int, LiveAgent] = {}
    pending = iter(enumerate(specs))

    async def worker() -> None:
        for index, spec in pending:
            observed[index] = await _observe_isolated(client, spec, rates[spec.fleet], now)

    await asyncio.gather(*(worker() for _ in range(min(client.concurrency, len(specs)))))
    return [observed[i] for i in range(len(specs))]


async def _observe_shared(
    client: GatewayClient,
    specs: Sequence[AgentSpec],
    rates: Mapping[str, Decimal],
    now: float | None,
    shared: SharedRead,
) -> list[LiveAgent]:
    """The daemon's read: balance and budget from the shared store (only stale fields are
    read). An agent whose next step would be a non-idempotent write decided from the balance
    (registering a missing wallet, a top-up) is observed in full, authoritatively, as
    ``finops apply`` does: such a write is never decided on a remembered value."""
    store = shared.store
    ensured = await store.ensure(
        client, [s.agent_id for s in specs], shared.freshness, authoritative=shared.authoritative
    )
    out: dict[str, LiveAgent] = {}
    full: list[AgentSpec] = []
    for spec in specs:
        agent = spec.agent_id
        view = store.view(agent)
        if agent in ensured.errors:
            out[agent] = LiveAgent(agent_id=agent, exists=False, error=ensured.errors[agent])
        elif view.balance is None or view.budget is None:
            full.append(spec)  # not asked for by this job's freshness: read it here
        elif view.balance.value is None or needs_top_up(spec, view.balance.value, rates[spec.fleet]):
            if view.balance.value is None and Field.BALANCE in ensured.read.get(agent, frozenset()):
                out[agent] = LiveAgent(agent_id=agent, exists=False, ledger_anchor=NEW_WALLET_ANCHOR)
            else:
                full.append(spec)
        else:
            out[agent] = LiveAgent(agent_id=agent, exists=True, balance=view.balance.value, budget=view.budget.value)
    for live in await _observe_agents(client, full, rates, now):
        out[live.agent_id] = live
    return [out[s.agent_id] for s in specs]


async def observe(
    client: GatewayClient,
    desired: DesiredState,
    *,
    target: str,
    webhooks_owned: bool = False,
    now: float | None = None,
    shared: SharedRead | None = None,
) -> LiveFleet:
    """Read everything the planner needs; concurrency is bounded by the client.

    Webhooks are listed (one read) when a fleet opts in or finops already owns some
    (``webhooks_owned``), so removing the last opted-in agent can still prune its hooks.
    ``shared`` (the daemon): agents' balances and budgets come from the shared observation
    store, read only where stale (``_observe_shared``); without it every agent is read."""
    keys = await client.list_keys()  # also proves the key is admin-scoped, before anything else
    currencies = sorted({f.currency for f in desired.fleets})
    rates = {c: await client.exchange_rate(c, CREDITS) for c in currencies}
    specs = desired.agents()
    webhooks = await client.list_webhooks() if webhooks_owned or any(s.gateway_webhooks for s in specs) else None
    by_fleet = {f.name: rates[f.currency] for f in desired.fleets}
    if shared is None:
        results = await _observe_agents(client, specs, by_fleet, now)
    else:
        results = await _observe_shared(client, specs, by_fleet, now, shared)
    return LiveFleet(
        target=target,
        agents={a.agent_id: a for a in results},
        rates=rates,
        key_agents=frozenset(k.agent_id for k in keys),
        admin_agents=frozenset(k.agent_id for k in keys if "admin" in k.scopes and not k.revoked),
        keys=tuple(keys),
        webhooks=tuple(webhooks) if webhooks is not None else None,
    )
