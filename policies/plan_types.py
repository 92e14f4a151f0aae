"""The plan's value types: what ``policies.planner.make_plan`` returns, renderers show and
``apply`` consumes, and their stable JSON form (``plan_to_dict`` / ``plan_from_dict``, the
format of ``--format json`` and of saved plan files). Pure values, no I/O.

All amounts in ``Change.args`` and ``FieldDiff`` values are gateway credits (thresholds a
ratio); the fleet currency is for display (``policies.units``), and the JSON form carries both,
labelled. Additions to the JSON never change ``format_version``; a change of meaning would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

from policies.currency import from_credits
from policies.exposure import ExposureReview
from policies.funding_window import DeferReason
from policies.guardrails import Violation
from policies.money import format_money
from policies.plan_exposure import CapMove, PlanExposureChange, exposure_change
from policies.spec import SecretRef
from policies.units import DiffUnit, Units, parse_decimal, percent_number, unit_of

PLAN_FORMAT_VERSION = 1


class ChangeKind(StrEnum):
    REGISTER = "register"
    TOP_UP = "top_up"
    SET_BUDGET = "set_budget"
    CREATE_WEBHOOK = "create_webhook"
    DELETE_WEBHOOK = "delete_webhook"


WEBHOOK_MARKER_PREFIX = "finops.managed/"
"""An event type finops adds to every webhook it creates (``finops.managed/<fleet>``): the
ownership key that lives on the gateway object itself. The gateway accepts free-form event
types and never emits this one, so it changes nothing about delivery."""


def webhook_marker(fleet: str) -> str:
    return WEBHOOK_MARKER_PREFIX + fleet


@dataclass(frozen=True)
class FieldDiff:
    field: str
    before: str | None
    after: str | None

    @property
    def unit(self) -> DiffUnit:
        """What ``before``/``after`` measure: credits (caps, balance), a ratio
        (``alert_threshold``) or text (``policies.units.FIELD_UNITS``)."""
        return unit_of(self.field)


def field_diff_to_dict(d: FieldDiff, units: Units | None) -> dict[str, Any]:
    """A diff as JSON: ``before``/``after`` as planned (credits, ratio), its ``unit``, and the
    same values in the units a person reads, labelled: ``currency`` with
    ``before_in_currency``/``after_in_currency`` (rounded half-even to the cent) for credits,
    ``before_percent``/``after_percent`` for a ratio."""
    out: dict[str, Any] = {"field": d.field, "before": d.before, "after": d.after, "unit": d.unit.value}
    b, a = parse_decimal(d.before), parse_decimal(d.after)
    if d.unit is DiffUnit.CREDITS and units is not None:
        out["currency"] = units.currency
        out["before_in_currency"] = format_money(units.in_currency(b)) if b is not None else None
        out["after_in_currency"] = format_money(units.in_currency(a)) if a is not None else None
    elif d.unit is DiffUnit.RATIO:
        out["before_percent"] = percent_number(b) if b is not None else None
        out["after_percent"] = percent_number(a) if a is not None else None
    return out


def _wire_money(value: Decimal) -> str:
    """A money argument in a plan file: ``str`` keeps whatever was read (the planner builds
    every amount quantized to cents, so it writes 2 decimals)."""
    return str(value)


@dataclass(frozen=True)
class RegisterArgs:
    expected_balance: Decimal
    """The wallet's balance right after registering: the gateway's signup bonus (credits)."""

    def wire(self) -> dict[str, str]:
        return {"expected_balance": _wire_money(self.expected_balance)}

    @classmethod
    def from_wire(cls, args: Mapping[str, str]) -> RegisterArgs:
        return cls(Decimal(args["expected_balance"]))


@dataclass(frozen=True)
class TopUpArgs:
    """A deposit, in credits. Apply re-reads the balance first: if it moved since the plan,
    it deposits what ``floor``/``target`` call for now, never more than ``amount``."""

    amount: Decimal
    expected_balance: Decimal
    floor: Decimal
    target: Decimal
    idempotency_key: str
    """The funding epoch's deposit key (``policies.funding.deposit_idempotency_key``)."""

    def wire(self) -> dict[str, str]:
        return {
            "amount": _wire_money(self.amount),
            "expected_balance": _wire_money(self.expected_balance),
            "floor": _wire_money(self.floor),
            "target": _wire_money(self.target),
            "idempotency_key": self.idempotency_key,
        }

    @classmethod
    def from_wire(cls, args: Mapping[str, str]) -> TopUpArgs:
        return cls(
            Decimal(args["amount"]),
            Decimal(args["expected_balance"]),
            Decimal(args["floor"]),
            Decimal(args["target"]),
            str(args["idempotency_key"]),
        )


@dataclass(frozen=True)
class SetBudgetArgs:
    """Caps in credits (``None``: not sent) and the gateway's ``alert_threshold`` ratio."""

    daily_cap: Decimal | None
    monthly_cap: Decimal | None
    alert_threshold: Decimal

    def wire(self) -> dict[str, str]:
        out = {} if self.daily_cap is None else {"daily_cap": _wire_money(self.daily_cap)}
        if self.monthly_cap is not None:
            out["monthly_cap"] = _wire_money(self.monthly_cap)
        out["alert_threshold"] = str(self.alert_threshold)
        return out

    @classmethod
    def from_wire(cls, args: Mapping[str, str]) -> SetBudgetArgs:
        daily, monthly = args.get("daily_cap"), args.get("monthly_cap")
        return cls(
            Decimal(daily) if daily is not None else None,
            Decimal(monthly) if monthly is not None else None,
            Decimal(args["alert_threshold"]),
        )


def secret_ref_args(ref: SecretRef) -> dict[str, str]:
    """A secret reference as change arguments (the value is resolved only at apply)."""
    if ref.managed:
        return {"secret_managed": ref.managed}
    args = {"secret_env": ref.env} if ref.env else {"secret_file": str(ref.file)}
    if ref.generate:
        args["secret_generate"] = "true"
    return args


def secret_ref_from_args(args: Mapping[str, str]) -> SecretRef:
    return SecretRef(
        env=args.get("secret_env"),
        file=args.get("secret_file"),
        generate=args.get("secret_generate") == "true",
        managed=args.get("secret_managed"),
    )


@dataclass(frozen=True)
class CreateWebhookArgs:
    url: str
    events: tuple[str, ...]
    """Every event type to subscribe to, finops' ownership marker included."""
    secret: SecretRef
    """The signing secret by reference; its value is resolved only at apply."""

    def wire(self) -> dict[str, str]:
        return {"url": self.url, "events": ",".join(self.events), **secret_ref_args(self.secret)}

    @classmethod
    def from_wire(cls, args: Mapping[str, str]) -> CreateWebhookArgs:
        return cls(str(args["url"]), tuple(str(args["events"]).split(",")), secret_ref_from_args(args))


@dataclass(frozen=True)
class DeleteWebhookArgs:
    webhook_id: str
    url: str

    def wire(self) -> dict[str, str]:
        return {"webhook_id": self.webhook_id, "url": self.url}

    @classmethod
    def from_wire(cls, args: Mapping[str, str]) -> DeleteWebhookArgs:
        return cls(str(args["webhook_id"]), str(args["url"]))


ChangeArgs = RegisterArgs | TopUpArgs | SetBudgetArgs | CreateWebhookArgs | DeleteWebhookArgs

ARGS_OF: Mapping[ChangeKind, type[ChangeArgs]] = {
    ChangeKind.REGISTER: RegisterArgs,
    ChangeKind.TOP_UP: TopUpArgs,
    ChangeKind.SET_BUDGET: SetBudgetArgs,
    ChangeKind.CREATE_WEBHOOK: CreateWebhookArgs,
    ChangeKind.DELETE_WEBHOOK: DeleteWebhookArgs,
}
"""The argument type of each kind of change (``Change`` refuses any other pairing)."""

_A = TypeVar("_A", RegisterArgs, TopUpArgs, SetBudgetArgs, CreateWebhookArgs, DeleteWebhookArgs)


@dataclass(frozen=True)
class Change:
    """One write the apply step will make, with the exact arguments it will send."""

    kind: ChangeKind
    fleet: str
    agent_id: str
    reason: str
    diff: tuple[FieldDiff, ...]
    args: ChangeArgs

    def __post_init__(self) -> None:
        if type(self.args) is not ARGS_OF[self.kind]:
            raise TypeError(f"a {self.kind.value} change takes {ARGS_OF[self.kind].__name__}, not {self.args!r}")

    def args_as(self, kind: type[_A]) -> _A:
        """The arguments as ``kind`` (the type-checked way to read them after a kind test)."""
        if not isinstance(self.args, kind):
            raise TypeError(f"{self.kind.value} change has {type(self.args).__name__}, not {kind.__name__}")
        return self.args

    @property
    def credits_in(self) -> Decimal:
        """Credits this change puts into the agent's wallet: a top-up's amount, the signup
        bonus of a registration (``RegisterArgs.expected_balance``), else zero."""
        if isinstance(self.args, TopUpArgs):
            return self.args.amount
        if isinstance(self.args, RegisterArgs):
            return self.args.expected_balance
        return Decimal("0.00")


class PlanErrorKind(StrEnum):
    UNOBSERVED = "could not observe"
    """The agent could not be read from the gateway: its plan is unknown, nothing changes."""
    WEBHOOK_NOT_PLANNED = "gateway webhook not planned"
    """A declared gateway webhook could not be planned (e.g. its secret is unusable)."""
    NOT_REGISTERED = "not registered"
    """Registration withheld (its key could not be delivered safely); see ``reconcile``."""


@dataclass(frozen=True)
class PlanError:
    """An agent the plan could not (fully) decide for, and why; typed so that consumers
    (the daemon's metrics, renderers) read ``agent_id``/``kind``, never the text."""

    agent_id: str
    kind: PlanErrorKind
    detail: str

    def __str__(self) -> str:
        return f"{self.agent_id}: {self.kind.value}: {self.detail}"

    @classmethod
    def parse(cls, text: str) -> PlanError:
        """Inverse of ``str`` (the plan file's form of an error)."""
        agent_id, _, rest = text.partition(": ")
        for kind in PlanErrorKind:
            if rest.startswith(kind.value + ": "):
                return cls(agent_id, kind, rest[len(kind.value) + 2 :])
        raise ValueError(f"unrecognised plan error {text!r}")


@dataclass(frozen=True)
class FleetInfo:
    name: str
    currency: str
    rate_to_credits: Decimal
    agents: int


@dataclass(frozen=True)
class HeldAgent:
    agent_id: str
    reason: str
    since: str
    auto: bool = False
    """finops' own hold (caps could not be set after registration), not an operator's."""


@dataclass(frozen=True)
class EscalatedAgent:
    """An escalation of the ladder in force (``policies.escalation``): a pause (the window's
    cap held at ``cap`` credits) or a freeze (an operator-style hold, also in ``held``).
    The reconcile pass never undoes it; ``release`` says how it ends."""

    agent_id: str
    action: str
    window: str
    threshold: int
    reason: str
    since: str
    release: str
    """``auto`` or ``manual``."""
    how_released: str
    cap: Decimal | None = None


INTENT_BLOCKS: Mapping[str, ChangeKind] = {
    "deposit": ChangeKind.TOP_UP,
    "register": ChangeKind.REGISTER,
    "create_webhook": ChangeKind.CREATE_WEBHOOK,
}
"""Which change an unresolved intent of each kind withholds for its agent."""


@dataclass(frozen=True)
class Blocked:
    """A change withheld because an earlier request of the same kind for this agent has an
    unknown outcome: it may still land, so repeating it could do it twice. Resolved from
    the gateway (ledger, wallet, webhook list) by the next apply; concluded "not landed"
    only after ``settles_at`` (``policies.settle``)."""

    agent_id: str
    kind: ChangeKind
    intent_key: str
    sent_at: str
    settles_at: str
    detail: str = ""


@dataclass(frozen=True)
class FundingWindow:
    """A fleet's rolling 24 h funding limit as this plan leaves it, in credits."""

    fleet: str
    currency: str
    rate_to_credits: Decimal
    limit: Decimal
    used: Decimal
    """Credits finops put in over the last 24 h before this plan (its records and the
    ledgers it read; deposits of unknown outcome included)."""
    planned: Decimal
    """Credits this plan puts in: top-ups plus the signup bonus of each registration."""

    @property
    def left(self) -> Decimal:
        """What remains of the limit once this plan is applied."""
        return max(Decimal("0.00"), self.limit - self.used - self.planned)

    @property
    def available(self) -> Decimal:
        """What remains of the limit before this plan."""
        return max(Decimal("0.00"), self.limit - self.used)

    def in_currency(self, credits: Decimal) -> Decimal:
        return from_credits(credits, self.rate_to_credits)


@dataclass(frozen=True)
class Deferred:
    """Funding the plan leaves out (or cuts short) for now, and why; it is planned again on
    a later pass once the window has room."""

    fleet: str
    agent_id: str
    kind: ChangeKind
    credits: Decimal
    """What was wanted and not planned."""
    reason: DeferReason
    message: str


@dataclass(frozen=True)
class OutflowFlag:
    """An agent whose wallet lost credits in the last 24 h other than as metered spend."""

    fleet: str
    agent_id: str
    unexplained: Decimal
    """Credits: ledger debits that are not metered spend (withdrawals, payments, charges
    beyond the budget's reported spend)."""
    limit: Decimal
    """The agent's ``maxUnexplainedPerDay`` in credits."""
    complete: bool
    """False when the ledger's 24 h was read only in part: ``unexplained`` is a lower bound."""

    @property
    def refunding_stopped(self) -> bool:
        return self.unexplained >= self.limit


@dataclass(frozen=True)
class Unverified:
    """A desired value the gateway cannot report and finops has no record of writing (a
    fresh state directory): it may well be in place, so it is not planned as a change; it
    is written with the agent's next budget write (the caps carry it)."""

    fleet: str
    agent_id: str
    field: str
    desired: str


@dataclass(frozen=True)
class Plan:
    target: str
    created_at: str
    basis: str
    """Digest of every observed value the plan depends on; a saved plan is stale when the
    live gateway no longer produces the same digest."""
    fleets: tuple[FleetInfo, ...]
    changes: tuple[Change, ...]
    unmanaged_agents: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    violations: tuple[Violation, ...] = ()
    errors: tuple[PlanError, ...] = ()
    """Agents that could not be observed: the plan for them is unknown."""
    held: tuple[HeldAgent, ...] = ()
    """Agents under an operator hold (``finops freeze``): caps kept at 0, never funded."""
    escalated: tuple[EscalatedAgent, ...] = ()
    """The escalation ladder's pauses and freezes in force (declared agents only)."""
    unmanaged_webhooks: tuple[str, ...] = ()
    """Webhooks on the admin key that finops does not own (both ownership keys needed)."""
    rebalanced: tuple[str, ...] = ()
    """Today's rebalancing adjustments in force (desired caps include them)."""
    blocked: tuple[Blocked, ...] = ()
    """Changes withheld while an earlier attempt's outcome is unknown."""
    funding: tuple[FundingWindow, ...] = ()
    """Per fleet: the rolling 24 h funding limit, used, planned and left."""
    deferred: tuple[Deferred, ...] = ()
    outflow: tuple[OutflowFlag, ...] = ()
    exposure: ExposureReview | None = None
    """The spending authority the manifests grant, per fleet, against the exposure a person
    last approved, and whether the increase needs ``finops approve`` (see policies.exposure)."""
    unverified: tuple[Unverified, ...] = ()
    """Desired values finops can neither read back nor find a record of writing."""
    format_version: int = PLAN_FORMAT_VERSION

    @property
    def empty(self) -> bool:
        return not self.changes

    def units(self, fleet: str) -> Units | None:
        """The fleet's currency and rate, as this plan observed it (``None``: not in the plan)."""
        for f in self.fleets:
            if f.name == fleet:
                return Units(f.currency, f.rate_to_credits)
        return None

    def exposure_change(self) -> PlanExposureChange:
        """What applying this plan changes in spending authority, per fleet
        (``policies.plan_exposure``): caps live → planned from the changes themselves,
        funding and agents from the review against the last approved revision."""
        registered: dict[str, list[str]] = {}
        deposits: dict[str, Decimal] = {}
        for c in self.changes:
            if c.kind is ChangeKind.REGISTER:
                registered.setdefault(c.fleet, []).append(c.agent_id)
            if c.credits_in:
                deposits[c.fleet] = deposits.get(c.fleet, Decimal("0.00")) + c.credits_in
        new_wallets = {a for ids in registered.values() for a in ids}
        moves = []
        for c in self.changes:
            if c.kind is not ChangeKind.SET_BUDGET:
                continue
            for d in c.diff:
                after = parse_decimal(d.after)
                if d.field in ("daily_cap", "monthly_cap") and after is not None:
                    moves.append(
                        CapMove(c.fleet, c.agent_id, d.field, parse_decimal(d.before), after, c.agent_id in new_wallets)
                    )
        units = {f.name: Units(f.currency, f.rate_to_credits) for f in self.fleets}
        unobserved = any(e.kind is PlanErrorKind.UNOBSERVED for e in self.errors)
        return exposure_change(units, moves, deposits, registered, self.exposure, complete=not unobserved)

    def summary(self) -> dict[str, Any]:
        counts = Counter(c.kind.value for c in self.changes)
        top_up = sum((c.args.amount for c in self.changes if isinstance(c.args, TopUpArgs)), Decimal(0))
        return {
            "changes": len(self.changes),
            "register": counts.get(ChangeKind.REGISTER.value, 0),
            "top_up": counts.get(ChangeKind.TOP_UP.value, 0),
            "set_budget": counts.get(ChangeKind.SET_BUDGET.value, 0),
            "create_webhook": counts.get(ChangeKind.CREATE_WEBHOOK.value, 0),
            "delete_webhook": counts.get(ChangeKind.DELETE_WEBHOOK.value, 0),
            "held": len(self.held),
            "blocked": len(self.blocked),
            "top_up_credits": format_money(top_up),
            "deferred": len(self.deferred),
            "outflow_flagged": len(self.outflow),
            "agents_changed": len({c.agent_id for c in self.changes}),
            "unmanaged_agents": len(self.unmanaged_agents),
            "violations": len(self.violations),
            "errors": len(self.errors),
            "exposure_increase": bool(self.exposure and self.exposure.increases),
            "approval_required": bool(self.exposure and self.exposure.requires_approval),
            "unverified": len(self.unverified),
            "exposure_change": self.exposure_change().to_dict(),
        }


# ---------------------------------------------------------------------- serialisation


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The stable JSON schema (format_version 1) used by ``--format json`` and plan files."""
    return {
        "format_version": plan.format_version,
        "target": plan.target,
        "created_at": plan.created_at,
        "basis": plan.basis,
        "fleets": [
            {
                "name": f.name,
                "currency": f.currency,
                "rate_to_credits": str(f.rate_to_credits),
                "agents": f.agents,
            }
            for f in plan.fleets
        ],
        "changes": [
            {
                "kind": c.kind.value,
                "fleet": c.fleet,
                "agent_id": c.agent_id,
                "reason": c.reason,
                "diff": [field_diff_to_dict(d, plan.units(c.fleet)) for d in c.diff],
                "args": c.args.wire(),
            }
            for c in plan.changes
        ],
        "unmanaged_agents": list(plan.unmanaged_agents),
        "warnings": list(plan.warnings),
        "violations": [{"rule": v.rule, "fleet": v.fleet, "message": v.message} for v in plan.violations],
        "errors": [str(e) for e in plan.errors],
        "held": [{"agent_id": h.agent_id, "reason": h.reason, "since": h.since, "auto": h.auto} for h in plan.held],
        "escalated": [
            {
                "agent_id": e.agent_id,
                "action": e.action,
                "window": e.window,
                "threshold": e.threshold,
                "reason": e.reason,
                "since": e.since,
                "release": e.release,
                "how_released": e.how_released,
                "cap_credits": format_money(e.cap) if e.cap is not None else None,
            }
            for e in plan.escalated
        ],
        "unmanaged_webhooks": list(plan.unmanaged_webhooks),
        "rebalanced": list(plan.rebalanced),
        "blocked": [
            {
                "agent_id": b.agent_id,
                "kind": b.kind.value,
                "intent_key": b.intent_key,
                "sent_at": b.sent_at,
                "settles_at": b.settles_at,
                "detail": b.detail,
            }
            for b in plan.blocked
        ],
        "funding": [funding_window_to_dict(w) for w in plan.funding],
        "deferred": [
            {
                "fleet": d.fleet,
                "agent_id": d.agent_id,
                "kind": d.kind.value,
                "credits": format_money(d.credits),
                "reason": d.reason.value,
                "message": d.message,
            }
            for d in plan.deferred
        ],
        "unexplained_outflow": [
            {
                "fleet": f.fleet,
                "agent_id": f.agent_id,
                "unexplained_credits": format_money(f.unexplained),
                "limit_credits": format_money(f.limit),
                "ledger_complete": f.complete,
                "refunding_stopped": f.refunding_stopped,
            }
            for f in plan.outflow
        ],
        "exposure": plan.exposure.to_dict() if plan.exposure is not None else None,
        "unverified": [
            {"fleet": u.fleet, "agent_id": u.agent_id, "field": u.field, "desired": u.desired} for u in plan.unverified
        ],
        "summary": plan.summary(),
    }


def funding_window_to_dict(w: FundingWindow) -> dict[str, Any]:
    """One fleet's rolling 24 h funding limit, in credits and in the fleet currency."""
    return {
        "fleet": w.fleet,
        "currency": w.currency,
        "rate_to_credits": str(w.rate_to_credits),
        "limit_credits": format_money(w.limit),
        "used_credits": format_money(w.used),
        "planned_credits": format_money(w.planned),
        "left_credits": format_money(w.left),
        "available_credits": format_money(w.available),
        "limit": format_money(w.in_currency(w.limit)),
        "used": format_money(w.in_currency(w.used)),
        "planned": format_money(w.in_currency(w.planned)),
        "left": format_money(w.in_currency(w.left)),
        "available": format_money(w.in_currency(w.available)),
    }


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Inverse of ``plan_to_dict``; refuses other format versions rather than guessing."""
    version = data.get("format_version")
    if version != PLAN_FORMAT_VERSION:
        raise ValueError(f"unsupported plan format_version {version!r} (expected {PLAN_FORMAT_VERSION})")
    return Plan(
        target=str(data["target"]),
        created_at=str(data["created_at"]),
        basis=str(data["basis"]),
        fleets=tuple(
            FleetInfo(f["name"], f["currency"], Decimal(f["rate_to_credits"]), int(f["agents"])) for f in data["fleets"]
        ),
        changes=tuple(
            Change(
                kind=ChangeKind(c["kind"]),
                fleet=c["fleet"],
                agent_id=c["agent_id"],
                reason=c["reason"],
                diff=tuple(FieldDiff(d["field"], d["before"], d["after"]) for d in c["diff"]),
                args=ARGS_OF[ChangeKind(c["kind"])].from_wire({str(k): str(v) for k, v in c["args"].items()}),
            )
            for c in data["changes"]
        ),
        unmanaged_agents=tuple(data.get("unmanaged_agents", ())),
        warnings=tuple(data.get("warnings", ())),
        violations=tuple(Violation(v["rule"], v["fleet"], v["message"]) for v in data.get("violations", ())),
        errors=tuple(PlanError.parse(str(e)) for e in data.get("errors", ())),
        held=tuple(
            HeldAgent(h["agent_id"], h["reason"], h["since"], bool(h.get("auto", False))) for h in data.get("held", ())
        ),
        escalated=tuple(
            EscalatedAgent(
                agent_id=str(e["agent_id"]),
                action=str(e["action"]),
                window=str(e["window"]),
                threshold=int(e["threshold"]),
                reason=str(e["reason"]),
                since=str(e["since"]),
                release=str(e["release"]),
                how_released=str(e["how_released"]),
                cap=Decimal(str(e["cap_credits"])) if e.get("cap_credits") is not None else None,
            )
            for e in data.get("escalated", ())
        ),
        unmanaged_webhooks=tuple(data.get("unmanaged_webhooks", ())),
        rebalanced=tuple(data.get("rebalanced", ())),
        blocked=tuple(
            Blocked(
                agent_id=str(b["agent_id"]),
                kind=ChangeKind(b["kind"]),
                intent_key=str(b["intent_key"]),
                sent_at=str(b["sent_at"]),
                settles_at=str(b["settles_at"]),
                detail=str(b.get("detail", "")),
            )
            for b in data.get("blocked", ())
        ),
        funding=tuple(
            FundingWindow(
                w["fleet"],
                w["currency"],
                Decimal(w["rate_to_credits"]),
                Decimal(w["limit_credits"]),
                Decimal(w["used_credits"]),
                Decimal(w["planned_credits"]),
            )
            for w in data.get("funding", ())
        ),
        deferred=tuple(
            Deferred(
                d["fleet"],
                d["agent_id"],
                ChangeKind(d["kind"]),
                Decimal(d["credits"]),
                DeferReason(d["reason"]),
                d["message"],
            )
            for d in data.get("deferred", ())
        ),
        outflow=tuple(
            OutflowFlag(
                f["fleet"],
                f["agent_id"],
                Decimal(f["unexplained_credits"]),
                Decimal(f["limit_credits"]),
                bool(f["ledger_complete"]),
            )
            for f in data.get("unexplained_outflow", ())
        ),
        exposure=ExposureReview.from_dict(data["exposure"]) if data.get("exposure") else None,
        unverified=tuple(
            Unverified(str(u["fleet"]), str(u["agent_id"]), str(u["field"]), str(u["desired"]))
            for u in data.get("unverified", ())
        ),
    )


def changes_equal(a: Sequence[Change], b: Sequence[Change]) -> bool:
    """Same writes with the same arguments (reasons and display text may differ)."""
    return [(c.kind, c.agent_id, c.args) for c in a] == [(c.kind, c.agent_id, c.args) for c in b]
