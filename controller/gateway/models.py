"""Domain views of gateway responses.

The gateway mixes 2-dp strings and JSON floats for money (API.md §0.12); everything is
converted to ``Decimal`` cents here so no float ever leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from policies.live import BudgetStatus, KeyRecord, Webhook

__all__ = [
    "ANALYTICS_ATOMIC_DIGITS",
    "LEADERBOARD_METRICS",
    "BudgetStatus",
    "DepositResult",
    "KeyRecord",
    "Leaderboard",
    "LeaderboardEntry",
    "Registration",
    "Rotation",
    "Transaction",
    "UsageBucket",
    "UsageSummary",
    "Webhook",
    "WebhookDelivery",
    "analytics_credits",
]

ANALYTICS_ATOMIC_DIGITS = 8
"""GreenHelix 1.4.8 bug (API.md §0.12, §5): the leaderboard's ``spend`` ``value`` and the
timeseries' ``cost`` are sums of the gateway's stored integers, i.e. *atomic units* of
1e-8 credit, not credits (``"cost": "30000000.00"`` is 0.30 credits). Every such field is
decoded by :func:`analytics_credits` and nothing else; a gateway that fixes the bug is this
one constant set to 0 (or made to depend on the gateway's version)."""


def analytics_credits(value: Decimal) -> Decimal:
    """Credits from an atomic-unit amount the gateway reports by mistake (see
    ``ANALYTICS_ATOMIC_DIGITS``): an exact decimal shift, never rounded, whatever the
    context's precision (``40000000`` -> ``0.40000000``; ``2460000`` -> ``0.02460000``)."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN / infinity: callers validate before this
        raise ValueError(f"not a finite amount: {value!r}")
    return Decimal((sign, digits, exponent - ANALYTICS_ATOMIC_DIGITS))


LEADERBOARD_METRICS = ("spend", "calls", "trust_score", "revenue", "rating")
"""What ``GET /v1/billing/leaderboard`` ranks by; anything else is the gateway's 400."""


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


@dataclass(frozen=True)
class LeaderboardEntry:
    """One row of the leaderboard. ``value`` is a count for ``calls`` (integral), credits
    for ``spend`` (converted exactly from the gateway's atomic units, so it may carry up to
    8 decimals: never rounded), and the gateway's number as given for the other metrics."""

    rank: int
    agent_id: str
    value: Decimal


@dataclass(frozen=True)
class Leaderboard:
    """``GET /v1/billing/leaderboard?metric=…&limit=…``: every agent *with usage* (ids
    starting ``test-``, ``perf-``, ``audit-``, ``stress-`` are hidden by the gateway),
    ranked by ``metric``, at most ``limit`` of them."""

    metric: str
    limit: int
    entries: tuple[LeaderboardEntry, ...]
    complete: bool
    """Fewer rows than ``limit`` came back, so no agent with usage was cut off: an agent
    missing from a complete board has no usage (or a hidden id), not a low rank."""

    def values(self) -> dict[str, Decimal]:
        """``{agent_id: value}`` (ids are unique: the client refuses a board that repeats one)."""
        return {entry.agent_id: entry.value for entry in self.entries}


@dataclass(frozen=True)
class UsageBucket:
    """One non-empty bucket of ``GET …/timeseries``: usage records whose time falls in
    ``[start, start + interval)`` (UTC). ``cost`` in credits (atomic units ÷ 1e8 on 1.4.8,
    exact); ``calls`` counts every recorded call, free ones included."""

    start: datetime
    calls: int
    cost: Decimal


@dataclass(frozen=True)
class UsageSummary:
    """``GET …/usage[?since=]``: the agent's recorded calls since ``since`` (all time
    without it). ``total_cost`` in credits at the gateway's atomic resolution (1e-8): the
    gateway sends a float sum, whose binary noise below 1e-8 is dropped, nothing else."""

    total_calls: int
    total_cost: Decimal
    total_tokens: int
