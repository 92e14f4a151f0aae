"""What key management remembers in finops' state database: when each held key's age
started, when it was last rotated, and the orphaned keys it has reported. Never keys.

These tables live in finops' one state database (``controller.state``); its migrations
create them and ``controller.state.db.connect`` opens the file. The key finops holds per
agent is one table, owned by the keys repository ``controller.state.keys``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from controller.state import keys
from controller.state.db import connect
from controller.state.keys import HeldKey as HeldKey  # re-exported: the ledger returns it
from controller.state.location import StateLocation, as_location

Clock = Callable[[], float]


@dataclass(frozen=True)
class Orphan:
    """A live key minted by an interrupted rotation that finops never stored."""

    agent_id: str
    key_prefix: str
    detected_at: float
    detail: str


class KeyLedger:
    """Thread-safe; every write commits at once."""

    def __init__(self, state_path: Path | StateLocation, *, clock: Clock = time.time) -> None:
        self.location = as_location(state_path)
        self.path = self.location.file
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.location)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record_stored(self, agent_id: str, key_prefix: str, origin: str, *, rotated: bool, reason: str = "") -> None:
        """finops now holds ``key_prefix`` for the agent; its age starts now."""
        with self._lock:
            keys.record_key(self._db, agent_id, key_prefix, origin, self._clock(), rotated=rotated, reason=reason)

    def held(self) -> dict[str, HeldKey]:
        with self._lock:
            return keys.held_keys(self._db)

    def registered_at(self, agent_id: str, key_prefix: str) -> float | None:
        """When finops started holding this exact key (registration by ``apply``, a
        rotation or an import); ``None`` when the key it holds is another one."""
        held = self.held().get(agent_id)
        return held.since if held is not None and held.key_prefix == key_prefix else None

    def record_orphans(self, agent_id: str, prefixes: Iterable[str], detail: str) -> list[str]:
        """Remember orphaned keys; returns the prefixes that were not known before."""
        new: list[str] = []
        now = self._clock()
        with self._lock:
            for prefix in prefixes:
                cur = self._db.execute(
                    "INSERT INTO keys_orphans (agent_id, key_prefix, detected_at, detail) VALUES (?,?,?,?) "
                    "ON CONFLICT(agent_id, key_prefix) DO NOTHING",
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
                "INSERT INTO keys_rotation_sent (agent_id, key_prefix, first_sent_at) VALUES (?,?,?) "
                "ON CONFLICT(agent_id, key_prefix) DO NOTHING",
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
                "INSERT INTO keys_late_watch (agent_id, intent_key, known, until) VALUES (?,?,?,?) "
                "ON CONFLICT(agent_id, intent_key) DO UPDATE SET "
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
