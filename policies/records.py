"""What finops remembers that the gateway cannot show: the value types of its state records.

Pure values (no I/O). ``controller.state`` stores and loads them; the planner reads them
through ``policies.planner.Memory``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from policies.exposure import Exposure, ExposureReview

__all__ = ["Adjustment", "Approval", "BudgetWrite", "Hold", "Intent", "ManagedWebhook", "PendingRevision"]


@dataclass(frozen=True)
class BudgetWrite:
    daily_cap: Decimal | None
    monthly_cap: Decimal | None
    alert_threshold: Decimal


@dataclass(frozen=True)
class Hold:
    """An operator's emergency stop on one agent; reconcile never undoes it."""

    agent_id: str
    reason: str
    held_at: float
    auto: bool = False
    """Set by finops itself (a new agent whose caps could not be set), not by an operator:
    reconcile sets the declared caps and lifts it once they are in place."""


@dataclass(frozen=True)
class ManagedWebhook:
    """A gateway webhook finops created: the first of the two ownership keys (the second is
    the marker event type on the live webhook)."""

    webhook_id: str
    agent_id: str
    fleet: str
    url: str


@dataclass(frozen=True)
class Adjustment:
    """The rebalancer's current adjustment of one agent's daily cap (fleet currency)."""

    agent_id: str
    fleet: str
    amount: Decimal
    explanation: str
    computed_at: float


@dataclass(frozen=True)
class Approval:
    """A person (or the bootstrap rule) accepted a revision's exposure as the new baseline."""

    revision: str
    source: str
    how: str
    """``approve`` (``finops approve``), ``apply`` (a confirmed interactive apply) or
    ``bootstrap`` (the first revision, within its own bound, with nothing approved yet)."""
    approved_at: float
    by_key: str
    """The admin key's fingerprint (never the key)."""
    by_user: str
    exposure_before: Exposure | None
    exposure_after: Exposure


@dataclass(frozen=True)
class PendingRevision:
    """A revision the daemon refused to apply unattended: its exposure and the review."""

    revision: str
    source: str
    first_seen: float
    last_seen: float
    exposure: Exposure
    review: ExposureReview


@dataclass(frozen=True)
class Intent:
    intent_key: str
    kind: str
    agent_id: str
    payload: Mapping[str, Any]
    status: str
    detail: str
    created_at: float
    sent_at: float | None = None
    """The last moment finops may have had this intent's request on the wire: settle time
    counts from here (``policies.settle``)."""
    ref: str | None = None
    """What it landed as, for code to read: a ledger transaction id, a webhook id."""
