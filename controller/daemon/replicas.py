"""Each ``finops run`` replica's role, heartbeat and last pass, in finops' state database.

With shared PostgreSQL state, several replicas run against one database and only one of
them is active (``controller.daemon.leader``). Their status lives here, one row per
replica, so an operator (``finops status``, or plain SQL) sees every replica from any
machine: which one is active, since when, which ones stand by, when each was last heard
from and how its last pass went. The local ``daemon-status.json`` file shows only the
replica of the machine it is on.

A row is information for people, never a decision input: who may write is decided by the
writer lock alone (``controller.state.lock``), and a row whose ``heartbeat_at`` is old
belongs to a replica that died (SIGKILL leaves its last row behind; it is pruned after
``FORGET_AFTER_S``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from controller.state.db import connect
from controller.state.location import StateLocation, as_location

FORGET_AFTER_S = 7 * 86_400.0
"""Rows of replicas not heard from for this long are deleted when a replica starts."""


class Role(Enum):
    STANDBY = "standby"
    """Waiting for the writer lock; makes no gateway write."""
    ACTIVE = "active"
    """Holds the writer lock and runs the jobs."""
    FENCED = "fenced"
    """Lost the writer lock while active: stopped writing, exiting."""
    STOPPED = "stopped"
    """Shut down (SIGTERM, ``--once`` done)."""


@dataclass(frozen=True)
class ReplicaIdentity:
    """Who this process is, in the table and in logs: host, pid and a random suffix (a
    restarted container may reuse the pid)."""

    replica_id: str
    host: str
    pid: int

    @classmethod
    def current(cls) -> ReplicaIdentity:
        host = socket.gethostname()
        pid = os.getpid()
        return cls(f"{host}/{pid}/{uuid.uuid4().hex[:8]}", host, pid)


@dataclass(frozen=True)
class ReplicaRecord:
    replica_id: str
    host: str
    pid: int
    role: Role
    started_at: float
    heartbeat_at: float
    active_since: float | None
    last_pass_at: float | None
    last_pass_result: str | None
    last_success_at: float | None
    detail: str
    status: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "host": self.host,
            "pid": self.pid,
            "role": self.role.value,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "active_since": self.active_since,
            "last_pass_at": self.last_pass_at,
            "last_pass_result": self.last_pass_result,
            "last_success_at": self.last_success_at,
            "detail": self.detail,
        }


_COLUMNS = (
    "replica_id, host, pid, role, started_at, heartbeat_at, active_since, last_pass_at, last_pass_result, "
    "last_success_at, detail, status"
)


def _record(row: Any) -> ReplicaRecord:
    try:
        status = json.loads(row[11] or "{}")
    except ValueError:
        status = {}
    try:
        role = Role(row[3])
    except ValueError:
        role = Role.STOPPED
    return ReplicaRecord(
        row[0], row[1], int(row[2]), role, float(row[4]), float(row[5]), row[6], row[7], row[8], row[9], row[10],
        status if isinstance(status, dict) else {},
    )  # fmt: skip


class ReplicaRegistry:
    """This replica's row (written) and everyone's rows (read), on a connection of its own.
    Thread-safe: the daemon writes from its loop, the watchdog and the metrics thread read."""

    def __init__(
        self,
        location: Path | StateLocation,
        identity: ReplicaIdentity,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(as_location(location))
        self._started = clock()
        self._active_since: float | None = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReplicaRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heartbeat(self, role: Role, detail: str = "") -> None:
        """Upsert this replica's row: its role now and ``heartbeat_at`` = now. Becoming
        active sets ``active_since``; any other role clears it."""
        now = self._clock()
        if role is Role.ACTIVE:
            if self._active_since is None:
                self._active_since = now
        else:
            self._active_since = None
        me = self.identity
        with self._lock:
            self._db.execute(
                "INSERT INTO daemon_replicas (replica_id, host, pid, role, started_at, heartbeat_at, active_since, "
                "detail) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(replica_id) DO UPDATE SET role=excluded.role, "
                "heartbeat_at=excluded.heartbeat_at, active_since=excluded.active_since, detail=excluded.detail",
                (me.replica_id, me.host, me.pid, role.value, self._started, now, self._active_since, detail[:500]),
            )

    def record_pass(self, *, result: str, at: float, last_success_at: float | None, status: Mapping[str, Any]) -> None:
        """The last pass of this (active) replica and its full status document."""
        with self._lock:
            self._db.execute(
                "UPDATE daemon_replicas SET last_pass_at=?, last_pass_result=?, last_success_at=?, status=?, "
                "heartbeat_at=? WHERE replica_id=?",
                (at, result, last_success_at, json.dumps(dict(status), default=str), at, self.identity.replica_id),
            )

    def forget_stale(self, older_than: float = FORGET_AFTER_S) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM daemon_replicas WHERE heartbeat_at < ?", (self._clock() - older_than,))
            return max(cur.rowcount, 0)

    def replicas(self) -> list[ReplicaRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM daemon_replicas ORDER BY heartbeat_at DESC, replica_id"
            ).fetchall()
        return [_record(r) for r in rows]

    def active(self) -> ReplicaRecord | None:
        """The other replica that says it is active, heard from most recently (``None``:
        none). A hint for people and for a standby's ``/readyz`` text; the lock decides."""
        for record in self.replicas():
            if record.role is Role.ACTIVE and record.replica_id != self.identity.replica_id:
                return record
        return None


def replica_statuses(location: Path | StateLocation) -> list[ReplicaRecord]:
    """Every replica's row, most recently heard from first (for ``finops status``)."""
    db = connect(as_location(location))
    try:
        rows = db.execute(f"SELECT {_COLUMNS} FROM daemon_replicas ORDER BY heartbeat_at DESC, replica_id").fetchall()
    finally:
        db.close()
    return [_record(r) for r in rows]


__all__ = ["FORGET_AFTER_S", "ReplicaIdentity", "ReplicaRecord", "ReplicaRegistry", "Role", "replica_statuses"]
