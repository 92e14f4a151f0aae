"""Detect what cannot be prevented: money and objects on the gateway that finops did not
put there (or put there twice), and steps of its own whose outcome is still unknown.

Pure: ``controller.reconcile.detect`` reads the ledger, the live webhooks and the state and
hands them in; ``finops status`` shows the typed findings and ``--strict`` fails on any.

* **Ledger deposits finops did not make** (``classify_deposit``), within the lookback
  (``LOOKBACK_SECONDS``, the rolling 24 h). A deposit is finops' own when this state
  recorded it (its idempotency key is a funding event's or an unresolved deposit intent's,
  or its ledger id the newest landed deposit's). A deposit that carries finops' key shape
  but is not in this state is finops-made elsewhere: when this state was already funding the
  agent at that point of the ledger (it registered the agent, or an earlier deposit is its), it
  is **another finops with another state** (a possible double funding); otherwise this
  state cannot know (a fresh state, a CI runner) and it is not flagged. Anything else is
  a **foreign** deposit. The signup bonus is expected and never flagged.
* **A balance above its funding target that finops' deposits do not explain**
  (``unexplained_balance``). finops only ever tops a wallet up *to* its target, so the
  excess over the target is unexplained up to what, in the lookback, came from elsewhere:
  credits that are not finops' deposits nor the signup bonus (foreign deposits, another
  finops', payments in), plus what finops-keyed deposits landed above the target (the
  balance each deposit left is in its ledger row's result snapshot): a deposit that lands
  above the target was computed from a balance that another deposit had already raised;
  plus what the balance gained that no ledger row shows (``unledgered_credits``: concurrent
  deposits with one key are credited each time and booked once).
* **More than one finops-marked webhook for an agent** (``duplicate_marked_webhooks``).
* **Intents left unresolved** (``unresolved_intents``): age, and whether the settle time
  has passed (then only a look at the gateway, by the next apply or rotate, resolves it).

All amounts here are gateway credits; the view converts them to the fleet's currency.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar

from policies.currency import from_credits
from policies.funding import DEPOSIT_KEY_PREFIX, NO_DEPOSIT_EPOCH, deposit_idempotency_key
from policies.funding_window import WINDOW_SECONDS
from policies.live import Webhook
from policies.money import CENT, ZERO, format_money
from policies.plan_types import WEBHOOK_MARKER_PREFIX
from policies.records import Intent, ManagedWebhook
from policies.settle import is_settled, settles_at

LOOKBACK_SECONDS = WINDOW_SECONDS
"""How far back the ledger is examined: the rolling 24 h of the funding window (the ledger
read that observation makes for a top-up is the same read) and of the gateway's daily
budget. ``finops status --strict`` run at least daily sees every deposit; a finding about a
deposit clears 24 h after it landed (or once the balance is back at or below the target)."""

DEPOSIT_TX_TYPES = frozenset({"deposit", "auto_reload"})
"""Ledger rows that put money in from outside the gateway (the signup bonus is expected)."""
SIGNUP_BONUS_TX_TYPE = "signup_bonus"

_FINOPS_KEY = re.compile(re.escape(DEPOSIT_KEY_PREFIX) + r"[0-9a-f]{40}")
"""The shape of every deposit key finops derives (``policies.funding.deposit_idempotency_key``)."""


INTENT_PENDING = "pending"
INTENT_DONE = "done"
"""Intent statuses as stored (``controller.state.PENDING`` and ``DONE``)."""


def is_finops_key(key: str | None) -> bool:
    return key is not None and _FINOPS_KEY.fullmatch(key) is not None


def _iso(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at is not None else None


def _money(credits: Decimal, rate: Decimal, currency: str) -> str:
    return f"{format_money(credits)} credits ({format_money(from_credits(credits, rate))} {currency})"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LedgerCredit:
    """A ledger row that put money into the wallet (amount > 0), as detection needs it."""

    id: int
    amount: Decimal
    tx_type: str
    idempotency_key: str | None
    at: float | None
    """Unix seconds, ``None`` when the gateway's timestamp was unreadable."""
    new_balance: Decimal | None = None
    """The balance this row left, from its result snapshot (keyed deposits only)."""
    later_sum: Decimal = ZERO
    """The sum of every ledger row newer than this one (charges and debits included)."""
    later_rows: int = 0
    """How many ledger rows are newer than this one."""


@dataclass
class CreditCollector:
    """Collects ``LedgerCredit`` rows while the ledger is read newest first, keeping each
    row's ``later_sum``/``later_rows`` exact: feed it every row of the lookback, in order."""

    credits: list[LedgerCredit] = field(default_factory=list)
    later_sum: Decimal = ZERO
    later_rows: int = 0

    def add(
        self, id: int, amount: Decimal, tx_type: str, key: str | None, at: float | None, new_balance: Decimal | None
    ) -> None:
        if amount > 0:
            self.credits.append(
                LedgerCredit(id, amount, tx_type, key, at, new_balance, self.later_sum, self.later_rows)
            )
        self.later_sum += amount
        self.later_rows += 1


@dataclass(frozen=True)
class OwnFunding:
    """What this state knows of finops' own deposits to one agent."""

    keys: frozenset[str] = frozenset()
    """Idempotency keys of its deposits (funding events, unresolved deposit intents)."""
    ledger_ids: frozenset[int] = frozenset()
    """Ledger ids its deposits landed as, where known (its newest landed deposit)."""
    covers_from: int | None = None
    """The ledger id from which this state would have recorded every finops deposit to the
    agent: 0 when it registered the agent, else its first recorded deposit's ledger id;
    ``None`` when it never funded the agent (a fresh state cannot tell)."""


def own_funding(
    agent_id: str,
    *,
    intents: Iterable[Intent],
    funding_refs: Iterable[str],
    last_deposit_id: int | None,
    rows: Sequence[LedgerCredit],
) -> OwnFunding:
    """``OwnFunding`` of one agent from what this state keeps in bounded form: its intents
    (the unresolved ones, whose key identifies their row if it landed, and registrations),
    its funding events' refs (the keys of its recent deposits), the ledger id of its newest
    landed deposit (``StateDB.last_deposit_ids``), and the ledger rows read. The state has
    been funding the agent from its registration (when this state made it) or else from its
    earliest deposit that is either in ``rows`` or is ``last_deposit_id``."""
    keys: set[str] = set(funding_refs)
    registered = False
    for intent in intents:
        if intent.agent_id != agent_id:
            continue
        if intent.kind == "deposit":
            keys.add(intent.intent_key)
        elif intent.kind == "register" and intent.status == INTENT_DONE:
            registered = True
    ids = frozenset({last_deposit_id} if last_deposit_id is not None else ())
    seen = [r.id for r in rows if r.id in ids or (r.idempotency_key is not None and r.idempotency_key in keys)]
    firsts = [*seen, *ids]
    covers_from = 0 if registered else (min(firsts) if firsts else None)
    return OwnFunding(frozenset(keys), ids, covers_from)


# --------------------------------------------------------------------------- findings


class FindingKind(StrEnum):
    UNEXPLAINED_BALANCE = "unexplained-balance"
    DEPOSIT_NOT_BY_FINOPS = "deposit-not-by-finops"
    DUPLICATE_WEBHOOKS = "duplicate-marked-webhooks"
    UNRESOLVED_INTENT = "unresolved-intent"
    NOT_CHECKED = "not-checked"


class DepositOrigin(StrEnum):
    OWN = "own"
    """Recorded in this state."""
    FINOPS_UNRECORDED = "finops-unrecorded"
    """finops' key shape; this state was not funding the agent then (a fresh state): not flagged."""
    FINOPS_OTHER_STATE = "finops-other-state"
    """finops' key shape, not in this state although it was funding the agent then: another
    finops with another state (a possible double funding)."""
    FOREIGN = "foreign"
    """No finops key: someone else deposited."""


FLAGGED_ORIGINS = frozenset({DepositOrigin.FINOPS_OTHER_STATE, DepositOrigin.FOREIGN})


@dataclass(frozen=True)
class UnexplainedBalance:
    """The balance is above the funding target by ``excess``; ``unexplained`` of it is not
    explained by finops' own deposits (``other_credits`` came from elsewhere in the
    lookback, ``overshoot`` is what finops-keyed deposits landed above the target,
    ``unledgered`` what the balance gained that no ledger row shows)."""

    agent_id: str
    balance: Decimal
    target: Decimal
    excess: Decimal
    unexplained: Decimal
    other_credits: Decimal
    overshoot: Decimal
    unledgered: Decimal
    complete: bool
    """False when the lookback did not fit in the ledger pages read: a lower bound."""

    kind: ClassVar[FindingKind] = FindingKind.UNEXPLAINED_BALANCE

    def to_dict(self, rate: Decimal, currency: str) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "agent_id": self.agent_id, "currency": currency}
        for name in (
            "balance",
            "target",
            "excess",
            "unexplained",
            "other_credits",
            "overshoot",
            "unledgered",
        ):
            credits: Decimal = getattr(self, name)
            out[f"{name}_credits"] = format_money(credits)
            out[name] = format_money(from_credits(credits, rate))
        out["complete"] = self.complete
        return out

    def message(self, rate: Decimal, currency: str) -> str:
        parts = []
        if self.other_credits > 0:
            parts.append(
                f"{_money(self.other_credits, rate, currency)} came in within 24 h from deposits or credits "
                "this finops did not make"
            )
        if self.unledgered > 0:
            parts.append(
                f"the balance gained {_money(self.unledgered, rate, currency)} that no ledger row shows (concurrent "
                "deposits with one idempotency key: the gateway moves the money each time and records it once)"
            )
        if self.overshoot > 0:
            parts.append(
                f"finops-keyed deposits landed {_money(self.overshoot, rate, currency)} above the target "
                "(a second deposit computed from a stale balance, or the target was lowered since)"
            )
        least = "" if self.complete else " at least"
        return (
            f"BALANCE ABOVE TARGET: {_money(self.balance, rate, currency)} vs target "
            f"{_money(self.target, rate, currency)};{least} {_money(self.unexplained, rate, currency)} of it is not "
            f"explained by finops' own deposits ({'; '.join(parts)})"
        )


@dataclass(frozen=True)
class UnrecognisedDeposit:
    """A deposit in the lookback that this finops did not make."""

    agent_id: str
    ledger_id: int
    amount: Decimal
    tx_type: str
    at: float | None
    origin: DepositOrigin
    finops_key: str | None
    """The idempotency key when it has finops' shape (a derived hash, not a secret); any
    other key is never shown (it could be anything, a credential included)."""
    key_verified: bool
    """The key is this fleet's derivation for this agent at a known funding epoch."""
    covers_from: int | None

    kind: ClassVar[FindingKind] = FindingKind.DEPOSIT_NOT_BY_FINOPS

    def to_dict(self, rate: Decimal, currency: str) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "agent_id": self.agent_id,
            "origin": self.origin.value,
            "ledger_id": self.ledger_id,
            "tx_type": self.tx_type,
            "amount_credits": format_money(self.amount),
            "amount": format_money(from_credits(self.amount, rate)),
            "currency": currency,
            "at": _iso(self.at),
            "finops_key": self.finops_key,
            "key_verified": self.key_verified,
        }

    def message(self, rate: Decimal, currency: str) -> str:
        what = f"{_money(self.amount, rate, currency)} ({self.tx_type}, ledger id {self.ledger_id}, {_iso(self.at)})"
        if self.origin is DepositOrigin.FINOPS_OTHER_STATE:
            how = "this fleet's key derivation" if self.key_verified else "finops' key shape"
            since = (
                "which registered this agent"
                if self.covers_from == 0
                else f"which has been funding this agent since ledger id {self.covers_from}"
            )
            return (
                f"DEPOSIT BY ANOTHER FINOPS: {what} carries {how} but is not in this state, {since}: another "
                "finops with another state funds it (a possible double funding; share one state, see `--state-url`)"
            )
        return f"DEPOSIT NOT BY FINOPS: {what} carries no finops idempotency key: someone else funded this agent"


@dataclass(frozen=True)
class DuplicateWebhooks:
    agent_id: str
    webhook_ids: tuple[str, ...]

    kind: ClassVar[FindingKind] = FindingKind.DUPLICATE_WEBHOOKS

    def to_dict(self, rate: Decimal, currency: str) -> dict[str, Any]:
        return {"kind": self.kind.value, "agent_id": self.agent_id, "webhook_ids": list(self.webhook_ids)}

    def message(self, rate: Decimal, currency: str) -> str:
        return (
            f"DUPLICATE WEBHOOKS: {len(self.webhook_ids)} finops-marked gateway webhooks for this agent "
            f"({', '.join(self.webhook_ids)}); `finops apply` keeps one and deletes the rest"
        )


@dataclass(frozen=True)
class UnresolvedIntent:
    agent_id: str
    intent_kind: str
    created_at: float
    sent_at: float
    age_seconds: float
    settle_seconds: float
    past_settle: bool

    kind: ClassVar[FindingKind] = FindingKind.UNRESOLVED_INTENT

    @property
    def settles_at(self) -> float:
        return settles_at(self.sent_at, self.settle_seconds)

    def to_dict(self, rate: Decimal, currency: str) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "agent_id": self.agent_id,
            "intent_kind": self.intent_kind,
            "created_at": _iso(self.created_at),
            "sent_at": _iso(self.sent_at),
            "age_seconds": int(self.age_seconds),
            "settle_seconds": self.settle_seconds,
            "settles_at": _iso(self.settles_at),
            "past_settle": self.past_settle,
        }

    def message(self, rate: Decimal, currency: str) -> str:
        sent = f"sent {_iso(self.sent_at)} ({int(self.age_seconds)} s ago)"
        if self.intent_kind == "rotate":
            head = f"ROTATION INTERRUPTED: its outcome is unknown ({sent}); "
            if self.past_settle:
                return head + (
                    f"past its settle time ({int(self.settle_seconds)} s, FINOPS_SETTLE_SECONDS) since "
                    f"{_iso(self.settles_at)}: the next `finops rotate` or daemon pass resolves it from the gateway"
                )
            return head + (
                "a `finops rotate` or daemon pass resolves it once it is seen landing or its settle time has "
                f"passed ({_iso(self.settles_at)}); no new rotation until then"
            )
        head = f"UNKNOWN OUTCOME: a {_INTENT_LABEL.get(self.intent_kind, self.intent_kind)} {sent} "
        if self.past_settle:
            return head + (
                f"is past its settle time ({int(self.settle_seconds)} s, FINOPS_SETTLE_SECONDS) since "
                f"{_iso(self.settles_at)}: the next `finops apply` resolves it from the gateway; none is repeated "
                "until then"
            )
        return head + (
            "may still land; none is repeated until it is resolved from the gateway (concluded not landed at "
            f"{_iso(self.settles_at)} at the latest)"
        )


_INTENT_LABEL = {"deposit": "top_up (deposit)", "register": "register", "create_webhook": "create_webhook"}
"""How an intent's kind reads in a flag: the change it withholds (``ChangeKind`` values)."""


@dataclass(frozen=True)
class NotChecked:
    """A check that could not run (its reads failed): nothing is known, so it is flagged."""

    agent_id: str | None
    what: str
    error: str

    kind: ClassVar[FindingKind] = FindingKind.NOT_CHECKED

    def to_dict(self, rate: Decimal, currency: str) -> dict[str, Any]:
        return {"kind": self.kind.value, "agent_id": self.agent_id, "what": self.what, "error": self.error}

    def message(self, rate: Decimal, currency: str) -> str:
        return f"NOT CHECKED: {self.what} could not be read ({self.error})"


Finding = UnexplainedBalance | UnrecognisedDeposit | DuplicateWebhooks | UnresolvedIntent | NotChecked


# --------------------------------------------------------------------------- decisions


def classify_deposit(row: LedgerCredit, own: OwnFunding) -> DepositOrigin:
    if row.id in own.ledger_ids or (row.idempotency_key is not None and row.idempotency_key in own.keys):
        return DepositOrigin.OWN
    if is_finops_key(row.idempotency_key):
        if own.covers_from is not None and row.id > own.covers_from:
            return DepositOrigin.FINOPS_OTHER_STATE
        return DepositOrigin.FINOPS_UNRECORDED
    return DepositOrigin.FOREIGN


def key_verified(key: str | None, fleet: str, agent_id: str, epochs: Iterable[int]) -> bool:
    """Whether ``key`` is ``deposit_idempotency_key(fleet, agent_id, epoch)`` for a known
    epoch (no finops deposit yet, or one of the given ledger ids)."""
    if not is_finops_key(key):
        return False
    candidates = {NO_DEPOSIT_EPOCH, *(str(i) for i in epochs)}
    return any(deposit_idempotency_key(fleet, agent_id, e) == key for e in candidates)


def in_lookback(at: float | None, now: float) -> bool:
    """A row without a readable time counts (the safe side), like the funding window."""
    return at is None or at > now - LOOKBACK_SECONDS


def unrecognised_deposits(
    agent_id: str, fleet: str, rows: Sequence[LedgerCredit], own: OwnFunding, now: float
) -> list[UnrecognisedDeposit]:
    """The flagged deposits of the lookback, oldest first."""
    epochs = {r.id for r in rows if is_finops_key(r.idempotency_key)} | own.ledger_ids
    out = []
    for row in rows:
        if row.tx_type not in DEPOSIT_TX_TYPES or row.amount <= 0 or not in_lookback(row.at, now):
            continue
        origin = classify_deposit(row, own)
        if origin not in FLAGGED_ORIGINS:
            continue
        finops = row.idempotency_key if is_finops_key(row.idempotency_key) else None
        out.append(
            UnrecognisedDeposit(
                agent_id,
                row.id,
                row.amount,
                row.tx_type,
                row.at,
                origin,
                finops,
                key_verified(finops, fleet, agent_id, (e for e in epochs if e < row.id)),
                own.covers_from,
            )
        )
    return sorted(out, key=lambda d: d.ledger_id)


def unexplained_balance(
    agent_id: str,
    balance: Decimal,
    target: Decimal,
    rows: Sequence[LedgerCredit],
    own: OwnFunding,
    now: float,
    *,
    complete: bool = True,
) -> UnexplainedBalance | None:
    """``None`` unless the balance is above the target by more than finops' own deposits
    explain (module docstring). ``target`` and ``balance`` in credits."""
    excess = balance - target
    if excess <= 0:
        return None
    other, overshoot = ZERO, ZERO
    snapshots: list[LedgerCredit] = []
    for row in rows:
        if row.amount <= 0 or row.tx_type == SIGNUP_BONUS_TX_TYPE or not in_lookback(row.at, now):
            continue
        origin = classify_deposit(row, own) if row.tx_type in DEPOSIT_TX_TYPES else DepositOrigin.FOREIGN
        if origin in FLAGGED_ORIGINS:
            other += row.amount
        elif row.new_balance is not None:
            overshoot += min(row.amount, max(ZERO, row.new_balance - target))
        if row.new_balance is not None:
            snapshots.append(row)
    unledgered = unledgered_credits(balance, snapshots)
    unexplained = min(excess, other + overshoot + unledgered)
    if unexplained <= 0:
        return None
    return UnexplainedBalance(agent_id, balance, target, excess, unexplained, other, overshoot, unledgered, complete)


def unledgered_credits(balance: Decimal, snapshots: Iterable[LedgerCredit]) -> Decimal:
    """What the balance gained that no ledger row shows. A row's snapshot says the balance
    it left; that balance plus every newer row must be the next snapshot's balance, and at
    the end the balance now. A segment that ends higher than its rows explain (by more than
    a cent per row: the gateway rounds each row to the cent) gained money without a row:
    the gateway's race on concurrent deposits with one idempotency key (API.md §9). Only
    gains count; a segment that ends lower (a debit without a row, a row that landed after
    the balance was read) is not this finding."""
    ordered = sorted((r for r in snapshots if r.new_balance is not None), key=lambda r: r.id)
    total = ZERO
    for i, older in enumerate(ordered):
        newer = ordered[i + 1] if i + 1 < len(ordered) else None
        assert older.new_balance is not None
        if newer is None:
            end, between, rows = balance, older.later_sum, older.later_rows
        else:
            assert newer.new_balance is not None
            end = newer.new_balance
            between = older.later_sum - newer.later_sum
            rows = older.later_rows - newer.later_rows
        gain = end - (older.new_balance + between)
        if gain > CENT * (rows + 1):
            total += gain
    return total


def duplicate_marked_webhooks(
    hooks: Sequence[Webhook], managed: Mapping[str, ManagedWebhook]
) -> list[DuplicateWebhooks]:
    """Agents with more than one live webhook that carries a finops marker (any fleet's) and
    is for that agent: filtered to exactly it, or recorded in this state as its."""
    per_agent: dict[str, list[str]] = {}
    for hook in hooks:
        if not any(e.startswith(WEBHOOK_MARKER_PREFIX) for e in hook.event_types):
            continue
        record = managed.get(hook.id)
        agents = {record.agent_id} if record is not None else set()
        if hook.filter_agent_ids is not None and len(hook.filter_agent_ids) == 1:
            agents.add(hook.filter_agent_ids[0])
        for agent in agents:
            per_agent.setdefault(agent, []).append(hook.id)
    return [DuplicateWebhooks(agent, tuple(sorted(ids))) for agent, ids in sorted(per_agent.items()) if len(ids) > 1]


def unresolved_intents(
    intents: Iterable[Intent], now: float, settle_seconds: float, *, agents: Collection[str] | None = None
) -> list[UnresolvedIntent]:
    """Every pending intent (of ``agents`` when given), oldest first."""
    out = []
    for intent in intents:
        if intent.status != INTENT_PENDING or (agents is not None and intent.agent_id not in agents):
            continue
        sent = intent.sent_at if intent.sent_at is not None else intent.created_at
        out.append(
            UnresolvedIntent(
                intent.agent_id,
                intent.kind,
                intent.created_at,
                sent,
                max(0.0, now - intent.created_at),
                settle_seconds,
                is_settled(sent, now, settle_seconds),
            )
        )
    return sorted(out, key=lambda u: (u.created_at, u.agent_id))
