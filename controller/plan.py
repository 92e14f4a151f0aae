"""The plan: an immutable value computed from (desired, live, memory), nothing else.

``make_plan`` never touches the network or prints; renderers turn a ``Plan`` into text and
``apply`` consumes one. A saved plan file is this value serialised by ``plan_to_dict``.
All amounts in ``Change.args`` are gateway credits; the fleet currency is for display.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from deepdiff import DeepDiff

from controller.gateway.models import Webhook
from controller.observe import NEW_WALLET_ANCHOR, LiveAgent, LiveFleet
from controller.state import Adjustment, BudgetWrite, Hold, ManagedWebhook
from policies.currency import SIGNUP_BONUS_CREDITS, from_credits, to_credits
from policies.exposure import Exposure, ExposureReview, exposure_of, review
from policies.funding import deposit_idempotency_key, top_up_amount
from policies.guardrails import Violation, check_caps_within_total, check_funding_ceiling
from policies.money import format_money
from policies.spec import AgentSpec, DesiredState, FleetSpec, GatewayWebhookSpec, SecretRef

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


@dataclass(frozen=True)
class Change:
    """One write the apply step will make, with the exact arguments it will send."""

    kind: ChangeKind
    fleet: str
    agent_id: str
    reason: str
    diff: tuple[FieldDiff, ...]
    args: Mapping[str, str]


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
    errors: tuple[str, ...] = ()
    """Agents that could not be observed: the plan for them is unknown."""
    held: tuple[HeldAgent, ...] = ()
    """Agents under an operator hold (``finops freeze``): caps kept at 0, never funded."""
    unmanaged_webhooks: tuple[str, ...] = ()
    """Webhooks on the admin key that finops does not own (both ownership keys needed)."""
    rebalanced: tuple[str, ...] = ()
    """Today's rebalancing adjustments in force (desired caps include them)."""
    exposure: ExposureReview | None = None
    """The spending authority the manifests grant, per fleet, against the exposure a person
    last approved, and whether the increase needs ``finops approve`` (see policies.exposure)."""
    format_version: int = PLAN_FORMAT_VERSION

    @property
    def empty(self) -> bool:
        return not self.changes

    def summary(self) -> dict[str, Any]:
        counts = Counter(c.kind.value for c in self.changes)
        top_up = sum((Decimal(c.args["amount"]) for c in self.changes if c.kind is ChangeKind.TOP_UP), Decimal(0))
        return {
            "changes": len(self.changes),
            "register": counts.get(ChangeKind.REGISTER.value, 0),
            "top_up": counts.get(ChangeKind.TOP_UP.value, 0),
            "set_budget": counts.get(ChangeKind.SET_BUDGET.value, 0),
            "create_webhook": counts.get(ChangeKind.CREATE_WEBHOOK.value, 0),
            "delete_webhook": counts.get(ChangeKind.DELETE_WEBHOOK.value, 0),
            "held": len(self.held),
            "top_up_credits": format_money(top_up),
            "agents_changed": len({c.agent_id for c in self.changes}),
            "unmanaged_agents": len(self.unmanaged_agents),
            "violations": len(self.violations),
            "errors": len(self.errors),
            "exposure_increase": bool(self.exposure and self.exposure.increases),
            "approval_required": bool(self.exposure and self.exposure.requires_approval),
        }


@dataclass(frozen=True)
class Memory:
    """What finops remembers that the gateway cannot show (see ``controller.state``)."""

    budget_writes: Mapping[str, BudgetWrite] = field(default_factory=dict)
    holds: Mapping[str, Hold] = field(default_factory=dict)
    managed_webhooks: Mapping[str, ManagedWebhook] = field(default_factory=dict)
    secret_fingerprints: Mapping[SecretRef, str | None] = field(default_factory=dict)
    """Fingerprints of the referenced signing secrets, resolved by the caller (``None``: not
    available yet, e.g. a file finops will generate on apply)."""
    key_prefixes: Mapping[str, str] = field(default_factory=dict)
    """Fingerprints of the agent keys finops holds."""
    adjustments: Mapping[str, Adjustment] = field(default_factory=dict)
    """The rebalancer's current daily-cap adjustments (desired cap = baseline + adjustment)."""
    approved_exposure: Exposure | None = None
    """The exposure a person last approved (``None``: nothing approved yet)."""


ADJUSTMENT_TTL_SECONDS = 86_400
"""An adjustment not recomputed for a full rolling window is stale: the agent returns to its
baseline even if the rebalancer stopped running."""


def live_adjustment(spec: AgentSpec, memory: Memory, now: float) -> Adjustment | None:
    """The adjustment the planner honours: fresh, non-zero, within the agent's bounds."""
    adj = memory.adjustments.get(spec.agent_id)
    if adj is None or adj.fleet != spec.fleet or not adj.amount or now - adj.computed_at > ADJUSTMENT_TTL_SECONDS:
        return None
    if spec.daily_cap_min is None or spec.daily_cap_max is None:
        return None  # rebalancing switched off in the manifest
    if not spec.daily_cap_min <= spec.daily_cap + adj.amount <= spec.daily_cap_max:
        return None  # bounds changed in git since; the baseline wins
    return adj


def desired_alert_threshold(spec: AgentSpec) -> Decimal:
    """The gateway's ``alert_threshold`` is a ratio; align it with the lowest declared
    threshold so its ``alert_triggered`` flag agrees with finops' own alerts."""
    return (Decimal(min(spec.alert_thresholds)) / 100).normalize() if spec.alert_thresholds else Decimal("0.8")


def field_diff(before: Mapping[str, str | None], after: Mapping[str, str | None]) -> tuple[FieldDiff, ...]:
    """Field-level before/after for flat records, via deepdiff so nested values work later."""
    if dict(before) == dict(after):
        return ()  # the common, converged case; DeepDiff costs ~0.4 ms even on equal dicts
    diff = DeepDiff(dict(before), dict(after), ignore_order=True, view="tree")
    fields: set[str] = set()
    for level_items in diff.values():
        for item in level_items:
            path = item.path(output_format="list")
            if path:
                fields.add(str(path[0]))
    return tuple(FieldDiff(f, before.get(f), after.get(f)) for f in sorted(fields, key=list(after).index))


def _money(value: Decimal | None) -> str | None:
    return format_money(value) if value is not None else None


def _plan_agent(
    fleet: FleetSpec, spec: AgentSpec, live: LiveAgent, rate: Decimal, memory: Memory, now: float
) -> list[Change]:
    changes: list[Change] = []
    hold = memory.holds.get(spec.agent_id)
    if hold is not None:
        return _plan_held(fleet, spec, live, hold, memory)
    balance = live.balance
    if not live.exists:
        changes.append(
            Change(
                kind=ChangeKind.REGISTER,
                fleet=fleet.name,
                agent_id=spec.agent_id,
                reason=(
                    f"agent has no wallet: register it (its own API key goes to the secrets directory; "
                    f"the gateway grants a {format_money(SIGNUP_BONUS_CREDITS)}-credit signup bonus)"
                ),
                diff=(FieldDiff("wallet", None, "registered"),),
                args={"expected_balance": format_money(SIGNUP_BONUS_CREDITS)},
            )
        )
        balance = SIGNUP_BONUS_CREDITS
    assert balance is not None
    floor = to_credits(spec.funding_floor, rate)
    target = to_credits(spec.funding_target, rate)
    amount = top_up_amount(balance, floor, target)
    if amount > 0:
        anchor = live.ledger_anchor or NEW_WALLET_ANCHOR
        changes.append(
            Change(
                kind=ChangeKind.TOP_UP,
                fleet=fleet.name,
                agent_id=spec.agent_id,
                reason=(
                    f"balance {format_money(balance)} < floor {format_money(floor)} credits: "
                    f"top up to target {format_money(target)} "
                    f"(+{format_money(from_credits(amount, rate))} {fleet.currency})"
                ),
                diff=(FieldDiff("balance", format_money(balance), format_money(balance + amount)),),
                args={
                    "amount": format_money(amount),
                    "expected_balance": format_money(balance),
                    "floor": format_money(floor),
                    "target": format_money(target),
                    "idempotency_key": deposit_idempotency_key(fleet.name, spec.agent_id, anchor, amount),
                },
            )
        )
    adj = live_adjustment(spec, memory, now)
    daily = spec.daily_cap + (adj.amount if adj else 0)
    want = {
        "daily_cap": _money(to_credits(daily, rate)),
        "monthly_cap": _money(to_credits(spec.monthly_cap, rate)),
        "alert_threshold": str(desired_alert_threshold(spec)),
    }
    budget = _plan_budget(fleet, spec, live, want, memory, held=False, adjustment=adj)
    return changes + budget


def _plan_held(fleet: FleetSpec, spec: AgentSpec, live: LiveAgent, hold: Hold, memory: Memory) -> list[Change]:
    """A held agent is kept at caps of 0 (the one lever that stops REST spend on 1.4.8) and
    is never funded; only ``finops unfreeze`` lifts the hold."""
    if not live.exists:
        return []
    want = {"daily_cap": "0.00", "monthly_cap": "0.00", "alert_threshold": str(desired_alert_threshold(spec))}
    return _plan_budget(fleet, spec, live, want, memory, held=True, hold=hold)


def _plan_budget(
    fleet: FleetSpec,
    spec: AgentSpec,
    live: LiveAgent,
    want: Mapping[str, str | None],
    memory: Memory,
    *,
    held: bool,
    hold: Hold | None = None,
    adjustment: Adjustment | None = None,
) -> list[Change]:
    changes: list[Change] = []
    remembered = memory.budget_writes.get(spec.agent_id)
    have = {
        "daily_cap": _money(live.budget.daily_cap) if live.budget else None,
        "monthly_cap": _money(live.budget.monthly_cap) if live.budget else None,
        # Not observable on the gateway: fall back on what finops last wrote, if anything.
        "alert_threshold": str(remembered.alert_threshold) if remembered else None,
    }
    diff = field_diff(have, want)
    if diff:
        unobservable_only = all(d.field == "alert_threshold" for d in diff)
        reason = (
            f"held by operator ({hold.reason}): caps stay at 0 until `finops unfreeze`"
            if held and hold is not None and not unobservable_only
            else "the gateway cannot report alert_threshold and finops has no record of writing it"
            if unobservable_only and remembered is None
            else f"caps differ from the manifest plus today's rebalancing ({adjustment.explanation})"
            if adjustment is not None and not unobservable_only
            else "caps differ from the manifest"
            if not unobservable_only
            else "alert_threshold differs from what finops last wrote"
        )
        changes.append(
            Change(
                kind=ChangeKind.SET_BUDGET,
                fleet=fleet.name,
                agent_id=spec.agent_id,
                reason=reason,
                diff=diff,
                args={k: v for k, v in want.items() if v is not None},
            )
        )
    return changes


def secret_ref_args(ref: SecretRef) -> dict[str, str]:
    """A secret reference as change arguments (the value is resolved only at apply)."""
    args = {"secret_env": ref.env} if ref.env else {"secret_file": str(ref.file)}
    if ref.generate:
        args["secret_generate"] = "true"
    return args


def secret_ref_from_args(args: Mapping[str, str]) -> SecretRef:
    return SecretRef(
        env=args.get("secret_env"), file=args.get("secret_file"), generate=args.get("secret_generate") == "true"
    )


def _webhook_fp(hook: Webhook) -> str:
    from controller.secretref import secret_fingerprint

    return secret_fingerprint(hook.secret)


def _describe(hook: Webhook) -> str:
    return f"{hook.id} {hook.url} [{', '.join(hook.event_types)}]"


@dataclass(frozen=True)
class _WebhookPlan:
    changes: list[Change]
    unmanaged: list[str]
    warnings: list[str]


def _plan_webhooks(desired: DesiredState, live: LiveFleet, memory: Memory, *, prune: bool) -> _WebhookPlan:
    """Gateway webhooks: create missing, replace what differs (the gateway has no update),
    prune only what finops owns. Ownership needs both keys: finops' state *and* the marker
    event type on the live webhook; anything else is listed as unmanaged and left alone."""
    out = _WebhookPlan([], [], [])
    if live.webhooks is None:
        return out
    owned = {
        w.id: w
        for w in live.webhooks
        if w.id in memory.managed_webhooks and webhook_marker(memory.managed_webhooks[w.id].fleet) in w.event_types
    }
    claimed: set[str] = set()
    for fleet in desired.fleets:
        for spec in fleet.agents:
            agent = live.agents.get(spec.agent_id)
            if agent is None or agent.error is not None:
                # Unobserved: its plan is unknown, so nothing changes for it (and nothing of
                # its is pruned either).
                claimed |= {h for h, rec in memory.managed_webhooks.items() if rec.agent_id == spec.agent_id}
                continue
            for hook in spec.gateway_webhooks:
                claimed |= _plan_agent_webhook(fleet, spec, hook, owned, memory, out)
    for hook_id, stale in sorted(owned.items()):
        if hook_id in claimed:
            continue
        record = memory.managed_webhooks[hook_id]
        if prune:
            out.changes.append(_delete_webhook(record.fleet, record.agent_id, stale, "no longer declared: pruned"))
        else:
            out.warnings.append(
                f"webhook {_describe(stale)} for {record.agent_id} is no longer declared; run with --prune to delete it"
            )
    for other in live.webhooks:
        if other.id in owned:
            continue
        marked = any(e.startswith(WEBHOOK_MARKER_PREFIX) for e in other.event_types)
        note = " (carries finops' marker but is not in finops' state: not proven ours)" if marked else ""
        out.unmanaged.append(_describe(other) + note)
    return out


def _plan_agent_webhook(
    fleet: FleetSpec,
    spec: AgentSpec,
    hook: GatewayWebhookSpec,
    owned: Mapping[str, Webhook],
    memory: Memory,
    out: _WebhookPlan,
) -> set[str]:
    events = tuple(sorted({*hook.events, webhook_marker(fleet.name)}))
    want_fp = memory.secret_fingerprints.get(hook.secret)
    mine = [
        w
        for w in owned.values()
        if memory.managed_webhooks[w.id].agent_id == spec.agent_id and w.filter_agent_ids == (spec.agent_id,)
    ]
    exact = [
        w
        for w in mine
        if w.url == hook.url and tuple(sorted(w.event_types)) == events and want_fp and _webhook_fp(w) == want_fp
    ]
    keep = exact[0] if exact else None
    if keep is None:
        before = mine[0] if mine else None
        changed = (
            [
                FieldDiff("url", before.url, hook.url) if before.url != hook.url else None,
                FieldDiff("events", ",".join(sorted(before.event_types)), ",".join(events))
                if tuple(sorted(before.event_types)) != events
                else None,
                FieldDiff("secret", _webhook_fp(before), want_fp or "(generated on apply)")
                if _webhook_fp(before) != want_fp
                else None,
            ]
            if before
            else [
                FieldDiff("url", None, hook.url),
                FieldDiff("events", None, ",".join(events)),
                FieldDiff("secret", None, want_fp or "(generated on apply)"),
            ]
        )
        reason = (
            "webhook differs and the gateway cannot update one: create the replacement, then delete the old"
            if before
            else "no webhook on the gateway for this agent"
        )
        out.changes.append(
            Change(
                kind=ChangeKind.CREATE_WEBHOOK,
                fleet=fleet.name,
                agent_id=spec.agent_id,
                reason=reason,
                diff=tuple(d for d in changed if d is not None),
                args={"url": hook.url, "events": ",".join(events), **secret_ref_args(hook.secret)},
            )
        )
    for w in mine:
        if w is not keep:
            why = "replaced (see the create above)" if keep is None else "duplicate of " + keep.id
            out.changes.append(_delete_webhook(fleet.name, spec.agent_id, w, why))
    return {w.id for w in mine}


def _delete_webhook(fleet: str, agent_id: str, hook: Webhook, why: str) -> Change:
    return Change(
        kind=ChangeKind.DELETE_WEBHOOK,
        fleet=fleet,
        agent_id=agent_id,
        reason=f"finops-owned webhook {hook.id}: {why}",
        diff=(FieldDiff("webhook", f"{hook.id} {hook.url}", None),),
        args={"webhook_id": hook.id, "url": hook.url},
    )


def observation_basis(desired: DesiredState, live: LiveFleet) -> str:
    """Digest of the observed values that decide the plan (not spend, which always moves)."""
    rows: list[Any] = [sorted((k, str(v)) for k, v in live.rates.items())]
    for spec in desired.agents():
        a = live.agents.get(spec.agent_id)
        if a is None:
            rows.append([spec.agent_id, "unobserved"])
            continue
        rows.append(
            [
                a.agent_id,
                a.exists,
                _money(a.balance),
                _money(a.budget.daily_cap) if a.budget else None,
                _money(a.budget.monthly_cap) if a.budget else None,
                a.ledger_anchor,
                a.error,
            ]
        )
    if live.webhooks is not None:
        rows.append(sorted([w.id, w.url, sorted(w.event_types), _webhook_fp(w)] for w in live.webhooks))
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def make_plan(
    desired: DesiredState, live: LiveFleet, memory: Memory, *, now: datetime | None = None, prune: bool = False
) -> Plan:
    """Compute every change needed to make the gateway match the manifests."""
    when = now or datetime.now(UTC)
    changes: list[Change] = []
    violations: list[Violation] = []
    errors: list[str] = []
    fleets: list[FleetInfo] = []
    for fleet in desired.fleets:
        rate = live.rates[fleet.currency]
        fleets.append(FleetInfo(fleet.name, fleet.currency, rate, len(fleet.agents)))
        fleet_changes: list[Change] = []
        for spec in fleet.agents:
            agent = live.agents.get(spec.agent_id)
            if agent is None or agent.error is not None:
                errors.append(f"{spec.agent_id}: could not observe: {agent.error if agent else 'missing'}")
                continue
            fleet_changes.extend(_plan_agent(fleet, spec, agent, rate, memory, when.timestamp()))
        top_ups = {
            c.agent_id: from_credits(Decimal(c.args["amount"]), rate)
            for c in fleet_changes
            if c.kind is ChangeKind.TOP_UP
        }
        violations += check_funding_ceiling(fleet.name, fleet.currency, top_ups, fleet.funding_ceiling)
        new_caps = [
            (c.agent_id, from_credits(Decimal(c.args["daily_cap"]), rate))
            for c in fleet_changes
            if c.kind is ChangeKind.SET_BUDGET and "daily_cap" in c.args
        ]
        violations += check_caps_within_total(fleet.name, fleet.currency, new_caps, fleet.daily_total)
        changes.extend(fleet_changes)
    hooks = _plan_webhooks(desired, live, memory, prune=prune)
    changes.extend(hooks.changes)
    declared = {a.agent_id for a in desired.agents()}
    unmanaged = sorted(live.key_agents - declared - live.admin_agents)
    held = tuple(
        HeldAgent(h.agent_id, h.reason, datetime.fromtimestamp(h.held_at, UTC).isoformat(timespec="seconds"))
        for h in sorted(memory.holds.values(), key=lambda h: h.agent_id)
        if h.agent_id in declared
    )
    warnings = [*hooks.warnings, *_key_warnings(desired, live, memory)]
    rebalanced = tuple(
        adj.explanation
        for spec in desired.agents()
        if spec.agent_id not in memory.holds and (adj := live_adjustment(spec, memory, when.timestamp())) is not None
    )
    return Plan(
        target=live.target,
        created_at=when.isoformat(timespec="seconds"),
        basis=observation_basis(desired, live),
        fleets=tuple(fleets),
        changes=tuple(changes),
        unmanaged_agents=tuple(unmanaged),
        violations=tuple(violations),
        errors=tuple(errors),
        warnings=tuple(warnings),
        held=held,
        unmanaged_webhooks=tuple(hooks.unmanaged),
        rebalanced=rebalanced,
        exposure=review(memory.approved_exposure, exposure_of(desired)),
    )


def _key_warnings(desired: DesiredState, live: LiveFleet, memory: Memory) -> list[str]:
    """Say plainly what the gateway cannot do, and where finops cannot manage a key."""
    out: list[str] = []
    scoped = sorted({s.keys.scopes for s in desired.agents() if s.keys.manage})
    for scopes in scoped:
        out.append(
            f"declared key scopes [{', '.join(scopes)}] are recorded but cannot be enforced: GreenHelix 1.4.8 "
            "has no HTTP endpoint that sets scopes, and rotation resets keys to read,write"
        )
    live_prefixes = {(k.agent_id, k.key_hash_prefix) for k in live.keys if not k.revoked}
    for spec in desired.agents():
        if not spec.keys.manage:
            continue
        agent = live.agents.get(spec.agent_id)
        if agent is None or not agent.exists:
            continue
        prefix = memory.key_prefixes.get(spec.agent_id)
        if prefix is None:
            out.append(
                f"{spec.agent_id}: finops holds no key for this agent, so it cannot rotate it; "
                f"run `finops keys import {spec.agent_id}` with the agent's current key on stdin"
            )
        elif live.keys and (spec.agent_id, prefix) not in live_prefixes:
            out.append(
                f"{spec.agent_id}: the key finops holds (sha3:{prefix}) is no longer live on the gateway; "
                "import the agent's current key or rotate from a held one"
            )
    return out


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
                "diff": [{"field": d.field, "before": d.before, "after": d.after} for d in c.diff],
                "args": dict(c.args),
            }
            for c in plan.changes
        ],
        "unmanaged_agents": list(plan.unmanaged_agents),
        "warnings": list(plan.warnings),
        "violations": [{"rule": v.rule, "fleet": v.fleet, "message": v.message} for v in plan.violations],
        "errors": list(plan.errors),
        "held": [{"agent_id": h.agent_id, "reason": h.reason, "since": h.since} for h in plan.held],
        "unmanaged_webhooks": list(plan.unmanaged_webhooks),
        "rebalanced": list(plan.rebalanced),
        "exposure": plan.exposure.to_dict() if plan.exposure is not None else None,
        "summary": plan.summary(),
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
                args={str(k): str(v) for k, v in c["args"].items()},
            )
            for c in data["changes"]
        ),
        unmanaged_agents=tuple(data.get("unmanaged_agents", ())),
        warnings=tuple(data.get("warnings", ())),
        violations=tuple(Violation(v["rule"], v["fleet"], v["message"]) for v in data.get("violations", ())),
        errors=tuple(data.get("errors", ())),
        held=tuple(HeldAgent(h["agent_id"], h["reason"], h["since"]) for h in data.get("held", ())),
        unmanaged_webhooks=tuple(data.get("unmanaged_webhooks", ())),
        rebalanced=tuple(data.get("rebalanced", ())),
        exposure=ExposureReview.from_dict(data["exposure"]) if data.get("exposure") else None,
    )


def changes_equal(a: Sequence[Change], b: Sequence[Change]) -> bool:
    """Same writes with the same arguments (reasons and display text may differ)."""
    return [(c.kind, c.agent_id, dict(c.args)) for c in a] == [(c.kind, c.agent_id, dict(c.args)) for c in b]
