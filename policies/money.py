"""Money handling shared by every layer.

Money is always :class:`decimal.Decimal`. Inputs with more than two decimal places are
rejected, never rounded: a silently rounded cap or deposit is a budget nobody committed to.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

CENT = Decimal("0.01")
ZERO = Decimal("0.00")

GATEWAY_MAX_AMOUNT = Decimal("92233720368.54")
"""The largest 2-dp amount the gateway can hold: it stores balances, caps and ledger amounts
as 64-bit integers of 1e-8 credits (at most 92,233,720,368.54775807 credits). Anything larger
would overflow there, after finops had already made other writes."""

GATEWAY_MAX_DEPOSIT = Decimal("1000000000.00")
"""The gateway's per-request deposit limit (``amount`` ≤ 1e9, API.md §1)."""


def out_of_gateway_range(value: Decimal, what: str = "amount") -> str | None:
    """``None`` when ``value`` can be stored by the gateway, else a one-line reason."""
    if not value.is_finite() or value > GATEWAY_MAX_AMOUNT:
        return (
            f"{what} {value if value.is_finite() else 'beyond any finite value'} exceeds the gateway's maximum "
            f"{GATEWAY_MAX_AMOUNT} (it stores amounts as 64-bit integers of 1e-8 credits)"
        )
    return None


class MoneyError(ValueError):
    """An amount that cannot be used as money (not a number, NaN, too precise, negative)."""


def parse_money(value: object, *, allow_negative: bool = False) -> Decimal:
    """Parse a manifest or API amount into a 2-dp Decimal, refusing anything lossy.

    Floats are accepted only through their shortest ``repr`` (YAML ``30.5`` is a float),
    so ``0.1`` stays ``0.10`` rather than becoming ``0.1000000000000000055…``.
    """
    if isinstance(value, bool):
        raise MoneyError(f"expected an amount, got boolean {value!r}")
    if isinstance(value, Decimal):
        dec = value
    elif isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, float):
        dec = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            dec = Decimal(value.strip())
        except InvalidOperation:
            raise MoneyError(f"not a number: {value!r}") from None
    else:
        raise MoneyError(f"expected an amount, got {type(value).__name__}")
    if not dec.is_finite():
        raise MoneyError(f"amount must be finite, got {value!r}")
    exponent = dec.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2 and dec != dec.quantize(CENT):
        raise MoneyError(f"amount {value!r} has more than 2 decimal places")
    if dec < 0 and not allow_negative:
        raise MoneyError(f"amount must not be negative, got {value!r}")
    return dec.quantize(CENT)


def from_gateway_number(value: object) -> Decimal:
    """Read a money value the gateway sent (a 2-dp string or a JSON number).

    The gateway stores caps in atomic units (x1e8) and serialises some of them as floats,
    so values such as ``8000.0`` or ``0.30000000000000004`` are normal; they are rounded
    half-even to cents exactly like the gateway's own serialiser does.
    """
    if isinstance(value, bool) or value is None:
        raise MoneyError(f"expected a number from the gateway, got {value!r}")
    if isinstance(value, float):
        dec = Decimal(repr(value))
    elif isinstance(value, (int, str, Decimal)):
        try:
            dec = Decimal(str(value).strip())
        except InvalidOperation:
            raise MoneyError(f"gateway sent a non-numeric amount: {value!r}") from None
    else:
        raise MoneyError(f"expected a number from the gateway, got {type(value).__name__}")
    if not dec.is_finite():
        raise MoneyError(f"gateway sent a non-finite amount: {value!r}")
    return dec.quantize(CENT, rounding=ROUND_HALF_EVEN)


def format_money(value: Decimal) -> str:
    """Serialise money the way the gateway and our JSON outputs do: a 2-dp string."""
    return str(value.quantize(CENT))
