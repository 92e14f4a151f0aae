"""What key management remembers in finops' state database: when each held key's age
started, when it was last rotated, and the orphaned keys it has reported. Never keys.

These tables live in the same SQLite file as ``controller.state`` (one file per gateway)
and are created here, so the state module needs no knowledge of key management.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from controller.secretfile import private_file

Clock = Callable[[], float]

_SCHEMA = """
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
"""


@dataclass(frozen=True)
class HeldKey:
    """The key finops holds for an agent. ``since`` is when finops got it (the start of
    its age for rotation); ``last_rotated_at`` is the last rotation finops completed."""

    agent_id: str
    key_prefix: str
    origin: str
    since: float
    last_rotated_at: float | None
    last_reason: str


@dataclass(frozen=True)
class Orphan:
    """A live key minted by an interrupted rotation that finops never stored."""

    agent_id: str
    key_prefix: str
    detected_at: float
    detail: str


class KeyLedger:
    """Thread-safe; every write commits at once."""

    def __init__(self, state_path: Path, *, clock: Clock = time.time) -> None:
        self.path = Path(state_path)
        private_file(self.path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record_stored(self, agent_id: str, key_prefix: str, origin: str, *, rotated: bool, reason: str = "") -> None:
        """finops now holds ``key_prefix`` for the agent; its age starts now."""
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT INTO keys_held VALUES (?,?,?,?,?,?,?) ON CONFLICT(agent_id) DO UPDATE SET "
                "key_prefix=excluded.key_prefix, origin=excluded.origin, since=excluded.since, "
                "last_rotated_at=COALESCE(excluded.last_rotated_at, keys_held.last_rotated_at), "
                "last_reason=excluded.last_reason, updated_at=excluded.updated_at",
                (agent_id, key_prefix, origin, now, now if rotated else None, reason, now),
            )

    def held(self) -> dict[str, HeldKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, key_prefix, origin, since, last_rotated_at, last_reason FROM keys_held"
            ).fetchall()
        return {r[0]: HeldKey(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def registered_at(self, agent_id: str, key_prefix: str) -> float | None:
        """When ``controller.state`` recorded this exact key (registration by ``apply``), for
        keys that key management has not yet seen; ``None`` when there is no such record."""
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT stored_at FROM agent_keys WHERE agent_id=? AND key_prefix=?", (agent_id, key_prefix)
                ).fetchone()
        except sqlite3.OperationalError:  # no state tables yet
            return None
        return float(row[0]) if row is not None else None

    def record_orphans(self, agent_id: str, prefixes: Iterable[str], detail: str) -> list[str]:
        """Remember orphaned keys; returns the prefixes that were not known before."""
        new: list[str] = []
        now = self._clock()
        with self._lock:
            for prefix in prefixes:
                cur = self._db.execute(
                    "INSERT INTO keys_orphans VALUES (?,?,?,?) ON CONFLICT(agent_id, key_prefix) DO NOTHING",
                    (agent_id, prefix, now, detail),
                )
                if cur.rowcount:
                    new.append(prefix)
        return new

    def record_rotation_sent(self, agent_id: str, key_prefix: str) -> float:
        """A rotate of ``key_prefix`` is about to be sent; keeps the *earliest* such time,
        which bounds when the gateway can have started the key's 300 s grace (a rotate lands
        at or after it is sent; the gateway keeps the first ``revoked_at``). Returns it."""
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT INTO keys_rotation_sent VALUES (?,?,?) ON CONFLICT(agent_id, key_prefix) DO NOTHING",
                (agent_id, key_prefix, now),
            )
            row = self._db.execute(
                "SELECT first_sent_at FROM keys_rotation_sent WHERE agent_id=? AND key_prefix=?", (agent_id, key_prefix)
            ).fetchone()
        return float(row[0])

    def forget_rotation_sent(self, agent_id: str, key_prefix: str) -> None:
        """The key is listed live and unrevoked: no rotate of it has landed so far, so the
        next one sent starts the bound afresh."""
        with self._lock:
            self._db.execute(
                "DELETE FROM keys_rotation_sent WHERE agent_id=? AND key_prefix=?", (agent_id, key_prefix)
            )

    def rotation_sent_at(self, agent_id: str, key_prefix: str) -> float | None:
        """When finops first sent a rotate of this key, ``None`` if it never did."""
        with self._lock:
            row = self._db.execute(
                "SELECT first_sent_at FROM keys_rotation_sent WHERE agent_id=? AND key_prefix=?", (agent_id, key_prefix)
            ).fetchone()
        return float(row[0]) if row is not None else None

    def watch_late(self, agent_id: str, intent_key: str, known: Iterable[str], until: float) -> None:
        """A rotate whose outcome was unknown was concluded without seeing it land: it may
        still land (a request stuck in a queue) and mint a key nobody holds. Until ``until``,
        any live key of the agent outside ``known`` (and not explained later) is an orphan."""
        with self._lock:
            self._db.execute(
                "INSERT INTO keys_late_watch VALUES (?,?,?,?) ON CONFLICT(agent_id, intent_key) DO UPDATE SET "
                "known=excluded.known, until=excluded.until",
                (agent_id, intent_key, json.dumps(sorted(set(known))), until),
            )

    def explain(self, agent_id: str, key_prefix: str) -> None:
        """``key_prefix`` is a key finops minted and holds: no watch may call it an orphan."""
        with self._lock:
            rows = self._db.execute(
                "SELECT intent_key, known FROM keys_late_watch WHERE agent_id=?", (agent_id,)
            ).fetchall()
            for intent_key, known in rows:
                prefixes = set(json.loads(known)) | {key_prefix}
                self._db.execute(
                    "UPDATE keys_late_watch SET known=? WHERE agent_id=? AND intent_key=?",
                    (json.dumps(sorted(prefixes)), agent_id, intent_key),
                )

    def late_watches(self, agent_id: str | None = None) -> dict[str, set[str]]:
        """Per agent with a watch: the prefixes every one of its watches knows (the
        intersection: a key that appeared after the earliest watch was set is suspect even if
        a later watch saw it). An expired watch stays until ``end_late_watches`` records a
        look at the gateway made after it expired: however long finops was down, a rotate
        that landed inside the watch is seen once."""
        with self._lock:
            rows = self._db.execute("SELECT agent_id, known FROM keys_late_watch").fetchall()
        out: dict[str, set[str]] = {}
        for agent, known in rows:
            if agent_id is None or agent == agent_id:
                prefixes = set(json.loads(known))
                out[agent] = out[agent] & prefixes if agent in out else prefixes
        return out

    def end_late_watches(self, agent_id: str, looked_at: float) -> None:
        """The agent's keys were listed at (or after) ``looked_at`` and checked against its
        watches: the watches that had expired by then are done."""
        with self._lock:
            self._db.execute("DELETE FROM keys_late_watch WHERE agent_id=? AND until < ?", (agent_id, looked_at))

    def orphans(self) -> dict[str, list[Orphan]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, key_prefix, detected_at, detail FROM keys_orphans ORDER BY detected_at, key_prefix"
            ).fetchall()
        out: dict[str, list[Orphan]] = {}
        for r in rows:
            out.setdefault(r[0], []).append(Orphan(r[0], r[1], r[2], r[3]))
        return out
