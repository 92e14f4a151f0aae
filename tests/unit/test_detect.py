"""``policies.detect``: the pure decisions behind ``finops status``' findings."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from controller.gateway.client import _snapshot_balance
from controller.state import DONE, PENDING
from policies.detect import (
    INTENT_DONE,
    INTENT_PENDING,
    LOOKBACK_SECONDS,
    DepositOrigin,
    DuplicateWebhooks,
    LedgerCredit,
    NotChecked,
    OwnFunding,
    classify_deposit,
    duplicate_marked_webhooks,
    is_finops_key,
    key_verified,
    own_funding,
    unexplained_balance,
    unledgered_credits,
    unrecognised_deposits,
    unresolved_intents,
)
from policies.funding import NO_DEPOSIT_EPOCH, deposit_idempotency_key
from policies.funding_window import bonus_ref
from policies.live import Webhook
from policies.money import CENT, format_money
from policies.plan_types import webhook_marker
from policies.records import Intent, ManagedWebhook

NOW = 1_800_000_000.0
KEY = deposit_idempotency_key("fleet", "a", NO_DEPOSIT_EPOCH)

cents = st.integers(min_value=1, max_value=10**9).map(lambda n: Decimal(n).scaleb(-2))
ids = st.integers(min_value=1, max_value=10**6)
recent = st.floats(min_value=NOW - LOOKBACK_SECONDS + 1, max_value=NOW + 60)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


def row(
    id: int,
    amount: str | Decimal,
    *,
    key: str | None = None,
    tx: str = "deposit",
    at: float | None = NOW - 60,
    new_balance: str | Decimal | None = None,
) -> LedgerCredit:
    nb = Decimal(new_balance) if new_balance is not None else None
    return LedgerCredit(id, Decimal(amount), tx, key, at, nb)


def intent(kind: str, agent: str, key: str, *, status: str = "done", ref: str | None = None) -> Intent:
    return Intent(key, kind, agent, {}, status, "", NOW - 100, NOW - 100, ref)


# --------------------------------------------------------------------------- keys


@given(names, names, st.one_of(st.just(NO_DEPOSIT_EPOCH), ids.map(str)))
def test_every_derived_deposit_key_has_finops_shape_and_verifies(fleet: str, agent: str, epoch: str) -> None:
    key = deposit_idempotency_key(fleet, agent, epoch)
    assert is_finops_key(key)
    epochs = [int(epoch)] if epoch != NO_DEPOSIT_EPOCH else []
    assert key_verified(key, fleet, agent, epochs)
    assert not key_verified(key, fleet + "x", agent, epochs)
    assert not key_verified(key, fleet, agent + "x", epochs)


def test_near_misses_are_not_finops_keys() -> None:
    assert not is_finops_key(None)
    assert not is_finops_key(KEY.upper())
    assert not is_finops_key(KEY[:-1])
    assert not is_finops_key(KEY + "0")
    assert not is_finops_key(KEY + "\n")


# --------------------------------------------------------------------------- deposits


def test_classification() -> None:
    own = OwnFunding(keys=frozenset({KEY}), ledger_ids=frozenset({10}), covers_from=10)
    other = deposit_idempotency_key("fleet", "a", "10")
    assert classify_deposit(row(10, "5.00"), own) is DepositOrigin.OWN  # by ref
    assert classify_deposit(row(99, "5.00", key=KEY), own) is DepositOrigin.OWN  # by key (pending intent)
    assert classify_deposit(row(11, "5.00", key=other), own) is DepositOrigin.FINOPS_OTHER_STATE
    assert classify_deposit(row(9, "5.00", key=other), own) is DepositOrigin.FINOPS_UNRECORDED  # before this state
    assert classify_deposit(row(11, "5.00", key=other), OwnFunding()) is DepositOrigin.FINOPS_UNRECORDED  # fresh
    assert classify_deposit(row(11, "5.00"), own) is DepositOrigin.FOREIGN
    assert classify_deposit(row(11, "5.00", key="anything"), OwnFunding()) is DepositOrigin.FOREIGN


@given(st.lists(st.tuples(ids, cents, st.booleans()), max_size=30, unique_by=lambda t: t[0]))
def test_a_fresh_state_never_flags_finops_keyed_deposits_and_always_flags_the_rest(
    rows: list[tuple[int, Decimal, bool]],
) -> None:
    ledger = [
        row(i, amount, key=deposit_idempotency_key("f", "a", str(i - 1)) if ours else None) for i, amount, ours in rows
    ]
    found = unrecognised_deposits("a", "f", ledger, OwnFunding(), NOW)
    assert {d.ledger_id for d in found} == {i for i, _, ours in rows if not ours}
    assert all(d.origin is DepositOrigin.FOREIGN and d.finops_key is None for d in found)
    # A state that registered the agent knows every finops deposit to it: the rest is another finops'.
    covering = OwnFunding(covers_from=0)
    flagged = unrecognised_deposits("a", "f", ledger, covering, NOW)
    assert {d.ledger_id for d in flagged} == {i for i, _, _ in rows}
    assert [d.ledger_id for d in flagged] == sorted(d.ledger_id for d in flagged)


def test_the_signup_bonus_other_credits_and_old_rows_are_not_flagged_deposits() -> None:
    ledger = [
        row(1, "500.00", tx="signup_bonus"),
        row(2, "3.00", tx="payment_received"),
        row(3, "4.00", at=NOW - LOOKBACK_SECONDS - 1),
        row(4, "-2.00", tx="withdrawal"),
        row(5, "7.00", tx="auto_reload"),
    ]
    found = unrecognised_deposits("a", "f", ledger, OwnFunding(covers_from=0), NOW)
    assert [(d.ledger_id, d.tx_type) for d in found] == [(5, "auto_reload")]


def test_a_row_without_a_readable_time_counts() -> None:
    [found] = unrecognised_deposits("a", "f", [row(3, "4.00", at=None)], OwnFunding(), NOW)
    assert found.at is None and found.to_dict(Decimal(100), "USD")["at"] is None


def test_own_funding_from_state_records() -> None:
    intents = [
        intent("deposit", "a", "k-pending", status="pending"),
        intent("deposit", "b", "k-b", status="pending"),
        intent("register", "b", "register:b"),
        intent("register", "a", "register:a", status="abandoned"),  # someone else registered a
    ]
    before, after = deposit_idempotency_key("f", "a", "1"), deposit_idempotency_key("f", "a", "50")
    rows = [
        row(60, "1.00", key=after),
        row(50, "1.00", key="k-pending"),
        row(45, "1.00", key="k-recent"),
        row(30, "1.00", key=before),
    ]
    a = own_funding("a", intents=intents, funding_refs=["k-recent", bonus_ref("a")], last_deposit_id=45, rows=rows)
    assert a == OwnFunding(frozenset({"k-pending", "k-recent", bonus_ref("a")}), frozenset({45}), 45)
    assert [classify_deposit(r, a) for r in rows] == [
        DepositOrigin.FINOPS_OTHER_STATE,  # after this state's first deposit to a: another finops'
        DepositOrigin.OWN,
        DepositOrigin.OWN,
        DepositOrigin.FINOPS_UNRECORDED,  # before it: this state cannot know
    ]
    # Its newest landed deposit is older than every row read: it covers the whole window.
    old = own_funding("a", intents=[], funding_refs=[], last_deposit_id=7, rows=rows)
    assert old.covers_from == 7
    assert own_funding("b", intents=intents, funding_refs=[], last_deposit_id=None, rows=rows).covers_from == 0
    assert own_funding("c", intents=intents, funding_refs=[], last_deposit_id=None, rows=rows) == OwnFunding()


def test_intent_status_values_match_the_state_store() -> None:
    assert (INTENT_PENDING, INTENT_DONE) == (PENDING, DONE)


# --------------------------------------------------------------------------- balance

target_st = st.integers(min_value=0, max_value=10**7).map(lambda n: Decimal(n).scaleb(-2))


class Sim:
    """A wallet and its ledger, moved by events, as the gateway books them: every row's
    snapshot (keyed deposits) is the balance it left, and ``later_sum`` is exact."""

    def __init__(self, balance: Decimal, target: Decimal) -> None:
        self.balance, self.target = balance, target
        self.rows: list[tuple[int, Decimal, str, str | None, Decimal | None]] = []
        self.injected = {"foreign": Decimal(0), "dup": Decimal(0)}

    def _row(self, amount: Decimal, tx: str, key: str | None = None, *, snapshot: bool = False) -> None:
        self.balance += amount
        self.rows.append((len(self.rows) + 1, amount, tx, key, self.balance if snapshot else None))

    def step(self, event: str, x: Decimal) -> None:
        want = self.target - self.balance
        key = deposit_idempotency_key("f", "a", str(len(self.rows)))
        if event == "spend" and x <= self.balance:
            self._row(-x, "charge")
        elif event == "topup" and want > 0:
            self._row(want, "deposit", key, snapshot=True)
        elif event == "bonus":
            self._row(Decimal("500.00"), "signup_bonus")
        elif event == "foreign":
            self._row(x, "deposit")
            self.injected["foreign"] += x
        elif event == "dup" and want > 0:  # two finops, one key, both credited, one row
            first = x > 1
            if not first:
                self.balance += want
            self._row(want, "deposit", key, snapshot=True)
            if first:
                self.balance += want
            self.injected["dup"] += want

    def ledger(self) -> list[LedgerCredit]:
        out, later_sum, later_rows = [], Decimal(0), 0
        for id, amount, tx, key, nb in reversed(self.rows):
            if amount > 0:
                out.append(LedgerCredit(id, amount, tx, key, NOW - 60, nb, later_sum, later_rows))
            later_sum, later_rows = later_sum + amount, later_rows + 1
        return out


events = st.lists(st.tuples(st.sampled_from(["spend", "topup", "bonus", "foreign", "dup"]), cents), max_size=25)


@given(target_st, target_st, events)
def test_finops_own_top_ups_spend_and_the_bonus_explain_any_balance(
    start: Decimal, target: Decimal, steps: list[tuple[str, Decimal]]
) -> None:
    """finops tops up *to* the target: however its top-ups, spend and the signup bonus
    interleave, and whatever the balance started at, nothing is unexplained."""
    sim = Sim(start, target)
    for event, x in steps:
        if event in ("spend", "topup", "bonus"):
            sim.step(event, x)
    ledger = sim.ledger()
    keys = frozenset(r.idempotency_key for r in ledger if r.idempotency_key)
    for own in (OwnFunding(), OwnFunding(keys=keys), OwnFunding(keys=keys, covers_from=0)):
        assert unexplained_balance("a", sim.balance, target, ledger, own, NOW) is None


@given(target_st, target_st, events, st.booleans())
def test_money_from_elsewhere_or_moved_without_a_row_is_found_and_bounded_by_the_excess(
    start: Decimal, target: Decimal, steps: list[tuple[str, Decimal]], complete: bool
) -> None:
    sim = Sim(start, target)
    for event, x in steps:
        sim.step(event, x)
    ledger = sim.ledger()
    found = unexplained_balance("a", sim.balance, target, ledger, OwnFunding(), NOW, complete=complete)
    unledgered = unledgered_credits(sim.balance, [r for r in ledger if r.new_balance is not None])
    dup, foreign = sim.injected["dup"], sim.injected["foreign"]
    assert unledgered <= dup
    # A duplicate credit shows either as money no row explains, or (when the row's snapshot
    # already includes it) as a finops-keyed deposit that landed above the target.
    tolerance = CENT * (len(sim.rows) + 1) * sum(1 for e, _ in steps if e == "dup")
    excess = sim.balance - target
    if found is None:
        assert excess <= 0 or (foreign == 0 and dup <= tolerance)
        return
    assert found.unexplained >= min(excess, foreign + dup - tolerance)
    assert 0 < found.unexplained <= found.excess == sim.balance - target
    assert found.other_credits == sim.injected["foreign"] and found.unledgered == unledgered
    assert found.complete == complete
    as_dict = found.to_dict(Decimal(100), "USD")
    json.dumps(as_dict)
    assert as_dict["unexplained_credits"] == format_money(found.unexplained)


@given(target_st, target_st, events, cents)
def test_a_foreign_deposit_on_a_funded_wallet_is_unexplained_in_full(
    start: Decimal, target: Decimal, steps: list[tuple[str, Decimal]], amount: Decimal
) -> None:
    sim = Sim(start, target)
    for event, x in steps:
        sim.step(event, x)
    sim.step("topup", Decimal(0))  # funded: at or above the target
    sim.step("foreign", amount)
    found = unexplained_balance("a", sim.balance, target, sim.ledger(), OwnFunding(), NOW)
    assert found is not None and found.unexplained >= amount


@given(target_st, cents, cents)
def test_rows_older_than_the_lookback_explain_nothing_and_flag_nothing(
    target: Decimal, excess: Decimal, amount: Decimal
) -> None:
    old = [
        row(1, amount, at=NOW - LOOKBACK_SECONDS),
        row(2, amount, key=KEY, new_balance=target + amount, at=NOW - LOOKBACK_SECONDS - 5),
    ]
    assert unexplained_balance("a", target + excess, target, old, OwnFunding(covers_from=0), NOW) is None
    assert unrecognised_deposits("a", "f", old, OwnFunding(covers_from=0), NOW) == []


def test_the_measured_double_funding() -> None:
    """Two deposits 18 ms apart with different keys: 10 → 75, then 75 → 140 (target 75)."""
    first = deposit_idempotency_key("f", "a", NO_DEPOSIT_EPOCH)
    second = deposit_idempotency_key("f", "a", "1")
    ledger = [
        row(2, "65.00", key=second, new_balance="140.00", at=NOW - 10.0),
        replace(row(1, "65.00", key=first, new_balance="75.00", at=NOW - 10.018), later_sum=Decimal(65), later_rows=1),
    ]
    # The state that made the first deposit: the second is another finops'.
    made_first = OwnFunding(frozenset({first}), frozenset({1}), 1)
    [other] = unrecognised_deposits("a", "f", ledger, made_first, NOW)
    assert (other.ledger_id, other.origin, other.key_verified) == (2, DepositOrigin.FINOPS_OTHER_STATE, True)
    for own in (made_first, OwnFunding(frozenset({second}), frozenset({2}), 2), OwnFunding()):
        found = unexplained_balance("a", Decimal("140.00"), Decimal("75.00"), ledger, own, NOW)
        assert found is not None and found.unexplained == Decimal("65.00"), own
    msg = found.message(Decimal(100), "USD")
    assert "65.00 credits (0.65 USD) of it is not explained" in msg


# --------------------------------------------------------------------------- webhooks


def hook(id: str, events: tuple[str, ...], agents: tuple[str, ...] | None) -> Webhook:
    return Webhook(id, "https://h.example.com/x", events, agents, "s" * 16, "2026-01-01T00:00:00+00:00")


def test_duplicate_marked_webhooks() -> None:
    mark = webhook_marker("research")
    hooks = [
        hook("whk-1", (mark, "billing.deposit"), ("a",)),
        hook("whk-2", (webhook_marker("other"),), ("a",)),  # another fleet's marker: still finops'
        hook("whk-3", ("billing.deposit",), ("b",)),  # unmarked: not finops'
        hook("whk-4", (mark,), ("b",)),
        hook("whk-5", (mark,), ("b", "c")),  # filtered to two agents, not recorded: for neither
        hook("whk-6", (mark,), None),  # recorded in state for c
        hook("whk-7", (mark,), ("c",)),
    ]
    managed = {"whk-6": ManagedWebhook("whk-6", "c", "research", "https://h.example.com/x")}
    assert duplicate_marked_webhooks(hooks, managed) == [
        DuplicateWebhooks("a", ("whk-1", "whk-2")),
        DuplicateWebhooks("c", ("whk-6", "whk-7")),
    ]
    assert duplicate_marked_webhooks(hooks[:1] + hooks[3:4], {}) == []


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=12))
def test_an_agent_is_flagged_exactly_when_it_has_two_or_more_marked_hooks(spec: list[tuple[str, bool]]) -> None:
    hooks = [
        hook(f"whk-{i}", (webhook_marker("f"),) if marked else ("x",), (agent,))
        for i, (agent, marked) in enumerate(spec)
    ]
    found = {d.agent_id: len(d.webhook_ids) for d in duplicate_marked_webhooks(hooks, {})}
    counts: dict[str, int] = {}
    for agent, marked in spec:
        counts[agent] = counts.get(agent, 0) + int(marked)
    assert found == {a: n for a, n in counts.items() if n > 1}


# --------------------------------------------------------------------------- intents


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["deposit", "register", "create_webhook", "rotate"]),
            st.sampled_from(["pending", "done", "abandoned", "failed"]),
            st.floats(min_value=0, max_value=10 * 86_400),
            st.one_of(st.none(), st.floats(min_value=0, max_value=10 * 86_400)),
        ),
        max_size=15,
    ),
    st.floats(min_value=0, max_value=86_400),
)
def test_unresolved_intents_are_every_pending_one_with_age_and_settle_state(
    rows: list[tuple[str, str, float, float | None]], settle: float
) -> None:
    intents = [
        Intent(f"k{i}", kind, "a", {}, status, "", NOW - age, None if sent is None else NOW - sent)
        for i, (kind, status, age, sent) in enumerate(rows)
    ]
    found = unresolved_intents(intents, NOW, settle)
    assert len(found) == sum(1 for _, status, _, _ in rows if status == "pending")
    for u in found:
        assert u.age_seconds >= 0
        assert u.past_settle == (NOW - u.sent_at > settle)
        text = u.message(Decimal(1), "CREDITS")
        assert text.startswith("ROTATION INTERRUPTED" if u.intent_kind == "rotate" else "UNKNOWN OUTCOME")
        assert ("past its settle time" in text) == u.past_settle
        json.dumps(u.to_dict(Decimal(1), "CREDITS"))
    assert [u.created_at for u in found] == sorted(u.created_at for u in found)
    assert unresolved_intents(intents, NOW, settle, agents=()) == []


def test_not_checked_is_a_finding_with_its_reason() -> None:
    finding = NotChecked("a", "ledger", "503 from the gateway")
    assert finding.to_dict(Decimal(1), "CREDITS")["kind"] == "not-checked"
    assert "ledger could not be read (503 from the gateway)" in finding.message(Decimal(1), "CREDITS")


# --------------------------------------------------------------------------- the gateway's snapshot


def test_snapshot_balance_is_read_when_present_and_ignored_when_odd() -> None:
    assert _snapshot_balance('{"new_balance": "140.00"}') == Decimal("140.00")
    assert _snapshot_balance({"new_balance": 140.0}) == Decimal("140.00")
    for odd in (None, "", "not json", "[]", '{"new_balance": "abc"}', '{"other": 1}', 5, "[" * 3000, "[" * 5000):
        assert _snapshot_balance(odd) is None
