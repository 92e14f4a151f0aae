"""Which manifest revisions the daemon applied or refused, in finops' state database.

One row per revision (not per pass, so a daemon that runs for a year adds rows only when
the manifests change). It answers "what commit is enforced right now?" for people, and
"what was the last good revision?" for a daemon restarted on top of an invalid commit.
The table lives in finops' one state database (created by ``controller.state.db``'s
migrations), on its own connection (WAL allows it).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller.state.db import connect
from controller.state.location import StateLocation, as_location

APPLIED = "applied"
INVALID = "invalid"


@dataclass(frozen=True)
class RevisionRecord:
    revision: str
    source: str
    status: str
    first_seen: float
    last_seen: float
    passes: int
    last_ok: bool | None
    last_changes: int | None
    detail: str


class RevisionLog:
    def __init__(self, db_path: Path | StateLocation, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(as_location(db_path))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record_applied(self, revision: str, source: str, *, ok: bool, changes: int) -> None:
        """A pass planned and applied ``revision`` (``ok`` is false when some agent failed)."""
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT INTO revisions (revision, source, status, first_seen, last_seen, passes, last_ok, "
                "last_changes) VALUES (?,?,?,?,?,1,?,?) ON CONFLICT(revision) DO UPDATE SET status=excluded.status, "
                "last_seen=excluded.last_seen, passes=revisions.passes+1, last_ok=excluded.last_ok, "
                "last_changes=excluded.last_changes, detail=''",
                (revision, source, APPLIED, now, now, int(ok), changes),
            )

    def record_invalid(self, revision: str, source: str, errors: list[str]) -> None:
        now = self._clock()
        detail = json.dumps(errors[:50])
        with self._lock:
            self._db.execute(
                "INSERT INTO revisions (revision, source, status, first_seen, last_seen, detail) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(revision) DO UPDATE SET last_seen=excluded.last_seen, status=excluded.status, "
                "detail=excluded.detail",
                (revision, source, INVALID, now, now, detail),
            )

    def get(self, revision: str) -> RevisionRecord | None:
        rows = self._select("WHERE revision=?", (revision,))
        return rows[0] if rows else None

    def last_applied(self, source: str | None = None) -> RevisionRecord | None:
        where, args = "WHERE status=?", [APPLIED]
        if source is not None:
            where += " AND source=?"
            args.append(source)
        rows = self._select(where + " ORDER BY last_seen DESC, rowid DESC LIMIT 1", tuple(args))
        return rows[0] if rows else None

    def history(self, limit: int = 20) -> list[RevisionRecord]:
        return self._select("ORDER BY last_seen DESC, rowid DESC LIMIT ?", (limit,))

    def _select(self, tail: str, args: tuple[object, ...]) -> list[RevisionRecord]:
        query = (
            "SELECT revision, source, status, first_seen, last_seen, passes, last_ok, last_changes, detail "
            f"FROM revisions {tail}"
        )
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [
            RevisionRecord(
                revision=r[0],
                source=r[1],
                status=r[2],
                first_seen=r[3],
                last_seen=r[4],
                passes=r[5],
                last_ok=None if r[6] is None else bool(r[6]),
                last_changes=r[7],
                detail=r[8],
            )
            for r in rows
        ]
