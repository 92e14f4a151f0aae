"""Exposure: the spending authority a desired state grants, per fleet, and whether a change
of it may be applied without a person.

A manifest revision authorizes money: caps let agents spend, funding targets and limits let
finops deposit. ``exposure_of(desired)`` sums that authority per fleet in the fleet's own
currency; ``diff(before, after)`` gives the per-fleet change; ``review(approved, after)``
says which increases exceed the unattended bound and therefore wait for an operator's
``finops approve``. Pure: no clock, no I/O; the controller stores and compares the values.

Rules that close the obvious bypasses:

- the baseline is the exposure a *person* last approved (or the bootstrap revision), never
  the last revision applied unattended, so many small commits cannot creep past the bound;
- the bound that judges a revision is the one in force at the last approval, lowered by the
  revision's own if that is lower: a commit cannot raise its own bound;
- a fleet that is new since the approval, or whose currency changed, is judged by a zero
  bound (a commit cannot escape review by renaming a fleet or switching currency);
- removing a rolling funding limit that the approved revision had counts as an unbounded
  increase.

Lowering exposure never waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from policies.money import ZERO, format_money
from policies.spec import ApprovalPolicy, DesiredState, FleetSpec

INFINITY = Decimal("Infinity")

DAILY_CAPS = "daily_caps"
MONTHLY_CAPS = "monthly_caps"
FUNDING_TARGETS = "funding_targets"
PER_RUN_CEILING = "per_run_ceiling"
DAILY_FUNDING_LIMIT = "daily_funding_limit"
AGENTS = "agents"
CURRENCY = "currency"
MONEY_DIMENSIONS = (DAILY_CAPS, MONTHLY_CAPS, FUNDING_TARGETS, PER_RUN_CEILING, DAILY_FUNDING_LIMIT)
"""The money figures of an exposure, in the order they are shown."""
LABELS = {
    DAILY_CAPS: "daily caps",
    MONTHLY_CAPS: "monthly caps",
    FUNDING_TARGETS: "funding targets",
    PER_RUN_CEILING: "per-run funding ceiling",
    DAILY_FUNDING_LIMIT: "daily funding limit",
    AGENTS: "agents added",
    CURRENCY: "currency",
}


@dataclass(frozen=True)
class FleetExposure:
    """One fleet's spending authority under a desired state, in ``currency``."""

    fleet: str
    currency: str
    daily_caps: Decimal
    monthly_caps: Decimal
    funding_targets: Decimal
    per_run_ceiling: Decimal
    daily_funding_limit: Decimal | None
    """The rolling 24 h funding limit; ``None`` when the fleet declares none."""
    agents: frozenset[str]
    policy: ApprovalPolicy = field(default_factory=ApprovalPolicy)

    def amount(self, dimension: str) -> Decimal | None:
        value: Decimal | None = getattr(self, dimension)
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "currency": self.currency,
            DAILY_CAPS: format_money(self.daily_caps),
            MONTHLY_CAPS: format_money(self.monthly_caps),
            FUNDING_TARGETS: format_money(self.funding_targets),
            PER_RUN_CEILING: format_money(self.per_run_ceiling),
            DAILY_FUNDING_LIMIT: None if self.daily_funding_limit is None else format_money(self.daily_funding_limit),
            AGENTS: sorted(self.agents),
            "policy": {
                DAILY_CAPS: format_money(self.policy.daily_caps),
                MONTHLY_CAPS: format_money(self.policy.monthly_caps),
                "funding": format_money(self.policy.funding),
                AGENTS: self.policy.agents,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FleetExposure:
        policy = data.get("policy") or {}
        limit = data.get(DAILY_FUNDING_LIMIT)
        return cls(
            fleet=str(data["fleet"]),
            currency=str(data["currency"]),
            daily_caps=Decimal(str(data[DAILY_CAPS])),
            monthly_caps=Decimal(str(data[MONTHLY_CAPS])),
            funding_targets=Decimal(str(data[FUNDING_TARGETS])),
            per_run_ceiling=Decimal(str(data[PER_RUN_CEILING])),
            daily_funding_limit=None if limit is None else Decimal(str(limit)),
            agents=frozenset(str(a) for a in data[AGENTS]),
            policy=ApprovalPolicy(
                daily_caps=Decimal(str(policy.get(DAILY_CAPS, "0.00"))),
                monthly_caps=Decimal(str(policy.get(MONTHLY_CAPS, "0.00"))),
                funding=Decimal(str(policy.get("funding", "0.00"))),
                agents=int(policy.get(AGENTS, 0)),
            ),
        )


@dataclass(frozen=True)
class Exposure:
    """Every fleet's exposure under one desired state (sorted by fleet name)."""

    fleets: tuple[FleetExposure, ...] = ()

    def fleet(self, name: str) -> FleetExposure | None:
        for f in self.fleets:
            if f.fleet == name:
                return f
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"fleets": [f.to_dict() for f in self.fleets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Exposure:
        return cls(tuple(sorted((FleetExposure.from_dict(f) for f in data["fleets"]), key=lambda f: f.fleet)))


def funding_daily_limit(fleet: FleetSpec) -> Decimal | None:
    """The fleet's rolling 24 h funding limit (``spec.funding.dailyLimit`` or its default)."""
    return fleet.funding_daily_limit


def fleet_exposure(fleet: FleetSpec) -> FleetExposure:
    agents = fleet.agents
    return FleetExposure(
        fleet=fleet.name,
        currency=fleet.currency,
        daily_caps=sum((a.daily_cap for a in agents), ZERO),
        monthly_caps=sum((a.monthly_cap for a in agents), ZERO),
        funding_targets=sum((a.funding_target for a in agents), ZERO),
        per_run_ceiling=fleet.funding_ceiling,
        daily_funding_limit=funding_daily_limit(fleet),
        agents=frozenset(a.agent_id for a in agents),
        policy=fleet.approval,
    )


def exposure_of(desired: DesiredState) -> Exposure:
    """The spending authority ``desired`` grants, per fleet."""
    return Exposure(tuple(sorted((fleet_exposure(f) for f in desired.fleets), key=lambda f: f.fleet)))


@dataclass(frozen=True)
class FleetDelta:
    """How one fleet's exposure changes from ``before`` to ``after`` (either may be absent).

    Money deltas are in ``currency`` (the after side's, else the before side's). When the
    currency changed, the two sides cannot be compared: ``before`` counts as absent."""

    fleet: str
    currency: str
    before: FleetExposure | None
    after: FleetExposure | None
    deltas: Mapping[str, Decimal] = field(default_factory=dict)
    """Per money dimension: after − before (``±Infinity`` when a rolling limit is removed
    or added)."""
    agents_added: tuple[str, ...] = ()
    agents_removed: tuple[str, ...] = ()
    currency_changed: bool = False

    def delta(self, dimension: str) -> Decimal:
        return self.deltas.get(dimension, ZERO)

    @property
    def increases(self) -> bool:
        return bool(self.agents_added) or self.currency_changed or any(v > 0 for v in self.deltas.values())

    @property
    def changed(self) -> bool:
        return self.increases or bool(self.agents_removed) or any(v != 0 for v in self.deltas.values())

    def sentence(self) -> str:
        """``+45.00 USD/day, +900.00 USD/month, …`` (only what changes)."""
        parts = []
        for dim in MONEY_DIMENSIONS:
            value = self.delta(dim)
            if value:
                parts.append(f"{_signed(value)} {self.currency}{_unit(dim)}")
        if self.agents_added:
            parts.append(f"+{len(self.agents_added)} agent(s) ({_names(self.agents_added)})")
        if self.agents_removed:
            parts.append(f"-{len(self.agents_removed)} agent(s) ({_names(self.agents_removed)})")
        if self.currency_changed and self.before is not None:
            parts.append(f"currency {self.before.currency} → {self.currency}")
        return ", ".join(parts) if parts else "no change"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "currency": self.currency,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "delta": {dim: _signed(self.delta(dim)) for dim in MONEY_DIMENSIONS},
            "agents_added": list(self.agents_added),
            "agents_removed": list(self.agents_removed),
            "currency_changed": self.currency_changed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FleetDelta:
        before, after = data.get("before"), data.get("after")
        return cls(
            fleet=str(data["fleet"]),
            currency=str(data["currency"]),
            before=FleetExposure.from_dict(before) if before else None,
            after=FleetExposure.from_dict(after) if after else None,
            deltas={k: _unsigned(v) for k, v in dict(data.get("delta") or {}).items() if _unsigned(v) != 0},
            agents_added=tuple(data.get("agents_added") or ()),
            agents_removed=tuple(data.get("agents_removed") or ()),
            currency_changed=bool(data.get("currency_changed")),
        )


def _names(ids: tuple[str, ...], shown: int = 5) -> str:
    more = f", … {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _signed(value: Decimal) -> str:
    if value.is_infinite():
        return "+unlimited" if value > 0 else "-unlimited"
    return ("+" if value > 0 else "") + format_money(value)


def _unsigned(value: object) -> Decimal:
    text = str(value)
    if text.endswith("unlimited"):
        return -INFINITY if text.startswith("-") else INFINITY
    return Decimal(text)


def _unit(dimension: str) -> str:
    return {
        DAILY_CAPS: "/day in daily caps",
        MONTHLY_CAPS: "/month in monthly caps",
        FUNDING_TARGETS: " in funding targets",
        PER_RUN_CEILING: " per-run funding ceiling",
        DAILY_FUNDING_LIMIT: " daily funding limit",
    }[dimension]


def _limit_delta(before: FleetExposure | None, after: FleetExposure | None) -> Decimal:
    """A rolling limit only tightens the other figures (targets, ceiling), which are counted
    on their own, so it is compared only when both sides have the fleet: removing a limit
    is an unbounded increase, adding one an unbounded decrease."""
    if before is None or after is None:
        return ZERO
    b, a = before.daily_funding_limit, after.daily_funding_limit
    if b is None and a is None:
        return ZERO
    if b is None:
        return -INFINITY
    if a is None:
        return INFINITY
    return a - b


def fleet_delta(name: str, before: FleetExposure | None, after: FleetExposure | None) -> FleetDelta:
    currency_changed = before is not None and after is not None and before.currency != after.currency
    base = None if currency_changed else before
    currency = after.currency if after is not None else before.currency if before is not None else ""
    deltas: dict[str, Decimal] = {}
    for dim in (DAILY_CAPS, MONTHLY_CAPS, FUNDING_TARGETS, PER_RUN_CEILING):
        b = base.amount(dim) if base is not None else ZERO
        a = after.amount(dim) if after is not None else ZERO
        value = (a or ZERO) - (b or ZERO)
        if value:
            deltas[dim] = value
    limit = _limit_delta(base, after)
    if limit:
        deltas[DAILY_FUNDING_LIMIT] = limit
    before_agents = base.agents if base is not None else frozenset()
    after_agents = after.agents if after is not None else frozenset()
    return FleetDelta(
        fleet=name,
        currency=currency,
        before=before,
        after=after,
        deltas=deltas,
        agents_added=tuple(sorted(after_agents - before_agents)),
        agents_removed=tuple(sorted(before_agents - after_agents)),
        currency_changed=currency_changed,
    )


def diff(before: Exposure, after: Exposure) -> tuple[FleetDelta, ...]:
    """Per fleet (sorted by name, every fleet on either side): after − before."""
    names = sorted({f.fleet for f in before.fleets} | {f.fleet for f in after.fleets})
    return tuple(fleet_delta(n, before.fleet(n), after.fleet(n)) for n in names)


@dataclass(frozen=True)
class Excess:
    """One increase above the unattended bound."""

    fleet: str
    dimension: str
    increase: Decimal
    allowed: Decimal
    currency: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "dimension": self.dimension,
            "increase": _signed(self.increase),
            "allowed": str(self.allowed),
            "currency": self.currency,
            "message": str(self),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Excess:
        return cls(
            str(data["fleet"]),
            str(data["dimension"]),
            _unsigned(data["increase"]),
            Decimal(str(data["allowed"])),
            str(data["currency"]),
        )

    def __str__(self) -> str:
        if self.dimension == AGENTS:
            # Counts: whole numbers however they were read back (a plan file has "+6.00").
            return f"fleet {self.fleet}: +{int(self.increase)} agent(s), {int(self.allowed)} allowed unattended"
        if self.dimension == CURRENCY:
            return f"fleet {self.fleet}: its currency changed (amounts cannot be compared)"
        return (
            f"fleet {self.fleet}: {LABELS[self.dimension]} {_signed(self.increase)} {self.currency}, "
            f"{format_money(self.allowed)} {self.currency} allowed unattended"
        )


def min_policy(a: ApprovalPolicy, b: ApprovalPolicy) -> ApprovalPolicy:
    return ApprovalPolicy(
        daily_caps=min(a.daily_caps, b.daily_caps),
        monthly_caps=min(a.monthly_caps, b.monthly_caps),
        funding=min(a.funding, b.funding),
        agents=min(a.agents, b.agents),
    )


def effective_policy(approved: Exposure | None, after: FleetExposure) -> ApprovalPolicy:
    """The bound that judges ``after``: with nothing approved yet, the fleet's own (the first
    revision bootstraps); else the approved fleet's bound, lowered by the new one's; a fleet
    that is new since the approval or changed currency gets a zero bound."""
    if approved is None:
        return after.policy
    before = approved.fleet(after.fleet)
    if before is None or before.currency != after.currency:
        return ApprovalPolicy()
    return min_policy(before.policy, after.policy)


def increase_exceeds(policy: ApprovalPolicy, delta: FleetDelta) -> tuple[Excess, ...]:
    """Every increase in ``delta`` above ``policy`` (empty: it may be applied unattended)."""
    out: list[Excess] = []
    bounds = {
        DAILY_CAPS: policy.daily_caps,
        MONTHLY_CAPS: policy.monthly_caps,
        FUNDING_TARGETS: policy.funding,
        PER_RUN_CEILING: policy.funding,
        DAILY_FUNDING_LIMIT: policy.funding,
    }
    for dim, allowed in bounds.items():
        value = delta.delta(dim)
        if value > allowed:
            out.append(Excess(delta.fleet, dim, value, allowed, delta.currency))
    if len(delta.agents_added) > policy.agents:
        out.append(Excess(delta.fleet, AGENTS, Decimal(len(delta.agents_added)), Decimal(policy.agents), ""))
    if delta.currency_changed:
        out.append(Excess(delta.fleet, CURRENCY, ZERO, ZERO, delta.currency))
    return tuple(out)


@dataclass(frozen=True)
class ExposureReview:
    """A desired state's exposure against the approved baseline, and the verdict."""

    deltas: tuple[FleetDelta, ...]
    excesses: tuple[Excess, ...]
    bootstrap: bool
    """Nothing was approved yet: the baseline is zero and each fleet's own bound applies."""

    @property
    def requires_approval(self) -> bool:
        return bool(self.excesses)

    @property
    def increases(self) -> bool:
        return any(d.increases for d in self.deltas)

    def lines(self) -> list[str]:
        """One line per fleet whose exposure changes, for plans, status and logs."""
        return [f"fleet {d.fleet}: {d.sentence()}" for d in self.deltas if d.changed]

    def headline(self) -> str:
        base = "nothing approved yet (baseline 0)" if self.bootstrap else "the last approved exposure"
        changed = [d for d in self.deltas if d.changed]
        if not changed:
            return f"Exposure: no change from {base}."
        verdict = (
            "above the unattended bound: needs `finops approve`"
            if self.requires_approval
            else "within the unattended bound"
        )
        return f"Exposure vs {base}: " + "; ".join(self.lines()) + f" ({verdict})."

    def to_dict(self) -> dict[str, Any]:
        return {
            "bootstrap": self.bootstrap,
            "requires_approval": self.requires_approval,
            "increases": self.increases,
            "fleets": [d.to_dict() for d in self.deltas],
            "excesses": [e.to_dict() for e in self.excesses],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExposureReview:
        """The saved form (plan files, state rows)."""
        return cls(
            tuple(FleetDelta.from_dict(d) for d in data.get("fleets") or ()),
            tuple(Excess.from_dict(e) for e in data.get("excesses") or ()),
            bool(data.get("bootstrap")),
        )


def review(approved: Exposure | None, after: Exposure) -> ExposureReview:
    """Judge ``after`` against the approved exposure (``None``: nothing approved yet)."""
    deltas = diff(approved or Exposure(), after)
    excesses: list[Excess] = []
    for delta in deltas:
        if delta.after is None:
            continue  # a fleet removed entirely only lowers exposure
        excesses.extend(increase_exceeds(effective_policy(approved, delta.after), delta))
    return ExposureReview(deltas, tuple(excesses), approved is None)
