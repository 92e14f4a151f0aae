"""The one state database: connection policy, schema version, forward migrations (from a
file written by the code before the schema had a version), refusal of a newer schema, the
one table of held keys, and table ownership (no module reads another's table)."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from controller.alerting.store import PENDING as ALERT_PENDING
from controller.alerting.store import AlertStore
from controller.daemon.revisions import APPLIED, RevisionLog
from controller.keys.store import KeyLedger
from controller.state import DONE, PENDING, SCHEMA_VERSION, SchemaTooNew, StateStore
from controller.state.db import MIGRATIONS, Database, connect
from controller.state.db import schema_version as _schema_version
from controller.state.location import StateLocation

FIXTURE = Path(__file__).parent.parent / "fixtures" / "state_pre_i10.sql"
"""``iterdump`` of a state file written by finops at 6652281 (all four old wrappers)."""
T0 = 1_800_000_000.0


def _old_file(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "state.db"
    path.parent.mkdir(mode=0o700)
    db = sqlite3.connect(path)
    db.executescript(FIXTURE.read_text())
    db.close()
    return path


def _tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()


def schema_version(raw: sqlite3.Connection) -> int:
    return _schema_version(_wrap(raw))


def _wrap(raw: sqlite3.Connection) -> Database:
    """A raw SQLite connection behind the state layer's ``Database`` API."""
    return Database(StateLocation(Path("state.db")), raw, "sqlite")


def test_a_state_file_from_before_the_schema_version_is_migrated_with_every_fact_kept(tmp_path: Path) -> None:
    path = _old_file(tmp_path)
    assert "schema_version" not in _tables(path) and "agent_keys" in _tables(path)
    store = StateStore(path, clock=lambda: T0 + 200)
    ledger = KeyLedger(path, clock=lambda: T0 + 200)
    revisions = RevisionLog(path)
    alerts = AlertStore(path)
    try:
        budget = store.budget_writes()["a1"]
        assert (budget.daily_cap, budget.monthly_cap, budget.alert_threshold) == (
            Decimal("10.00"),
            None,
            Decimal("0.80"),
        )
        pending = store.intents(status=PENDING)
        assert [(i.intent_key, i.kind, i.agent_id) for i in pending] == [("rotate:a2:y", "rotate", "a2")]
        assert pending[0].sent_at == T0 and dict(pending[0].payload) == {"prefix": "a2_pfx"}
        assert [i.ref for i in store.intents(status=DONE)] == ["42"]
        assert store.last_deposit_ids() == {"a1": 42}
        # agent_keys merged into keys_held: a1 only registered by apply, a2 rotated later.
        assert store.key_prefixes() == {"a1": "a2a_test_aaaa", "a2": "a2a_test_cccc"}
        held = ledger.held()
        assert (held["a1"].origin, held["a1"].since, held["a1"].last_rotated_at) == ("register", T0, None)
        assert (held["a2"].origin, held["a2"].since, held["a2"].last_rotated_at) == ("rotate", T0 + 100, T0 + 100)
        assert held["a2"].last_reason == "schedule"
        assert ledger.registered_at("a1", "a2a_test_aaaa") == T0
        assert ledger.orphans()["a2"][0].key_prefix == "a2a_test_dddd"
        assert ledger.rotation_sent_at("a1", "a2a_test_aaaa") == T0 + 100
        assert ledger.late_watches() == {"a2": {"a2a_test_cccc"}}
        assert store.holds()["a3"].reason == "ops stop" and not store.holds()["a3"].auto
        assert store.managed_webhooks()["wh1"].url == "https://example.test/h"
        assert store.adjustments()["a1"].amount == Decimal("1.50")
        assert [(e.ref, e.credits) for e in store.funding_events(now=T0 + 200)] == [("r1", Decimal("5.00"))]
        assert store.bundle("rev1") == {"a.yaml": b"x: 1\n"}
        record = revisions.last_applied()
        assert record is not None and (record.revision, record.status, record.passes) == ("rev1", APPLIED, 1)
        assert [(r.alert_id, r.status) for r in alerts.pending()] == [("al1", ALERT_PENDING)]
    finally:
        for part in (store, ledger, revisions, alerts):
            part.close()
    assert "agent_keys" not in _tables(path)
    db = sqlite3.connect(path)
    try:
        assert schema_version(db) == SCHEMA_VERSION
        assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")] == [
            m.version for m in MIGRATIONS
        ]
    finally:
        db.close()


def test_a_first_release_file_gets_the_columns_added_later(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE intents (intent_key TEXT PRIMARY KEY, kind TEXT NOT NULL, agent_id TEXT NOT NULL, "
        "payload TEXT NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, "
        "updated_at REAL NOT NULL);"
        "CREATE TABLE holds (agent_id TEXT PRIMARY KEY, reason TEXT NOT NULL, held_at REAL NOT NULL, "
        "caps_before TEXT NOT NULL DEFAULT '{}');"
        "INSERT INTO intents VALUES ('deposit:a:1', 'deposit', 'a', '{}', 'pending', '', 5.0, 5.0);"
        "INSERT INTO holds VALUES ('b', 'stop', 6.0, '{}');"
    )
    db.close()
    store = StateStore(path)
    try:
        [intent] = store.intents()
        assert (intent.intent_key, intent.sent_at, intent.ref) == ("deposit:a:1", None, None)
        assert store.holds()["b"].auto is False
        store.set_hold("c", "auto", auto=True)
        assert store.holds()["c"].auto is True
    finally:
        store.close()


def test_a_file_written_by_a_newer_finops_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    db.execute("CREATE TABLE from_the_future (x INTEGER)")
    db.commit()
    db.close()
    before = _tables(path)
    for opener in (StateStore, KeyLedger, RevisionLog, AlertStore):
        with pytest.raises(SchemaTooNew, match=rf"schema version {SCHEMA_VERSION + 1} .*newer finops"):
            opener(path)
    assert _tables(path) == before


def test_every_repository_gets_the_one_connection_policy_and_a_private_file(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "deep" / "state.db"
        parts = [StateStore(path), KeyLedger(path), RevisionLog(path), AlertStore(path)]
    finally:
        os.umask(old)
    try:
        for part in parts:
            db: sqlite3.Connection = part._db.raw  # the policy is a property of each connection
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
            assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        for part in parts:
            part.close()


def test_concurrent_opens_run_each_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    errors: list[BaseException] = []

    def open_close() -> None:
        try:
            connect(path).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_close) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = connect(path)
    try:
        assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")] == [
            m.version for m in MIGRATIONS
        ]
    finally:
        db.close()


def test_the_key_finops_holds_is_one_fact_shared_by_apply_rotation_and_the_ledger(tmp_path: Path) -> None:
    now = [100.0]
    store = StateStore(tmp_path / "s.db", clock=lambda: now[0])
    ledger = KeyLedger(tmp_path / "s.db", clock=lambda: now[0])
    try:
        store.record_key("a", "a2a_k1", "register")  # apply registered the agent
        assert ledger.held()["a"].since == 100.0 and ledger.registered_at("a", "a2a_k1") == 100.0
        now[0] = 200.0
        store.record_key("a", "a2a_k2", "rotate")  # rotation stored the new key (step 3)
        ledger.record_stored("a", "a2a_k2", "rotate", rotated=True, reason="schedule")  # and completed
        assert store.key_prefixes() == {"a": "a2a_k2"}
        held = ledger.held()["a"]
        assert (held.since, held.last_rotated_at, held.last_reason) == (200.0, 200.0, "schedule")
        assert ledger.registered_at("a", "a2a_k1") is None  # no longer the key finops holds
        now[0] = 300.0
        store.record_key("a", "a2a_k3", "import")  # a new key without a rotation
        held = ledger.held()["a"]
        assert (held.key_prefix, held.since, held.last_rotated_at, held.last_reason) == ("a2a_k3", 300.0, 200.0, "")
    finally:
        store.close()
        ledger.close()


_CONTROLLER = Path(__file__).parent.parent.parent / "controller"
_OWNERS = {
    "controller/state/store.py": (
        "budget_writes", "intents", "holds", "managed_webhooks", "rebalance_adjustments", "funding_events",
        "apply_log", "exposure_approvals", "exposure_pending", "revision_bundles",
    ),
    "controller/state/keys.py": ("keys_held",),
    "controller/state/escalations.py": ("escalations",),
    "controller/keys/store.py": ("keys_rotation_sent", "keys_late_watch", "keys_orphans"),
    "controller/keys/sealed.py": ("sealed_keys",),
    "controller/alerting/store.py": ("alert_slots", "alert_outbox", "alert_delivery_log"),
    "controller/daemon/revisions.py": ("revisions",),
    "controller/daemon/replicas.py": ("daemon_replicas",),
}  # fmt: skip


def test_each_table_is_read_and_written_only_by_its_repository() -> None:
    """No module reaches into another repository's table with raw SQL (the migrations in
    ``controller/state/db.py`` are the one exception: they define every table)."""
    owner_of = {table: owner for owner, tables in _OWNERS.items() for table in tables}
    sql = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE(?: IF NOT EXISTS)?)\s+([a-z_]+)\b")
    seen: set[str] = set()
    for path in sorted(_CONTROLLER.rglob("*.py")):
        rel = path.relative_to(_CONTROLLER.parent).as_posix()
        if rel.startswith("controller/sandbox/") or rel == "controller/state/db.py":
            continue
        for table in sql.findall(path.read_text()):
            if table in owner_of:
                seen.add(table)
                assert owner_of[table] == rel, f"{rel} uses table {table} owned by {owner_of[table]}"
    assert seen == set(owner_of)  # every table is used by its owner: the regex finds real SQL
    db = sqlite3.connect(":memory:")
    for migration in MIGRATIONS:
        migration.step(_wrap(db))
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables - {"sqlite_sequence"} == set(owner_of)  # every table has exactly one owner


def test_every_intent_kind_has_one_resolver_and_an_unowned_kind_is_refused_before_writing(tmp_path: Path) -> None:
    from controller.keys.rotate import ROTATE
    from controller.state.recovery import RESOLVERS, IntentKind, Resolver, UnknownIntentKind, kinds_resolved_by
    from policies.plan_types import INTENT_BLOCKS

    assert set(RESOLVERS) == set(IntentKind)
    # apply resolves exactly the kinds whose pending intents withhold a planned change
    assert kinds_resolved_by(Resolver.APPLY) == set(INTENT_BLOCKS)
    assert kinds_resolved_by(Resolver.KEYS) == {ROTATE}
    assert kinds_resolved_by(Resolver.APPLY) & kinds_resolved_by(Resolver.KEYS) == set()
    store = StateStore(tmp_path / "state.db")
    try:
        with pytest.raises(UnknownIntentKind, match="'withdraw' has no resolver"):
            store.begin_intent("withdraw:a:1", "withdraw", "a", {})
        assert store.intents() == []
        store.begin_intent("deposit:a:1", IntentKind.DEPOSIT, "a", {"amount": "1.00"})
        assert [i.kind for i in store.intents(status=PENDING)] == ["deposit"]
    finally:
        store.close()


def test_a_migration_interrupted_half_way_leaves_the_file_at_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller.state import db as state_db

    path = _old_file(tmp_path)
    baseline, merge = state_db.MIGRATIONS[0], state_db.MIGRATIONS[1]

    def crash(db: Database) -> None:
        merge.step(db)  # the step's writes are done...
        raise KeyboardInterrupt  # ...and the process dies before its version row commits

    monkeypatch.setattr(state_db, "MIGRATIONS", (baseline, state_db.Migration(2, merge.what, crash)))
    with pytest.raises(KeyboardInterrupt):
        StateStore(path)
    assert "agent_keys" in _tables(path)  # rolled back with the step
    raw = sqlite3.connect(path)
    assert schema_version(raw) == 1
    raw.close()
    monkeypatch.undo()
    store = StateStore(path)
    try:
        assert store.key_prefixes() == {"a1": "a2a_test_aaaa", "a2": "a2a_test_cccc"}
    finally:
        store.close()
    assert "agent_keys" not in _tables(path)


def test_old_history_is_pruned_but_pending_intents_and_each_agents_funding_epoch_are_kept(tmp_path: Path) -> None:
    day = 86_400.0
    now = [T0]
    store = StateStore(tmp_path / "s.db", clock=lambda: now[0])
    store.begin_intent("dep-a-old", "deposit", "a", {"amount": "1.00"})
    store.finish_intent("dep-a-old", DONE, "landed", ref="7")
    store.begin_intent("dep-a-new", "deposit", "a", {"amount": "1.00"})
    store.finish_intent("dep-a-new", DONE, "landed", ref="9")
    store.begin_intent("dep-b-only", "deposit", "b", {"amount": "1.00"})
    store.finish_intent("dep-b-only", DONE, "landed", ref="3")
    store.begin_intent("rot-a", "rotate", "a", {})
    store.finish_intent("rot-a", "abandoned", "refused")
    store.begin_intent("dep-c-unknown", "deposit", "c", {"amount": "1.00"})  # stays pending
    store.log_apply(now[0], True, {"applied": 1})
    before = store.last_deposit_ids()

    now[0] = T0 + 89 * day
    assert store.prune_history() == 0  # nothing is old enough yet

    now[0] = T0 + 91 * day
    store.log_apply(now[0], True, {"applied": 0})  # logging prunes on the way
    left = {i.intent_key: i.status for i in store.intents()}
    assert left == {"dep-a-new": DONE, "dep-b-only": DONE, "dep-c-unknown": PENDING}
    assert store.last_deposit_ids() == before == {"a": 9, "b": 3}
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as raw:
        assert raw.execute("SELECT COUNT(*) FROM apply_log").fetchone() == (1,)  # only the row written now
