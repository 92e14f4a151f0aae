"""Fleet currency → gateway credits.

Manifests are written in the fleet's currency (the seed's figures are USD); the gateway
accounts in CREDITS. Conversion uses the gateway's own exchange rate, which the plan shows,
and rounds half-even to the cent like the gateway's serialiser.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, localcontext

from policies.money import CENT

CREDITS = "CREDITS"
SIGNUP_BONUS_CREDITS = Decimal("500.00")
"""What ``POST /v1/register`` puts in a new wallet; it counts toward the funding target."""


_PRECISION = 80
"""Digits for conversions: manifest amounts are at most 14 digits (see
``policies.money.GATEWAY_MAX_AMOUNT``), so any sane rate converts exactly."""


def to_credits(amount: Decimal, rate: Decimal) -> Decimal:
    """``amount`` in fleet currency times credits-per-unit ``rate``.

    Never raises for finite inputs: a product too large to represent (an absurd rate) is
    ``Decimal("Infinity")``, which every range check (``out_of_gateway_range``) refuses
    before a write."""
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        try:
            return (amount * rate).quantize(CENT, rounding=ROUND_HALF_EVEN)
        except ArithmeticError:
            return Decimal("Infinity")


def from_credits(credits: Decimal, rate: Decimal) -> Decimal:
    """Back to fleet currency for display; never used to decide a write."""
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        try:
            return (credits / rate).quantize(CENT, rounding=ROUND_HALF_EVEN)
        except ArithmeticError:
            return Decimal("Infinity")
