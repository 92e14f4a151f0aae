"""Domain views of gateway responses.

The gateway mixes 2-dp strings and JSON floats for money (API.md §0.12); everything is
converted to ``Decimal`` cents here so no float ever leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from policies.live import BudgetStatus, KeyRecord, Webhook

__all__ = [
    "BudgetStatus",
    "DepositResult",
    "KeyRecord",
    "Registration",
    "Rotation",
    "Transaction",
    "Webhook",
    "WebhookDelivery",
]


@dataclass(frozen=True)
class Registration:
    """``POST /v1/register``: the agent's only chance to get its own key (shown once)."""

    agent_id: str
    api_key: str
    tier: str
    balance: Decimal

    def __repr__(self) -> str:  # keep the key out of reprs, logs and tracebacks
        return f"Registration(agent_id={self.agent_id!r}, tier={self.tier!r}, balance={self.balance})"


@dataclass(frozen=True)
class DepositResult:
    """A completed deposit. ``recovered`` is true when the result came from a ledger
    look-up after an unknown outcome rather than from the deposit response itself."""

    new_balance: Decimal
    transaction_id: int | None
    recovered: bool = False


@dataclass(frozen=True)
class Transaction:
    """A ledger row; ``idempotency_key`` is how lost deposit responses are recovered."""

    id: int
    amount: Decimal
    tx_type: str
    idempotency_key: str | None
    created_at: str
    new_balance: Decimal | None = None
    """The balance the row left, from its ``result_snapshot`` (the gateway keeps one for keyed
    deposits and withdrawals: the response it replays); ``None`` when absent or unreadable."""


@dataclass(frozen=True)
class Rotation:
    """``POST /v1/infra/keys/rotate``: the new key is shown once; the old one keeps working
    until ``grace_expires_at`` (unix seconds)."""

    agent_id: str
    new_key: str
    grace_expires_at: float

    def __repr__(self) -> str:  # keep the key out of reprs, logs and tracebacks
        return f"Rotation(agent_id={self.agent_id!r}, grace_expires_at={self.grace_expires_at})"


@dataclass(frozen=True)
class WebhookDelivery:
    """A row of ``GET /v1/infra/webhooks/{id}/deliveries``."""

    id: int
    event_type: str
    status: str
    attempts: int
    response_code: int | None
    last_attempt_at: float | None
