"""Key management's constants, errors and value types (rotation outcomes, runs, due
keys, status rows, held-key health).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.errors import FinopsError
from controller.gateway.client import GatewayClient
from controller.keys.vault import MAIN, QUARANTINE
from controller.state.recovery import IntentKind
from policies.rotation import GRACE_SECONDS as GRACE_SECONDS  # re-exported for the key engine
from policies.spec import KeySinkSpec

ROTATE = IntentKind.ROTATE.value  # resolved by key management (controller.state.recovery)
"""Intent kind in the state database."""
LATE_WATCH_SECONDS = 2 * GRACE_SECONDS
"""How long after concluding an interrupted rotation finops watches for it landing late (at
least; never less than the rotate's settle time, and a watch ends only with a look at the
gateway made after it expired)."""
MAX_PARALLEL_ROTATIONS = 8

FaultHook = Callable[[str, str], None]
"""Called as ``hook(point, agent_id)`` after ``rotate``, ``vault`` and ``deliver``; tests
raise from it to simulate a kill between steps."""
AgentClientFactory = Callable[[str], GatewayClient]
"""Builds a client that authenticates with an agent's own key (for verification)."""

ORPHAN_HELP = (
    "nobody holds this key: it was minted by an interrupted rotation and never stored. GreenHelix 1.4.8 "
    "cannot revoke another agent's key over REST (admin revoke searches only the admin's own keys) and "
    "rotation sets no expiry, so it stays valid until a gateway operator revokes it in the gateway's "
    "database (the api_keys row whose key_hash starts with this prefix). Its secret existed only in the "
    "lost rotate response."
)


class KeyManagementError(FinopsError):
    """A key operation for one agent failed; the message is user-facing and key-free."""


class NoKeyHeld(KeyManagementError):
    """finops holds no key for the agent, so it cannot rotate it."""


class RotationError(KeyManagementError):
    """A rotation failed or stopped part-way (a pending intent says how far it got)."""


class ImportRefused(KeyManagementError):
    """``import_key`` was given a key that is not a live key of that agent."""


def key_fp(prefix: str) -> str:
    return f"sha3:{prefix}"


def iso_seconds(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def sink_payload(spec: KeySinkSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "path": spec.path, "command": list(spec.command)}


def sink_from_payload(data: Mapping[str, Any]) -> KeySinkSpec:
    return KeySinkSpec(
        kind=str(data.get("kind", "directory")),
        path=data.get("path"),
        command=tuple(str(a) for a in data.get("command") or ()),
    )


ORIGIN = {(MAIN, MAIN): "rotate", (MAIN, QUARANTINE): "quarantine", (QUARANTINE, MAIN): "release"}


@dataclass(frozen=True)
class RotationOutcome:
    """One completed rotation (or, with ``changed=False``, one that was not needed)."""

    agent_id: str
    old_fingerprint: str
    new_fingerprint: str
    delivered_to: str
    quarantined: bool
    released: bool = False
    grace_expires_at: float | None = None
    recovered: bool = False
    orphans: tuple[str, ...] = ()
    """Fingerprints of keys minted by an interrupted rotation that nobody holds."""
    changed: bool = True

    def describe(self) -> str:
        if not self.changed:
            return f"{self.agent_id}: key {self.new_fingerprint} is already in quarantine; nothing rotated"
        verb = (
            "released from quarantine"
            if self.released
            else "rotated into quarantine"
            if self.quarantined
            else "rotated"
        )
        parts = [f"{self.agent_id}: key {verb} {self.old_fingerprint} → {self.new_fingerprint}"]
        parts.append(
            "held by finops, not delivered: the agent's key stops working when its grace ends"
            if self.quarantined
            else f"delivered to {self.delivered_to}"
        )
        parts.append("verified")
        if self.grace_expires_at:
            parts.append(f"old key valid until {iso_seconds(self.grace_expires_at)}")
        else:
            parts.append(f"old key valid for up to {GRACE_SECONDS} s after the rotation")
        if self.recovered:
            parts.append("completed after an interrupted run")
        if self.orphans:
            parts.append(f"ORPHANED key(s) {', '.join(self.orphans)}: {ORPHAN_HELP}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "old_fingerprint": self.old_fingerprint,
            "new_fingerprint": self.new_fingerprint,
            "delivered_to": self.delivered_to,
            "quarantined": self.quarantined,
            "released": self.released,
            "grace_expires_at": self.grace_expires_at,
            "recovered": self.recovered,
            "orphans": list(self.orphans),
            "changed": self.changed,
        }


@dataclass
class RotationRun:
    """The result of ``rotate_due``: each agent attempted, failures isolated."""

    recovered: list[str] = field(default_factory=list)
    rotated: list[RotationOutcome] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "recovered": list(self.recovered),
            "rotated": [o.to_dict() for o in self.rotated],
            "failed": dict(self.failed),
            "skipped": dict(self.skipped),
        }


@dataclass(frozen=True)
class DueKey:
    agent_id: str
    schedule: str
    since: datetime | None
    """When the held key's age started (last rotation, else when finops stored it)."""
    due_at: datetime


@dataclass(frozen=True)
class KeyStatus:
    """One agent's key as ``finops status`` shows it."""

    agent_id: str
    managed: bool
    schedule: str
    sink: str
    fingerprint: str | None
    quarantined: bool
    last_rotation: datetime | None
    key_since: datetime | None
    next_due: datetime | None
    due: bool
    orphans: tuple[str, ...]
    pending_rotation: bool
    problem: str | None = None

    def describe(self) -> str:
        if not self.managed:
            return f"{self.agent_id}: key not managed by finops"
        if self.fingerprint is None:
            return f"{self.agent_id}: no key held (run `finops keys import {self.agent_id}`)"
        parts = [f"{self.agent_id}: key {self.fingerprint}"]
        if self.quarantined:
            parts.append("QUARANTINED (not delivered; `finops unfreeze` releases it)")
        parts.append(
            f"last rotated {self.last_rotation.isoformat(timespec='seconds')}"
            if self.last_rotation
            else "never rotated by finops"
        )
        if self.next_due is not None:
            when = self.next_due.isoformat(timespec="seconds")
            parts.append(f"DUE since {when}" if self.due else f"next rotation {when} ({self.schedule})")
        if self.pending_rotation:
            parts.append(
                "a rotation's outcome is unknown (resolved from the gateway once it is seen landing or its "
                "settle time has passed; no new rotation until then)"
            )
        if self.orphans:
            parts.append(f"ORPHANED key(s) {', '.join(self.orphans)}")
        if self.problem:
            parts.append(self.problem)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat(timespec="seconds") if value else None

        return {
            "agent_id": self.agent_id,
            "managed": self.managed,
            "schedule": self.schedule,
            "sink": self.sink,
            "fingerprint": self.fingerprint,
            "quarantined": self.quarantined,
            "last_rotation": iso(self.last_rotation),
            "key_since": iso(self.key_since),
            "next_due": iso(self.next_due),
            "due": self.due,
            "orphans": list(self.orphans),
            "pending_rotation": self.pending_rotation,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class HeldKeyHealth:
    """What the gateway says about the key finops holds for one agent (``finops status``)."""

    agent_id: str
    fingerprint: str
    listed: bool
    """The key is one of the agent's keys in ``GET /v1/infra/keys``."""
    revoked: bool
    """Listed as revoked: a rotation (or revoke) landed; it works only for its grace."""
    authenticates: bool | None
    """Tested only when listed revoked or not listed; ``None`` if the test could not run."""
    expires_in: int | None
    """Seconds of grace left (lower bound), when finops sent the rotation that revoked it."""
    error: str | None = None

    @property
    def flag(self) -> str | None:
        agent, fp = self.agent_id, self.fingerprint
        if self.listed and not self.revoked:
            return None
        if self.authenticates is False:
            return (
                f"NO WORKING KEY HELD: the key finops holds ({fp}) no longer authenticates as {agent}; "
                f"run `finops keys import {agent}` with the agent's current key"
            )
        if not self.listed:
            return f"HELD KEY {fp} IS NOT LISTED among {agent}'s keys on the gateway" + (
                f" (and could not be tested: {self.error})" if self.error else ""
            )
        when = (
            f"expires in {self.expires_in} s"
            if self.expires_in is not None
            else f"is revoked (not by finops) and expires at most {GRACE_SECONDS} s after its revocation"
        )
        tested = f" (could not test it: {self.error})" if self.authenticates is None and self.error else ""
        return (
            f"HELD KEY EXPIRES: held key {fp} {when} and no successor is held{tested}; "
            f"`finops rotate --agent {agent}` (or the daemon's next rotation pass) rotates again from it "
            "while it still authenticates"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "listed": self.listed,
            "revoked": self.revoked,
            "authenticates": self.authenticates,
            "expires_in": self.expires_in,
        }


@dataclass(frozen=True)
class RecoveryStep:
    note: str
    outcome: RotationOutcome | None = None
    lost: bool = False
    unresolved: bool = False
    """The rotate's outcome is still unknown (inside its settle time, nothing landed yet):
    the intent stays pending and no new rotation of the agent may be sent."""
