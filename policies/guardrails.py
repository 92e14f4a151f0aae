"""Safety rules a plan must pass before anything is applied.

Pure: the planner hands in what the plan would do, in the fleet's currency, and gets back
every rule it breaks with the amount by which it breaks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from policies.money import GATEWAY_MAX_DEPOSIT, format_money, out_of_gateway_range


@dataclass(frozen=True)
class Violation:
    rule: str
    fleet: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] fleet {self.fleet}: {self.message}"


def check_funding_ceiling(
    fleet: str, currency: str, top_ups: Mapping[str, Decimal], ceiling: Decimal
) -> list[Violation]:
    """What one run puts into the fleet (``funded``: per agent, top-ups plus the signup bonus
    of each registration) must not exceed the fleet's per-run funding ceiling."""
    total = sum(top_ups.values(), Decimal("0.00"))
    if total <= ceiling:
        return []
    return [
        Violation(
            rule="funding-ceiling",
            fleet=fleet,
            message=(
                f"plan puts {format_money(total)} {currency} into {len(top_ups)} agent(s) "
                "(top-ups and signup bonuses), "
                f"{format_money(total - ceiling)} {currency} over the per-run ceiling "
                f"{format_money(ceiling)} {currency}"
            ),
        )
    ]


def check_caps_within_total(
    fleet: str, currency: str, new_daily_caps: Iterable[tuple[str, Decimal]], daily_total: Decimal
) -> list[Violation]:
    """No cap the plan writes may exceed the fleet's daily budget total on its own."""
    out = []
    for agent_id, cap in new_daily_caps:
        if cap > daily_total:
            out.append(
                Violation(
                    rule="cap-over-fleet-total",
                    fleet=fleet,
                    message=(
                        f"plan raises {agent_id}'s daily cap to {format_money(cap)} {currency}, "
                        f"{format_money(cap - daily_total)} {currency} over the fleet daily total "
                        f"{format_money(daily_total)} {currency}"
                    ),
                )
            )
    return out


def check_gateway_range(fleet: str, agent_id: str, amounts: Mapping[str, Decimal]) -> list[Violation]:
    """Every amount the plan would send (caps, funding target, in credits at the gateway's
    rate) must fit the gateway's storage; otherwise a write fails half-way (an agent
    registered but left without caps)."""
    out = []
    for name, credits in amounts.items():
        problem = out_of_gateway_range(credits, f"{name} in credits")
        if problem:
            out.append(Violation(rule="amount-range", fleet=fleet, message=f"{agent_id}: {problem}"))
    return out


def check_deposit_limit(fleet: str, top_ups: Mapping[str, Decimal]) -> list[Violation]:
    """The gateway refuses a deposit over 1e9 credits; one bigger top-up is refused at plan
    time, never split into several deposits behind the reviewer's back."""
    return [
        Violation(
            rule="deposit-limit",
            fleet=fleet,
            message=(
                f"{agent_id}: top-up of {format_money(credits)} credits is over the gateway's per-deposit "
                f"maximum {format_money(GATEWAY_MAX_DEPOSIT)}; lower the funding target"
            ),
        )
        for agent_id, credits in sorted(top_ups.items())
        if credits > GATEWAY_MAX_DEPOSIT
    ]
