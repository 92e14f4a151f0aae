"""Units a person reads: amounts in the fleet's currency with gateway credits alongside,
thresholds as percentages. One formatter for plan, apply and status, so the same figure
reads the same everywhere. Pure; never used to decide a write (writes are in credits).

``30.00 → 35.00 USD (3000.00 → 3500.00 credits)``; for a fleet whose currency *is* CREDITS,
just ``3000.00 → 3500.00 credits``. A value that does not convert back exactly (a rate that
does not divide it) is shown with ``≈`` in front of its fleet-currency figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from enum import StrEnum

from policies.currency import CREDITS, from_credits
from policies.money import format_money

APPROX = "≈"


class DiffUnit(StrEnum):
    """What a ``FieldDiff``'s ``before``/``after`` strings are measured in."""

    CREDITS = "credits"
    """Gateway credits, 2-decimal strings (caps, balances)."""
    RATIO = "ratio"
    """The gateway's ``alert_threshold``: a ratio (0.75), shown as a percentage (75 %)."""
    TEXT = "text"
    """Anything else (a wallet, a URL, an event list, a fingerprint)."""


FIELD_UNITS: dict[str, DiffUnit] = {
    "daily_cap": DiffUnit.CREDITS,
    "monthly_cap": DiffUnit.CREDITS,
    "balance": DiffUnit.CREDITS,
    "alert_threshold": DiffUnit.RATIO,
}
"""The unit of each field the planner diffs; any other field is ``TEXT``."""


def unit_of(field: str) -> DiffUnit:
    return FIELD_UNITS.get(field, DiffUnit.TEXT)


def percent(ratio: Decimal) -> str:
    """``0.75`` → ``75 %``; ``0.825`` → ``82.5 %`` (never rounded)."""
    return f"{_plain(ratio * 100)} %"


def percent_number(ratio: Decimal) -> str:
    """``0.75`` → ``75`` (the JSON form: a string, no unit)."""
    return _plain(ratio * 100)


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def parse_decimal(text: str | None) -> Decimal | None:
    """A diff value as a number, or ``None`` when it is absent or not a finite number."""
    if text is None:
        return None
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


@dataclass(frozen=True)
class Units:
    """A fleet's currency and the gateway's rate (credits per unit of it)."""

    currency: str
    rate: Decimal

    @property
    def is_credits(self) -> bool:
        """Amounts in the fleet currency *are* credits: show them once."""
        return self.currency.upper() == CREDITS

    def in_currency(self, credits: Decimal) -> Decimal:
        return credits if self.is_credits else from_credits(credits, self.rate)

    def exact(self, credits: Decimal) -> bool:
        """Whether ``credits`` converts to the fleet currency without rounding."""
        if self.is_credits or not credits.is_finite():
            return True
        value = from_credits(credits, self.rate)
        with localcontext() as ctx:
            ctx.prec = 80
            return value.is_finite() and value * self.rate == credits

    def currency_text(self, credits: Decimal) -> str:
        """The fleet-currency figure alone (``≈`` when rounded), without the unit."""
        value = self.in_currency(credits)
        if not value.is_finite():
            return "(not convertible)"
        return ("" if self.exact(credits) else APPROX) + format_money(value)

    def amount(self, credits: Decimal) -> str:
        """``30.00 USD (3000.00 credits)``, or ``3000.00 credits`` for a CREDITS fleet."""
        if self.is_credits:
            return f"{format_money(credits)} credits"
        return f"{self.currency_text(credits)} {self.currency} ({format_money(credits)} credits)"

    def change(self, before: Decimal | None, after: Decimal | None, none: str = "none") -> str:
        """``30.00 → 35.00 USD (3000.00 → 3500.00 credits)``; an absent side shows ``none``."""
        credits = f"{_side(before, format_money, none)} → {_side(after, format_money, none)} credits"
        if self.is_credits:
            return credits
        shown = f"{_side(before, self.currency_text, none)} → {_side(after, self.currency_text, none)}"
        return f"{shown} {self.currency} ({credits})"


def _side(value: Decimal | None, show: Callable[[Decimal], str], none: str) -> str:
    return none if value is None else show(value)


def show_change(field_unit: DiffUnit, before: str | None, after: str | None, units: Units | None) -> str:
    """One diff's ``before → after`` in the units a person reads (``units``: the change's
    fleet; ``None`` when unknown, then credits are labelled as such)."""
    if field_unit is DiffUnit.CREDITS:
        b, a = parse_decimal(before), parse_decimal(after)
        if (before is None or b is not None) and (after is None or a is not None):
            return (units or Units(CREDITS, Decimal(1))).change(b, a)
    if field_unit is DiffUnit.RATIO:
        b, a = parse_decimal(before), parse_decimal(after)
        if (before is None or b is not None) and (after is None or a is not None):
            return f"{percent(b) if b is not None else 'none'} → {percent(a) if a is not None else 'none'}"
    return f"{before if before is not None else '(none)'} → {after if after is not None else '(none)'}"
