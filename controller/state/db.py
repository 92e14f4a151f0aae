"""The one state database: its connection policy, schema version and forward migrations.

Every part of finops that keeps state (intents, budget writes, holds, webhooks,
adjustments, funding events, exposure approvals, key ledger, alerts, revisions) opens the
same SQLite file through :func:`connect`, so there is one place that sets the PRAGMAs and
one numbered list of schema steps. A file is brought forward on open; a file written by a
newer finops (a higher ``schema_version``) is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.errors import ConfigError
from controller.io.secretfile import private_file

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another connection's write transaction (daemon + CLI)."""


class SchemaTooNew(ConfigError):
    """The state file was written by a newer finops: reading it could lose an intent."""


_BASELINE = """
-- controller.state.store: intents, budget writes, holds, webhooks, adjustments, funding

CREATE TABLE IF NOT EXISTS budget_writes (
    agent_id TEXT PRIMARY KEY,
    daily_cap TEXT,
    monthly_cap TEXT,
    alert_threshold TEXT NOT NULL,
    written_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS intents (
    intent_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    ref TEXT
);
CREATE INDEX IF NOT EXISTS intents_open ON intents(status, kind);
CREATE TABLE IF NOT EXISTS agent_keys (
    agent_id TEXT PRIMARY KEY,
    key_prefix TEXT NOT NULL,
    source TEXT NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    agent_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    held_at REAL NOT NULL,
    caps_before TEXT NOT NULL DEFAULT '{}',
    auto INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS managed_webhooks (
    webhook_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    fleet TEXT NOT NULL,
    url TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rebalance_adjustments (
    agent_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    amount TEXT NOT NULL,
    explanation TEXT NOT NULL,
    computed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS funding_events (
    ref TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    fleet TEXT NOT NULL,
    kind TEXT NOT NULL,
    credits TEXT NOT NULL,
    at REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS funding_events_at ON funding_events(at);
CREATE TABLE IF NOT EXISTS apply_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    ok INTEGER NOT NULL,
    summary TEXT NOT NULL
);
-- exposure approvals, pending revisions and revision bundles

-- Exposure approvals (finops approve, interactive apply, bootstrap) and what the daemon
-- needs to keep the last approved revision enforced. Kept apart from the tables above.
CREATE TABLE IF NOT EXISTS exposure_approvals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision TEXT NOT NULL,
    source TEXT NOT NULL,
    how TEXT NOT NULL,
    approved_at REAL NOT NULL,
    by_key TEXT NOT NULL,
    by_user TEXT NOT NULL,
    exposure_before TEXT,
    exposure_after TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exposure_pending (
    revision TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    exposure TEXT NOT NULL,
    review TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revision_bundles (
    revision TEXT PRIMARY KEY,
    files TEXT NOT NULL,
    stored_at REAL NOT NULL
);
-- key ledger (controller.keys.store)

CREATE TABLE IF NOT EXISTS keys_held (
    agent_id TEXT PRIMARY KEY,
    key_prefix TEXT NOT NULL,
    origin TEXT NOT NULL,
    since REAL NOT NULL,
    last_rotated_at REAL,
    last_reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys_rotation_sent (
    agent_id TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    first_sent_at REAL NOT NULL,
    PRIMARY KEY (agent_id, key_prefix)
);
CREATE TABLE IF NOT EXISTS keys_late_watch (
    agent_id TEXT NOT NULL,
    intent_key TEXT NOT NULL,
    known TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (agent_id, intent_key)
);
CREATE TABLE IF NOT EXISTS keys_orphans (
    agent_id TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    detected_at REAL NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (agent_id, key_prefix)
);
-- alerts (controller.alerting.store)

CREATE TABLE IF NOT EXISTS alert_slots (
    agent_id TEXT NOT NULL,
    budget_window TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    fired INTEGER NOT NULL,
    episodes INTEGER NOT NULL,
    alert_id TEXT NOT NULL,
    fired_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (agent_id, budget_window, threshold)
);
CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    route TEXT NOT NULL,
    url TEXT NOT NULL,
    allow_insecure INTEGER NOT NULL,
    secret_ref TEXT NOT NULL,
    body BLOB NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code INTEGER,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (alert_id, url)
);
CREATE INDEX IF NOT EXISTS alert_outbox_status ON alert_outbox(status, id);
CREATE TABLE IF NOT EXISTS alert_delivery_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id INTEGER NOT NULL,
    alert_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    route TEXT NOT NULL,
    url TEXT NOT NULL,
    attempted_at REAL NOT NULL,
    ok INTEGER NOT NULL,
    status_code INTEGER,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS alert_delivery_log_route ON alert_delivery_log(agent_id, route, id);
-- revisions (controller.daemon.revisions)

CREATE TABLE IF NOT EXISTS revisions (
    revision TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passes INTEGER NOT NULL DEFAULT 0,
    last_ok INTEGER,
    last_changes INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS revisions_recent ON revisions(status, last_seen);
"""

_COLUMNS_ADDED = {
    "intents": (("sent_at", "REAL"), ("ref", "TEXT")),
    "holds": (("auto", "INTEGER NOT NULL DEFAULT 0"),),
}
"""Columns added before the schema was versioned: a state file from before gets them."""


def _baseline(db: sqlite3.Connection) -> None:
    """Version 1: every table as finops wrote them before the schema had a version (a file
    of that time already has some or all of them: ``IF NOT EXISTS``, missing columns added)."""
    for statement in _split(_BASELINE):
        db.execute(statement)
    for table, columns in _COLUMNS_ADDED.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _one_key_table(db: sqlite3.Connection) -> None:
    """Version 2: the key finops holds per agent is one fact in one table (``keys_held``).
    Before, ``apply`` wrote registrations to ``agent_keys`` and key management its own
    record to ``keys_held``; for each agent the newer record wins (both were written
    together whenever key management stored a key, so they differ only when ``apply``
    registered a key that key management had not seen)."""
    rows = db.execute("SELECT agent_id, key_prefix, source, stored_at FROM agent_keys").fetchall()
    for agent_id, prefix, source, stored_at in rows:
        held = db.execute("SELECT key_prefix, updated_at FROM keys_held WHERE agent_id=?", (agent_id,)).fetchone()
        if held is not None and (held[0] == prefix or held[1] >= stored_at):
            continue
        db.execute(
            "INSERT INTO keys_held (agent_id, key_prefix, origin, since, last_rotated_at, last_reason, updated_at) "
            "VALUES (?,?,?,?,NULL,'',?) ON CONFLICT(agent_id) DO UPDATE SET key_prefix=excluded.key_prefix, "
            "origin=excluded.origin, since=excluded.since, last_reason='', updated_at=excluded.updated_at",
            (agent_id, prefix, source, stored_at, stored_at),
        )
    db.execute("DROP TABLE agent_keys")


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    step: Callable[[sqlite3.Connection], None]


MIGRATIONS: Sequence[Migration] = (
    Migration(1, "baseline: the tables of the unversioned state file", _baseline),
    Migration(2, "one table for the key finops holds per agent", _one_key_table),
)
"""Forward only, numbered from 1, each run once in its own transaction. Add a step at the
end; never edit one that has shipped."""

SCHEMA_VERSION = MIGRATIONS[-1].version


def _split(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def schema_version(db: sqlite3.Connection) -> int:
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _read_version(db: sqlite3.Connection) -> int | None:
    """The file's version without writing, ``None`` when it has no version table yet."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone() is None:
        return None
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(db: sqlite3.Connection, path: Path | str = "state database") -> int:
    """Bring ``db`` to :data:`SCHEMA_VERSION`; each step commits with its version row, so a
    crash mid-way resumes at the step that did not commit. Returns the version."""
    current = _read_version(db)  # no write lock when the file is already current
    if current is None:
        db.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path}: schema version {current} was written by a newer finops (this one knows up to "
            f"{SCHEMA_VERSION}); refusing to open it. Run the newer finops, or restore a backup."
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) < migration.version:  # another process may have run it meanwhile
                migration.step(db)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (migration.version,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return SCHEMA_VERSION


def connect(path: Path) -> sqlite3.Connection:
    """The one connection policy: a 0600 file (0700 directories) whatever the umask, WAL,
    ``synchronous=FULL`` (a committed intent survives power loss), a busy timeout so the
    daemon and a CLI command wait for each other instead of failing, foreign keys on,
    autocommit mode (callers open ``BEGIN IMMEDIATE`` themselves), usable from threads
    (callers serialise with a lock). The schema is brought forward before it is returned."""
    path = Path(path)
    private_file(path)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db
