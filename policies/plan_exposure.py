"""The spending authority one plan changes, per fleet, in the fleet's currency (credits
alongside): what merging a manifest change authorizes compared with today.

Two baselines, each where it is the truth:

- **caps** (daily, monthly) are enforced by the gateway, so "today" is what the gateway
  enforces now: the delta is live cap → planned cap, summed over the agents whose caps this
  plan writes (a wallet this plan registers counts from 0: it cannot spend before it exists).
  An agent the gateway shows with no cap at all (unlimited) that this plan caps is counted
  apart (``uncapped_before``): unlimited → capped has no finite delta. Drift is included: a
  cap an agent raised itself and the plan puts back is a decrease.
- **funding targets, the per-run ceiling and the rolling daily funding limit** live only in
  finops' configuration; the gateway cannot show them. Their "today" is the last revision a
  person approved (``policies.exposure``), the same baseline that decides whether the plan
  needs ``finops approve``: so the review verdict and the numbers shown agree, and a series
  of small commits cannot hide an increase. Agents added/removed are counted the same way.

Also stated: the credits this plan puts in now (top-ups and signup bonuses). Pure values; the
plan computes this from its own changes, so a saved plan reads back the same figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from policies.exposure import (
    DAILY_FUNDING_LIMIT,
    FUNDING_TARGETS,
    PER_RUN_CEILING,
    ExposureReview,
    FleetDelta,
)
from policies.money import ZERO, format_money
from policies.units import Units

DAILY = "daily_cap"
MONTHLY = "monthly_cap"
DECLARED_DIMENSIONS = (FUNDING_TARGETS, PER_RUN_CEILING, DAILY_FUNDING_LIMIT)
"""The finops-side figures, judged against the approved baseline."""


@dataclass(frozen=True)
class CapMove:
    """One agent's cap as this plan moves it, in credits (``before`` ``None``: no cap today)."""

    fleet: str
    agent_id: str
    cap: str
    """``daily_cap`` or ``monthly_cap``."""
    before: Decimal | None
    after: Decimal
    new_wallet: bool
    """The plan registers this agent: its authority today is zero."""


def signed(value: Decimal) -> str:
    """``+45.00`` / ``-15.00`` / ``0.00``; ``±unlimited`` for an unbounded change."""
    if value.is_infinite():
        return "+unlimited" if value > 0 else "-unlimited"
    return ("+" if value > 0 else "") + format_money(value)


@dataclass(frozen=True)
class FleetExposureChange:
    fleet: str
    units: Units
    daily_caps: Decimal = ZERO
    """Credits: Δ of the sum of daily caps, live → planned."""
    monthly_caps: Decimal = ZERO
    uncapped_before: tuple[str, ...] = ()
    """Agents with no cap on the gateway today that this plan caps."""
    deposits: Decimal = ZERO
    """Credits this plan puts in now (top-ups plus signup bonuses)."""
    registered: tuple[str, ...] = ()
    declared: FleetDelta | None = None
    """Funding targets/limits and agents, vs the last approved revision (``None``: the plan
    carries no review, e.g. it was made without state)."""
    in_plan: bool = True
    """False for a fleet the manifests no longer declare (known from the review only): its
    agents become unmanaged; finops never deletes a wallet, so their caps stay as they are."""

    def declared_delta(self, dimension: str) -> Decimal:
        return self.declared.delta(dimension) if self.declared is not None else ZERO

    @property
    def increases(self) -> bool:
        return (
            self.daily_caps > 0
            or self.monthly_caps > 0
            or bool(self.registered)
            or (self.declared is not None and self.declared.increases)
        )

    @property
    def changed(self) -> bool:
        return bool(
            self.daily_caps
            or self.monthly_caps
            or self.uncapped_before
            or self.deposits
            or self.registered
            or (self.declared is not None and self.declared.changed)
        )

    def _money(self, credits: Decimal, per: str, sign: bool = True) -> str:
        u = self.units
        show = signed if sign else format_money
        value = show(u.in_currency(credits))
        if u.is_credits:
            return f"{value} credits{per}"
        return f"{value} {u.currency}{per} ({show(credits)} credits)"

    def caps_sentence(self) -> str:
        """``authorizes up to +45.00 USD/day and +900.00 USD/month more`` (live → planned)."""
        up = [(v, per) for v, per in ((self.daily_caps, "/day"), (self.monthly_caps, "/month")) if v > 0]
        down = [(v, per) for v, per in ((self.daily_caps, "/day"), (self.monthly_caps, "/month")) if v < 0]
        parts = []
        if up:
            parts.append("authorizes up to " + " and ".join(self._money(v, p) for v, p in up) + " more in caps")
        if down:
            parts.append("lowers caps by " + " and ".join(self._money(-v, p, sign=False) for v, p in down))
        if self.uncapped_before:
            parts.append(f"caps {len(self.uncapped_before)} agent(s) that have no cap on the gateway today")
        return "; ".join(parts) if parts else "no change to the caps the gateway enforces"

    def sentence(self) -> str:
        """The whole change in one line (caps, money put in now, declared figures)."""
        parts = [self.caps_sentence()] if self.in_plan else ["no longer declared (its agents become unmanaged)"]
        if self.deposits:
            parts.append(f"puts in {self.units.amount(self.deposits)} now")
        if self.registered:
            parts.append(f"registers {len(self.registered)} agent(s)")
        declared = self.declared
        if declared is not None:
            figures = [
                f"{label} {signed(declared.delta(dim))} {declared.currency}"
                for dim, label in (
                    (FUNDING_TARGETS, "funding targets"),
                    (PER_RUN_CEILING, "per-run funding ceiling"),
                    (DAILY_FUNDING_LIMIT, "daily funding limit"),
                )
                if declared.delta(dim)
            ]
            if declared.agents_added:
                figures.append(f"+{len(declared.agents_added)} agent(s) declared")
            if declared.agents_removed:
                figures.append(f"-{len(declared.agents_removed)} agent(s) no longer managed")
            if declared.currency_changed and declared.before is not None:
                figures.append(f"currency {declared.before.currency} → {declared.currency}")
            if figures:
                parts.append("vs the last approved revision: " + ", ".join(figures))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        u = self.units
        declared = self.declared
        out: dict[str, Any] = {
            "fleet": self.fleet,
            "currency": u.currency,
            "rate_to_credits": str(u.rate) if self.in_plan else None,
            "daily_caps": signed(u.in_currency(self.daily_caps)),
            "daily_caps_credits": signed(self.daily_caps),
            "monthly_caps": signed(u.in_currency(self.monthly_caps)),
            "monthly_caps_credits": signed(self.monthly_caps),
            "uncapped_before": list(self.uncapped_before),
            "deposits": format_money(u.in_currency(self.deposits)),
            "deposits_credits": format_money(self.deposits),
            "agents_registered": list(self.registered),
            "vs_approved": None
            if declared is None
            else {
                "currency": declared.currency,
                **{dim: signed(declared.delta(dim)) for dim in DECLARED_DIMENSIONS},
                "agents_added": list(declared.agents_added),
                "agents_removed": list(declared.agents_removed),
                "currency_changed": declared.currency_changed,
            },
            "increases": self.increases,
            "sentence": self.sentence(),
        }
        return out


@dataclass(frozen=True)
class PlanExposureChange:
    """Per fleet (in plan order), what applying the plan changes in spending authority."""

    fleets: tuple[FleetExposureChange, ...] = ()
    complete: bool = True
    """False when some declared agents could not be observed: their caps are not counted."""
    bootstrap: bool = False
    """Nothing was approved yet: the declared figures are against zero."""
    requires_approval: bool = False
    reviewed: bool = False
    """The plan carries an exposure review (the declared figures and verdict are known)."""

    @property
    def increases(self) -> bool:
        return any(f.increases for f in self.fleets)

    @property
    def changed(self) -> bool:
        return any(f.changed for f in self.fleets)

    def lines(self) -> list[str]:
        return [f"fleet {f.fleet}: {f.sentence()}" for f in self.fleets if f.changed]

    def headline(self) -> str:
        if not self.changed:
            return "Exposure: this plan changes no spending authority."
        return (
            "Exposure: this plan "
            + ("raises spending authority" if self.increases else "does not raise spending authority")
            + (" (caps: live gateway → planned; funding: vs the last approved revision)")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "basis": {
                "caps": "live gateway caps → planned caps",
                "funding_and_agents": "nothing approved yet (zero)" if self.bootstrap else "last approved revision",
            },
            "complete": self.complete,
            "increases": self.increases,
            "requires_approval": self.requires_approval,
            "fleets": [f.to_dict() for f in self.fleets],
        }


def exposure_change(
    fleets: Mapping[str, Units],
    moves: Iterable[CapMove],
    deposits: Mapping[str, Decimal],
    registered: Mapping[str, Iterable[str]],
    review: ExposureReview | None,
    *,
    complete: bool,
) -> PlanExposureChange:
    """Sum ``moves`` per fleet (``fleets`` in the order to show them)."""
    daily: dict[str, Decimal] = {}
    monthly: dict[str, Decimal] = {}
    uncapped: dict[str, set[str]] = {}
    for m in moves:
        if m.before is None and not m.new_wallet:
            uncapped.setdefault(m.fleet, set()).add(m.agent_id)
            continue
        delta = m.after - (m.before if m.before is not None else ZERO)
        sums = daily if m.cap == DAILY else monthly
        sums[m.fleet] = sums.get(m.fleet, ZERO) + delta
    declared = {d.fleet: d for d in review.deltas} if review is not None else {}
    out = tuple(
        FleetExposureChange(
            fleet=name,
            units=units,
            daily_caps=daily.get(name, ZERO),
            monthly_caps=monthly.get(name, ZERO),
            uncapped_before=tuple(sorted(uncapped.get(name, ()))),
            deposits=deposits.get(name, ZERO),
            registered=tuple(sorted(registered.get(name, ()))),
            declared=declared.get(name),
        )
        for name, units in fleets.items()
    )
    # A fleet removed from the manifests entirely only appears in the review.
    removed = tuple(
        FleetExposureChange(fleet=d.fleet, units=Units(d.currency, Decimal(1)), declared=d, in_plan=False)
        for d in (review.deltas if review is not None else ())
        if d.fleet not in fleets and d.changed
    )
    return PlanExposureChange(
        fleets=out + removed,
        complete=complete,
        bootstrap=bool(review and review.bootstrap),
        requires_approval=bool(review and review.requires_approval),
        reviewed=review is not None,
    )
