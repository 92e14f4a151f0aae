"""Funding bounded over time: the fleet's rolling 24 h funding limit and the per-agent limit
on refunding unexplained outflow.

Pure: the planner hands in what finops has put into the fleet (its own durable records,
merged with what the gateway's ledger shows), what this plan would add, and the clock; it
gets back what may be funded now and what must wait. All amounts are gateway credits.

* **Fleet limit.** Every credit finops puts into a fleet's wallets counts for 24 h: its
  deposits (landed *or* of unknown outcome) and the signup bonus of each agent it registers.
  A plan never takes the fleet above ``limit`` within any rolling 24 h window; what does not
  fit is deferred (typed), and the caps and everything else in the plan still converge.
* **Unexplained outflow.** Credits that left an agent's wallet in the last 24 h other than as
  metered gateway spend (withdrawals, payments, conversions: every ledger debit that is not a
  ``charge``) are *unexplained*. The agent is flagged, and its top-ups are clipped to
  ``max_unexplained - unexplained``: once that much has left, finops stops refilling it. If
  every refill is drained again, the refills to a flagged agent add up to at most
  ``max_unexplained`` per 24 h.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum

from policies.money import CENT, ZERO

WINDOW_SECONDS = 86_400
"""The rolling window, like the gateway's own budget windows (last 86 400 s)."""

DEPOSIT_KEY_PREFIX = "finops-topup-"
"""Idempotency keys of finops' deposits (``policies.funding.deposit_idempotency_key``)."""


class FundingKind(StrEnum):
    DEPOSIT = "deposit"
    SIGNUP_BONUS = "signup_bonus"


class DeferReason(StrEnum):
    FLEET_DAILY_LIMIT = "fleet-daily-limit"
    """The fleet's rolling 24 h funding limit is used up (or would be)."""
    UNEXPLAINED_OUTFLOW = "unexplained-outflow"
    """The agent's unexplained outflow reached its declared ``maxUnexplainedPerDay``."""


@dataclass(frozen=True)
class FundingEvent:
    """Credits finops put into one wallet at ``at`` (unix seconds). ``ref`` identifies the
    event across sources (a deposit's idempotency key; ``signup_bonus:<agent>``), so finops'
    record and the ledger row of the same deposit count once."""

    ref: str
    agent_id: str
    fleet: str
    kind: FundingKind
    credits: Decimal
    at: float


@dataclass(frozen=True)
class LedgerRow:
    """The part of a ledger row these decisions need; ``at`` is ``None`` when the gateway's
    timestamp could not be read (such a row is treated as recent: the safe side)."""

    amount: Decimal
    tx_type: str
    idempotency_key: str | None
    at: float | None


def bonus_ref(agent_id: str) -> str:
    """An agent is registered once ever, so its bonus has one stable reference."""
    return f"signup_bonus:{agent_id}"


def in_window(at: float, now: float) -> bool:
    """An event counts for exactly 24 h: from ``at`` until ``at + WINDOW_SECONDS``
    (excluded). An event stamped in the future (clock skew) counts: the safe side."""
    return at > now - WINDOW_SECONDS


def used_in_window(events: Iterable[FundingEvent], now: float) -> Decimal:
    """Credits put in within the rolling window, each ``ref`` counted once."""
    seen: dict[str, Decimal] = {}
    for e in events:
        if in_window(e.at, now):
            seen[e.ref] = max(seen.get(e.ref, ZERO), e.credits)
    return sum(seen.values(), ZERO)


def parse_ledger_time(value: str) -> float | None:
    """The gateway's ISO-8601 ``created_at`` as unix seconds, or ``None`` if unreadable."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def matters(row: LedgerRow) -> bool:
    """Whether these decisions read the row: not a metered charge (the bulk of a busy
    ledger), so what observation keeps per agent stays small."""
    return row.tx_type != "charge"


def unexplained_outflow(rows: Iterable[LedgerRow], now: float, charges: ChargeTotal | None = None) -> Decimal:
    """Credits that left the wallet within the window other than as metered spend: every
    debit that is not a ``charge``, plus whatever the ``charge`` rows took beyond the
    metered spend the gateway's budget reports (``charges``, when known)."""
    total = ZERO
    for row in rows:
        if row.amount < 0 and row.tx_type != "charge" and (row.at is None or in_window(row.at, now)):
            total += -row.amount
    return total + (charges.excess if charges is not None else ZERO)


@dataclass(frozen=True)
class ChargeTotal:
    """The ``charge`` rows of the last 24 h, summed (not kept: a busy ledger is mostly
    charges), against the metered spend the budget reports for the same rolling 24 h.

    Charges beyond metered spend are not spend: the gateway charges a wallet on every call
    that reuses an ``X-Request-ID`` yet records the spend once (API.md §4), and a debit the
    gateway books as a charge without metering it would look the same. Each row is rounded
    to the cent while spend is summed exactly, so up to a cent per row is tolerated."""

    credits: Decimal
    rows: int
    metered_spend: Decimal

    @property
    def excess(self) -> Decimal:
        return max(ZERO, self.credits - self.metered_spend - CENT * self.rows)


def ledger_funding(agent_id: str, fleet: str, rows: Iterable[LedgerRow]) -> list[FundingEvent]:
    """finops' credits as the gateway's ledger shows them (a fresh state database is not
    blind): deposits carrying finops' idempotency-key prefix and the signup bonus. A row
    without a readable time is left out here; finops' own record of it still counts."""
    out: list[FundingEvent] = []
    for row in rows:
        if row.at is None or row.amount <= 0:
            continue
        if row.tx_type == "deposit" and (row.idempotency_key or "").startswith(DEPOSIT_KEY_PREFIX):
            assert row.idempotency_key is not None
            out.append(FundingEvent(row.idempotency_key, agent_id, fleet, FundingKind.DEPOSIT, row.amount, row.at))
        elif row.tx_type == "signup_bonus":
            out.append(FundingEvent(bonus_ref(agent_id), agent_id, fleet, FundingKind.SIGNUP_BONUS, row.amount, row.at))
    return out


@dataclass(frozen=True)
class FundingRequest:
    """One funding step a plan wants: a registration (its bonus is all or nothing) or a
    top-up (may be granted in part: a smaller top-up still lifts the agent)."""

    agent_id: str
    kind: FundingKind
    credits: Decimal
    divisible: bool


def allocate(limit: Decimal, used: Decimal, requests: Sequence[FundingRequest]) -> list[Decimal]:
    """Grant requests in order while the window has room; never more than ``limit - used``
    in total. An indivisible request (a registration's bonus) that does not fit is skipped,
    and so is every later request of the same agent (its top-up waits for its wallet); a
    later, smaller request of another agent may still fit. A divisible request (a top-up)
    gets what is left, in whole cents."""
    left = max(ZERO, limit - used)
    waiting: set[str] = set()
    grants: list[Decimal] = []
    for req in requests:
        want = max(ZERO, req.credits)
        if req.agent_id in waiting:
            grant = ZERO
        elif want <= left:
            grant = want
        elif req.divisible:
            grant = left.quantize(CENT, rounding=ROUND_FLOOR)
        else:
            grant = ZERO
            waiting.add(req.agent_id)
        grants.append(grant)
        left -= grant
    return grants


def outflow_allowance(max_unexplained: Decimal, unexplained: Decimal) -> Decimal:
    """What finops may still refill into an agent with this much unexplained outflow."""
    return max(ZERO, max_unexplained - unexplained)
