"""The rolling funding window and the unexplained-outflow allowance are pure: property tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.state import StateStore
from policies.funding_window import (
    WINDOW_SECONDS,
    ChargeTotal,
    FundingEvent,
    FundingKind,
    FundingRequest,
    LedgerRow,
    allocate,
    bonus_ref,
    ledger_funding,
    matters,
    outflow_allowance,
    parse_ledger_time,
    unexplained_outflow,
    used_in_window,
)

D = Decimal
cents = st.integers(min_value=0, max_value=1_000_000).map(lambda c: D(c) / 100)
requests = st.lists(
    st.builds(
        FundingRequest,
        agent_id=st.sampled_from(["a", "b", "c", "d"]),
        kind=st.sampled_from(list(FundingKind)),
        credits=cents,
        divisible=st.booleans(),
    ),
    max_size=12,
)


@given(limit=cents, used=cents, reqs=requests)
def test_allocation_never_exceeds_what_is_left_of_the_limit(limit: D, used: D, reqs: list[FundingRequest]) -> None:
    grants = allocate(limit, used, reqs)
    assert len(grants) == len(reqs)
    assert sum(grants, D(0)) <= max(D(0), limit - used)
    for req, grant in zip(reqs, grants, strict=True):
        assert D(0) <= grant <= req.credits
        assert grant == grant.quantize(D("0.01"))
        if not req.divisible:
            assert grant in (D(0), req.credits)  # a signup bonus is all or nothing


@given(limit=cents, used=cents, reqs=requests)
def test_a_waiting_registration_holds_back_the_rest_of_that_agent(
    limit: D, used: D, reqs: list[FundingRequest]
) -> None:
    grants = allocate(limit, used, reqs)
    waiting: set[str] = set()
    for req, grant in zip(reqs, grants, strict=True):
        if req.agent_id in waiting:
            assert grant == 0
        if not req.divisible and grant == 0 and req.credits > 0:
            waiting.add(req.agent_id)


def test_allocation_is_greedy_in_plan_order_and_cuts_a_top_up_to_what_is_left() -> None:
    reqs = [
        FundingRequest("a", FundingKind.DEPOSIT, D("30.00"), divisible=True),
        FundingRequest("b", FundingKind.SIGNUP_BONUS, D("500.00"), divisible=False),
        FundingRequest("b", FundingKind.DEPOSIT, D("1.00"), divisible=True),
        FundingRequest("c", FundingKind.DEPOSIT, D("50.00"), divisible=True),
    ]
    assert allocate(D("100.00"), D("25.00"), reqs) == [D("30.00"), D(0), D(0), D("45.00")]


passes = st.lists(
    st.tuples(st.integers(min_value=0, max_value=3 * WINDOW_SECONDS // 2), requests), min_size=1, max_size=25
)


@settings(max_examples=500)
@given(limit=cents, steps=passes)
def test_any_sequence_of_passes_stays_within_the_limit_in_every_24_h_window(
    limit: D, steps: list[tuple[int, list[FundingRequest]]]
) -> None:
    """A daemon planning pass after pass (any spacing, any needs), recording what it put in,
    never has more than ``limit`` in any rolling 24 h window."""
    now = 1_800_000_000.0
    events: list[FundingEvent] = []
    for gap, reqs in steps:
        now += gap
        grants = allocate(limit, used_in_window(events, now), reqs)
        for grant in grants:
            if grant:  # every deposit has its own key (a reused key moves no money)
                events.append(FundingEvent(f"k{len(events)}", "a", "f", FundingKind.DEPOSIT, grant, now))
    for end in {e.at for e in events}:  # the windows ending at an event are the fullest ones
        inside = [e.credits for e in events if end - WINDOW_SECONDS < e.at <= end]
        assert sum(inside, D(0)) <= limit


def test_an_event_counts_for_exactly_24_h() -> None:
    event = FundingEvent("k", "a", "f", FundingKind.DEPOSIT, D("10.00"), 1000.0)
    assert used_in_window([event], 1000.0) == D("10.00")
    assert used_in_window([event], 1000.0 + WINDOW_SECONDS - 0.001) == D("10.00")
    assert used_in_window([event], 1000.0 + WINDOW_SECONDS) == D(0)
    assert used_in_window([event], 999.0) == D("10.00")  # stamped in the future (skew): counts


@given(at=st.floats(min_value=0, max_value=4e9, allow_nan=False), age=st.floats(min_value=0, max_value=3e5))
def test_ageing_out_is_exact_for_any_time(at: float, age: float) -> None:
    event = FundingEvent("k", "a", "f", FundingKind.DEPOSIT, D("1.00"), at)
    now = at + age
    assert (used_in_window([event], now) == D("1.00")) == (at > now - WINDOW_SECONDS)


def test_one_credit_seen_twice_counts_once() -> None:
    """finops' record and the ledger row of the same deposit share the idempotency key."""
    ours = FundingEvent("finops-topup-1", "a", "f", FundingKind.DEPOSIT, D("20.00"), 100.0)
    ledger = FundingEvent("finops-topup-1", "a", "f", FundingKind.DEPOSIT, D("20.00"), 101.0)
    other = FundingEvent(bonus_ref("a"), "a", "f", FundingKind.SIGNUP_BONUS, D("500.00"), 90.0)
    assert used_in_window([ours, ledger, other], 200.0) == D("520.00")


NOW = 1_800_000_000.0


def row(amount: str, tx_type: str, *, age: float = 60.0, key: str | None = None) -> LedgerRow:
    return LedgerRow(D(amount), tx_type, key, NOW - age)


def test_unexplained_outflow_is_every_debit_but_metered_spend_within_24_h() -> None:
    rows = [
        row("-30.00", "withdrawal"),
        row("-12.50", "payment"),
        row("-0.10", "charge"),  # metered spend: explained
        row("40.00", "deposit", key="finops-topup-x"),
        row("-99.00", "withdrawal", age=WINDOW_SECONDS + 1),  # aged out
        LedgerRow(D("-1.00"), "withdrawal", None, None),  # unreadable time: counted (safe side)
    ]
    assert unexplained_outflow(rows, NOW) == D("43.50")
    assert [matters(r) for r in rows[:3]] == [True, True, False]  # observation drops charges


def test_the_ledger_shows_finops_deposits_and_the_signup_bonus() -> None:
    rows = [
        row("20.00", "deposit", key="finops-topup-abc"),
        row("20.00", "deposit", key="someone-else"),
        row("500.00", "signup_bonus"),
        row("-5.00", "withdrawal"),
        LedgerRow(D("7.00"), "deposit", "finops-topup-notime", None),
    ]
    events = ledger_funding("a", "f", rows)
    assert {(e.ref, e.kind, e.credits) for e in events} == {
        ("finops-topup-abc", FundingKind.DEPOSIT, D("20.00")),
        (bonus_ref("a"), FundingKind.SIGNUP_BONUS, D("500.00")),
    }


def test_gateway_timestamps_parse_and_garbage_is_unknown() -> None:
    assert parse_ledger_time("2027-01-15T08:00:00+00:00") == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_ledger_time("2027-01-15T09:00:00+01:00") == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_ledger_time("2026-11-29T00:00:00Z") == parse_ledger_time("2026-11-29T00:00:00+00:00")
    assert parse_ledger_time("2026-11-29T00:00:00") is None  # no zone: ambiguous
    assert parse_ledger_time("yesterday") is None


@given(
    limit=cents,
    balance=cents,
    target=cents,
    cycles=st.integers(min_value=1, max_value=30),
)
def test_refills_to_an_agent_that_drains_every_refill_add_up_to_at_most_its_limit(
    limit: D, balance: D, target: D, cycles: int
) -> None:
    """The worst case: the agent withdraws everything after each refill. Whatever its target,
    finops refills it by at most ``maxUnexplainedPerDay`` in total within the window."""
    unexplained = D(0)
    refilled = D(0)
    for _ in range(cycles):
        unexplained += balance  # drained
        want = target
        grant = min(want, outflow_allowance(limit, unexplained))
        refilled += grant
        balance = grant
    assert refilled <= limit


def test_state_counts_an_unknown_deposit_until_it_is_proven_not_to_have_landed(tmp_path: Path) -> None:
    clock = [NOW]
    store = StateStore(tmp_path / "state.db", clock=lambda: clock[0])
    store.note_funding("k1", "a", "f", FundingKind.DEPOSIT, D("20.00"), landed=False)
    store.note_funding(bonus_ref("b"), "b", "f", FundingKind.SIGNUP_BONUS, D("500.00"), landed=True)
    assert used_in_window(store.funding_events(), NOW) == D("520.00")
    clock[0] += 10
    store.note_funding("k1", "a", "f", FundingKind.DEPOSIT, D("20.00"), landed=True)
    store.release_funding("k1")  # landed: never forgotten
    store.release_funding(bonus_ref("b"))
    [first, _bonus] = sorted(store.funding_events(), key=lambda e: e.ref)
    assert first.at == NOW  # the window runs from the first attempt
    assert used_in_window(store.funding_events(), NOW + 10) == D("520.00")
    store.note_funding("k2", "a", "f", FundingKind.DEPOSIT, D("5.00"), landed=False)
    store.release_funding("k2")  # proven never landed
    assert used_in_window(store.funding_events(), NOW + 10) == D("520.00")
    assert store.funding_events(now=NOW + WINDOW_SECONDS) == []
    store.close()


def test_charges_beyond_metered_spend_are_unexplained() -> None:
    """The gateway charges every call that reuses an X-Request-ID but meters it once."""
    honest = ChargeTotal(credits=D("12.34"), rows=3, metered_spend=D("12.3456"))
    assert honest.excess == 0  # per-row cent rounding is tolerated
    quirk = ChargeTotal(credits=D("50.00"), rows=5, metered_spend=D("10.00"))
    assert quirk.excess == D("39.95")
    assert unexplained_outflow([row("-30.00", "withdrawal")], NOW, quirk) == D("69.95")
