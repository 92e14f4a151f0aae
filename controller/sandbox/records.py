"""The sandbox store's value types and domain errors, and the gateway's storage units:
money and caps as integer atomic units (×1e8), keys as SHA3-256 hashes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

ATOMIC_PER_CREDIT = 100_000_000
_ATOMIC = Decimal(ATOMIC_PER_CREDIT)
_SQLITE_MAX_INT = 2**63 - 1

KNOWN_TIERS = ("free", "starter", "pro", "enterprise")
DEFAULT_SCOPES: tuple[str, ...] = ("read", "write")
SIGNUP_BONUS_ATOMIC = 500 * ATOMIC_PER_CREDIT


def to_atomic(value: Decimal) -> int:
    """Credits → atomic units (×1e8), the gateway's storage unit for money and caps."""
    units = int((value * _ATOMIC).to_integral_value(rounding=ROUND_HALF_EVEN))
    if abs(units) > _SQLITE_MAX_INT:
        raise AmountOutOfRange(value)
    return units


def from_atomic(units: int) -> Decimal:
    """Atomic units → exact credits."""
    return Decimal(units).scaleb(-8)


def hash_key(raw_key: str) -> str:
    """The gateway stores only SHA3-256 of a key; listings show its first 8 hex chars."""
    return hashlib.sha3_256(raw_key.encode()).hexdigest()


def new_raw_key(tier: str) -> str:
    """``a2a_{tier}_{24 hex}``; the tier in the string is informative only."""
    return f"a2a_{tier}_{secrets.token_hex(12)}"


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """A domain rule refused an operation; the HTTP layer maps each type to a problem."""


class AmountOutOfRange(StoreError):
    def __init__(self, value: Decimal) -> None:
        super().__init__(f"Amount {value} is out of range")


class WalletExists(StoreError):
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"Wallet already exists for agent {agent_id}")


class WalletNotFound(StoreError):
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"Wallet not found for agent {agent_id}")


class WalletFrozen(StoreError):
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"Wallet for agent {agent_id} is frozen")


class InsufficientFunds(StoreError):
    def __init__(self, agent_id: str, requested: int, available: int) -> None:
        self.agent_id = agent_id
        self.requested = requested
        self.available = available
        # The gateway formats these as Python floats ("Requested 1000.0, available 70.5").
        super().__init__(
            f"Agent {agent_id}: insufficient balance in CREDITS. "
            f"Requested {float(from_atomic(requested))!r}, available {float(from_atomic(available))!r}"
        )


class DuplicateIdempotencyKey(StoreError):
    """The global ledger key was taken between look-up and insert (a concurrent duplicate)."""


class UnknownTier(StoreError):
    def __init__(self, tier: str) -> None:
        self.tier = tier
        super().__init__(f"Unknown tier '{tier}'")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class KeyRecord:
    key_hash: str
    agent_id: str
    tier: str
    scopes: tuple[str, ...]
    allowed_tools: tuple[str, ...] | None
    allowed_agent_ids: tuple[str, ...] | None
    created_at: float
    revoked: bool
    revoked_at: float | None
    expires_at: float | None

    @property
    def key_hash_prefix(self) -> str:
        return self.key_hash[:8]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


@dataclass(frozen=True)
class WalletRecord:
    agent_id: str
    balance: int
    frozen: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class TransactionRecord:
    id: int
    agent_id: str
    amount: int
    tx_type: str
    description: str
    currency: str
    created_at: float
    idempotency_key: str | None
    result_snapshot: str | None


@dataclass(frozen=True)
class BudgetCapRecord:
    agent_id: str
    daily_cap: int | None
    monthly_cap: int | None
    alert_threshold: float


@dataclass(frozen=True)
class RateCounts:
    """Rate events of one agent, the current call included (recorded before counting)."""

    last_hour: int
    last_minute: int
    tool_last_hour: int


@dataclass(frozen=True)
class UsageSummary:
    total_calls: int
    total_cost: int
    total_tokens: int


@dataclass(frozen=True)
class WebhookRecord:
    id: str
    agent_id: str
    url: str
    event_types: tuple[str, ...]
    secret: str
    filter_agent_ids: tuple[str, ...] | None
    created_at: float
    active: bool


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    webhook_id: str
    event_type: str
    payload: str
    status: str
    attempts: int
    last_attempt_at: float | None
    next_retry_at: float | None
    response_code: int | None
    response_body: str | None
    created_at: float
