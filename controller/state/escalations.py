"""The escalations repository: one row per action the escalation ladder decided
(``policies.escalation``), keyed by the crossing's alert id, so an action exists at most
once per crossing.

The alert engine inserts rows in the same transaction as the alert slots
(``controller.alerting.store.AlertTx``); the ladder runner (``controller.alerting.ladder``)
moves them along; the planner reads the open pauses (``StateStore.escalations``). No other
module writes SQL against the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING

from policies.escalation import RELEASED, UNFINISHED, Escalation
from policies.money import format_money

if TYPE_CHECKING:
    from controller.state.db import Database

TABLE = """
CREATE TABLE IF NOT EXISTS escalations (
    alert_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    budget_window TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    action TEXT NOT NULL,
    release_policy TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    cap TEXT,
    detail TEXT NOT NULL DEFAULT '',
    decided_at REAL NOT NULL,
    executed_at REAL,
    released_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS escalations_agent ON escalations(agent_id, status);
"""

_COLUMNS = (
    "alert_id, agent_id, budget_window, threshold, action, release_policy, status, reason, cap, detail,"
    " decided_at, executed_at, released_at"
)


def _row(r: tuple[object, ...]) -> Escalation:
    a, ag, w, t, act, rel, st, reason, cap, detail, dec, ex, released = r
    return Escalation(
        alert_id=str(a),
        agent_id=str(ag),
        window=str(w),
        threshold=int(str(t)),
        action=str(act),
        release=str(rel),
        status=str(st),
        reason=str(reason),
        decided_at=float(str(dec)),
        cap=Decimal(str(cap)) if cap is not None else None,
        executed_at=float(str(ex)) if ex is not None else None,
        released_at=float(str(released)) if released is not None else None,
        detail=str(detail),
    )


def load(db: Database, *, statuses: Iterable[str] | None = None, agent_id: str | None = None) -> list[Escalation]:
    """Rows, oldest decision first (optionally only some statuses, or one agent's)."""
    sql = f"SELECT {_COLUMNS} FROM escalations"
    where: list[str] = []
    args: list[object] = []
    if statuses is not None:
        wanted = sorted(set(statuses))
        where.append(f"status IN ({','.join('?' * len(wanted))})")
        args += wanted
    if agent_id is not None:
        where.append("agent_id = ?")
        args.append(agent_id)
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [_row(tuple(r)) for r in db.execute(sql + " ORDER BY decided_at, alert_id", args).fetchall()]


def insert(db: Database, row: Escalation, now: float) -> bool:
    """Record a decision; ``False`` when this crossing already has one (never replaced)."""
    cur = db.execute(
        f"INSERT INTO escalations ({_COLUMNS}, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (alert_id) DO NOTHING",
        (row.alert_id, row.agent_id, row.window, row.threshold, row.action, row.release, row.status, row.reason,
         _money(row.cap), row.detail, row.decided_at, row.executed_at, row.released_at, now),
    )  # fmt: skip
    return cur.rowcount > 0


def update(db: Database, row: Escalation, now: float, *, expect: Iterable[str] | None = None) -> bool:
    """Store a row's new status, cap, times and detail; with ``expect``, only if its stored
    status is one of those (a concurrent release is not overwritten)."""
    sql = (
        "UPDATE escalations SET status=?, cap=?, detail=?, executed_at=?, released_at=?, updated_at=? WHERE alert_id=?"
    )
    args: list[object] = [row.status, _money(row.cap), row.detail, row.executed_at, row.released_at, now, row.alert_id]
    if expect is not None:
        wanted = sorted(set(expect))
        sql += f" AND status IN ({','.join('?' * len(wanted))})"
        args += wanted
    return db.execute(sql, args).rowcount > 0


def release_all(db: Database, agent_id: str, now: float, detail: str) -> int:
    """End every unfinished escalation of an agent (``finops unfreeze``)."""
    cur = db.execute(
        "UPDATE escalations SET status=?, detail=?, released_at=COALESCE(released_at, ?), updated_at=?"
        " WHERE agent_id=? AND status IN (?,?,?)",
        (RELEASED, detail, now, now, agent_id, *UNFINISHED),
    )
    return cur.rowcount


def _money(value: Decimal | None) -> str | None:
    return format_money(value) if value is not None else None
