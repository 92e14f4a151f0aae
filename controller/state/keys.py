"""The keys repository: the one table (``keys_held``) that says which key finops holds for
each agent (its fingerprint prefix, never the key), where it came from and since when.

``apply`` (registration), rotation and import all record through :func:`record_key`;
``controller.state.store.StateStore`` and ``controller.keys.store.KeyLedger`` read it
through the functions here, so no other module writes SQL against the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.state.db import Database


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


def record_key(
    db: Database, agent_id: str, key_prefix: str, origin: str, now: float, *, rotated: bool = False,
    reason: str | None = None,
) -> None:  # fmt: skip
    """finops now holds ``key_prefix`` for the agent; its age starts now. ``rotated`` marks
    a completed rotation; ``reason`` (``None``: keep the row's own while the key is the
    same) is the reason of the last rotation or import."""
    db.execute(
        "INSERT INTO keys_held (agent_id, key_prefix, origin, since, last_rotated_at, last_reason, updated_at) "
        "VALUES (?,?,?,?,?,?,?) ON CONFLICT(agent_id) DO UPDATE SET "
        "last_reason=CASE WHEN CAST(? AS TEXT) IS NOT NULL THEN excluded.last_reason "
        "WHEN keys_held.key_prefix=excluded.key_prefix THEN keys_held.last_reason ELSE '' END, "
        "key_prefix=excluded.key_prefix, origin=excluded.origin, since=excluded.since, "
        "last_rotated_at=COALESCE(excluded.last_rotated_at, keys_held.last_rotated_at), "
        "updated_at=excluded.updated_at",
        (agent_id, key_prefix, origin, now, now if rotated else None, reason or "", now, reason),
    )


def held_keys(db: Database) -> dict[str, HeldKey]:
    rows = db.execute(
        "SELECT agent_id, key_prefix, origin, since, last_rotated_at, last_reason FROM keys_held"
    ).fetchall()
    return {r[0]: HeldKey(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows}


def key_prefixes(db: Database) -> dict[str, str]:
    return {r[0]: r[1] for r in db.execute("SELECT agent_id, key_prefix FROM keys_held").fetchall()}
