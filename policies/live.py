"""One observation of the gateway: the planner's only view of the world, as pure values.

``controller.reconcile.observe`` reads the gateway into these; ``controller.gateway.models`` re-exports
the gateway value models the planner reads (``BudgetStatus``, ``KeyRecord``, ``Webhook``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from policies.funding import NO_DEPOSIT_EPOCH
from policies.funding_window import ChargeTotal, LedgerRow

if TYPE_CHECKING:
    from policies.detect import LedgerCredit

__all__ = ["NEW_WALLET_ANCHOR", "BudgetStatus", "KeyRecord", "LiveAgent", "LiveFleet", "Webhook"]

NEW_WALLET_ANCHOR = NO_DEPOSIT_EPOCH
"""A wallet that does not exist yet has no finops deposit: the same epoch as an existing
wallet finops never funded, so registering it in between does not change the key."""


@dataclass(frozen=True)
class BudgetStatus:
    """``GET .../budget``. Caps are ``None`` when unset; the gateway never returns
    ``alert_threshold`` here, so it cannot be observed (finops remembers what it wrote)."""

    daily_cap: Decimal | None
    monthly_cap: Decimal | None
    daily_spend: Decimal
    monthly_spend: Decimal
    daily_pct: float
    monthly_pct: float
    alert_triggered: bool
    cap_exceeded: bool


@dataclass(frozen=True)
class KeyRecord:
    """A row of ``GET /v1/infra/keys``; the only handle is the hash prefix."""

    key_hash_prefix: str
    agent_id: str
    tier: str
    scopes: tuple[str, ...]
    created_at: str
    revoked: bool


@dataclass(frozen=True)
class Webhook:
    """A row of ``GET /v1/infra/webhooks`` (only the caller's own, active ones). The gateway
    returns the signing secret in clear; it is kept out of ``repr``."""

    id: str
    url: str
    event_types: tuple[str, ...]
    filter_agent_ids: tuple[str, ...] | None
    secret: str
    created_at: str

    def __repr__(self) -> str:
        return f"Webhook(id={self.id!r}, url={self.url!r}, event_types={self.event_types!r})"


@dataclass(frozen=True)
class LiveAgent:
    """What the gateway shows for one agent. ``exists`` is false when it has no wallet."""

    agent_id: str
    exists: bool
    balance: Decimal | None = None
    budget: BudgetStatus | None = None
    ledger_anchor: str | None = None
    """Ledger id of finops' newest landed deposit among the rows read, or
    ``NO_DEPOSIT_EPOCH``; read only when a top-up may be needed (else ``None``)."""
    ledger: tuple[LedgerRow, ...] | None = None
    """The last 24 h of the ledger (newest first) but its metered charges, read only when a
    top-up is considered."""
    ledger_complete: bool = True
    """False when the 24 h did not fit in ``LEDGER_MAX_PAGES`` pages: outflow is a lower bound."""
    charges: ChargeTotal | None = None
    """The ledger's ``charge`` rows of the last 24 h, summed, against the budget's spend."""
    credits: tuple[LedgerCredit, ...] | None = None
    """The last 24 h's rows that put money in, with ids and balance snapshots, read with
    ``ledger`` (``status``' detection reuses them instead of reading the ledger again)."""
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
