from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from policies.funding import (
    DEPOSIT_KEY_PREFIX,
    NO_DEPOSIT_EPOCH,
    deposit_idempotency_key,
    funding_epoch,
    needs_top_up,
    top_up_amount,
    wanted_top_up,
)
from policies.spec import AgentSpec

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


def test_deposit_keys_are_stable_per_epoch_and_unique_across_epochs_agents_and_fleets() -> None:
    key = deposit_idempotency_key("research", "res-01", "41")
    assert key == deposit_idempotency_key("research", "res-01", "41")
    assert key != deposit_idempotency_key("research", "res-01", "42")
    assert key != deposit_idempotency_key("research", "res-02", "41")
    assert key != deposit_idempotency_key("support", "res-01", "41")
    assert key.startswith(DEPOSIT_KEY_PREFIX) and len(key) < 64


ledger_ids = st.lists(st.integers(min_value=1, max_value=10**9), max_size=30)


@given(finops=ledger_ids, others=ledger_ids)
def test_the_epoch_ignores_every_ledger_row_that_is_not_a_landed_finops_deposit(
    finops: list[int], others: list[int]
) -> None:
    """The repro of issue 9: the signup bonus (or spend, or anyone's deposit) landing between
    two attempts of one top-up changed the key. The epoch only looks at finops' own landed
    deposits, whichever witnesses saw them (ledger scan, finops' state, or none)."""
    newest = max(finops) if finops else None
    seen_in_ledger = newest if others and min(others) % 2 else None  # the row may have scrolled out of the scan
    epoch = funding_epoch([seen_in_ledger, newest])
    assert epoch == (str(newest) if newest is not None else NO_DEPOSIT_EPOCH)
    assert funding_epoch([newest]) == epoch == funding_epoch([newest, seen_in_ledger, None])


@given(first=st.integers(min_value=1, max_value=10**9), gap=st.integers(min_value=1, max_value=10**6))
def test_a_landed_deposit_starts_a_new_epoch_and_a_new_key(first: int, gap: int) -> None:
    before = deposit_idempotency_key("f", "a", funding_epoch([first]))
    after = deposit_idempotency_key("f", "a", funding_epoch([first, first + gap]))
    assert before != after
    assert deposit_idempotency_key("f", "a", funding_epoch([])) == deposit_idempotency_key("f", "a", NO_DEPOSIT_EPOCH)


def _spec(floor: str, target: str) -> AgentSpec:
    return AgentSpec("a", "f", "t", Decimal("1"), Decimal("1"), Decimal(floor), Decimal(target), ())


@given(cents, st.sampled_from([Decimal("1"), Decimal("100"), Decimal("0.5")]))
def test_one_decision_of_needs_a_top_up_in_credits_for_observe_and_planner(balance: Decimal, rate: Decimal) -> None:
    """``observe`` reads the ledger exactly when ``needs_top_up``; the planner deposits
    ``wanted_top_up``: both are the floor/target rule on the credit amounts."""
    spec = _spec("40.00", "75.00")
    floor, target = Decimal("40.00") * rate, Decimal("75.00") * rate
    wanted = wanted_top_up(spec, balance, rate)
    assert wanted == top_up_amount(balance, floor, target)
    assert needs_top_up(spec, balance, rate) is (wanted > 0) is (balance < floor)


def test_needs_a_top_up_at_the_floor_boundary() -> None:
    spec = _spec("40.00", "75.00")
    assert not needs_top_up(spec, Decimal("4000.00"), Decimal("100"))
    assert wanted_top_up(spec, Decimal("3999.99"), Decimal("100")) == Decimal("3500.01")
