"""The one state database: its connection policy, schema version and forward migrations,
on either backend.

Every part of finops that keeps state (intents, budget writes, holds, webhooks,
adjustments, funding events, exposure approvals, key ledger, alerts, revisions) opens the
same database through :func:`connect`: an embedded SQLite file (the default) or a shared
PostgreSQL database (``StateLocation.url``). There is one place that sets the connection
policy and one numbered list of schema steps. A database is brought forward on open; one
written by a newer finops (a higher ``schema_version``) is refused rather than misread.

Repositories speak one SQL: ``?`` placeholders, ``INSERT … ON CONFLICT``, ``RETURNING``,
``IS [NOT] DISTINCT FROM`` (SQLite >= 3.39 and PostgreSQL both understand it); the
:class:`Database` wrapper turns placeholders into psycopg's ``%s``. Schema text is written
once in SQLite's types and translated for PostgreSQL (``REAL`` -> ``DOUBLE PRECISION``,
``BLOB`` -> ``BYTEA``, ``AUTOINCREMENT`` -> ``BIGSERIAL``).

PostgreSQL and two finops versions: every finops connection holds a *shared* advisory lock
on the schema for its whole life; a migration needs the *exclusive* one, so a newer finops
never changes the schema under an older one still running (it waits up to
``MIGRATION_LOCK_TIMEOUT_S`` and then says so), and an older finops refuses a newer schema.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controller.errors import ConfigError
from controller.io.secretfile import private_file
from controller.state.location import POSTGRESQL, SQLITE, StateLocation, as_location

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another connection's write transaction (daemon + CLI)."""


MIGRATION_LOCK_TIMEOUT_S = 30
"""How long a migration waits for other finops processes (older versions) to disconnect."""
CONNECT_TIMEOUT_S = 10

LOCK_NAMESPACE = 0x66696E6F
"""``pg_advisory_lock(namespace, object)``: finops' locks, apart from other applications'."""
LOCK_SCHEMA = 1
"""Shared by every connected finops; exclusive for a migration."""
LOCK_WRITER = 2
"""The writer lock (``controller.state.lock``): one daemon or apply at a time."""
LOCK_TRANSACTION = 3
"""Held for each write transaction: PostgreSQL transactions serialise like SQLite's."""


class SchemaTooNew(ConfigError):
    """The state database was written by a newer finops: reading it could lose an intent."""


class StateUnavailable(ConfigError):
    """The state database cannot be reached (PostgreSQL down, wrong URL, auth refused)."""


class Cursor(Protocol):
    """What a statement returns on either backend."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_ddl(script: str) -> str:
    script = re.sub(r"INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY", script)
    script = re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)
    return re.sub(r"\bBLOB\b", "BYTEA", script)


class Database:
    """One connection to the state database, SQLite or PostgreSQL, behind one small API:
    ``execute``/``executemany`` (autocommit outside a transaction) and ``transaction()``
    (``BEGIN IMMEDIATE`` on SQLite: writers queue on the busy timeout; a plain transaction
    on PostgreSQL). Callers serialise threads themselves (each repository has a lock). A
    PostgreSQL connection that broke is re-opened at the next statement outside a
    transaction (the daemon survives a database restart); inside one, the error surfaces."""

    def __init__(self, location: StateLocation, raw: Any, dialect: str) -> None:
        self.location = location
        self.dialect = dialect
        self._raw = raw
        self._in_tx = False
        self._reconnect_lock = threading.Lock()

    # -- statements --------------------------------------------------------------

    def _conn(self) -> Any:
        if self.dialect == POSTGRESQL and not self._in_tx and self._raw.closed:
            with self._reconnect_lock:
                if self._raw.closed:
                    raw = _pg_open(self.location)
                    try:
                        _pg_join(raw, self.location)  # the same session rules as the first connection
                    except BaseException:
                        raw.close()
                        raise
                    self._raw = raw
        return self._raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if self.dialect == POSTGRESQL:
            cur: Cursor = _pg_call(self.location, lambda: self._conn().execute(_pg_sql(sql), tuple(params)))
            return cur
        cur = self._raw.execute(sql, tuple(params))
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self.dialect == POSTGRESQL:
            _pg_call(self.location, lambda: self._conn().cursor().executemany(_pg_sql(sql), [tuple(r) for r in rows]))
        else:
            self._raw.executemany(sql, [tuple(r) for r in rows])

    def ddl(self, script: str) -> None:
        """Run schema text written in SQLite's types (translated for PostgreSQL)."""
        text = _pg_ddl(script) if self.dialect == POSTGRESQL else script
        for statement in _split(text):
            if self.dialect == POSTGRESQL:
                self._conn().execute(statement)
            else:
                self._raw.execute(statement)

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[Database]:
        """Everything inside commits together or not at all. ``snapshot``: a read-only
        transaction that sees one consistent snapshot (PostgreSQL ``REPEATABLE READ, READ
        ONLY``, which writes nothing and so takes no write lock; SQLite holds its write lock
        as for any transaction, which keeps writers out while it reads)."""
        if self._in_tx:  # nested: part of the outer transaction
            yield self
            return
        if self.dialect == POSTGRESQL:
            conn = self._conn()
            self._in_tx = True
            try:
                with _pg_errors(self.location), conn.transaction():
                    # One write transaction at a time across every finops on this database, as
                    # SQLite's BEGIN IMMEDIATE gives: a read-decide-write inside a transaction
                    # (alert slots, hold precedence) never interleaves with another's.
                    if snapshot:
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    else:
                        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, LOCK_TRANSACTION))
                    yield self
            finally:
                self._in_tx = False
            return
        self._raw.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self
        except BaseException:
            self._in_tx = False
            self._raw.execute("ROLLBACK")
            raise
        self._in_tx = False
        self._raw.execute("COMMIT")

    def table_exists(self, name: str) -> bool:
        if self.dialect == POSTGRESQL:
            return bool(self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0])
        return self.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def columns(self, table: str) -> set[str]:
        if self.dialect == POSTGRESQL:
            rows = self.execute("SELECT column_name FROM information_schema.columns WHERE table_name=?", (table,))
            return {r[0] for r in rows.fetchall()}
        return {row[1] for row in self._raw.execute(f"PRAGMA table_info({table})")}

    def tables(self) -> list[str]:
        """The tables of the database (finops' own schema), sorted."""
        if self.dialect == POSTGRESQL:
            rows = self.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_type = 'BASE TABLE'"
            ).fetchall()
        else:
            rows = self.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite^_%' ESCAPE '^'"
            ).fetchall()
        return sorted(str(r[0]) for r in rows)

    def stream(self, sql: str, params: Sequence[Any] = (), *, size: int = 500) -> Iterator[tuple[Any, ...]]:
        """The rows of a query without holding the whole result in memory (a table copy).
        On PostgreSQL the connection runs nothing else until the iteration ends."""
        if self.dialect == POSTGRESQL:
            with _pg_errors(self.location):
                for row in self._conn().cursor().stream(_pg_sql(sql), tuple(params), size=size):
                    yield tuple(row)
            return
        cur = self._raw.execute(sql, tuple(params))
        while batch := cur.fetchmany(size):
            for row in batch:
                yield tuple(row)

    @property
    def raw(self) -> Any:
        """The driver connection (advisory locks and tests only)."""
        return self._conn()

    def close(self) -> None:
        self._raw.close()


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


def _baseline(db: Database) -> None:
    """Version 1: every table as finops wrote them before the schema had a version (a file
    of that time already has some or all of them: ``IF NOT EXISTS``, missing columns added)."""
    db.ddl(_BASELINE)
    if db.dialect == POSTGRESQL:
        # SQLite's implicit rowid orders bundles stored in the same instant; PostgreSQL gets it.
        db.ddl("ALTER TABLE revision_bundles ADD COLUMN IF NOT EXISTS rowid BIGSERIAL")
        db.ddl("ALTER TABLE revisions ADD COLUMN IF NOT EXISTS rowid BIGSERIAL")
    for table, columns in _COLUMNS_ADDED.items():
        have = db.columns(table)
        for name, decl in columns:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _one_key_table(db: Database) -> None:
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


def _sealed_keys(db: Database) -> None:
    """Version 3: the database key store (``controller.keys.sealed``): per agent and slot the
    key encrypted under its own data key, the data key wrapped under the key-encryption key
    (whose id is stored, never the key itself), and the key's gateway prefix."""
    db.ddl(
        """
        CREATE TABLE IF NOT EXISTS sealed_keys (
            agent_id TEXT NOT NULL,
            slot TEXT NOT NULL,
            ciphertext BLOB NOT NULL,
            nonce BLOB NOT NULL,
            wrapped_key BLOB NOT NULL,
            wrap_nonce BLOB NOT NULL,
            kek_id TEXT NOT NULL,
            key_prefix TEXT NOT NULL,
            format INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (agent_id, slot)
        );
        """
    )


_DAEMON_REPLICAS = """
CREATE TABLE IF NOT EXISTS daemon_replicas (
    replica_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    role TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    active_since REAL,
    last_pass_at REAL,
    last_pass_result TEXT,
    last_success_at REAL,
    detail TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS daemon_replicas_heartbeat ON daemon_replicas(heartbeat_at);
"""


def _daemon_replicas(db: Database) -> None:
    """Version 4: each ``finops run`` replica's role, heartbeat and last pass
    (``controller.daemon.replicas``), readable from any machine that shares the state."""
    db.ddl(_DAEMON_REPLICAS)


def _escalations(db: Database) -> None:
    """Version 5: the escalation ladder's decisions (``controller.state.escalations``): one
    row per crossing that carries a pause or freeze, and where its execution stands."""
    from controller.state.escalations import TABLE

    db.ddl(TABLE)


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    step: Callable[[Database], None]


MIGRATIONS: Sequence[Migration] = (
    Migration(1, "baseline: the tables of the unversioned state file", _baseline),
    Migration(2, "one table for the key finops holds per agent", _one_key_table),
    Migration(3, "the database key store: agents' keys sealed under a key-encryption key", _sealed_keys),
    Migration(4, "daemon replicas: role, heartbeat and last pass of each finops run", _daemon_replicas),
    Migration(5, "escalation ladder: the pause or freeze decided per crossing", _escalations),
)
"""Forward only, numbered from 1, each run once in its own transaction. Add a step at the
end; never edit one that has shipped."""

SCHEMA_VERSION = MIGRATIONS[-1].version


def _split(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def schema_version(db: Database) -> int:
    db.ddl("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _read_version(db: Database) -> int | None:
    """The database's version without writing, ``None`` when it has no version table yet."""
    if not db.table_exists("schema_version"):
        return None
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _too_new(current: int, where: object) -> SchemaTooNew:
    return SchemaTooNew(
        f"{where}: schema version {current} was written by a newer finops (this one knows up to "
        f"{SCHEMA_VERSION}); refusing to open it. Run the newer finops, or restore a backup."
    )


def _migrate_pg(db: Database, where: object) -> int:
    """All missing steps in one transaction (PostgreSQL's DDL is transactional) under the
    exclusive schema lock. Another finops holding its shared side (an older version still
    running) makes this wait, re-reading the version meanwhile: a replica that migrated
    first is not waited for."""
    deadline = time.monotonic() + MIGRATION_LOCK_TIMEOUT_S
    while True:
        with db.transaction():
            got = db.execute("SELECT pg_try_advisory_xact_lock(?, ?)", (LOCK_NAMESPACE, LOCK_SCHEMA)).fetchone()[0]
            if got:
                now = schema_version(db)
                if now > SCHEMA_VERSION:
                    raise _too_new(now, where)
                for migration in MIGRATIONS:
                    if migration.version > now:
                        migration.step(db)
                        db.execute("INSERT INTO schema_version (version) VALUES (?)", (migration.version,))
                return SCHEMA_VERSION
        current = _read_version(db)
        if current is not None and current > SCHEMA_VERSION:
            raise _too_new(current, where)
        if current == SCHEMA_VERSION:
            return SCHEMA_VERSION
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{where}: the schema needs migrating to version {SCHEMA_VERSION}, but another finops process "
                f"(an older version?) stayed connected for {MIGRATION_LOCK_TIMEOUT_S} s; stop the older finops "
                "processes, then start this one again"
            )
        time.sleep(0.2)


def migrate(db: Database, where: object = "state database") -> int:
    """Bring ``db`` to :data:`SCHEMA_VERSION`. On SQLite each step commits with its version
    row (``BEGIN IMMEDIATE`` serialises processes), so a crash mid-way resumes at the step
    that did not commit. Returns the version."""
    current = _read_version(db)  # no write lock when the database is already current
    if current is not None and current > SCHEMA_VERSION:
        raise _too_new(current, where)
    if current == SCHEMA_VERSION:
        return SCHEMA_VERSION
    if db.dialect == POSTGRESQL:
        return _migrate_pg(db, where)
    for migration in MIGRATIONS:
        if current is not None and migration.version <= current:
            continue
        with db.transaction():
            now = schema_version(db)  # another process may have run it meanwhile
            if now > SCHEMA_VERSION:
                raise _too_new(now, where)
            if now < migration.version:
                migration.step(db)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (migration.version,))
    return SCHEMA_VERSION


def _pg_call(location: StateLocation, fn: Callable[[], Any]) -> Any:
    with _pg_errors(location):
        return fn()


@contextmanager
def _pg_errors(location: StateLocation) -> Iterator[None]:
    """psycopg's operational errors (server gone, lock timeout) as one finops error that
    names the database without its password; programming errors stay bugs."""
    import psycopg

    try:
        yield
    except psycopg.errors.LockNotAvailable:
        raise StateUnavailable(f"state database {location}: a lock was not granted in time") from None
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StateUnavailable(f"state database {location} is unavailable: {_strip_secrets(first)}") from None


def _strip_secrets(message: str) -> str:
    return re.sub(r"password=\S+", "password=***", re.sub(r"://([^:/@\s]+):[^@\s]+@", r"://\1:***@", message))


def _pg_open(location: StateLocation) -> Any:
    import psycopg

    assert location.url is not None
    with _pg_errors(location):
        conn = psycopg.connect(
            location.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="finops",
            # A dead peer is noticed by the server within a minute, not after two hours of TCP.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
    return conn


def _pg_join(raw: Any, location: StateLocation) -> None:
    """Hold the schema lock shared for the session's life (a newer finops cannot migrate
    under it), then make sure the schema is not newer than this finops (one may have
    migrated while this session was away)."""
    with _pg_errors(location):
        raw.execute("SELECT pg_advisory_lock_shared(%s, %s)", (LOCK_NAMESPACE, LOCK_SCHEMA))
        row = raw.execute("SELECT MAX(version) FROM schema_version").fetchone()
    version = int(row[0]) if row and row[0] is not None else 0
    if version > SCHEMA_VERSION:
        raise _too_new(version, location)
    if version < SCHEMA_VERSION:
        raise ConfigError(f"{location}: schema version {version}, expected {SCHEMA_VERSION}: open it again to migrate")


def connect(where: Path | StateLocation) -> Database:
    """The one connection policy, brought to the current schema before it is returned.

    SQLite: a 0600 file (0700 directories) whatever the umask, WAL, ``synchronous=FULL``
    (a committed intent survives power loss), a busy timeout so the daemon and a CLI
    command wait for each other instead of failing, foreign keys on, usable from threads.
    PostgreSQL: autocommit outside explicit transactions, TCP keepalives, a connect
    timeout, the shared schema lock held for the connection's life."""
    location = as_location(where)
    if location.backend == POSTGRESQL:
        db = Database(location, _pg_open(location), POSTGRESQL)
        try:
            migrate(db, location)
            _pg_join(db.raw, location)
        except BaseException:
            db.close()
            raise
        return db
    path = location.file
    private_file(path)
    raw = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    db = Database(location, raw, SQLITE)
    try:
        raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA synchronous=FULL")
        raw.execute("PRAGMA foreign_keys=ON")
        migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db
