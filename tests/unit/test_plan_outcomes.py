"""The planner and unknown outcomes (pure): withheld changes, the funding epoch, finops'
automatic hold, and which live webhooks are provably finops' own."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from controller.gateway.models import Webhook
from controller.reconcile.observe import LiveAgent
from controller.state import PENDING, BudgetWrite, Hold, Intent, ManagedWebhook
from policies.funding import deposit_idempotency_key
from policies.plan_types import ChangeKind, plan_from_dict, plan_to_dict, webhook_marker
from policies.planner import Memory, make_plan, marked_owner, webhook_owners
from policies.settle import SETTLE_SECONDS, is_settled, parse_settle_seconds
from tests.unit.test_plan import WHEN, agent, budget, desired, live

D = Decimal
T0 = 1_800_000_000.0


def intent(kind: str, agent_id: str = "res-01", sent_at: float = T0) -> Intent:
    return Intent(f"{kind}:{agent_id}", kind, agent_id, {}, PENDING, "", sent_at, sent_at=sent_at)


def poor(agent_id: str = "res-01", anchor: str = "none") -> LiveAgent:
    """Below its floor (40 USD = 4000 credits), caps in place."""
    return LiveAgent(
        agent_id, exists=True, balance=D("100.00"), budget=budget("3000.00", "60000.00"), ledger_anchor=anchor
    )


def test_an_unresolved_deposit_withholds_the_top_up_and_the_plan_says_until_when() -> None:
    plan = make_plan(desired(agent("res-01")), live(poor()), Memory(unresolved=(intent("deposit"),)), now=WHEN)
    assert ChangeKind.TOP_UP not in [c.kind for c in plan.changes]
    [blocked] = plan.blocked
    assert (blocked.agent_id, blocked.kind, blocked.intent_key) == ("res-01", ChangeKind.TOP_UP, "deposit:res-01")
    assert blocked.settles_at == "2027-01-15T08:10:00+00:00"  # sent_at + 600 s
    assert plan_from_dict(plan_to_dict(plan)) == plan
    # Other agents, and other kinds of change for the same agent, are not held back.
    other = make_plan(
        desired(agent("res-01"), agent("res-02")),
        live(poor(), poor("res-02")),
        Memory(unresolved=(intent("deposit"),)),
        now=WHEN,
    )
    assert [(c.agent_id, c.kind) for c in other.changes if c.kind is ChangeKind.TOP_UP] == [
        ("res-02", ChangeKind.TOP_UP)
    ]


def test_an_unresolved_registration_withholds_registering_again() -> None:
    new = LiveAgent("res-01", exists=False, ledger_anchor="none")
    assert make_plan(desired(agent("res-01")), live(new), Memory(), now=WHEN).changes[0].kind is ChangeKind.REGISTER
    plan = make_plan(desired(agent("res-01")), live(new), Memory(unresolved=(intent("register"),)), now=WHEN)
    assert plan.changes == () and [b.kind for b in plan.blocked] == [ChangeKind.REGISTER]


def test_rotations_and_undeclared_agents_block_nothing_here() -> None:
    memory = Memory(unresolved=(intent("rotate"), intent("deposit", "someone-else")))
    plan = make_plan(desired(agent("res-01")), live(poor()), memory, now=WHEN)
    assert ChangeKind.TOP_UP in [c.kind for c in plan.changes] and plan.blocked == ()


@given(spent=st.decimals(min_value=0, max_value=3000, places=2), bonus_row=st.integers(min_value=1, max_value=10**6))
def test_the_deposit_key_is_the_epochs_whatever_the_balance_or_unrelated_rows_did(
    spent: Decimal, bonus_row: int
) -> None:
    """Registering (the bonus row lands) and spending (charge rows) change the balance and
    the ledger, never the key of the pending funding decision."""
    before = make_plan(
        desired(agent("res-01")), live(LiveAgent("res-01", exists=False, ledger_anchor="none")), Memory(), now=WHEN
    )
    after = make_plan(
        desired(agent("res-01")),
        live(LiveAgent("res-01", exists=True, balance=D("500.00") - spent, budget=None, ledger_anchor="none")),
        Memory(),
        now=WHEN,
    )
    key = {c.args.idempotency_key for p in (before, after) for c in p.changes if c.kind is ChangeKind.TOP_UP}
    assert key == {deposit_idempotency_key("research", "res-01", "none")}


def test_finops_own_record_of_its_last_deposit_keeps_the_epoch_when_the_ledger_row_scrolled_away() -> None:
    seen = make_plan(desired(agent("res-01")), live(poor(anchor="41")), Memory(), now=WHEN)
    scrolled = make_plan(
        desired(agent("res-01")), live(poor(anchor="none")), Memory(last_deposits={"res-01": 41}), now=WHEN
    )
    keys = [c.args.idempotency_key for p in (seen, scrolled) for c in p.changes if c.kind is ChangeKind.TOP_UP]
    assert keys == [deposit_idempotency_key("research", "res-01", "41")] * 2


def test_an_automatic_hold_sets_the_declared_caps_and_funds_nothing() -> None:
    hold = Hold("res-01", "auto: caps could not be set after registration", T0, auto=True)
    uncapped = LiveAgent("res-01", exists=True, balance=D("500.00"), budget=None, ledger_anchor="none")
    plan = make_plan(desired(agent("res-01")), live(uncapped), Memory(holds={"res-01": hold}), now=WHEN)
    [change] = plan.changes
    assert (
        change.kind is ChangeKind.SET_BUDGET and str(change.args.daily_cap) == "3000.00"
    )  # not 0: an operator's would be
    assert [(h.agent_id, h.auto) for h in plan.held] == [("res-01", True)]
    # Caps already in place: a confirming write still comes, whose success lifts the hold.
    written = {"res-01": BudgetWrite(D("3000.00"), D("60000.00"), D("0.75"))}
    [confirm] = make_plan(
        desired(agent("res-01")), live(poor()), Memory(holds={"res-01": hold}, budget_writes=written), now=WHEN
    ).changes
    assert confirm.kind is ChangeKind.SET_BUDGET and confirm.diff == ()


def test_an_operator_hold_still_keeps_caps_at_zero() -> None:
    hold = Hold("res-01", "incident", T0)
    [change] = make_plan(desired(agent("res-01")), live(poor()), Memory(holds={"res-01": hold}), now=WHEN).changes
    assert str(change.args.daily_cap) == "0.00"


def hook(hook_id: str, events: tuple[str, ...], agents: tuple[str, ...] | None) -> Webhook:
    return Webhook(hook_id, "https://x.example/h", events, agents, "secret", "")


def test_only_a_marked_webhook_filtered_to_exactly_one_declared_agent_of_that_fleet_is_finops() -> None:
    fleet_of = {"a": "research", "b": "support"}
    mark = webhook_marker("research")
    assert marked_owner(hook("1", ("x", mark), ("a",)), fleet_of) == "a"
    assert marked_owner(hook("2", ("x",), ("a",)), fleet_of) is None  # unmarked
    assert marked_owner(hook("3", (mark,), ("a", "b")), fleet_of) is None  # two agents
    assert marked_owner(hook("4", (mark,), None), fleet_of) is None  # every agent
    assert marked_owner(hook("5", (mark,), ("b",)), fleet_of) is None  # b is in another fleet
    assert marked_owner(hook("6", (mark,), ("zed",)), fleet_of) is None  # undeclared
    recorded = {"7": ManagedWebhook("7", "zed", "research", "https://x.example/h")}
    owners = webhook_owners([hook("1", (mark,), ("a",)), hook("7", (mark,), ("zed",))], recorded, fleet_of)
    assert {k: v.agent_id for k, v in owners.items()} == {"1": "a", "7": "zed"}  # state keeps undeclared ones prunable


def test_settle_time_rules() -> None:
    assert SETTLE_SECONDS > 30 + 5 * 10  # the gateway's handler limit plus the client's worst case
    assert not is_settled(T0, T0 + SETTLE_SECONDS) and is_settled(T0, T0 + SETTLE_SECONDS + 0.001)
    assert parse_settle_seconds(" 0 ") == 0
    for bad in ("-1", "soon", "nan", "1e9"):
        try:
            parse_settle_seconds(bad)
        except ValueError as exc:
            assert "FINOPS_SETTLE_SECONDS" in str(exc)
        else:
            raise AssertionError(bad)
