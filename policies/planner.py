"""The plan: an immutable value computed from (desired, live, memory), nothing else.

``make_plan`` never touches the network or prints; renderers turn a ``Plan`` into text and
``apply`` consumes one. A saved plan file is this value serialised by ``plan_to_dict``.
All amounts in ``Change.args`` are gateway credits; the fleet currency is for display.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from deepdiff import DeepDiff

from policies.currency import SIGNUP_BONUS_CREDITS, from_credits, to_credits
from policies.escalation import Escalation, paused_windows
from policies.exposure import Exposure, exposure_of, review
from policies.funding import deposit_idempotency_key, funding_epoch, wanted_top_up
from policies.funding_window import (
    DeferReason,
    FundingEvent,
    FundingKind,
    FundingRequest,
    allocate,
    bonus_ref,
    in_window,
    ledger_funding,
    outflow_allowance,
    unexplained_outflow,
    used_in_window,
)
from policies.guardrails import (
    Violation,
    check_caps_within_total,
    check_deposit_limit,
    check_funding_ceiling,
    check_gateway_range,
)
from policies.keyprint import secret_fingerprint
from policies.live import NEW_WALLET_ANCHOR, LiveAgent, LiveFleet, Webhook
from policies.money import CENT, format_money
from policies.plan_types import (
    INTENT_BLOCKS,
    WEBHOOK_MARKER_PREFIX,
    Blocked,
    Change,
    ChangeKind,
    CreateWebhookArgs,
    Deferred,
    DeleteWebhookArgs,
    EscalatedAgent,
    FieldDiff,
    FleetInfo,
    FundingWindow,
    HeldAgent,
    OutflowFlag,
    Plan,
    PlanError,
    PlanErrorKind,
    RegisterArgs,
    SetBudgetArgs,
    TopUpArgs,
    Unverified,
    webhook_marker,
)
from policies.records import Adjustment, BudgetWrite, Hold, Intent, ManagedWebhook
from policies.settle import SETTLE_SECONDS, settles_at
from policies.spec import AgentSpec, DesiredState, FleetSpec, GatewayWebhookSpec, SecretRef
from policies.units import Units


@dataclass(frozen=True)
class Memory:
    """What finops remembers that the gateway cannot show (see ``controller.state``)."""

    budget_writes: Mapping[str, BudgetWrite] = field(default_factory=dict)
    holds: Mapping[str, Hold] = field(default_factory=dict)
    managed_webhooks: Mapping[str, ManagedWebhook] = field(default_factory=dict)
    secret_fingerprints: Mapping[SecretRef, str | None] = field(default_factory=dict)
    """Fingerprints of the referenced signing secrets, resolved by the caller (``None``: not
    available yet, e.g. a file finops will generate on apply)."""
    secret_problems: Mapping[SecretRef, str] = field(default_factory=dict)
    """Referenced secrets that apply could not use (a directory, unreadable, unset, missing
    without ``generate``): the webhooks that need them are reported, never half-applied."""
    key_prefixes: Mapping[str, str] = field(default_factory=dict)
    """Fingerprints of the agent keys finops holds."""
    adjustments: Mapping[str, Adjustment] = field(default_factory=dict)
    """The rebalancer's current daily-cap adjustments (desired cap = baseline + adjustment)."""
    unresolved: tuple[Intent, ...] = ()
    """Intents whose outcome is still unknown (``PENDING``): each withholds its kind of change."""
    last_deposits: Mapping[str, int] = field(default_factory=dict)
    """Ledger id of finops' newest deposit known to have landed, per agent."""
    settle_seconds: float = SETTLE_SECONDS
    funding_events: tuple[FundingEvent, ...] = ()
    """Credits finops put in over the last 24 h (``controller.state`` funding events)."""
    approved_exposure: Exposure | None = None
    """The exposure a person last approved (``None``: nothing approved yet)."""
    escalations: tuple[Escalation, ...] = ()
    """The escalation ladder's open escalations (``pending``/``active``): a pause keeps its
    window's cap at the pause cap, and the agent unfunded, until it is released."""


def unresolved_intent(memory: Memory, agent_id: str, kind: str) -> Intent | None:
    found = [i for i in memory.unresolved if i.agent_id == agent_id and i.kind == kind]
    return found[-1] if found else None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def blocked_changes(desired: DesiredState, memory: Memory) -> tuple[Blocked, ...]:
    declared = {a.agent_id for a in desired.agents()}
    out = []
    for intent in memory.unresolved:
        kind = INTENT_BLOCKS.get(intent.kind)
        if kind is None or intent.agent_id not in declared:
            continue
        sent = intent.sent_at if intent.sent_at is not None else intent.created_at
        out.append(
            Blocked(
                agent_id=intent.agent_id,
                kind=kind,
                intent_key=intent.intent_key,
                sent_at=_iso(sent),
                settles_at=_iso(settles_at(sent, memory.settle_seconds)),
                detail=intent.detail,
            )
        )
    return tuple(sorted(out, key=lambda b: (b.agent_id, b.kind.value)))


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
    """Register, then caps, then funding: money never goes into a wallet before its caps
    are planned, and a step whose earlier attempt has an unknown outcome is withheld
    (``blocked_changes`` reports it)."""
    changes: list[Change] = []
    hold = memory.holds.get(spec.agent_id)
    if hold is not None and not hold.auto:
        return _plan_held(fleet, spec, live, hold, memory)
    pauses = paused_windows(e for e in memory.escalations if e.agent_id == spec.agent_id)
    if pauses and live.exists:
        return _plan_paused(fleet, spec, live, rate, memory, now, pauses)
    balance = live.balance
    if not live.exists:
        if unresolved_intent(memory, spec.agent_id, "register") is not None:
            return []  # a registration may still land: registering again could lose its key
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
                args=RegisterArgs(SIGNUP_BONUS_CREDITS.quantize(CENT)),
            )
        )
        balance = SIGNUP_BONUS_CREDITS
    assert balance is not None
    adj = live_adjustment(spec, memory, now)
    daily = spec.daily_cap + (adj.amount if adj else 0)
    want = {
        "daily_cap": _money(to_credits(daily, rate)),
        "monthly_cap": _money(to_credits(spec.monthly_cap, rate)),
        "alert_threshold": str(desired_alert_threshold(spec)),
    }
    budget = _plan_budget(fleet, spec, live, want, memory, held=False, adjustment=adj, hold=hold)
    if hold is not None:
        # finops' automatic hold (a new agent whose caps could not be set): write the
        # declared caps, even if they look in place, and lift the hold when that write
        # succeeds; no funding until then.
        return changes + (budget or [_confirm_caps(fleet, spec, want, hold)])
    changes += budget
    if unresolved_intent(memory, spec.agent_id, "deposit") is not None:
        return changes
    floor = to_credits(spec.funding_floor, rate)
    target = to_credits(spec.funding_target, rate)
    amount = wanted_top_up(spec, balance, rate)
    if amount > 0:
        seen = live.ledger_anchor or NEW_WALLET_ANCHOR
        epoch = funding_epoch([int(seen) if seen.isdigit() else None, memory.last_deposits.get(spec.agent_id)])
        changes.append(
            Change(
                kind=ChangeKind.TOP_UP,
                fleet=fleet.name,
                agent_id=spec.agent_id,
                reason=top_up_reason(Units(fleet.currency, rate), balance, floor, target, amount),
                diff=(FieldDiff("balance", format_money(balance), format_money(balance + amount)),),
                args=TopUpArgs(
                    amount=amount.quantize(CENT),
                    expected_balance=balance.quantize(CENT),
                    floor=floor.quantize(CENT),
                    target=target.quantize(CENT),
                    idempotency_key=deposit_idempotency_key(fleet.name, spec.agent_id, epoch),
                ),
            )
        )
    return changes


def top_up_reason(units: Units, balance: Decimal, floor: Decimal, target: Decimal, amount: Decimal) -> str:
    """``balance 1.00 < floor 40.00 USD: top up to target 75.00 USD (+74.00 USD = 7400.00
    credits)``: the fleet currency first, the credits deposited alongside."""
    if units.is_credits:
        return (
            f"balance {format_money(balance)} < floor {format_money(floor)} credits: "
            f"top up to target {format_money(target)} (+{format_money(amount)} credits)"
        )
    c, cur = units.currency_text, units.currency
    return (
        f"balance {c(balance)} < floor {c(floor)} {cur}: top up to target {c(target)} {cur} "
        f"(+{c(amount)} {cur} = {format_money(amount)} credits)"
    )


def _confirm_caps(fleet: FleetSpec, spec: AgentSpec, want: Mapping[str, str | None], hold: Hold) -> Change:
    return Change(
        kind=ChangeKind.SET_BUDGET,
        fleet=fleet.name,
        agent_id=spec.agent_id,
        reason=f"held by finops ({hold.reason}): confirm the declared caps, then lift the hold",
        diff=(),
        args=SetBudgetArgs.from_wire({k: v for k, v in want.items() if v is not None}),
    )


def _refused_before_planning(
    fleet: FleetSpec, spec: AgentSpec, live: LiveFleet, rate: Decimal, memory: Memory, now: float
) -> list[Violation]:
    """Checks that only the live gateway can answer, made before any change is planned so
    nothing fails half-way at apply: the agent is not an admin (finops' own identity), and
    every amount, converted at the gateway's rate, fits what the gateway can store."""
    if spec.agent_id in live.admin_agents:
        return [
            Violation(
                rule="admin-agent",
                fleet=fleet.name,
                message=(
                    f"{spec.agent_id} holds an admin-scoped key on the gateway (finops' own identity): "
                    "finops never sets caps on or funds an admin's wallet; remove it from the manifests"
                ),
            )
        ]
    adj = live_adjustment(spec, memory, now)
    return check_gateway_range(
        fleet.name,
        spec.agent_id,
        {
            "funding floor": to_credits(spec.funding_floor, rate),
            "funding target": to_credits(spec.funding_target, rate),
            "daily cap": to_credits(spec.daily_cap + (adj.amount if adj else 0), rate),
            "monthly cap": to_credits(spec.monthly_cap, rate),
        },
    )


def _plan_held(fleet: FleetSpec, spec: AgentSpec, live: LiveAgent, hold: Hold, memory: Memory) -> list[Change]:
    """A held agent is kept at caps of 0 (the one lever that stops REST spend on 1.4.8) and
    is never funded; only ``finops unfreeze`` lifts the hold."""
    if not live.exists:
        return []
    want = {"daily_cap": "0.00", "monthly_cap": "0.00", "alert_threshold": str(desired_alert_threshold(spec))}
    return _plan_budget(fleet, spec, live, want, memory, held=True, hold=hold)


def _plan_paused(
    fleet: FleetSpec,
    spec: AgentSpec,
    live: LiveAgent,
    rate: Decimal,
    memory: Memory,
    now: float,
    pauses: Mapping[str, Decimal],
) -> list[Change]:
    """A paused agent (the escalation ladder): each paused window's cap is kept at its pause
    cap (never raised: a live cap already lower stays), the other window at the declared
    value, and the agent is not funded. Only the ladder (auto release) or ``finops
    unfreeze`` ends a pause; this pass never restores a paused cap."""
    adj = live_adjustment(spec, memory, now)
    daily = spec.daily_cap + (adj.amount if adj else 0)
    want: dict[str, str | None] = {
        "daily_cap": _money(to_credits(daily, rate)),
        "monthly_cap": _money(to_credits(spec.monthly_cap, rate)),
        "alert_threshold": str(desired_alert_threshold(spec)),
    }
    for window, cap in sorted(pauses.items()):
        have = None if live.budget is None else live.budget.daily_cap if window == "daily" else live.budget.monthly_cap
        want[f"{window}_cap"] = _money(cap if have is None else min(have, cap))
    paused = ", ".join(f"{w} cap held at {format_money(c)} credits" for w, c in sorted(pauses.items()))
    return _plan_budget(fleet, spec, live, want, memory, held=False, paused=paused)


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
    paused: str | None = None,
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
    if remembered is None and all(d.field in UNOBSERVABLE_BUDGET_FIELDS for d in diff):
        # Only what the gateway cannot report, and no record of writing it (a fresh state
        # directory): unverified, not a change (``unverified_fields``); the caps' next write
        # carries it.
        diff = ()
    if diff:
        unobservable_only = all(d.field == "alert_threshold" for d in diff)
        reason = (
            f"paused by the escalation ladder ({paused}): kept until released; no funding meanwhile"
            if paused is not None and not unobservable_only
            else f"held by finops ({hold.reason}): declared caps first; funding resumes once they are in place"
            if hold is not None and hold.auto
            else f"held by operator ({hold.reason}): caps stay at 0 until `finops unfreeze`"
            if held and hold is not None and not unobservable_only
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
                args=SetBudgetArgs.from_wire({k: v for k, v in want.items() if v is not None}),
            )
        )
    return changes


UNOBSERVABLE_BUDGET_FIELDS = frozenset({"alert_threshold"})
"""Budget fields the gateway accepts but never reports back (API.md)."""


def unverified_fields(
    fleet: FleetSpec, spec: AgentSpec, live: LiveAgent, memory: Memory, planned: Sequence[Change]
) -> list[Unverified]:
    """What finops cannot verify for an existing agent: a field the gateway cannot report,
    with no record of finops writing it, and no budget write planned that would carry it."""
    if not live.exists or spec.agent_id in memory.budget_writes:
        return []
    if any(c.kind is ChangeKind.SET_BUDGET for c in planned):
        return []
    return [Unverified(fleet.name, spec.agent_id, "alert_threshold", str(desired_alert_threshold(spec)))]


def _webhook_fp(hook: Webhook) -> str:
    return secret_fingerprint(hook.secret)


def _describe(hook: Webhook) -> str:
    return f"{hook.id} {hook.url} [{', '.join(hook.event_types)}]"


@dataclass(frozen=True)
class _WebhookPlan:
    changes: list[Change]
    unmanaged: list[str]
    warnings: list[str]
    errors: list[PlanError] = field(default_factory=list)


def marked_owner(hook: Webhook, fleet_of: Mapping[str, str]) -> str | None:
    """The declared agent a live webhook on the admin key is provably finops' own for, by
    the gateway object alone: its filter is exactly that one agent and it carries the
    marker of that agent's fleet. Only the admin key's holder can create (or list) such a
    webhook, so it is finops' even when finops' state lost track of it (a create whose
    answer was lost and that landed later, a lost state file). ``fleet_of``: declared
    agent id → fleet name."""
    if hook.filter_agent_ids is None or len(hook.filter_agent_ids) != 1:
        return None
    agent = hook.filter_agent_ids[0]
    fleet = fleet_of.get(agent)
    return agent if fleet is not None and webhook_marker(fleet) in hook.event_types else None


def webhook_owners(
    hooks: Sequence[Webhook], managed: Mapping[str, ManagedWebhook], fleet_of: Mapping[str, str]
) -> dict[str, ManagedWebhook]:
    """Every live webhook finops owns, as the record finops keeps (or would keep) of it:
    recorded in state *and* carrying its fleet's marker, or marked for a declared agent."""
    out: dict[str, ManagedWebhook] = {}
    for hook in hooks:
        record = managed.get(hook.id)
        if record is not None and webhook_marker(record.fleet) in hook.event_types:
            out[hook.id] = record
            continue
        agent = marked_owner(hook, fleet_of)
        if agent is not None:
            out[hook.id] = ManagedWebhook(hook.id, agent, fleet_of[agent], hook.url)
    return out


def live_managed_secrets(
    desired: DesiredState, hooks: Sequence[Webhook], managed: Mapping[str, ManagedWebhook]
) -> dict[SecretRef, frozenset[str]]:
    """Per finops-generated (managed) webhook secret the manifests use, the distinct secrets
    its finops-owned live webhooks carry (``webhook_owners``, filtered to exactly their
    agent). The gateway lists webhook secrets in clear to the admin key, so a managed secret
    whose file is lost (a fresh state directory) is re-derivable from them when they agree."""
    fleet_of = {spec.agent_id: fleet.name for fleet in desired.fleets for spec in fleet.agents}
    ref_of = {
        (spec.agent_id, hook.url): hook.secret
        for spec in desired.agents()
        for hook in spec.gateway_webhooks
        if hook.secret.managed is not None
    }
    owners = webhook_owners(hooks, managed, fleet_of)
    out: dict[SecretRef, set[str]] = {ref: set() for ref in ref_of.values()}
    for hook in hooks:
        record = owners.get(hook.id)
        if record is None or hook.filter_agent_ids != (record.agent_id,) or not hook.secret:
            continue
        ref = ref_of.get((record.agent_id, hook.url))
        if ref is None:
            # An owned hook at an older URL still proves the fleet's secret.
            refs = {r for (agent, _), r in ref_of.items() if agent == record.agent_id}
            ref = next(iter(refs)) if len(refs) == 1 else None
        if ref is not None:
            out[ref].add(hook.secret)
    return {ref: frozenset(values) for ref, values in out.items()}


def _effective_fingerprints(
    desired: DesiredState, live_hooks: Sequence[Webhook], memory: Memory, out: _WebhookPlan
) -> dict[SecretRef, str | None]:
    """``memory.secret_fingerprints``, with each managed secret finops has no file for (a
    fresh state directory) taken from the live webhooks when they all carry one secret:
    apply adopts that secret (``Applier.prepare``) instead of generating a new one."""
    fps = dict(memory.secret_fingerprints)
    missing = {r for r, fp in fps.items() if fp is None and r.managed is not None and r not in memory.secret_problems}
    if not missing:
        return fps
    for ref, values in live_managed_secrets(desired, live_hooks, memory.managed_webhooks).items():
        if ref not in missing or not values:
            continue
        if len(values) == 1:
            fps[ref] = secret_fingerprint(next(iter(values)))
        else:
            out.warnings.append(
                f"{ref.describe()} is not in finops' state and its finops-owned webhooks on the gateway carry "
                f"{len(values)} different secrets: not guessing which; a new secret is generated on apply and "
                "every one of those webhooks is replaced"
            )
    return fps


def _plan_webhooks(desired: DesiredState, live: LiveFleet, memory: Memory, *, prune: bool) -> _WebhookPlan:
    """Gateway webhooks: create missing, replace what differs (the gateway has no update),
    remove duplicates, prune only what finops owns. Ownership: finops' state *and* the
    marker event type on the live webhook, or the marker of a declared agent's fleet with
    a filter of exactly that agent (``marked_owner``); anything else is listed as unmanaged
    and left alone."""
    out = _WebhookPlan([], [], [])
    if live.webhooks is None:
        return out
    fleet_of = {spec.agent_id: fleet.name for fleet in desired.fleets for spec in fleet.agents}
    owners = webhook_owners(live.webhooks, memory.managed_webhooks, fleet_of)
    owned = {w.id: w for w in live.webhooks if w.id in owners}
    memory = replace(memory, secret_fingerprints=_effective_fingerprints(desired, live.webhooks, memory, out))
    for hook_id in sorted(set(owners) - set(memory.managed_webhooks)):
        out.warnings.append(
            f"webhook {_describe(owned[hook_id])} carries finops' marker for {owners[hook_id].agent_id} but is not "
            "in this state database (a fresh state, or a create whose answer was lost): adopted as finops' own"
        )
    claimed: set[str] = set()
    for fleet in desired.fleets:
        for spec in fleet.agents:
            agent = live.agents.get(spec.agent_id)
            mine = {h for h, rec in owners.items() if rec.agent_id == spec.agent_id}
            if agent is None or agent.error is not None:
                # Unobserved: its plan is unknown, so nothing changes for it (and nothing of
                # its is pruned either).
                claimed |= mine | {h for h, rec in memory.managed_webhooks.items() if rec.agent_id == spec.agent_id}
                continue
            if spec.gateway_webhooks and unresolved_intent(memory, spec.agent_id, "create_webhook") is not None:
                claimed |= mine  # a create may still land: no new create (nor a delete) until resolved
                continue
            for hook in spec.gateway_webhooks:
                claimed |= _plan_agent_webhook(fleet, spec, hook, owned, owners, memory, out)
    for hook_id, stale in sorted(owned.items()):
        if hook_id in claimed:
            continue
        record = owners[hook_id]
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
    owners: Mapping[str, ManagedWebhook],
    memory: Memory,
    out: _WebhookPlan,
) -> set[str]:
    problem = memory.secret_problems.get(hook.secret)
    if problem is not None:
        # Checked here, not at apply: the create would fail after other writes were made.
        out.errors.append(PlanError(spec.agent_id, PlanErrorKind.WEBHOOK_NOT_PLANNED, problem))
        return {h for h, rec in memory.managed_webhooks.items() if rec.agent_id == spec.agent_id}
    events = tuple(sorted({*hook.events, webhook_marker(fleet.name)}))
    want_fp = memory.secret_fingerprints.get(hook.secret)
    mine = [
        w
        for w in sorted(owned.values(), key=lambda w: (w.id not in memory.managed_webhooks, w.id))
        if owners[w.id].agent_id == spec.agent_id and w.filter_agent_ids == (spec.agent_id,)
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
                args=CreateWebhookArgs(hook.url, events, hook.secret),
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
        args=DeleteWebhookArgs(hook.id, hook.url),
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


def make_plan(desired: DesiredState, live: LiveFleet, memory: Memory, *, now: datetime, prune: bool = False) -> Plan:
    """Compute every change needed to make the gateway match the manifests."""
    when = now
    changes: list[Change] = []
    violations: list[Violation] = []
    errors: list[PlanError] = []
    fleets: list[FleetInfo] = []
    windows: list[FundingWindow] = []
    deferred: list[Deferred] = []
    outflow: list[OutflowFlag] = []
    unverified: list[Unverified] = []
    for fleet in desired.fleets:
        rate = live.rates[fleet.currency]
        fleets.append(FleetInfo(fleet.name, fleet.currency, rate, len(fleet.agents)))
        by_agent: dict[str, list[Change]] = {}
        for spec in fleet.agents:
            agent = live.agents.get(spec.agent_id)
            if agent is None or agent.error is not None:
                why = (agent.error if agent else None) or "missing"
                errors.append(PlanError(spec.agent_id, PlanErrorKind.UNOBSERVED, why))
                continue
            refused = _refused_before_planning(fleet, spec, live, rate, memory, when.timestamp())
            if refused:
                violations += refused
                continue
            by_agent[spec.agent_id] = _plan_agent(fleet, spec, agent, rate, memory, when.timestamp())
            unverified += unverified_fields(fleet, spec, agent, memory, by_agent[spec.agent_id])
        bounded = _bound_funding(fleet, rate, by_agent, live, memory, when.timestamp())
        windows.append(bounded.window)
        deferred += bounded.deferred
        outflow += bounded.outflow
        fleet_changes = [c for cs in bounded.changes.values() for c in cs]
        funded: dict[str, Decimal] = {}
        for c in fleet_changes:
            if c.kind in (ChangeKind.TOP_UP, ChangeKind.REGISTER):
                credits = c.credits_in
                funded[c.agent_id] = funded.get(c.agent_id, Decimal("0.00")) + credits
        per_agent = {a: from_credits(credits, rate) for a, credits in funded.items()}
        violations += check_funding_ceiling(fleet.name, fleet.currency, per_agent, fleet.funding_ceiling)
        violations += check_deposit_limit(
            fleet.name, {c.agent_id: c.args.amount for c in fleet_changes if isinstance(c.args, TopUpArgs)}
        )
        new_caps = [
            (c.agent_id, from_credits(c.args.daily_cap, rate))
            for c in fleet_changes
            if isinstance(c.args, SetBudgetArgs) and c.args.daily_cap is not None
        ]
        violations += check_caps_within_total(fleet.name, fleet.currency, new_caps, fleet.daily_total)
        changes.extend(fleet_changes)
    hooks = _plan_webhooks(desired, live, memory, prune=prune)
    waiting = {d.agent_id for d in deferred if d.kind is ChangeKind.REGISTER}
    changes.extend(c for c in hooks.changes if not (c.kind is ChangeKind.CREATE_WEBHOOK and c.agent_id in waiting))
    declared = {a.agent_id for a in desired.agents()}
    unmanaged = sorted(live.key_agents - declared - live.admin_agents)
    held = tuple(
        HeldAgent(h.agent_id, h.reason, datetime.fromtimestamp(h.held_at, UTC).isoformat(timespec="seconds"), h.auto)
        for h in sorted(memory.holds.values(), key=lambda h: h.agent_id)
        if h.agent_id in declared
    )
    escalated = tuple(
        EscalatedAgent(
            agent_id=e.agent_id,
            action=e.action,
            window=e.window,
            threshold=e.threshold,
            reason=e.reason,
            since=datetime.fromtimestamp(e.executed_at or e.decided_at, UTC).isoformat(timespec="seconds"),
            release=e.release,
            how_released=e.release_hint(),
            cap=e.cap,
        )
        for e in sorted(memory.escalations, key=lambda e: (e.agent_id, e.decided_at))
        if e.agent_id in declared and e.open
    )
    warnings = [*hooks.warnings, *_key_warnings(desired, live, memory)]
    errors += hooks.errors
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
        escalated=escalated,
        unmanaged_webhooks=tuple(hooks.unmanaged),
        rebalanced=rebalanced,
        blocked=blocked_changes(desired, memory),
        funding=tuple(windows),
        deferred=tuple(deferred),
        outflow=tuple(outflow),
        exposure=review(memory.approved_exposure, exposure_of(desired)),
        unverified=tuple(unverified),
    )


@dataclass(frozen=True)
class _Bounded:
    changes: dict[str, list[Change]]
    window: FundingWindow
    deferred: list[Deferred]
    outflow: list[OutflowFlag]


def _bound_funding(
    fleet: FleetSpec,
    rate: Decimal,
    by_agent: Mapping[str, list[Change]],
    live: LiveFleet,
    memory: Memory,
    now: float,
) -> _Bounded:
    """Bound the fleet's funding over time: first each agent's refunding of unexplained
    outflow, then the fleet's rolling 24 h limit. What does not fit is deferred (typed), and
    an agent whose registration waits gets no other change yet (it has no wallet)."""
    specs = {s.agent_id: s for s in fleet.agents}
    changes = {a: list(cs) for a, cs in by_agent.items()}
    deferred: list[Deferred] = []
    flags: list[OutflowFlag] = []
    events = [e for e in memory.funding_events if e.fleet == fleet.name]
    for agent_id in changes:
        agent = live.agents[agent_id]
        if agent.ledger is None:
            continue
        events += ledger_funding(agent_id, fleet.name, agent.ledger)
        unexplained = unexplained_outflow(agent.ledger, now, agent.charges)
        if unexplained <= 0:
            continue
        limit = to_credits(specs[agent_id].max_unexplained_per_day, rate)
        flag = OutflowFlag(fleet.name, agent_id, unexplained, limit, agent.ledger_complete)
        flags.append(flag)
        allowance = outflow_allowance(limit, unexplained)
        changes[agent_id] = [
            _clip_top_up(fleet, rate, c, allowance, DeferReason.UNEXPLAINED_OUTFLOW, deferred, _outflow_why(flag, rate))
            if c.kind is ChangeKind.TOP_UP
            else c
            for c in changes[agent_id]
        ]
        changes[agent_id] = [c for c in changes[agent_id] if not _is_empty_top_up(c)]

    limit = to_credits(fleet.funding_daily_limit, rate)
    used = used_in_window(events, now)
    # A step already counted (sent before, outcome unknown, e.g. after a crash) adds nothing:
    # the gateway moves money once per deposit key, and registers an agent once.
    counted = {e.ref for e in events if in_window(e.at, now)}
    requests = [
        (c, _funding_request(c, counted))
        for cs in changes.values()
        for c in cs
        if c.kind in (ChangeKind.REGISTER, ChangeKind.TOP_UP)
    ]
    grants = allocate(limit, used, [r for _, r in requests])
    why = (
        f"fleet {fleet.name}'s rolling 24 h funding limit {format_money(fleet.funding_daily_limit)} {fleet.currency} "
        f"({format_money(used)} of {format_money(limit)} credits used before this plan)"
    )
    planned = Decimal("0.00")
    for (change, req), grant in zip(requests, grants, strict=True):
        planned += grant
        if grant == req.credits:
            continue
        if change.kind is ChangeKind.REGISTER:
            deferred.append(
                Deferred(
                    fleet.name,
                    change.agent_id,
                    ChangeKind.REGISTER,
                    req.credits,
                    DeferReason.FLEET_DAILY_LIMIT,
                    f"registration waits (its {format_money(req.credits)}-credit signup bonus does not fit {why})",
                )
            )
            changes[change.agent_id] = []  # no wallet yet: nothing else for it either
            continue
        current = changes[change.agent_id]
        if change in current:
            clipped = _clip_top_up(fleet, rate, change, grant, DeferReason.FLEET_DAILY_LIMIT, deferred, why)
            current[current.index(change)] = clipped
            changes[change.agent_id] = [c for c in current if not _is_empty_top_up(c)]
    window = FundingWindow(fleet.name, fleet.currency, rate, limit, used, planned)
    return _Bounded(changes, window, deferred, flags)


def _funding_request(change: Change, counted: set[str]) -> FundingRequest:
    """A registration's signup bonus or a top-up, as a request on the funding window."""
    agent = change.agent_id
    if isinstance(change.args, RegisterArgs):
        bonus = _new(SIGNUP_BONUS_CREDITS, bonus_ref(agent), counted)
        return FundingRequest(agent, FundingKind.SIGNUP_BONUS, bonus, False)
    top_up = change.args_as(TopUpArgs)
    return FundingRequest(agent, FundingKind.DEPOSIT, _new(top_up.amount, top_up.idempotency_key, counted), True)


def _new(credits: Decimal | str, ref: str, counted: set[str]) -> Decimal:
    """What a funding step adds to the window: nothing if its reference is already in it."""
    return Decimal("0.00") if ref in counted else Decimal(credits)


def _outflow_why(flag: OutflowFlag, rate: Decimal) -> str:
    return (
        f"{format_money(flag.unexplained)} credits left the wallet in the last 24 h other than as metered spend "
        f"(withdrawals, payments); maxUnexplainedPerDay is {format_money(flag.limit)} credits "
        f"({format_money(from_credits(flag.limit, rate))} in the fleet currency)"
    )


_EMPTY = Decimal("0.00")


def _is_empty_top_up(change: Change) -> bool:
    return isinstance(change.args, TopUpArgs) and not change.args.amount


def _clip_top_up(
    fleet: FleetSpec,
    rate: Decimal,
    change: Change,
    most: Decimal,
    reason: DeferReason,
    deferred: list[Deferred],
    why: str,
) -> Change:
    """The top-up cut to ``most`` credits (``0.00``: dropped by the caller), the rest deferred."""
    args = change.args_as(TopUpArgs)
    amount = args.amount
    if amount <= most:
        return change
    units = Units(fleet.currency, rate)
    granted = max(Decimal("0.00"), most)
    deferred.append(
        Deferred(
            fleet.name,
            change.agent_id,
            ChangeKind.TOP_UP,
            amount - granted,
            reason,
            (
                f"top-up of {units.amount(amount)} "
                + (f"cut to {units.amount(granted)}" if granted else "not planned")
                + f": {why}"
            ),
        )
    )
    if not granted:
        return replace(change, args=replace(args, amount=_EMPTY))
    balance = args.expected_balance
    # The key stays the funding epoch's (``policies.funding``): a cut top-up is the same
    # decision, so it and the full one can never both land.
    return replace(
        change,
        reason=f"{change.reason}; cut to {units.amount(granted)} ({reason.value})",
        diff=(FieldDiff("balance", format_money(balance), format_money(balance + granted)),),
        args=replace(args, amount=granted.quantize(CENT)),
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
