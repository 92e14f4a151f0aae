from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from policies.funding import deposit_idempotency_key, top_up_amount

cents = st.decimals(min_value=0, max_value=10**7, places=2, allow_nan=False, allow_infinity=False)


def test_top_up_only_below_floor_and_to_target() -> None:
    assert top_up_amount(Decimal("30.00"), Decimal("40.00"), Decimal("75.00")) == Decimal("45.00")
    assert top_up_amount(Decimal("40.00"), Decimal("40.00"), Decimal("75.00")) == Decimal("0.00")
    assert top_up_amount(Decimal("90.00"), Decimal("40.00"), Decimal("75.00")) == Decimal("0.00")


@given(balance=cents, floor=cents, extra=cents)
def test_top_up_lands_exactly_on_target_and_never_withdraws(balance: Decimal, floor: Decimal, extra: Decimal) -> None:
    target = floor + extra
    amount = top_up_amount(balance, floor, target)
    assert amount >= 0
    if balance < floor:
        assert balance + amount == target
    else:
        assert amount == 0


def test_deposit_keys_are_stable_per_decision_and_unique_across_decisions() -> None:
    key = deposit_idempotency_key("research", "res-01", "41", Decimal("45.00"))
    assert key == deposit_idempotency_key("research", "res-01", "41", Decimal("45.00"))
    assert key != deposit_idempotency_key("research", "res-01", "42", Decimal("45.00"))
    assert key != deposit_idempotency_key("research", "res-02", "41", Decimal("45.00"))
    assert key != deposit_idempotency_key("research", "res-01", "41", Decimal("45.01"))
    assert key.startswith("finops-topup-") and len(key) < 64
