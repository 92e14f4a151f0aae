"""Fleet currency → gateway credits.

Manifests are written in the fleet's currency (the seed's figures are USD); the gateway
accounts in CREDITS. Conversion uses the gateway's own exchange rate, which the plan shows,
and rounds half-even to the cent like the gateway's serialiser.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from policies.money import CENT

CREDITS = "CREDITS"
SIGNUP_BONUS_CREDITS = Decimal("500.00")
"""What ``POST /v1/register`` puts in a new wallet; it counts toward the funding target."""


def to_credits(amount: Decimal, rate: Decimal) -> Decimal:
    """``amount`` in fleet currency times credits-per-unit ``rate``."""
    return (amount * rate).quantize(CENT, rounding=ROUND_HALF_EVEN)


def from_credits(credits: Decimal, rate: Decimal) -> Decimal:
    """Back to fleet currency for display; never used to decide a write."""
    return (credits / rate).quantize(CENT, rounding=ROUND_HALF_EVEN)
