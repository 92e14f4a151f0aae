"""Every repository behaves the same on both state backends: the embedded SQLite file and a
real PostgreSQL server (``pg_url``: a fresh database per test). One set of scenarios, run on
each; what only PostgreSQL has (schema lock, newer-schema refusal, reconnect) is below."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from controller.alerting.store import PENDING as ALERT_PENDING
from controller.alerting.store import AlertStore
from controller.daemon.revisions import APPLIED, INVALID, RevisionLog
from controller.keys.store import KeyLedger
from controller.state import (
    DONE,
    PENDING,
    SCHEMA_VERSION,
    Adjustment,
    BudgetWrite,
    ManagedWebhook,
    SchemaTooNew,
    StateStore,
)
from controller.state.db import StateUnavailable, connect
from controller.state.location import StateLocation, check_state_url, redact_url
from policies.alerts import SlotKey, SlotState
from policies.escalation import ACTIVE, OPEN, RELEASED, Escalation, LadderDecision
from policies.exposure import Exposure
from policies.funding_window import FundingKind
from policies.spec import SecretRef


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateLocation]:
    if request.param == "sqlite":
        yield StateLocation(tmp_path / "state.db")
    else:
        yield StateLocation(tmp_path / "state.db", url=request.getfixturevalue("pg_url"))


def test_intents_budget_writes_holds_webhooks_adjustments(location: StateLocation) -> None:
    clock = Clock(1_000.0)
    store = StateStore(location, clock=clock)
    try:
        store.begin_intent("deposit:a:1", "deposit", "a", {"amount": "5.00"})
        store.begin_intent("deposit:a:2", "deposit", "a", {"amount": "6.00"}, sent_at=990.5)
        store.mark_sent("deposit:a:1", 1_001.25)
        assert [(i.intent_key, i.sent_at) for i in store.intents(status=PENDING)] == [
            ("deposit:a:1", 1_001.25),
            ("deposit:a:2", 990.5),
        ]
        store.finish_intent("deposit:a:1", DONE, "landed", ref="17")
        store.finish_intent("deposit:a:2", DONE, "landed", ref="9")
        assert store.last_deposit_ids() == {"a": 17}
        payloads = [i.payload for i in store.intents(kind="deposit", status=DONE)]
        assert payloads == [{"amount": "5.00"}, {"amount": "6.00"}]

        store.record_budget_write("a", BudgetWrite(Decimal("30.00"), None, Decimal("0.75")))
        store.record_budget_write("a", BudgetWrite(Decimal("35.00"), Decimal("900.00"), Decimal("0.75")))
        assert store.budget_writes() == {"a": BudgetWrite(Decimal("35.00"), Decimal("900.00"), Decimal("0.75"))}

        store.set_hold("a", "auto: uncapped", auto=True)
        store.set_hold("a", "operator", auto=False)
        store.set_hold("a", "auto again", auto=True)  # never replaces an operator's hold
        assert store.holds()["a"].reason == "operator" and not store.holds()["a"].auto
        assert store.clear_auto_hold("a") is False and store.clear_hold("a") is True and store.holds() == {}
        store.set_hold("b", "pasted a2a_free_" + "0123456789abcdef01234567" + " by mistake")
        assert "0123456789abcdef" not in store.holds()["b"].reason  # never stored, never printed

        store.record_webhook(ManagedWebhook("wh1", "a", "f", "https://x/1"))
        store.record_webhook(ManagedWebhook("wh1", "a", "f", "https://x/2"))  # replaced, not duplicated
        assert store.managed_webhooks() == {"wh1": ManagedWebhook("wh1", "a", "f", "https://x/2")}
        store.forget_webhook("wh1")
        assert store.managed_webhooks() == {}

        store.replace_adjustments("f", [Adjustment("a", "f", Decimal("-1.50"), "idle", 1.0)])
        store.replace_adjustments("f", [Adjustment("b", "f", Decimal("2.25"), "busy", 2.0)])
        assert store.adjustments() == {"b": Adjustment("b", "f", Decimal("2.25"), "busy", 2.0)}

        store.record_key("a", "a2a_test_aaaa", "register")
        assert store.key_prefixes() == {"a": "a2a_test_aaaa"}
        store.log_apply(999.0, True, {"writes": 3})
    finally:
        store.close()


def test_funding_events_approvals_and_bundles(location: StateLocation) -> None:
    clock = Clock(100_000.0)
    store = StateStore(location, clock=clock)
    try:
        store.note_funding("dep:1", "a", "f", FundingKind.DEPOSIT, Decimal("10.00"), landed=False)
        clock.now += 5
        store.note_funding("dep:1", "a", "f", FundingKind.DEPOSIT, Decimal("10.00"), landed=True)
        store.note_funding("dep:2", "a", "f", FundingKind.DEPOSIT, Decimal("3.00"), landed=False)
        store.release_funding("dep:2")
        store.release_funding("dep:1")  # a landed credit is never forgotten
        events = store.funding_events()
        assert [(e.ref, e.credits, e.at) for e in events] == [("dep:1", Decimal("10.00"), 100_000.0)]

        after = Exposure.from_dict({"fleets": []})
        store.record_approval("rev1", "dir", how="approve", by_key="sha3:ab", by_user="ops", before=None, after=after)
        store.record_approval("rev2", "dir", how="approve", by_key="sha3:ab", by_user="ops", before=after, after=after)
        assert [a.revision for a in store.approvals()] == ["rev2", "rev1"]
        last = store.last_approval()
        assert last is not None and last.exposure_before == after

        store.clear_pending(except_revision=None)
        assert store.pending_revisions() == []

        for n in range(23):  # only the newest 20 bundles are kept, even within one instant
            store.store_bundle(f"r{n}", {"fleet.yaml": b"kind: Fleet\n\x00\xff"})
        assert store.bundle("r22") == {"fleet.yaml": b"kind: Fleet\n\x00\xff"}
        assert store.bundle("r2") is None and store.bundle("r3") is not None
    finally:
        store.close()


def test_key_ledger_revisions_and_alerts(location: StateLocation) -> None:
    clock = Clock(1_000.0)
    ledger = KeyLedger(location, clock=clock)
    revisions = RevisionLog(location, clock=clock)
    alerts = AlertStore(location)
    try:
        ledger.record_stored("a", "k1", "register", rotated=False)
        clock.now = 2_000.0
        ledger.record_stored("a", "k2", "rotation", rotated=True, reason="weekly")
        held = ledger.held()["a"]
        assert (held.key_prefix, held.since, held.last_rotated_at) == ("k2", 2_000.0, 2_000.0)
        assert held.last_reason == "weekly"
        assert ledger.record_orphans("a", ["o1", "o2"], "late") == ["o1", "o2"]
        assert ledger.record_orphans("a", ["o1"], "late") == []
        assert ledger.record_rotation_sent("a", "k2") == 2_000.0
        ledger.watch_late("a", "rotate:1", {"k2"}, until=2_600.0)
        ledger.explain("a", "k3")
        assert ledger.late_watches() == {"a": {"k2", "k3"}}
        ledger.end_late_watches("a", looked_at=3_000.0)
        assert ledger.late_watches() == {}

        revisions.record_applied("rev1", "git", ok=True, changes=2)
        revisions.record_applied("rev1", "git", ok=False, changes=1)
        revisions.record_invalid("rev2", "git", ["bad"])
        record = revisions.get("rev1")
        assert record is not None and (record.status, record.passes, record.last_ok) == (APPLIED, 2, False)
        assert [r.status for r in revisions.history()] == [INVALID, APPLIED]

        slot = SlotKey("a", "daily", 75)
        with alerts.decide(at=5.0) as tx:
            tx.save_slots({slot: SlotState(True, 1, "al1", 5.0)}, [])
            first = tx.enqueue(
                alert_id="al1", agent_id="a", event_type="budget.threshold", route="r", url="https://x/h",
                allow_insecure=False, secret=SecretRef(env="S"), body=b"{}",
            )  # fmt: skip
            again = tx.enqueue(
                alert_id="al1", agent_id="a", event_type="budget.threshold", route="r", url="https://x/h",
                allow_insecure=False, secret=SecretRef(env="S"), body=b"{}",
            )  # fmt: skip
        assert first is not None and again is None  # the same crossing is queued once
        (row,) = alerts.pending()
        assert (row.id, row.status, row.body) == (first, ALERT_PENDING, b"{}")
        alerts.record_attempt(row, "https://x/h", 6.0, ok=False, code=503, error="busy")
        assert alerts.attempts_of(first) == 1
        assert [f.alert_id for f in alerts.fired()] == ["al1"]
        with alerts.decide(at=7.0) as tx:
            tx.forget_agents_except([])
        assert alerts.slots() == {}
    finally:
        for part in (ledger, revisions, alerts):
            part.close()


def test_a_failed_transaction_leaves_nothing_behind(location: StateLocation) -> None:
    alerts = AlertStore(location)
    try:
        with pytest.raises(RuntimeError), alerts.decide(at=1.0) as tx:
            tx.save_slots({SlotKey("a", "daily", 90): SlotState(True, 1, "al9", 1.0)}, [])
            raise RuntimeError("crash mid-decision")
        assert alerts.slots() == {}
    finally:
        alerts.close()


# -- PostgreSQL only ---------------------------------------------------------------------


def test_concurrent_first_opens_migrate_once(pg_url: str, tmp_path: Path) -> None:
    location = StateLocation(tmp_path / "x.db", url=pg_url)
    errors: list[BaseException] = []
    opened: list[StateStore] = []

    def open_one() -> None:
        try:
            opened.append(StateStore(location))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in opened:
        store.close()
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_a_newer_schema_is_refused(pg_url: str, tmp_path: Path) -> None:
    location = StateLocation(tmp_path / "x.db", url=pg_url)
    StateStore(location).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer finops"):
        StateStore(location)


def test_a_dropped_connection_is_reopened_between_statements(pg_url: str, tmp_path: Path) -> None:
    store = StateStore(StateLocation(tmp_path / "x.db", url=pg_url))
    try:
        store.set_hold("a", "x")
        pid = store._db.raw.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StateUnavailable):  # the statement in flight fails, said plainly
            store.holds()
        assert set(store.holds()) == {"a"}  # the next one reconnects
    finally:
        store.close()


def test_unreachable_database_and_urls_never_show_the_password(tmp_path: Path) -> None:
    url = "postgresql://finops:s3cretpw@127.0.0.1:1/finops"
    with pytest.raises(StateUnavailable) as caught:
        connect(StateLocation(tmp_path / "x.db", url=url))
    assert "s3cretpw" not in str(caught.value) and "127.0.0.1" in str(caught.value)
    assert redact_url(url) == "postgresql://finops:***@127.0.0.1:1/finops"
    assert "s3cretpw" not in repr(StateLocation(tmp_path, url=url))
    assert check_state_url("postgres://h/db") == "postgres://h/db"
    for bad in ("mysql://h/db", "postgresql://h", "postgresql://u:pw@h/"):
        with pytest.raises(Exception, match="state URL") as refused:
            check_state_url(bad)
        assert "pw@" not in str(refused.value)


def test_a_newer_finops_waits_for_an_older_one_to_disconnect_before_migrating(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two finops versions never corrupt each other: every connection holds the schema lock
    shared; a migration needs it exclusive, so it never runs under a connected older finops."""
    from controller.state import db as state_db

    location = StateLocation(tmp_path / "x.db", url=pg_url)
    older = StateStore(location)  # running, at today's schema
    added = state_db.Migration(SCHEMA_VERSION + 1, "a column of tomorrow", lambda db: db.ddl(
        "ALTER TABLE holds ADD COLUMN tomorrow TEXT"
    ))  # fmt: skip
    monkeypatch.setattr(state_db, "MIGRATIONS", (*state_db.MIGRATIONS, added))
    monkeypatch.setattr(state_db, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(state_db, "MIGRATION_LOCK_TIMEOUT_S", 1)
    try:
        with pytest.raises(Exception, match="stop the older finops processes"):
            StateStore(location)
        assert "tomorrow" not in older._db.columns("holds")  # nothing changed under it
        older.set_hold("a", "still works")
    finally:
        older.close()
    newer = StateStore(location)  # the older one is gone: the migration runs
    try:
        assert "tomorrow" in newer._db.columns("holds") and set(newer.holds()) == {"a"}
    finally:
        newer.close()
    monkeypatch.undo()
    with pytest.raises(SchemaTooNew):  # and today's finops now refuses the newer schema
        StateStore(location)


def test_write_transactions_of_two_processes_never_interleave(location: StateLocation) -> None:
    """The alert check reads slots, decides and queues in one transaction: a second finops
    (another machine, on PostgreSQL) must not read the slots before the first one commits,
    or both would fire the same crossing. Both backends serialise write transactions."""
    first, second = AlertStore(location), AlertStore(location)
    slot = SlotKey("a", "daily", 90)
    inside, release = threading.Event(), threading.Event()
    seen: list[dict[SlotKey, SlotState]] = []

    def deciding() -> None:
        with first.decide(at=1.0) as tx:
            tx.save_slots({slot: SlotState(True, 1, "al1", 1.0)}, [])
            inside.set()
            release.wait(10)

    def also_deciding() -> None:
        with second.decide(at=2.0) as tx:
            seen.append(tx.slots())

    try:
        a = threading.Thread(target=deciding)
        a.start()
        assert inside.wait(10)
        b = threading.Thread(target=also_deciding)
        b.start()
        b.join(0.5)
        assert b.is_alive() and seen == []  # waits for the first transaction...
        release.set()
        a.join(10)
        b.join(10)
        assert seen == [{slot: SlotState(True, 1, "al1", 1.0)}]  # ...and then sees its decision
    finally:
        release.set()
        first.close()
        second.close()


def test_escalations_once_per_crossing_guarded_updates_and_release(location: StateLocation) -> None:
    clock = Clock(1_000.0)
    store = StateStore(location, clock=clock)
    alerts = AlertStore(location)
    try:
        pause = Escalation(
            "al1", "a", "daily", 90, "pause", "auto", PENDING, "auto: 90 % of daily cap", 5.0, Decimal("9.00")
        )
        freeze = Escalation("al2", "a", "daily", 100, "freeze", "manual", PENDING, "auto: 100 % of daily cap", 5.0)
        with alerts.decide(at=5.0) as tx:
            tx.record_escalations(LadderDecision(started=(pause, freeze)))
        with alerts.decide(at=6.0) as tx:  # the same crossing again: never a second row, never replaced
            tx.record_escalations(LadderDecision(started=(replace(pause, cap=Decimal("1.00")),)))
            assert [e.alert_id for e in tx.escalations()] == ["al1", "al2"]
        assert [(e.alert_id, e.cap) for e in store.escalations(statuses=OPEN)] == [
            ("al1", Decimal("9.00")),
            ("al2", None),
        ]
        active = replace(pause, status=ACTIVE, executed_at=7.0, cap=Decimal("8.50"))
        assert store.update_escalation(active, expect=(PENDING,))
        assert not store.update_escalation(replace(active, status=RELEASED), expect=(PENDING,))  # guarded
        assert store.release_escalations("a", "released by `finops unfreeze`") == 2
        assert {(e.status, e.released_at) for e in store.escalations()} == {(RELEASED, 1_000.0)}
        assert store.escalations(statuses=OPEN) == []
    finally:
        alerts.close()
        store.close()
