"""Observe the live gateway for every declared agent (the manifests are the inventory).

Reads per agent on a converged fleet: balance and budget (2). The ledger anchor used for
deposit idempotency keys (finops' newest landed deposit, ``policies.funding.funding_epoch``)
is read only for agents that need a top-up, and the fleet-wide key listing (1 call) finds
agents nobody declared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from controller.gateway.models import BudgetStatus, KeyRecord, Webhook
from policies.currency import CREDITS, to_credits
from policies.funding import DEPOSIT_KEY_PREFIX, NO_DEPOSIT_EPOCH, top_up_amount
from policies.spec import AgentSpec, DesiredState

NEW_WALLET_ANCHOR = NO_DEPOSIT_EPOCH
"""A wallet that does not exist yet has no finops deposit: the same epoch as an existing
wallet finops never funded, so registering it in between does not change the key."""
ANCHOR_SCAN_ROWS = 100
"""Ledger rows searched for finops' newest deposit (one read). A deposit older than that is
still known from finops' own records (``StateStore.last_deposit_ids``)."""


@dataclass(frozen=True)
class LiveAgent:
    """What the gateway shows for one agent. ``exists`` is false when it has no wallet."""

    agent_id: str
    exists: bool
    balance: Decimal | None = None
    budget: BudgetStatus | None = None
    ledger_anchor: str | None = None
    """Ledger id of finops' newest deposit among the newest ``ANCHOR_SCAN_ROWS`` rows, or
    ``NO_DEPOSIT_EPOCH``; read only when a top-up may be needed (else ``None``)."""
    error: str | None = None
    """Why this agent could not be observed; the planner skips it and reports it."""


@dataclass(frozen=True)
class LiveFleet:
    """One observation of the gateway, the planner's only view of the world."""

    target: str
    agents: Mapping[str, LiveAgent]
    rates: Mapping[str, Decimal]
    """Credits per unit of each fleet currency."""
    key_agents: frozenset[str] = frozenset()
    """Every agent id that holds a key on the gateway."""
    admin_agents: frozenset[str] = frozenset()
    keys: tuple[KeyRecord, ...] = field(default=())
    webhooks: tuple[Webhook, ...] | None = None
    """The admin key's own webhooks; ``None`` when no fleet opted in (not read)."""


async def observe_agent(client: GatewayClient, spec: AgentSpec, rate: Decimal) -> LiveAgent:
    balance = await client.get_balance(spec.agent_id)
    if balance is None:
        return LiveAgent(agent_id=spec.agent_id, exists=False, ledger_anchor=NEW_WALLET_ANCHOR)
    budget = await client.get_budget(spec.agent_id)
    anchor: str | None = None
    floor = to_credits(spec.funding_floor, rate)
    target = to_credits(spec.funding_target, rate)
    if top_up_amount(balance, floor, target) > 0:
        anchor = await finops_deposit_anchor(client, spec.agent_id)
    return LiveAgent(agent_id=spec.agent_id, exists=True, balance=balance, budget=budget, ledger_anchor=anchor)


async def finops_deposit_anchor(client: GatewayClient, agent_id: str) -> str:
    """The id of finops' newest landed deposit in the wallet's newest ledger rows (its key
    carries ``DEPOSIT_KEY_PREFIX``), else ``NO_DEPOSIT_EPOCH``. Other rows (spend, the
    signup bonus, anyone else's deposits) never move it."""
    for tx in await client.transactions(agent_id, limit=ANCHOR_SCAN_ROWS):
        if tx.idempotency_key is not None and tx.idempotency_key.startswith(DEPOSIT_KEY_PREFIX):
            return str(tx.id)
    return NO_DEPOSIT_EPOCH


async def _observe_isolated(client: GatewayClient, spec: AgentSpec, rate: Decimal) -> LiveAgent:
    """One agent's failure is that agent's problem; auth failures stop everything."""
    try:
        return await observe_agent(client, spec, rate)
    except (AuthenticationFailed, NotAdmin):
        raise
    except GatewayError as exc:
        return LiveAgent(agent_id=spec.agent_id, exists=False, error=str(exc))


async def _observe_agents(
    client: GatewayClient, specs: Sequence[AgentSpec], rates: Mapping[str, Decimal]
) -> list[LiveAgent]:
    """Observe every agent with as many workers as the client has requests in flight, not
    one task per agent: a pending agent task holds ~10 KB (100 MB at 10,000 agents), and
    only ``client.concurrency`` of them can make progress at a time anyway."""
    observed: dict[int, LiveAgent] = {}
    pending = iter(enumerate(specs))

    async def worker() -> None:
        for index, spec in pending:
            observed[index] = await _observe_isolated(client, spec, rates[spec.fleet])

    await asyncio.gather(*(worker() for _ in range(min(client.concurrency, len(specs)))))
    return [observed[i] for i in range(len(specs))]


async def observe(
    client: GatewayClient, desired: DesiredState, *, target: str, webhooks_owned: bool = False
) -> LiveFleet:
    """Read everything the planner needs; concurrency is bounded by the client.

    Webhooks are listed (one read) when a fleet opts in or finops already owns some
    (``webhooks_owned``), so removing the last opted-in agent can still prune its hooks."""
    keys = await client.list_keys()  # also proves the key is admin-scoped, before anything else
    currencies = sorted({f.currency for f in desired.fleets})
    rates = {c: await client.exchange_rate(c, CREDITS) for c in currencies}
    specs = desired.agents()
    webhooks = await client.list_webhooks() if webhooks_owned or any(s.gateway_webhooks for s in specs) else None
    results = await _observe_agents(client, specs, {f.name: rates[f.currency] for f in desired.fleets})
    return LiveFleet(
        target=target,
        agents={a.agent_id: a for a in results},
        rates=rates,
        key_agents=frozenset(k.agent_id for k in keys),
        admin_agents=frozenset(k.agent_id for k in keys if "admin" in k.scopes and not k.revoked),
        keys=tuple(keys),
        webhooks=tuple(webhooks) if webhooks is not None else None,
    )
