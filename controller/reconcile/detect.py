"""The reads behind ``finops status``' detection of what cannot be prevented
(``policies.detect`` decides): per existing agent one read of its ledger back to the
lookback (``observe.read_ledger``: one request on a quiet agent; none more when observation
already read it for a top-up), the admin key's webhooks (one listing, unless observation
already made it), and the state's intents and funding records. Reads only; works with any
state backend through the ``StateDB`` protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from controller.reconcile.observe import read_ledger
from controller.state.interface import StateDB
from policies.currency import to_credits
from policies.detect import (
    INTENT_DONE,
    INTENT_PENDING,
    LOOKBACK_SECONDS,
    LedgerCredit,
    NotChecked,
    duplicate_marked_webhooks,
    own_funding,
    unexplained_balance,
    unrecognised_deposits,
    unresolved_intents,
)
from policies.detect import Finding as Finding
from policies.live import LiveFleet
from policies.records import Intent
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


async def _ledgers(
    client: GatewayClient, specs: Sequence[AgentSpec], now: float
) -> dict[str, LedgerWindow | GatewayError]:
    """Every agent's window, ``client.concurrency`` at a time; one agent's failure is its own."""
    out: dict[str, LedgerWindow | GatewayError] = {}
    pending = iter(specs)

    async def worker() -> None:
        for spec in pending:
            try:
                read = await read_ledger(client, spec.agent_id, now)
                out[spec.agent_id] = LedgerWindow(read.credits, read.complete)
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
    # Bounded reads of the state (its full intent history grows without end): the unresolved
    # intents, one registration per agent, the deposits of the last two funding windows (a
    # late landing can lag its first attempt), each agent's newest landed deposit.
    pending = store.intents(status=INTENT_PENDING)
    for unresolved in unresolved_intents(pending, now, settle_seconds):
        found.add(declared, unresolved)
    intents_of: dict[str, list[Intent]] = {}
    for intent in [*pending, *store.intents(status=INTENT_DONE, kind="register")]:
        intents_of.setdefault(intent.agent_id, []).append(intent)
    refs: dict[str, set[str]] = {}
    for event in [*store.funding_events(now=now), *store.funding_events(now=now - LOOKBACK_SECONDS)]:
        refs.setdefault(event.agent_id, set()).add(event.ref)
    last_deposits = store.last_deposit_ids()

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
    # Observation already read the ledger of an agent it considered topping up: reused.
    windows: dict[str, LedgerWindow | GatewayError] = {
        s.agent_id: LedgerWindow(credits, live.agents[s.agent_id].ledger_complete)
        for s in existing
        if (credits := live.agents[s.agent_id].credits) is not None
    }
    windows |= await _ledgers(client, [s for s in existing if s.agent_id not in windows], now)
    fleet_of = {spec.agent_id: fleet for fleet in desired.fleets for spec in fleet.agents}
    for spec in existing:
        window = windows[spec.agent_id]
        if isinstance(window, GatewayError):
            found.add(declared, NotChecked(spec.agent_id, "ledger", str(window)))
            continue
        found.ledger_complete[spec.agent_id] = window.complete
        fleet = fleet_of[spec.agent_id]
        own = own_funding(
            spec.agent_id,
            intents=intents_of.get(spec.agent_id, ()),
            funding_refs=refs.get(spec.agent_id, ()),
            last_deposit_id=last_deposits.get(spec.agent_id),
            rows=window.credits,
        )
        for deposit in unrecognised_deposits(spec.agent_id, fleet.name, window.credits, own, now):
            found.add(declared, deposit)
        balance = live.agents[spec.agent_id].balance
        assert balance is not None
        target = to_credits(spec.funding_target, live.rates[fleet.currency])
        excess = unexplained_balance(spec.agent_id, balance, target, window.credits, own, now, complete=window.complete)
        if excess is not None:
            found.add(declared, excess)
    return found


__all__ = ["Detection", "Finding", "LedgerWindow", "detect"]
