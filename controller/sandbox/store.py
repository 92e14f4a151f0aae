"""SQLite state of the embedded sandbox gateway.

The layout mirrors the real gateway's tables (wallets, keys, a ledger with a *global*
unique idempotency key, budget caps in atomic units, usage records, webhooks, rate
events) because several of its quirks live in that layout: a ledger key collision is a
unique-index violation, spend windows are sums over usage rows, caps are ×1e8 integers.

All money is stored as integer atomic units (×1e8) and converted to ``Decimal`` at the
edge, so no float ever takes part in a balance or cap decision. The store never reads a
clock: every method that needs "now" takes it as an argument, so the HTTP layer's
injected clock is the only source of time.

One connection, one re-entrant lock: the ASGI server calls in from its event-loop
thread while tests read state from theirs, and SQLite statements are microseconds long,
so serialising them is both the simplest and the fastest safe choice.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from controller.io.secretfile import private_file
from controller.sandbox.records import (
    ATOMIC_PER_CREDIT,
    DEFAULT_SCOPES,
    KNOWN_TIERS,
    SIGNUP_BONUS_ATOMIC,
    AmountOutOfRange,
    BudgetCapRecord,
    DeliveryRecord,
    DuplicateIdempotencyKey,
    InsufficientFunds,
    KeyRecord,
    RateCounts,
    StoreError,
    TransactionRecord,
    UnknownTier,
    UsageSummary,
    WalletExists,
    WalletFrozen,
    WalletNotFound,
    WalletRecord,
    WebhookRecord,
    from_atomic,
    hash_key,
    new_raw_key,
    to_atomic,
)
from controller.sandbox.stats import RequestStats

LEADERBOARD_HIDDEN_PREFIXES = ("test-", "perf-", "audit-", "stress-")
"""Agent ids the gateway leaves off its leaderboard (case-sensitive prefixes)."""

_RATE_EVENT_HORIZON_S = 3600.0
_RATE_PURGE_EVERY = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS wallets (
    agent_id    TEXT PRIMARY KEY,
    balance     INTEGER NOT NULL,
    frozen      INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash          TEXT PRIMARY KEY,
    agent_id          TEXT NOT NULL,
    tier              TEXT NOT NULL,
    scopes            TEXT NOT NULL,
    allowed_tools     TEXT,
    allowed_agent_ids TEXT,
    created_at        REAL NOT NULL,
    revoked           INTEGER NOT NULL DEFAULT 0,
    revoked_at        REAL,
    expires_at        REAL
);
CREATE INDEX IF NOT EXISTS api_keys_agent ON api_keys(agent_id);
CREATE TABLE IF NOT EXISTS transactions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id        TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    tx_type         TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    currency        TEXT NOT NULL DEFAULT 'CREDITS',
    created_at      REAL NOT NULL,
    idempotency_key TEXT UNIQUE,
    result_snapshot TEXT
);
CREATE INDEX IF NOT EXISTS transactions_agent ON transactions(agent_id, id);
CREATE TABLE IF NOT EXISTS budget_caps (
    agent_id        TEXT PRIMARY KEY,
    daily_cap       INTEGER,
    monthly_cap     INTEGER,
    alert_threshold REAL NOT NULL DEFAULT 0.8,
    updated_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_records (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id        TEXT NOT NULL,
    function        TEXT NOT NULL,
    cost            INTEGER NOT NULL,
    tokens          INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_agent_time ON usage_records(agent_id, created_at);
CREATE TABLE IF NOT EXISTS usage_totals (
    agent_id TEXT PRIMARY KEY,
    calls    INTEGER NOT NULL,
    cost     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL,
    url              TEXT NOT NULL,
    event_types      TEXT NOT NULL,
    secret           TEXT NOT NULL,
    filter_agent_ids TEXT,
    created_at       REAL NOT NULL,
    active           INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS webhooks_agent ON webhooks(agent_id);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    next_retry_at   REAL,
    response_code   INTEGER,
    response_body   TEXT,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_webhook ON webhook_deliveries(webhook_id, id);
CREATE TABLE IF NOT EXISTS rate_events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    tool     TEXT NOT NULL,
    ts       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_events_agent ON rate_events(agent_id, ts);
"""


def _tuple_or_none(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(json.loads(text))


def _json_or_none(values: Sequence[str] | None) -> str | None:
    return None if values is None else json.dumps(list(values))


class SandboxStore:
    """All sandbox state. ``path=None`` keeps everything in memory (tests)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            private_file(self.path)  # it holds webhook secrets and key hashes: 0600 whatever the umask
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            ":memory:" if self.path is None else str(self.path),
            check_same_thread=False,
            isolation_level=None,
        )
        if self.path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=OFF")
        self._conn.executescript(_SCHEMA)
        self._backfill_usage_totals()
        self._rate_inserts = 0
        self.stats = RequestStats()

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock: all-or-nothing multi-statement writes."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        with self._lock:
            row: tuple[object, ...] | None = self._conn.execute(sql, params).fetchone()
            return row

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    # ---------------------------------------------------------------- request stats

    def request_counts(self) -> dict[str, object]:
        return self.stats.snapshot()

    def reset_request_counts(self) -> None:
        self.stats.reset()

    # ---------------------------------------------------------------- wallets

    @staticmethod
    def _wallet(row: tuple[object, ...]) -> WalletRecord:
        agent_id, balance, frozen, created_at, updated_at = row
        assert isinstance(agent_id, str) and isinstance(balance, int)
        assert isinstance(created_at, float) and isinstance(updated_at, float)
        return WalletRecord(agent_id, balance, bool(frozen), created_at, updated_at)

    def get_wallet(self, agent_id: str) -> WalletRecord | None:
        row = self._one(
            "SELECT agent_id, balance, frozen, created_at, updated_at FROM wallets WHERE agent_id = ?",
            (agent_id,),
        )
        return None if row is None else self._wallet(row)

    def _insert_wallet(self, conn: sqlite3.Connection, agent_id: str, initial: int, bonus: bool, now: float) -> None:
        try:
            conn.execute(
                "INSERT INTO wallets (agent_id, balance, frozen, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
                (agent_id, initial + (SIGNUP_BONUS_ATOMIC if bonus else 0), now, now),
            )
        except sqlite3.IntegrityError:
            raise WalletExists(agent_id) from None
        if initial > 0:
            self._insert_tx(conn, agent_id, initial, "deposit", "Initial deposit", now)
        if bonus:
            self._insert_tx(conn, agent_id, SIGNUP_BONUS_ATOMIC, "signup_bonus", "Signup bonus", now)

    def create_wallet(self, agent_id: str, initial: int, *, signup_bonus: bool, now: float) -> WalletRecord:
        with self._tx() as conn:
            self._insert_wallet(conn, agent_id, initial, signup_bonus, now)
        wallet = self.get_wallet(agent_id)
        assert wallet is not None
        return wallet

    def register_agent(self, agent_id: str, *, now: float) -> tuple[str, KeyRecord, WalletRecord]:
        """``/v1/register``: wallet with the 500 bonus plus a free key, atomically."""
        with self._tx() as conn:
            self._insert_wallet(conn, agent_id, 0, True, now)
            raw, record = self._insert_key(conn, agent_id, "free", DEFAULT_SCOPES, now)
        wallet = self.get_wallet(agent_id)
        assert wallet is not None
        return raw, record, wallet

    def set_frozen(self, agent_id: str, frozen: bool, *, now: float) -> None:
        """No error for a missing wallet: the gateway's freeze "succeeds" for one too."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE wallets SET frozen = ?, updated_at = ? WHERE agent_id = ?",
                (1 if frozen else 0, now, agent_id),
            )

    def credit(self, agent_id: str, amount: int, *, now: float) -> int:
        """Add to a wallet (deposit); refuses a frozen one. Returns the new balance."""
        with self._tx() as conn:
            row = conn.execute("SELECT frozen FROM wallets WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is None:
                raise WalletNotFound(agent_id)
            if row[0]:
                raise WalletFrozen(agent_id)
            (balance,) = conn.execute(
                "UPDATE wallets SET balance = balance + ?, updated_at = ? WHERE agent_id = ? RETURNING balance",
                (amount, now, agent_id),
            ).fetchone()
        assert isinstance(balance, int)
        return balance

    def debit(self, agent_id: str, amount: int, *, now: float, check_frozen: bool = True) -> int:
        """Atomic ``UPDATE … WHERE balance >= ?`` like the gateway; returns the new balance."""
        with self._tx() as conn:
            return self._debit(conn, agent_id, amount, now, check_frozen)

    def _debit(self, conn: sqlite3.Connection, agent_id: str, amount: int, now: float, check_frozen: bool) -> int:
        row = conn.execute("SELECT frozen, balance FROM wallets WHERE agent_id = ?", (agent_id,)).fetchone()
        if row is None:
            raise WalletNotFound(agent_id)
        if check_frozen and row[0]:
            raise WalletFrozen(agent_id)
        updated = conn.execute(
            "UPDATE wallets SET balance = balance - ?, updated_at = ? WHERE agent_id = ? AND balance >= ? "
            "RETURNING balance",
            (amount, now, agent_id, amount),
        ).fetchone()
        if updated is None:
            raise InsufficientFunds(agent_id, amount, int(row[1]))
        balance = updated[0]
        assert isinstance(balance, int)
        return balance

    # ---------------------------------------------------------------- ledger

    @staticmethod
    def _tx_record(row: tuple[object, ...]) -> TransactionRecord:
        id_, agent_id, amount, tx_type, description, currency, created_at, key, snapshot = row
        assert isinstance(id_, int) and isinstance(agent_id, str) and isinstance(amount, int)
        assert isinstance(tx_type, str) and isinstance(description, str) and isinstance(currency, str)
        assert isinstance(created_at, float)
        assert key is None or isinstance(key, str)
        assert snapshot is None or isinstance(snapshot, str)
        return TransactionRecord(id_, agent_id, amount, tx_type, description, currency, created_at, key, snapshot)

    _TX_COLUMNS = "id, agent_id, amount, tx_type, description, currency, created_at, idempotency_key, result_snapshot"

    @staticmethod
    def _insert_tx(
        conn: sqlite3.Connection,
        agent_id: str,
        amount: int,
        tx_type: str,
        description: str,
        now: float,
        idempotency_key: str | None = None,
        result_snapshot: str | None = None,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO transactions (agent_id, amount, tx_type, description, currency, created_at, "
            "idempotency_key, result_snapshot) VALUES (?, ?, ?, ?, 'CREDITS', ?, ?, ?)",
            (agent_id, amount, tx_type, description, now, idempotency_key, result_snapshot),
        )
        tx_id = cur.lastrowid
        assert tx_id is not None
        return tx_id

    def record_transaction(
        self,
        agent_id: str,
        amount: int,
        tx_type: str,
        description: str,
        *,
        now: float,
        idempotency_key: str | None = None,
        result_snapshot: str | None = None,
    ) -> int:
        """Append a ledger row. A taken global key raises ``DuplicateIdempotencyKey`` *after*
        the caller already moved the money, exactly the gateway's concurrent-duplicate bug."""
        try:
            with self._tx() as conn:
                return self._insert_tx(
                    conn, agent_id, amount, tx_type, description, now, idempotency_key, result_snapshot
                )
        except sqlite3.IntegrityError:
            raise DuplicateIdempotencyKey(idempotency_key or "") from None

    def find_transaction_by_key(self, idempotency_key: str) -> TransactionRecord | None:
        row = self._one(f"SELECT {self._TX_COLUMNS} FROM transactions WHERE idempotency_key = ?", (idempotency_key,))
        return None if row is None else self._tx_record(row)

    def list_transactions(self, agent_id: str, *, limit: int, offset: int) -> list[TransactionRecord]:
        rows = self._all(
            f"SELECT {self._TX_COLUMNS} FROM transactions WHERE agent_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
            (agent_id, limit, offset),
        )
        return [self._tx_record(r) for r in rows]

    # ---------------------------------------------------------------- usage and spend

    def record_usage_and_charge(
        self, agent_id: str, function: str, cost: int, idempotency_key: str | None, *, now: float
    ) -> None:
        """Usage row (deduplicated by the global usage key) then the charge (never
        deduplicated, never blocked by a freeze): the gateway's spend-undercount quirk."""
        with self._tx() as conn:
            recorded = conn.execute(
                "INSERT OR IGNORE INTO usage_records (agent_id, function, cost, tokens, idempotency_key, "
                "created_at) VALUES (?, ?, ?, 0, ?, ?)",
                (agent_id, function, cost, idempotency_key, now),
            ).rowcount
            if recorded:
                conn.execute(
                    "INSERT INTO usage_totals (agent_id, calls, cost) VALUES (?, 1, ?) ON CONFLICT(agent_id) "
                    "DO UPDATE SET calls = calls + 1, cost = cost + excluded.cost",
                    (agent_id, cost),
                )
            if cost > 0:
                self._debit(conn, agent_id, cost, now, check_frozen=False)
                self._insert_tx(conn, agent_id, -cost, "charge", f"gateway:{function}", now)

    def spend_since(self, agent_id: str, since: float) -> int:
        row = self._one(
            "SELECT COALESCE(SUM(cost), 0) FROM usage_records WHERE agent_id = ? AND created_at >= ?",
            (agent_id, since),
        )
        assert row is not None and isinstance(row[0], int)
        return row[0]

    def usage_summary(self, agent_id: str, since: float | None) -> UsageSummary:
        row = self._one(
            "SELECT COUNT(*), COALESCE(SUM(cost), 0), COALESCE(SUM(tokens), 0) FROM usage_records "
            "WHERE agent_id = ? AND created_at >= ?",
            (agent_id, since if since is not None else float("-inf")),
        )
        assert row is not None
        calls, cost, tokens = row
        assert isinstance(calls, int) and isinstance(cost, int) and isinstance(tokens, int)
        return UsageSummary(calls, cost, tokens)

    def _backfill_usage_totals(self) -> None:
        """``usage_totals`` is the running ``GROUP BY agent_id`` of ``usage_records``; a
        database written before it existed gets it computed once, here."""
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM usage_totals LIMIT 1").fetchone() is None:
                conn.execute(
                    "INSERT INTO usage_totals (agent_id, calls, cost) "
                    "SELECT agent_id, COUNT(*), SUM(cost) FROM usage_records GROUP BY agent_id"
                )

    def leaderboard(self, metric: str, limit: int) -> list[tuple[str, int]]:
        """``(agent_id, value)`` of agents with usage, all time, best first: ``metric``
        ``"calls"`` counts usage records, ``"spend"`` sums their cost in atomic units. Ties
        go by agent id (the gateway's SQL leaves them unordered). Ids with a hidden prefix
        are left out before ``limit`` applies; a negative ``limit`` is SQLite's "no limit",
        as on the gateway. Reads the running totals, so its cost is one row per agent,
        whatever the number of usage records."""
        column = {"calls": "calls", "spend": "cost"}[metric]
        hidden = " AND ".join(f"agent_id NOT GLOB '{prefix}*'" for prefix in LEADERBOARD_HIDDEN_PREFIXES)
        rows = self._all(
            f"SELECT agent_id, {column} FROM usage_totals WHERE {hidden} ORDER BY {column} DESC, agent_id LIMIT ?",
            (limit,),
        )
        out: list[tuple[str, int]] = []
        for agent_id, value in rows:
            assert isinstance(agent_id, str) and isinstance(value, int)
            out.append((agent_id, value))
        return out

    def usage_buckets(self, agent_id: str, step: int, since: float | None, limit: int) -> list[tuple[float, int, int]]:
        """``(bucket start, calls, cost in atomic units)`` per ``step``-second bucket of the
        agent's usage at or after ``since``: the newest ``limit`` non-empty buckets, oldest
        first (the gateway's ``GROUP BY bucket ORDER BY bucket DESC LIMIT ?``, reversed)."""
        rows = self._all(
            "SELECT CAST(CAST(created_at / ? AS INTEGER) * ? AS REAL) AS bucket, COUNT(*), COALESCE(SUM(cost), 0) "
            "FROM usage_records WHERE agent_id = ? AND created_at >= ? GROUP BY bucket ORDER BY bucket DESC LIMIT ?",
            (step, step, agent_id, since if since is not None else float("-inf"), limit),
        )
        out: list[tuple[float, int, int]] = []
        for bucket, calls, cost in reversed(rows):
            assert isinstance(bucket, float) and isinstance(calls, int) and isinstance(cost, int)
            out.append((bucket, calls, cost))
        return out

    # ---------------------------------------------------------------- budget caps

    def set_budget_cap(
        self, agent_id: str, daily_cap: int | None, monthly_cap: int | None, alert_threshold: float, *, now: float
    ) -> BudgetCapRecord:
        """Upsert and full replace: omitted caps become NULL, last writer wins."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO budget_caps (agent_id, daily_cap, monthly_cap, alert_threshold, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(agent_id) DO UPDATE SET daily_cap = excluded.daily_cap, "
                "monthly_cap = excluded.monthly_cap, alert_threshold = excluded.alert_threshold, "
                "updated_at = excluded.updated_at",
                (agent_id, daily_cap, monthly_cap, alert_threshold, now),
            )
        return BudgetCapRecord(agent_id, daily_cap, monthly_cap, alert_threshold)

    def get_budget_cap(self, agent_id: str) -> BudgetCapRecord | None:
        row = self._one(
            "SELECT daily_cap, monthly_cap, alert_threshold FROM budget_caps WHERE agent_id = ?", (agent_id,)
        )
        if row is None:
            return None
        daily, monthly, threshold = row
        assert daily is None or isinstance(daily, int)
        assert monthly is None or isinstance(monthly, int)
        assert isinstance(threshold, float)
        return BudgetCapRecord(agent_id, daily, monthly, threshold)

    # ---------------------------------------------------------------- rate events

    def record_rate_event(self, agent_id: str, tool: str, *, now: float) -> RateCounts:
        """Insert first, then count, so rejected calls count too (as in the gateway)."""
        with self._tx() as conn:
            conn.execute("INSERT INTO rate_events (agent_id, tool, ts) VALUES (?, ?, ?)", (agent_id, tool, now))
            hour, minute, tool_hour = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(ts >= ?), 0), COALESCE(SUM(tool = ?), 0) FROM rate_events "
                "WHERE agent_id = ? AND ts >= ?",
                (now - 60.0, tool, agent_id, now - _RATE_EVENT_HORIZON_S),
            ).fetchone()
            self._rate_inserts += 1
            if self._rate_inserts % _RATE_PURGE_EVERY == 0:
                conn.execute("DELETE FROM rate_events WHERE ts < ?", (now - _RATE_EVENT_HORIZON_S,))
        return RateCounts(int(hour), int(minute), int(tool_hour))

    # ---------------------------------------------------------------- keys

    _KEY_COLUMNS = (
        "key_hash, agent_id, tier, scopes, allowed_tools, allowed_agent_ids, created_at, revoked, "
        "revoked_at, expires_at"
    )

    @staticmethod
    def _key(row: tuple[object, ...]) -> KeyRecord:
        key_hash, agent_id, tier, scopes, tools, agents, created_at, revoked, revoked_at, expires_at = row
        assert isinstance(key_hash, str) and isinstance(agent_id, str) and isinstance(tier, str)
        assert isinstance(scopes, str) and isinstance(created_at, float)
        assert tools is None or isinstance(tools, str)
        assert agents is None or isinstance(agents, str)
        assert revoked_at is None or isinstance(revoked_at, float)
        assert expires_at is None or isinstance(expires_at, float)
        return KeyRecord(
            key_hash=key_hash,
            agent_id=agent_id,
            tier=tier,
            scopes=tuple(json.loads(scopes)),
            allowed_tools=_tuple_or_none(tools),
            allowed_agent_ids=_tuple_or_none(agents),
            created_at=created_at,
            revoked=bool(revoked),
            revoked_at=revoked_at,
            expires_at=expires_at,
        )

    def _insert_key(
        self,
        conn: sqlite3.Connection,
        agent_id: str,
        tier: str,
        scopes: Sequence[str],
        now: float,
        *,
        expires_at: float | None = None,
        allowed_tools: Sequence[str] | None = None,
        allowed_agent_ids: Sequence[str] | None = None,
    ) -> tuple[str, KeyRecord]:
        if tier not in KNOWN_TIERS:
            raise UnknownTier(tier)
        raw = new_raw_key(tier)
        record = KeyRecord(
            key_hash=hash_key(raw),
            agent_id=agent_id,
            tier=tier,
            scopes=tuple(scopes),
            allowed_tools=None if allowed_tools is None else tuple(allowed_tools),
            allowed_agent_ids=None if allowed_agent_ids is None else tuple(allowed_agent_ids),
            created_at=now,
            revoked=False,
            revoked_at=None,
            expires_at=expires_at,
        )
        conn.execute(
            f"INSERT INTO api_keys ({self._KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, ?)",
            (
                record.key_hash,
                agent_id,
                tier,
                json.dumps(list(record.scopes)),
                _json_or_none(allowed_tools),
                _json_or_none(allowed_agent_ids),
                now,
                expires_at,
            ),
        )
        return raw, record

    def create_key(
        self,
        agent_id: str,
        tier: str,
        *,
        now: float,
        scopes: Sequence[str] = DEFAULT_SCOPES,
        expires_at: float | None = None,
        allowed_tools: Sequence[str] | None = None,
        allowed_agent_ids: Sequence[str] | None = None,
    ) -> tuple[str, KeyRecord]:
        """Mint a key; also the test back door for what no HTTP route can set (scopes,
        expiry, allowlists, paid tiers), like ``KeyManager.create_key`` in the gateway."""
        with self._tx() as conn:
            return self._insert_key(
                conn,
                agent_id,
                tier,
                scopes,
                now,
                expires_at=expires_at,
                allowed_tools=allowed_tools,
                allowed_agent_ids=allowed_agent_ids,
            )

    def get_key(self, key_hash: str) -> KeyRecord | None:
        row = self._one(f"SELECT {self._KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,))
        return None if row is None else self._key(row)

    def list_keys(self, agent_id: str | None = None) -> list[KeyRecord]:
        if agent_id is None:
            rows = self._all(f"SELECT {self._KEY_COLUMNS} FROM api_keys ORDER BY created_at, rowid")
        else:
            rows = self._all(
                f"SELECT {self._KEY_COLUMNS} FROM api_keys WHERE agent_id = ? ORDER BY created_at, rowid",
                (agent_id,),
            )
        return [self._key(r) for r in rows]

    def revoke_key_by_prefix(self, agent_id: str, prefix: str, *, now: float) -> bool:
        """Only ``agent_id``'s own live keys are searched (the gateway's REST revoke)."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT key_hash FROM api_keys WHERE agent_id = ? AND revoked = 0 AND substr(key_hash, 1, ?) = ? "
                "ORDER BY created_at, rowid LIMIT 1",
                (agent_id, len(prefix), prefix),
            ).fetchone()
            if row is None or not prefix:
                return False
            conn.execute("UPDATE api_keys SET revoked = 1, revoked_at = ? WHERE key_hash = ?", (now, row[0]))
        return True

    def revoke_key(self, key_hash: str, *, now: float) -> None:
        """Revoke; an already revoked key keeps its original ``revoked_at`` (no grace extension)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked = 1, revoked_at = COALESCE(revoked_at, ?) WHERE key_hash = ?",
                (now, key_hash),
            )

    def rotate_key(self, old: KeyRecord, *, now: float) -> tuple[str, KeyRecord]:
        """Revoke + create in one transaction; the new key gets the old tier and *default*
        scopes (an admin key rotates into a non-admin one), and nothing stops a second
        rotation of the same old key inside its grace window."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked = 1, revoked_at = COALESCE(revoked_at, ?) WHERE key_hash = ?",
                (now, old.key_hash),
            )
            return self._insert_key(conn, old.agent_id, old.tier, DEFAULT_SCOPES, now)

    # ---------------------------------------------------------------- webhooks

    _WEBHOOK_COLUMNS = "id, agent_id, url, event_types, secret, filter_agent_ids, created_at, active"

    @staticmethod
    def _webhook(row: tuple[object, ...]) -> WebhookRecord:
        id_, agent_id, url, event_types, secret, filters, created_at, active = row
        assert isinstance(id_, str) and isinstance(agent_id, str) and isinstance(url, str)
        assert isinstance(event_types, str) and isinstance(secret, str) and isinstance(created_at, float)
        assert filters is None or isinstance(filters, str)
        return WebhookRecord(
            id_,
            agent_id,
            url,
            tuple(json.loads(event_types)),
            secret,
            _tuple_or_none(filters),
            created_at,
            bool(active),
        )

    def create_webhook(
        self,
        agent_id: str,
        url: str,
        event_types: Sequence[str],
        secret: str,
        filter_agent_ids: Sequence[str] | None,
        *,
        now: float,
    ) -> WebhookRecord:
        record = WebhookRecord(
            id=f"whk-{secrets.token_hex(12)}",
            agent_id=agent_id,
            url=url,
            event_types=tuple(event_types),
            secret=secret,
            filter_agent_ids=None if filter_agent_ids is None else tuple(filter_agent_ids),
            created_at=now,
            active=True,
        )
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO webhooks ({self._WEBHOOK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    record.id,
                    agent_id,
                    url,
                    json.dumps(list(event_types)),
                    secret,
                    _json_or_none(filter_agent_ids),
                    now,
                ),
            )
        return record

    def list_webhooks(self, agent_id: str) -> list[WebhookRecord]:
        rows = self._all(
            f"SELECT {self._WEBHOOK_COLUMNS} FROM webhooks WHERE agent_id = ? AND active = 1 "
            "ORDER BY created_at, rowid",
            (agent_id,),
        )
        return [self._webhook(r) for r in rows]

    def get_active_webhook(self, webhook_id: str) -> WebhookRecord | None:
        row = self._one(f"SELECT {self._WEBHOOK_COLUMNS} FROM webhooks WHERE id = ? AND active = 1", (webhook_id,))
        return None if row is None else self._webhook(row)

    def deactivate_webhook(self, webhook_id: str) -> bool:
        with self._tx() as conn:
            cur = conn.execute("UPDATE webhooks SET active = 0 WHERE id = ? AND active = 1", (webhook_id,))
            return cur.rowcount > 0

    _DELIVERY_COLUMNS = (
        "id, webhook_id, event_type, payload, status, attempts, last_attempt_at, next_retry_at, "
        "response_code, response_body, created_at"
    )

    @staticmethod
    def _delivery(row: tuple[object, ...]) -> DeliveryRecord:
        (id_, webhook_id, event_type, payload, status, attempts, last_at, next_at, code, body, created) = row
        assert isinstance(id_, int) and isinstance(webhook_id, str) and isinstance(event_type, str)
        assert isinstance(payload, str) and isinstance(status, str) and isinstance(attempts, int)
        assert last_at is None or isinstance(last_at, float)
        assert next_at is None or isinstance(next_at, float)
        assert code is None or isinstance(code, int)
        assert body is None or isinstance(body, str)
        assert isinstance(created, float)
        return DeliveryRecord(
            id_, webhook_id, event_type, payload, status, attempts, last_at, next_at, code, body, created
        )

    def add_delivery(
        self,
        webhook_id: str,
        event_type: str,
        payload: str,
        *,
        status: str,
        attempts: int,
        last_attempt_at: float | None,
        next_retry_at: float | None,
        response_code: int | None,
        response_body: str | None,
        now: float,
    ) -> DeliveryRecord:
        with self._tx() as conn:
            cur = conn.execute(
                f"INSERT INTO webhook_deliveries ({self._DELIVERY_COLUMNS}) "
                "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    webhook_id,
                    event_type,
                    payload,
                    status,
                    attempts,
                    last_attempt_at,
                    next_retry_at,
                    response_code,
                    response_body,
                    now,
                ),
            )
            delivery_id = cur.lastrowid
        assert delivery_id is not None
        return DeliveryRecord(
            delivery_id,
            webhook_id,
            event_type,
            payload,
            status,
            attempts,
            last_attempt_at,
            next_retry_at,
            response_code,
            response_body,
            now,
        )

    def list_deliveries(self, webhook_id: str, *, limit: int, offset: int) -> list[DeliveryRecord]:
        rows = self._all(
            f"SELECT {self._DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = ? "
            "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            (webhook_id, limit, offset),
        )
        return [self._delivery(r) for r in rows]


__all__ = [
    "ATOMIC_PER_CREDIT",
    "DEFAULT_SCOPES",
    "KNOWN_TIERS",
    "LEADERBOARD_HIDDEN_PREFIXES",
    "SIGNUP_BONUS_ATOMIC",
    "AmountOutOfRange",
    "BudgetCapRecord",
    "DeliveryRecord",
    "DuplicateIdempotencyKey",
    "InsufficientFunds",
    "KeyRecord",
    "RateCounts",
    "RequestStats",
    "SandboxStore",
    "StoreError",
    "TransactionRecord",
    "UnknownTier",
    "UsageSummary",
    "WalletExists",
    "WalletFrozen",
    "WalletNotFound",
    "WalletRecord",
    "WebhookRecord",
    "from_atomic",
    "hash_key",
    "new_raw_key",
    "to_atomic",
]
