from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.money import MoneyError, format_money, from_gateway_number, parse_money


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("30", "30.00"),
        (30, "30.00"),
        (30.5, "30.50"),
        ("0.1", "0.10"),
        (0.1, "0.10"),
        ("1e2", "100.00"),
        ("7.00", "7.00"),
    ],
)
def test_parse_money_accepts_up_to_two_places(raw: object, expected: str) -> None:
    assert format_money(parse_money(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("30.123", "more than 2 decimal places"),
        (30.123, "more than 2 decimal places"),
        ("-5", "negative"),
        ("NaN", "finite"),
        ("inf", "finite"),
        ("abc", "not a number"),
        (True, "boolean"),
        ([1], "expected an amount"),
    ],
)
def test_parse_money_rejects_instead_of_rounding(raw: object, fragment: str) -> None:
    with pytest.raises(MoneyError, match=fragment):
        parse_money(raw)


def test_trailing_zeros_beyond_two_places_are_not_extra_precision() -> None:
    assert parse_money("30.500") == Decimal("30.50")


def test_gateway_floats_are_read_exactly_to_the_cent() -> None:
    assert from_gateway_number(0.30000000000000004) == Decimal("0.30")
    assert from_gateway_number(8000.0) == Decimal("8000.00")
    assert from_gateway_number("100.50") == Decimal("100.50")
    with pytest.raises(MoneyError):
        from_gateway_number(None)


@given(st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False, allow_infinity=False))
def test_round_trip_through_string(value: Decimal) -> None:
    assert parse_money(format_money(value)) == value
