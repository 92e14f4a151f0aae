"""The reads behind ``finops status``' detection of what cannot be prevented
(``policies.detect`` decides): per existing agent one paged read of its ledger back to the
lookback (one request on a quiet agent), the admin key's webhooks (one listing, unless
observation already made it), and the state's intents and funding records. Reads only;
works with any state backend through the ``StateDB`` protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from controller.reconcile.observe import LEDGER_MAX_PAGES, LEDGER_PAGE
from controller.state.interface import StateDB
from policies.currency import to_credits
from policies.detect import (
    INTENT_PENDING,
    LedgerCredit,
    NotChecked,
    duplicate_marked_webhooks,
    in_lookback,
    own_funding,
    unexplained_balance,
    unrecognised_deposits,
    unresolved_intents,
)
from policies.detect import Finding as Finding
from policies.funding_window import parse_ledger_time
from policies.live import LiveFleet
from policies.spec import AgentSpec, DesiredState


@dataclass(frozen=True)
class LedgerWindow:
    credits: tuple[LedgerCredit, ...]
    """The rows of the lookback that put money in, newest first."""
    complete: bool
    """False when the lookback did not fit in ``LEDGER_MAX_PAGES`` pages."""


@dataclass
class Detection:
    by_agent: dict[str, list[Finding]] = field(default_factory=dict)
    """Findings of declared agents."""
    other: list[Finding] = field(default_factory=list)
    """Findings of agents the manifests no longer declare, and checks that could not run."""
    ledger_complete: dict[str, bool] = field(default_factory=dict)
    """Per agent whose ledger was read: whether the whole lookback fit in the pages read
    (a busy agent's is read in part; what was found is then a lower bound)."""

    def add(self, declared: set[str], finding: Finding) -> None:
        if finding.agent_id is not None and finding.agent_id in declared:
            self.by_agent.setdefault(finding.agent_id, []).append(finding)
        else:
            self.other.append(finding)


async def read_credits(client: GatewayClient, agent_id: str, now: float) -> LedgerWindow:
    """The ledger's credits (amount > 0) back to the lookback, at most ``LEDGER_MAX_PAGES``
    pages; a quiet agent takes one request."""
    out: list[LedgerCredit] = []
    later_sum, later_rows = Decimal("0.00"), 0  # every row newer than the current one
    for page in range(LEDGER_MAX_PAGES):
        batch = await client.transactions(agent_id, limit=LEDGER_PAGE, offset=page * LEDGER_PAGE)
        reached_end = False
        for tx in batch:
            at = parse_ledger_time(tx.created_at)
            if not in_lookback(at, now):
                reached_end = True
                break
            if tx.amount > 0:
                out.append(
                    LedgerCredit(
                        tx.id, tx.amount, tx.tx_type, tx.idempotency_key, at, tx.new_balance, later_sum, later_rows
                    )
                )
            later_sum, later_rows = later_sum + tx.amount, later_rows + 1
        if reached_end or len(batch) < LEDGER_PAGE:
            return LedgerWindow(tuple(out), True)
    return LedgerWindow(tuple(out), False)


async def _ledgers(
    client: GatewayClient, specs: Sequence[AgentSpec], now: float
) -> dict[str, LedgerWindow | GatewayError]:
    """Every agent's window, ``client.concurrency`` at a time; one agent's failure is its own."""
    out: dict[str, LedgerWindow | GatewayError] = {}
    pending = iter(specs)

    async def worker() -> None:
        for spec in pending:
            try:
                out[spec.agent_id] = await read_credits(client, spec.agent_id, now)
            except (AuthenticationFailed, NotAdmin):
                raise
            except GatewayError as exc:
                out[spec.agent_id] = exc

    await asyncio.gather(*(worker() for _ in range(min(client.concurrency, len(specs)))))
    return out


async def detect(
    client: GatewayClient,
    desired: DesiredState,
    store: StateDB,
    live: LiveFleet,
    *,
    now: float,
    settle_seconds: float,
) -> Detection:
    declared = {s.agent_id for s in desired.agents()}
    found = Detection()
    intents = store.intents()
    for unresolved in unresolved_intents((i for i in intents if i.status == INTENT_PENDING), now, settle_seconds):
        found.add(declared, unresolved)

    hooks = live.webhooks
    if hooks is None:
        try:
            hooks = tuple(await client.list_webhooks())
        except (AuthenticationFailed, NotAdmin):
            raise
        except GatewayError as exc:
            found.add(declared, NotChecked(None, "finops-marked webhooks", str(exc)))
    for duplicate in duplicate_marked_webhooks(hooks or (), store.managed_webhooks()):
        found.add(declared, duplicate)

    existing = [
        s for s in desired.agents() if (a := live.agents.get(s.agent_id)) is not None and a.exists and not a.error
    ]
    windows = await _ledgers(client, existing, now)
    refs: dict[str, set[str]] = {}
    for event in store.funding_events(now=now):
        refs.setdefault(event.agent_id, set()).add(event.ref)
    fleet_of = {spec.agent_id: fleet for fleet in desired.fleets for spec in fleet.agents}
    for spec in existing:
        window = windows[spec.agent_id]
        if isinstance(window, GatewayError):
            found.add(declared, NotChecked(spec.agent_id, "ledger", str(window)))
            continue
        found.ledger_complete[spec.agent_id] = window.complete
        fleet = fleet_of[spec.agent_id]
        own = own_funding(spec.agent_id, intents, refs.get(spec.agent_id, ()))
        for deposit in unrecognised_deposits(spec.agent_id, fleet.name, window.credits, own, now):
            found.add(declared, deposit)
        balance = live.agents[spec.agent_id].balance
        assert balance is not None
        target = to_credits(spec.funding_target, live.rates[fleet.currency])
        excess = unexplained_balance(spec.agent_id, balance, target, window.credits, own, now, complete=window.complete)
        if excess is not None:
            found.add(declared, excess)
    return found


__all__ = ["Detection", "Finding", "LedgerWindow", "detect", "read_credits"]
