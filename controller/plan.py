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

from controller.observe import NEW_WALLET_ANCHOR, LiveAgent, LiveFleet
from controller.state import BudgetWrite
from policies.currency import SIGNUP_BONUS_CREDITS, from_credits, to_credits
from policies.funding import deposit_idempotency_key, top_up_amount
from policies.guardrails import Violation, check_caps_within_total, check_funding_ceiling
from policies.money import format_money
from policies.spec import AgentSpec, DesiredState, FleetSpec

PLAN_FORMAT_VERSION = 1


class ChangeKind(StrEnum):
    REGISTER = "register"
    TOP_UP = "top_up"
    SET_BUDGET = "set_budget"


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
            "top_up_credits": format_money(top_up),
            "agents_changed": len({c.agent_id for c in self.changes}),
            "unmanaged_agents": len(self.unmanaged_agents),
            "violations": len(self.violations),
            "errors": len(self.errors),
        }


@dataclass(frozen=True)
class Memory:
    """What finops remembers that the gateway cannot show (see ``controller.state``)."""

    budget_writes: Mapping[str, BudgetWrite] = field(default_factory=dict)


def desired_alert_threshold(spec: AgentSpec) -> Decimal:
    """The gateway's ``alert_threshold`` is a ratio; align it with the lowest declared
    threshold so its ``alert_triggered`` flag agrees with finops' own alerts."""
    return (Decimal(min(spec.alert_thresholds)) / 100).normalize() if spec.alert_thresholds else Decimal("0.8")


def field_diff(before: Mapping[str, str | None], after: Mapping[str, str | None]) -> tuple[FieldDiff, ...]:
    """Field-level before/after for flat records, via deepdiff so nested values work later."""
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


def _plan_agent(fleet: FleetSpec, spec: AgentSpec, live: LiveAgent, rate: Decimal, memory: Memory) -> list[Change]:
    changes: list[Change] = []
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
    want = {
        "daily_cap": _money(to_credits(spec.daily_cap, rate)),
        "monthly_cap": _money(to_credits(spec.monthly_cap, rate)),
        "alert_threshold": str(desired_alert_threshold(spec)),
    }
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
            "the gateway cannot report alert_threshold and finops has no record of writing it"
            if unobservable_only and remembered is None
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
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def make_plan(desired: DesiredState, live: LiveFleet, memory: Memory, *, now: datetime | None = None) -> Plan:
    """Compute every change needed to make the gateway match the manifests."""
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
            fleet_changes.extend(_plan_agent(fleet, spec, agent, rate, memory))
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
    declared = {a.agent_id for a in desired.agents()}
    unmanaged = sorted(live.key_agents - declared - live.admin_agents)
    return Plan(
        target=live.target,
        created_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        basis=observation_basis(desired, live),
        fleets=tuple(fleets),
        changes=tuple(changes),
        unmanaged_agents=tuple(unmanaged),
        violations=tuple(violations),
        errors=tuple(errors),
    )


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
    )


def changes_equal(a: Sequence[Change], b: Sequence[Change]) -> bool:
    """Same writes with the same arguments (reasons and display text may differ)."""
    return [(c.kind, c.agent_id, dict(c.args)) for c in a] == [(c.kind, c.agent_id, dict(c.args)) for c in b]
