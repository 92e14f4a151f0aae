"""Where finops' state lives and who writes to it, for ``finops status``: the backend, the
writer lock's holder (PostgreSQL), and each daemon replica's role and last heartbeat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.daemon.replicas import ReplicaRecord, Role, replica_statuses
from controller.errors import FinopsError
from controller.state.location import StateLocation
from controller.state.lock import holder

HEARD_WITHIN_S = 60.0
"""A replica whose heartbeat is older than this is not counted as running."""
RECENT_S = 3_600.0
"""Replicas heard from within this are listed (older rows are history)."""


@dataclass(frozen=True)
class StateStatus:
    backend: str
    location: str
    writer: str | None
    """Who holds the writer lock now (PostgreSQL only; ``None``: nobody or not known)."""
    replicas: tuple[ReplicaRecord, ...]
    now: float
    flags: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "location": self.location,
            "writer": self.writer,
            "replicas": [
                {**r.to_dict(), "heard_ago_seconds": round(self.now - r.heartbeat_at, 1)} for r in self.replicas
            ],
            "flags": list(self.flags),
        }

    def lines(self) -> list[str]:
        held = f"; writer lock held by {self.writer}" if self.writer else ""
        out = [f"State: {self.backend} at {self.location}{held}"]
        for r in self.replicas:
            heard = self.now - r.heartbeat_at
            last = f", last pass {r.last_pass_result}" if r.last_pass_result else ""
            who = f"{r.host}/{r.pid} ({r.replica_id[:8]})"
            out.append(f"  replica {who}: {r.role.value}, heard {heard:.0f} s ago{last}")
        out += [f"  ! {flag}" for flag in self.flags]
        return out


def _flags(replicas: tuple[ReplicaRecord, ...], now: float) -> tuple[str, ...]:
    alive = [r for r in replicas if now - r.heartbeat_at <= HEARD_WITHIN_S and r.role is not Role.STOPPED]
    active = [r for r in alive if r.role is Role.ACTIVE]
    flags: list[str] = []
    if alive and not active:
        flags.append(
            f"NO ACTIVE DAEMON: {len(alive)} replica(s) running, none active (is the writer lock held elsewhere?)"
        )
    if len(active) > 1:  # the lock forbids it; a stale heartbeat of a replica killed a moment ago can show it
        flags.append("MORE THAN ONE ACTIVE DAEMON reported: " + ", ".join(f"{r.host}/{r.pid}" for r in active))
    return tuple(flags)


def state_status(location: StateLocation, *, now: float) -> StateStatus:
    writer: str | None = None
    if location.shared:
        try:
            writer = holder(location)
        except FinopsError:
            writer = None
    try:
        rows = tuple(r for r in replica_statuses(location) if now - r.heartbeat_at <= RECENT_S)
    except FinopsError:
        rows = ()
    return StateStatus(location.backend, str(location), writer, rows, now, _flags(rows, now))
