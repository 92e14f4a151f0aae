"""Dynamic budget rebalancing: lend an idle agent's unused daily budget to a busy one.

The rule, per fleet and per pass:

* An agent is a **donor** when its spend over the last 24 h is below ``donor_below`` of its
  *baseline* daily cap (the cap committed in git), and a **receiver** when it is above
  ``receiver_above``. Held agents, and agents whose baseline is zero (a deliberate stop),
  are neither.
* A donor may give at most ``share`` of its unused baseline, rounded down to the cent, and
  never so much that its cap would drop below its minimum. Because ``share <= 1``, a donor's
  lowered cap never drops below what it has already spent, so lending never blocks it
  outright.
* A receiver asks for enough to bring its utilization back down to ``receiver_above``
  (``spend / receiver_above - baseline``, rounded up to the cent), never beyond its maximum.
* The amount moved is the smaller of what donors can give and what receivers ask for. Both
  sides are split proportionally in whole cents (largest remainder, ties by agent id), from
  the *same* pool, so what donors give equals what receivers get to the cent and the sum of
  the caps equals the sum of the baselines. A naive "take a share from each donor, floor
  it at the minimum, hand each receiver its share" leaks or creates money whenever a floor
  or a rounding bites; splitting one integer pool on both sides cannot.

Why it is stateless. Each pass recomputes from the baselines and the rolling 24 h spend the
gateway reports; it never starts from the caps it wrote last time. An adjustment therefore
expires by itself: once a donor's spend recovers or a receiver quiets down (its spend ages
out of the rolling window), the next pass finds it neutral and returns it to its baseline.
While a receiver keeps spending past its raised cap, its spend over the *baseline* keeps
rising and so does what it asks for, up to its maximum. Git owns the baselines; this module
owns only the day's adjustment (desired cap = baseline + adjustment).

All arithmetic is in integer cents and exact fractions, so the result does not depend on
the ambient :mod:`decimal` context, on float rounding, or on the order of the input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from fractions import Fraction
from types import MappingProxyType

_EXACT = Context(prec=100)
"""For the few Decimal operations outside integer cents, so that a caller's
``decimal.getcontext()`` cannot round them."""


class RebalanceInputError(ValueError):
    """Inputs the rebalancer refuses to guess about (bad amounts, inconsistent bounds)."""


@dataclass(frozen=True)
class RebalancePolicy:
    """A fleet's rebalancing policy. Thresholds and share are fractions (0.30 = 30 %).

    How often to run is the scheduler's business, not this decision's.
    """

    enabled: bool = True
    donor_below: Decimal = Decimal("0.30")
    receiver_above: Decimal = Decimal("0.80")
    share: Decimal = Decimal("0.50")


@dataclass(frozen=True)
class AgentBudget:
    """One agent as the rebalancer sees it, in the fleet's currency.

    ``baseline`` is the daily cap committed in git; ``spend`` the gateway's rolling 24 h
    spend; ``minimum``/``maximum`` bound the cap the rebalancer may set. A ``held`` agent
    (paused, under investigation, mid-rotation) keeps its baseline and lends nothing.
    """

    agent_id: str
    baseline: Decimal
    spend: Decimal
    minimum: Decimal
    maximum: Decimal
    held: bool = False


@dataclass(frozen=True)
class Transfer:
    donor: str
    receiver: str
    amount: Decimal


@dataclass(frozen=True)
class Rebalance:
    """The decision: every agent's new daily cap and how it got there.

    ``caps`` and ``adjustments`` hold every input agent (adjustment ``0.00`` when
    unchanged), so ``caps[a] == baseline(a) + adjustments[a]`` for all agents.
    """

    caps: Mapping[str, Decimal]
    adjustments: Mapping[str, Decimal]
    transfers: tuple[Transfer, ...]
    notes: tuple[str, ...]
    held: frozenset[str] = field(default_factory=frozenset)

    @property
    def changed(self) -> bool:
        return any(self.adjustments.values())

    @property
    def moved(self) -> Decimal:
        """Total budget moved from donors to receivers."""
        return functools.reduce(_EXACT.add, (t.amount for t in self.transfers), Decimal("0.00"))

    def baseline(self, agent_id: str) -> Decimal:
        return _EXACT.subtract(self.caps[agent_id], self.adjustments[agent_id])

    def explain(self, agent_id: str, currency: str = "") -> str:
        """One line for a plan's reason column, e.g.
        ``res-01 daily cap 30.00 → 37.50: rebalanced +7.50 from sum-01, cls-01``
        (with ``currency="USD"``: ``… 30.00 USD → 37.50 USD: rebalanced +7.50 USD from …``).
        Counterparties are listed largest first."""
        unit = f" {currency}" if currency else ""
        cap = self.caps[agent_id]
        adjustment = self.adjustments[agent_id]
        if not adjustment:
            why = "held" if agent_id in self.held else "not rebalanced"
            return f"{agent_id} daily cap {cap}{unit}: baseline, {why}"
        if adjustment > 0:
            parts = [(t.amount, t.donor) for t in self.transfers if t.receiver == agent_id]
            direction = "from"
        else:
            parts = [(t.amount, t.receiver) for t in self.transfers if t.donor == agent_id]
            direction = "to"
        others = ", ".join(name for _, name in sorted(parts, key=lambda p: (-p[0], p[1])))
        sign = "+" if adjustment > 0 else "-"
        return (
            f"{agent_id} daily cap {self.baseline(agent_id)}{unit} → {cap}{unit}: "
            f"rebalanced {sign}{_EXACT.abs(adjustment)}{unit} {direction} {others}"
        )


def rebalance(agents: Sequence[AgentBudget], policy: RebalancePolicy, fleet_total: Decimal) -> Rebalance:
    """New daily caps for one fleet: the same total, moved from idle agents to busy ones.

    Raises :class:`RebalanceInputError` for inputs that cannot be money or whose bounds
    contradict each other (``minimum > baseline``, ``maximum < baseline``, duplicate ids).
    """
    _check_policy(policy)
    total_cents = _cents(fleet_total, "fleet daily total")
    by_id: dict[str, _Agent] = {}
    for agent in agents:
        parsed = _parse_agent(agent)
        if parsed.agent_id in by_id:
            raise RebalanceInputError(f"agent {parsed.agent_id!r} appears twice")
        by_id[parsed.agent_id] = parsed
    ordered = [by_id[a] for a in sorted(by_id)]
    held = frozenset(a.agent_id for a in ordered if a.held)

    if not policy.enabled:
        return _unchanged(ordered, held, "rebalancing disabled by policy")
    baseline_sum = sum(a.baseline for a in ordered)
    if baseline_sum > total_cents:
        return _unchanged(
            ordered,
            held,
            f"baseline daily caps sum to {_money(baseline_sum)}, over the fleet daily total "
            f"{_money(total_cents)}: not rebalancing",
        )

    donor_below, receiver_above, share = (
        Fraction(policy.donor_below),
        Fraction(policy.receiver_above),
        Fraction(policy.share),
    )
    capacity: dict[str, int] = {}
    need: dict[str, int] = {}
    for a in ordered:
        if a.held or a.baseline == 0:
            continue
        if a.spend < donor_below * a.baseline:
            give = min(math.floor((a.baseline - a.spend) * share), a.baseline - a.minimum)
            if give > 0:
                capacity[a.agent_id] = give
        elif a.spend > receiver_above * a.baseline:
            ask = min(math.ceil(a.spend / receiver_above) - a.baseline, a.maximum - a.baseline)
            if ask > 0:
                need[a.agent_id] = ask

    if not capacity or not need:
        missing = []
        if not capacity:
            missing.append(
                f"no donor (no agent below {_percent(policy.donor_below)} of its baseline "
                "with budget to spare above its minimum)"
            )
        if not need:
            missing.append(
                f"no receiver (no agent above {_percent(policy.receiver_above)} of its baseline "
                "with room below its maximum)"
            )
        return _unchanged(ordered, held, *missing)

    pool = min(sum(capacity.values()), sum(need.values()))
    given = _split(pool, capacity)
    received = _split(pool, need)
    transfers = _pair(given, received)
    adjustments = {a.agent_id: received.get(a.agent_id, 0) - given.get(a.agent_id, 0) for a in ordered}
    note = (
        f"moved {_money(pool)} from {len(given)} donor(s) to {len(received)} receiver(s); "
        f"donors could give {_money(sum(capacity.values()))}, receivers asked for {_money(sum(need.values()))}"
    )
    return _result(ordered, adjustments, transfers, held, (note,))


@dataclass(frozen=True)
class _Agent:
    """An :class:`AgentBudget` in integer cents, validated."""

    agent_id: str
    baseline: int
    spend: int
    minimum: int
    maximum: int
    held: bool


def _parse_agent(agent: AgentBudget) -> _Agent:
    if not isinstance(agent.agent_id, str) or not agent.agent_id:
        raise RebalanceInputError(f"agent id must be a non-empty string, got {agent.agent_id!r}")
    who = f"agent {agent.agent_id!r}"
    parsed = _Agent(
        agent_id=agent.agent_id,
        baseline=_cents(agent.baseline, f"{who} baseline daily cap"),
        spend=_cents(agent.spend, f"{who} spend"),
        minimum=_cents(agent.minimum, f"{who} minimum daily cap"),
        maximum=_cents(agent.maximum, f"{who} maximum daily cap"),
        held=bool(agent.held),
    )
    if parsed.minimum > parsed.baseline:
        raise RebalanceInputError(
            f"{who}: minimum daily cap {_money(parsed.minimum)} is above its baseline "
            f"{_money(parsed.baseline)}; lower the minimum or raise the baseline"
        )
    if parsed.maximum < parsed.baseline:
        raise RebalanceInputError(
            f"{who}: maximum daily cap {_money(parsed.maximum)} is below its baseline "
            f"{_money(parsed.baseline)}; raise the maximum or lower the baseline"
        )
    return parsed


def _cents(value: object, what: str) -> int:
    """Whole cents of a non-negative Decimal with at most two decimals, else refuse."""
    if not isinstance(value, Decimal):
        raise RebalanceInputError(f"{what} must be a Decimal, got {type(value).__name__} {value!r}")
    if not value.is_finite():
        raise RebalanceInputError(f"{what} must be finite, got {value}")
    if value < 0:
        raise RebalanceInputError(f"{what} must not be negative, got {value}")
    cents = Fraction(value) * 100
    if cents.denominator != 1:
        raise RebalanceInputError(f"{what} has more than 2 decimal places: {value}")
    return int(cents)


def _check_policy(policy: RebalancePolicy) -> None:
    for name in ("donor_below", "receiver_above", "share"):
        value = getattr(policy, name)
        if not isinstance(value, Decimal) or not value.is_finite():
            raise RebalanceInputError(f"rebalance policy {name} must be a finite Decimal, got {value!r}")
    if not Decimal(0) <= policy.share <= Decimal(1):
        raise RebalanceInputError(f"rebalance policy share must be between 0 and 1, got {policy.share}")
    if not Decimal(0) < policy.receiver_above <= Decimal(1):
        raise RebalanceInputError(
            f"rebalance policy receiver_above must be above 0 and at most 1, got {policy.receiver_above}"
        )
    if not Decimal(0) <= policy.donor_below < policy.receiver_above:
        raise RebalanceInputError(
            f"rebalance policy donor_below must be at least 0 and below receiver_above "
            f"({policy.receiver_above}), got {policy.donor_below}"
        )


def _split(pool: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split ``pool`` cents proportionally to ``weights`` (largest remainder method).

    Requires ``0 <= pool <= sum(weights)``; then no one gets more than its weight, because a
    leftover cent only goes to a share with a fractional part. Ties go to the smaller agent
    id, so the result depends on the contents of ``weights``, never on their order.
    Zero shares are dropped.
    """
    total = sum(weights.values())
    base = {k: pool * w // total for k, w in weights.items()}
    leftover = pool - sum(base.values())
    by_remainder = sorted(weights, key=lambda k: (-(pool * weights[k] % total), k))
    for k in by_remainder[:leftover]:
        base[k] += 1
    return {k: v for k, v in base.items() if v > 0}


def _pair(given: Mapping[str, int], received: Mapping[str, int]) -> tuple[Transfer, ...]:
    """Donor→receiver transfers that account for every cent.

    Donors and receivers are each laid end to end in id order on the same line of
    ``pool`` cents; a transfer is where a donor's stretch overlaps a receiver's.
    """
    out: list[Transfer] = []
    for donor, d_start, d_end in _stretches(given):
        for receiver, r_start, r_end in _stretches(received):
            overlap = min(d_end, r_end) - max(d_start, r_start)
            if overlap > 0:
                out.append(Transfer(donor=donor, receiver=receiver, amount=_money(overlap)))
    return tuple(out)


def _stretches(amounts: Mapping[str, int]) -> list[tuple[str, int, int]]:
    out, position = [], 0
    for key in sorted(amounts):
        out.append((key, position, position + amounts[key]))
        position += amounts[key]
    return out


def _unchanged(ordered: Iterable[_Agent], held: frozenset[str], *notes: str) -> Rebalance:
    return _result(ordered, {}, (), held, notes)


def _result(
    ordered: Iterable[_Agent],
    adjustments: Mapping[str, int],
    transfers: tuple[Transfer, ...],
    held: frozenset[str],
    notes: tuple[str, ...],
) -> Rebalance:
    caps: dict[str, Decimal] = {}
    adjusted: dict[str, Decimal] = {}
    for a in ordered:
        delta = adjustments.get(a.agent_id, 0)
        caps[a.agent_id] = _money(a.baseline + delta)
        adjusted[a.agent_id] = _money(delta)
    return Rebalance(
        caps=MappingProxyType(caps),
        adjustments=MappingProxyType(adjusted),
        transfers=transfers,
        notes=tuple(notes),
        held=held,
    )


def _money(cents: int) -> Decimal:
    """Cents as a 2-dp Decimal, built from a string so no decimal context can round it."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return Decimal(f"{sign}{whole}.{part:02d}")


def _percent(fraction: Decimal) -> str:
    return f"{fraction.scaleb(2, context=_EXACT).normalize(context=_EXACT):f} %"
