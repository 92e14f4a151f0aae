"""Rotating managed agents' keys without downtime, and converging after a crash.

GreenHelix 1.4.8 rotates a key only on presentation of the raw current key, answers with
the new key once, keeps the old key valid for 300 s, and mints another live key if the
request is repeated (API.md §0.4, §6). So every rotation is:

1. a durable ``rotate`` intent (old key prefix, the agent's live key prefixes, sink);
2. ``rotate_key`` — never retried: an unknown outcome leaves the intent pending;
3. the new key written to finops' vault at once (atomic, fsynced) and its prefix recorded;
4. delivery to the agent's sink (or, for an emergency stop, into quarantine instead);
5. verification: a balance read with the new key;
6. the intent marked done and the rotation time recorded.

A run that dies between any two steps leaves a pending intent. ``recover`` never rotates
blindly: it lists the agent's live keys and compares them with what the vault holds.

- The new key reached the vault: finish delivery and verification (delivery is repeated, so
  sinks must be idempotent).
- No new key on the gateway: the rotation never happened; nothing to do.
- A new key on the gateway that the vault lacks: it is an *orphan* (minted, never stored).
  It is reported by prefix. Admin cannot revoke another agent's key over REST on 1.4.8, and
  rotation sets no expiry, so it stays live until a gateway operator revokes it in the
  gateway's database. If the held old key is still in its grace period, finops rotates
  again from it to regain a key it holds (decided: one more live key costs nothing, an agent
  locked out costs everything); past the grace, the agent's key is reported lost.

Either way the run converges to exactly one key held by finops that works, and every
orphan is reported by its ``key_hash_prefix``. Rotations of one agent are serialised by an
in-process lock; across processes, the caller holds the state directory's writer lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.errors import FinopsError
from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, Forbidden, GatewayError, ServerError, UnknownOutcome
from controller.gateway.models import KeyRecord
from controller.keys.sinks import DEFAULT_COMMAND_TIMEOUT_S, DeliveryError, KeySink, scrub, sink_for
from controller.keys.store import HeldKey, KeyLedger
from controller.keys.vault import MAIN, QUARANTINE, KeyVault
from controller.state import ABANDONED, DONE, FAILED, PENDING, Intent, StateStore
from policies.keyprint import is_key_token, key_prefix
from policies.rotation import GRACE_SECONDS, next_rotation, rotation_due, validate_schedule
from policies.settle import is_settled, settles_at
from policies.spec import AgentSpec, DesiredState, KeySinkSpec

log = logging.getLogger("finops.keys")

ROTATE = "rotate"
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


def _fp(prefix: str) -> str:
    return f"sha3:{prefix}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _sink_payload(spec: KeySinkSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "path": spec.path, "command": list(spec.command)}


def _sink_from_payload(data: Mapping[str, Any]) -> KeySinkSpec:
    return KeySinkSpec(
        kind=str(data.get("kind", "directory")),
        path=data.get("path"),
        command=tuple(str(a) for a in data.get("command") or ()),
    )


_ORIGIN = {(MAIN, MAIN): "rotate", (MAIN, QUARANTINE): "quarantine", (QUARANTINE, MAIN): "release"}


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
            parts.append(f"old key valid until {_iso(self.grace_expires_at)}")
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
class _Recovery:
    note: str
    outcome: RotationOutcome | None = None
    lost: bool = False
    unresolved: bool = False
    """The rotate's outcome is still unknown (inside its settle time, nothing landed yet):
    the intent stays pending and no new rotation of the agent may be sent."""


class KeyManager:
    """Rotation, recovery, import, quarantine and status for managed agents' keys."""

    def __init__(
        self,
        client: GatewayClient,
        store: StateStore,
        vault: KeyVault,
        *,
        state_path: Path,
        clock: Callable[[], float] = time.time,
        fault_hook: FaultHook | None = None,
        agent_client_factory: AgentClientFactory | None = None,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
        settle_seconds: float | None = None,
    ) -> None:
        from controller.apply import configured_settle_seconds  # apply is the settle time's owner

        self.client = client
        self.store = store
        self.vault = vault
        self.ledger = KeyLedger(state_path, clock=clock)
        self._clock = clock
        self._hook: FaultHook = fault_hook or (lambda point, agent: None)
        self._agent_client: AgentClientFactory = agent_client_factory or self._default_agent_client
        self._command_timeout = command_timeout
        self._settle = configured_settle_seconds() if settle_seconds is None else settle_seconds
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        self.ledger.close()

    # ------------------------------------------------------------------ plumbing

    def _default_agent_client(self, raw_key: str) -> GatewayClient:
        return GatewayClient(self.client.base_url, raw_key, max_attempts=3)

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(agent_id, asyncio.Lock())

    def _sink(self, spec: KeySinkSpec) -> KeySink:
        return sink_for(spec, self.vault, command_timeout=self._command_timeout)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def _agent_keys(self, agent_id: str) -> list[KeyRecord]:
        return [k for k in await self.client.list_keys(agent_id=agent_id) if k.agent_id == agent_id]

    async def _authenticates(self, agent_id: str, raw_key: str) -> bool:
        """Whether the key works for its agent: a free balance read with the key itself.
        Other gateway failures (unreachable, 5xx) propagate: they decide nothing."""
        async with self._agent_client(raw_key) as agent_client:
            try:
                balance = await agent_client.get_balance(agent_id)
            except (AuthenticationFailed, Forbidden):
                return False
        return balance is not None

    def _pending(self, agent_id: str | None = None) -> list[Intent]:
        return [
            i for i in self.store.intents(status=PENDING, kind=ROTATE) if agent_id is None or i.agent_id == agent_id
        ]

    def _report_orphans(self, agent_id: str, prefixes: Collection[str]) -> None:
        if not prefixes:
            return
        self.ledger.record_orphans(agent_id, sorted(prefixes), ORPHAN_HELP)
        for prefix in sorted(prefixes):
            log.warning("ORPHANED KEY %s of agent %s: %s", _fp(prefix), agent_id, ORPHAN_HELP)

    # ------------------------------------------------------------------ rotation

    async def rotate(self, spec: AgentSpec, *, reason: str, quarantine: bool = False) -> RotationOutcome:
        """Rotate the agent's key and deliver the new one (or hold it in quarantine).

        A rotation of this agent left pending by an earlier run is finished first; when that
        completes the same kind of rotation, it is returned instead of rotating again.
        """
        agent = spec.agent_id
        if not spec.keys.manage:
            raise KeyManagementError(f"{agent}: finops does not manage this agent's key (keys.manage is false)")
        async with self._lock(agent):
            supersede = "an emergency stop (rotation into quarantine)" if quarantine else None
            for outcome in await self._resume(agent, spec.keys.sink, supersede=supersede):
                if outcome.quarantined == quarantine and not outcome.released:
                    return outcome
            if quarantine:
                held = self.vault.read(agent, QUARANTINE)
                if held is not None:
                    fp = _fp(key_prefix(held))
                    return RotationOutcome(agent, fp, fp, "quarantine", quarantined=True, changed=False)
                return await self._rotate_locked(agent, spec.keys.sink, reason, MAIN, QUARANTINE)
            if self.vault.is_quarantined(agent):
                raise KeyManagementError(
                    f"{agent}: the key is in quarantine (emergency stop); `finops unfreeze {agent}` releases it "
                    "with a fresh key"
                )
            return await self._rotate_locked(agent, spec.keys.sink, reason, MAIN, MAIN)

    async def quarantine(self, spec: AgentSpec, *, reason: str) -> str:
        """Emergency stop: rotate into quarantine; the agent's key dies when its grace ends."""
        return (await self.rotate(spec, reason=reason, quarantine=True)).describe()

    async def release_quarantine(self, spec: AgentSpec) -> str:
        """Rotate the quarantined key into a fresh key delivered to the agent's sink."""
        agent = spec.agent_id
        async with self._lock(agent):
            for outcome in await self._resume(agent, spec.keys.sink):
                if outcome.released:
                    return outcome.describe()
            if not self.vault.is_quarantined(agent):
                return f"{agent}: no key in quarantine; nothing to release"
            outcome = await self._rotate_locked(agent, spec.keys.sink, "release from quarantine", QUARANTINE, MAIN)
            return outcome.describe()

    async def _rotate_locked(
        self,
        agent: str,
        sink: KeySinkSpec,
        reason: str,
        source: str,
        target: str,
    ) -> RotationOutcome:
        held = self.vault.read(agent, source)
        if held is None:
            where = " in quarantine" if source == QUARANTINE else ""
            raise NoKeyHeld(
                f"{agent}: finops holds no key for this agent{where}, so it cannot rotate it; run "
                f"`finops keys import {agent}` with the agent's current key on stdin"
            )
        old = key_prefix(held)
        looked_at = self._clock()
        rows = await self._agent_keys(agent)
        self._check_late(agent, rows, looked_at)
        live = {k.key_hash_prefix for k in rows if not k.revoked}
        # A held key listed as revoked may still be inside its 300 s grace: while it
        # authenticates it is the only way back to a key finops holds, so rotate from it.
        if old not in live and not await self._authenticates(agent, held):
            raise RotationError(
                f"{agent}: the key finops holds ({_fp(old)}) does not authenticate as {agent} on the gateway "
                f"(revoked past its grace, or not this agent's); run `finops keys import {agent}` with the "
                "agent's current key"
            )
        target_before = self.vault.read(agent, target)
        sent_at = self._clock()
        payload: dict[str, Any] = {
            "old_prefix": old,
            "live_before": sorted(live),
            "listed_before": sorted(k.key_hash_prefix for k in rows),
            "source": source,
            "target": target,
            "target_before": key_prefix(target_before) if target_before else "",
            "sink": _sink_payload(sink),
            "reason": reason,
            "sent_at": sent_at,
        }
        intent_key = f"rotate:{agent}:{sent_at:.6f}"
        self.store.begin_intent(intent_key, ROTATE, agent, payload, sent_at=sent_at)
        self.ledger.record_rotation_sent(agent, old)
        try:
            rotation = await self.client.rotate_key(held)
        except (UnknownOutcome, ServerError) as exc:
            # It may still run on the gateway (a queued request): settle time from now.
            self.store.mark_sent(intent_key, self._clock())
            self.store.finish_intent(intent_key, PENDING, f"outcome unknown: {scrub(str(exc), held)}")
            raise RotationError(
                f"{agent}: the outcome of rotating key {_fp(old)} is unknown ({scrub(str(exc), held)}). It is not "
                "retried, because a retry would mint another live key; a later run resolves it from the gateway: "
                "at once if it is seen landing, else once its settle time has passed and a fresh look still "
                "shows nothing"
            ) from None
        except GatewayError as exc:
            self.store.finish_intent(intent_key, ABANDONED, f"refused: {scrub(str(exc), held)}")
            raise RotationError(
                f"{agent}: the gateway refused to rotate key {_fp(old)}: {scrub(str(exc), held)}"
            ) from None
        self._hook("after_rotate", agent)
        new = rotation.new_key
        self.vault.write(agent, new, target)
        self.store.record_key(agent, key_prefix(new), _ORIGIN[(source, target)])
        self.ledger.explain(agent, key_prefix(new))
        self._hook("after_vault", agent)
        return await self._complete(intent_key, agent, payload, new, sink, grace=rotation.grace_expires_at)

    async def _complete(
        self,
        intent_key: str,
        agent: str,
        payload: Mapping[str, Any],
        new: str,
        sink: KeySinkSpec,
        *,
        grace: float | None,
        recovered: bool = False,
        orphans: tuple[str, ...] = (),
    ) -> RotationOutcome:
        """Steps 4-6 for a new key that is already in the vault (shared with recovery)."""
        prefix = key_prefix(new)
        old, source, target = str(payload["old_prefix"]), str(payload["source"]), str(payload["target"])
        origin = _ORIGIN[(source, target)]
        self.store.record_key(agent, prefix, origin)
        if target == MAIN:
            try:
                where = await self._sink(sink).deliver(agent, new)
            except DeliveryError as exc:
                problem = scrub(str(exc), new)
                self.store.finish_intent(intent_key, PENDING, f"delivery failed: {problem}")
                until = f"at {_iso(grace)}" if grace else f"{GRACE_SECONDS} s after the rotation"
                raise RotationError(
                    f"{agent}: the new key {_fp(prefix)} is held by finops but was NOT delivered: {problem}. The "
                    f"agent's previous key {_fp(old)} stops working {until}. Fix the sink and run `finops rotate "
                    f"--agent {agent}`: it delivers the held key without rotating again"
                ) from None
            self._hook("after_deliver", agent)
        else:
            where = f"quarantine ({self.vault.path_for(agent, QUARANTINE)})"
        await self._verify(intent_key, agent, new)
        if source == QUARANTINE and target == MAIN:
            self.vault.clear(agent, QUARANTINE)
        self.ledger.record_stored(agent, prefix, origin, rotated=True, reason=str(payload.get("reason", "")))
        self.store.finish_intent(
            intent_key, DONE, f"{_fp(old)} -> {_fp(prefix)}" + (" (recovered)" if recovered else "")
        )
        outcome = RotationOutcome(
            agent_id=agent,
            old_fingerprint=_fp(old),
            new_fingerprint=_fp(prefix),
            delivered_to=where,
            quarantined=target == QUARANTINE,
            released=source == QUARANTINE and target == MAIN,
            grace_expires_at=grace,
            recovered=recovered,
            orphans=orphans,
        )
        log.info("%s", outcome.describe())
        return outcome

    async def _verify(self, intent_key: str, agent: str, raw: str) -> None:
        prefix = key_prefix(raw)
        try:
            works = await self._authenticates(agent, raw)
        except GatewayError as exc:
            self.store.finish_intent(intent_key, PENDING, "verification could not run")
            raise RotationError(
                f"{agent}: the new key {_fp(prefix)} is stored but could not be verified "
                f"({scrub(str(exc), raw)}); the next run verifies it"
            ) from None
        if not works:
            self.store.finish_intent(intent_key, FAILED, "the gateway refuses the new key")
            raise RotationError(
                f"{agent}: the gateway refuses the new key {_fp(prefix)} that its rotation just returned; "
                "check the gateway, then import a working key with `finops keys import`"
            )

    # ------------------------------------------------------------------ recovery

    async def recover(self) -> list[str]:
        """Resolve every rotation a crashed or failed run left pending; one note each."""
        notes, _, _ = await self._recover_all()
        return notes

    async def _recover_all(self) -> tuple[list[str], dict[str, str], dict[str, str]]:
        """Notes; the agents whose interrupted rotation could not be resolved or whose key
        was found lost (a run with any of these is not ok); and the agents whose rotate has an
        unknown outcome inside its settle time (a state, not an error: no rotation for them)."""
        notes: list[str] = []
        problems: dict[str, str] = {}
        waiting: dict[str, str] = {}
        for intent in self._pending():
            lock = self._lock(intent.agent_id)
            if lock.locked():
                continue  # being rotated right now, in this process
            async with lock:
                if intent.intent_key not in {i.intent_key for i in self._pending(intent.agent_id)}:
                    continue
                try:
                    recovery = await self._recover_intent(intent, None)
                except (FinopsError, OSError) as exc:
                    note = (
                        f"{intent.agent_id}: an interrupted rotation is not resolved yet: {scrub(str(exc))}; "
                        "the next run tries again"
                    )
                    problems[intent.agent_id] = note
                    notes.append(note)
                    continue
                notes.append(recovery.note)
                if recovery.lost:
                    problems[intent.agent_id] = recovery.note
                elif recovery.unresolved:
                    waiting[intent.agent_id] = recovery.note
        pending = {i.agent_id for i in self._pending()}
        for agent in sorted(set(self.ledger.late_watches()) - pending):
            try:
                looked_at = self._clock()
                late = self._check_late(agent, await self._agent_keys(agent), looked_at)
            except GatewayError as exc:
                notes.append(f"{agent}: could not check for a late-landing rotation: {scrub(str(exc))}")
                continue
            if late:
                notes.append(
                    f"{agent}: a rotation that finops had given up on landed late and minted "
                    f"ORPHANED key(s) {', '.join(_fp(x) for x in late)}: {ORPHAN_HELP}"
                )
        return notes, problems, waiting

    async def _resume(self, agent: str, sink: KeySinkSpec, *, supersede: str | None = None) -> list[RotationOutcome]:
        """Finish this agent's pending rotations (with the current sink) before a new one.
        A rotate whose outcome is still unknown blocks the new one (it would mint another
        key), unless ``supersede`` names an action that must not wait (an emergency stop)."""
        outcomes: list[RotationOutcome] = []
        for intent in self._pending(agent):
            recovery = await self._recover_intent(intent, sink, supersede=supersede)
            if recovery.lost or recovery.unresolved:
                raise RotationError(recovery.note)
            if recovery.outcome is not None:
                outcomes.append(recovery.outcome)
        return outcomes

    def _sent_at(self, intent: Intent) -> float:
        """The last moment finops may have had the intent's rotate on the wire."""
        if intent.sent_at is not None:
            return intent.sent_at
        sent = intent.payload.get("sent_at")
        return float(sent) if isinstance(sent, (int, float)) else intent.created_at

    async def _recover_intent(
        self, intent: Intent, sink_override: KeySinkSpec | None, *, supersede: str | None = None
    ) -> _Recovery:
        """Resolve one interrupted rotation by looking, never by guessing.

        1. The vault holds a new key for the target slot: finish delivery and verification.
        2. Otherwise test the key finops holds (a balance read with it) and compare the
           agent's live key prefixes with the ones known before the rotation:
           - the held key no longer authenticates (401/403): only then is the key lost;
           - something new appeared (an orphan) or the held key is listed revoked (a rotate
             landed whose key finops never got, or the held key was already dying): the held
             key dies when its 300 s grace ends, so, while it still authenticates, rotate
             again from it at once (no settle-time wait: waiting could only lose the key),
             on every run, until a successor is live *and* held;
           - the held key is listed live and nothing new appeared: nothing landed *yet*. A
             rotate stuck in a queue may still run (``policies.settle``), so the intent stays
             pending, and no new rotation of the agent is sent, until the settle time has
             passed since it was sent; only a look made after that concludes "never landed".
        A gateway failure while looking decides nothing: the intent stays pending.
        """
        agent, p = intent.agent_id, intent.payload
        sink = sink_override or _sink_from_payload(p.get("sink") or {})
        old, source, target = str(p["old_prefix"]), str(p["source"]), str(p["target"])
        sent = self._sent_at(intent)
        looked_at = self._clock()
        settled = is_settled(sent, looked_at, self._settle)  # decided before looking: the look comes after
        rows = await self._agent_keys(agent)
        self._check_late(agent, rows, looked_at)
        listed = {k.key_hash_prefix: k for k in rows}
        live = {prefix for prefix, k in listed.items() if not k.revoked}
        minted = sorted(live - set(p.get("live_before") or ()) - {old})
        stored = self.vault.read(agent, target)
        stored_prefix = key_prefix(stored) if stored else None
        if stored is not None and stored_prefix not in {p.get("target_before"), old}:
            orphans = [m for m in minted if m != stored_prefix]
            self._report_orphans(agent, orphans)
            outcome = await self._complete(
                intent.intent_key,
                agent,
                p,
                stored,
                sink,
                grace=None,
                recovered=True,
                orphans=tuple(_fp(m) for m in orphans),
            )
            return _Recovery(f"{agent}: finished an interrupted rotation: {outcome.describe()}", outcome)
        self._report_orphans(agent, minted)
        orphan_fps = ", ".join(_fp(m) for m in minted)
        held = self.vault.read(agent, source)
        works = held is not None and key_prefix(held) == old and await self._authenticates(agent, held)
        # A concluded rotate may still land until its settle time: watch for it at least that long.
        watch_until = max(self._clock() + LATE_WATCH_SECONDS, settles_at(sent, self._settle))
        if not works:
            self.store.finish_intent(
                intent.intent_key,
                FAILED,
                "the held key no longer authenticates" + (f"; new key lost (orphan {orphan_fps})" if minted else ""),
            )
            self.ledger.watch_late(agent, intent.intent_key, listed, watch_until)
            lost = (
                f"a rotation was interrupted after the gateway minted the new key (ORPHANED {orphan_fps}) and "
                "before finops stored it, and "
                if minted
                else "a rotation was interrupted and "
            )
            return _Recovery(
                f"{agent}: LOST KEY: {lost}the key it rotated from ({_fp(old)}) no longer authenticates (past its "
                f"{GRACE_SECONDS} s grace, or revoked). finops holds no working key for {agent}. If the agent still "
                f"has a working key, run `finops keys import {agent}` with it; otherwise a gateway operator must "
                "issue one." + (f" The orphan: {ORPHAN_HELP}" if minted else ""),
                lost=True,
            )
        assert held is not None
        old_row = listed.get(old)
        if not minted and old_row is not None and not old_row.revoked:
            if settled:
                # Past the settle time, and this look (made after it) still shows nothing.
                self.store.finish_intent(
                    intent.intent_key,
                    ABANDONED,
                    f"never landed: nothing on the gateway {int(looked_at - sent)} s after it was sent",
                )
                self.ledger.watch_late(agent, intent.intent_key, listed, watch_until)
                self.ledger.forget_rotation_sent(agent, old)
                return _Recovery(
                    f"{agent}: an interrupted rotation never reached the gateway (its settle time has passed and "
                    f"the gateway still shows no new key); the key finops holds ({_fp(old)}) is unchanged, live "
                    "and works"
                )
            if supersede is not None:
                self.store.finish_intent(
                    intent.intent_key, ABANDONED, f"outcome unknown; superseded by {supersede}, watched for landing"
                )
                self.ledger.watch_late(agent, intent.intent_key, listed, watch_until)
                return _Recovery(
                    f"{agent}: an earlier rotation's outcome is still unknown; {supersede} does not wait for it (if "
                    "it lands late, the key it mints is reported as an orphan)"
                )
            return _Recovery(
                f"{agent}: the outcome of an interrupted rotation of key {_fp(old)} is still unknown (sent "
                f"{_iso(sent)}; it may still run on the gateway). The held key is live, unrevoked and works. No new "
                f"rotation of {agent} is sent until the rotation is seen landing or its settle time ends at "
                f"{_iso(settles_at(sent, self._settle))} and a fresh look still shows nothing",
                unresolved=True,
            )
        # A rotate landed and its new key never reached finops (an orphan, or the held key
        # is listed revoked), but the held key still authenticates: it is inside its grace.
        # It dies when the grace ends, so this does not wait for the settle time.
        revoked_before = old not in set(p.get("live_before") or ()) and old in set(p.get("listed_before") or ())
        why = (
            f"its new key was lost (ORPHANED {orphan_fps})"
            if minted
            else "the held key was already listed revoked and this rotation's outcome is unknown"
            if revoked_before
            else "the held key is listed revoked"
        )
        self.store.finish_intent(intent.intent_key, ABANDONED, f"{why}; rotating again from the held key")
        self.ledger.watch_late(agent, intent.intent_key, listed, watch_until)
        try:
            outcome = await self._rotate_locked(agent, sink, f"recovery: {p.get('reason', '')}", source, target)
        except RotationError as exc:
            left = self._grace_left(agent, old)
            expiry = f"; the held key expires in {left} s and no successor is held" if left is not None else ""
            raise RotationError(f"{exc}{expiry}") from None
        outcome = dataclasses.replace(outcome, recovered=True, orphans=tuple(_fp(m) for m in minted))
        return _Recovery(
            f"{agent}: an interrupted rotation left finops holding only a dying key ({why}); the held key still "
            f"authenticated, so finops rotated again from it: {outcome.describe()}",
            outcome,
        )

    def _grace_left(self, agent: str, prefix: str) -> int | None:
        """Whole seconds left of the held key's grace, from the first rotate finops sent of
        it (a lower bound: the gateway starts the grace when a rotate lands); ``None`` when
        finops never sent one."""
        sent = self.ledger.rotation_sent_at(agent, prefix)
        if sent is None:
            return None
        return max(0, int(sent + GRACE_SECONDS - self._clock()))

    def _check_late(self, agent: str, rows: Collection[KeyRecord], looked_at: float) -> list[str]:
        """Report live keys that appeared after an interrupted rotation was concluded (a rotate
        that landed late) and that finops does not hold. ``rows`` is a listing made at or after
        ``looked_at``; watches that expired before then end with this look (never unseen)."""
        known = self.ledger.late_watches(agent).get(agent)
        if known is None:
            return []
        held = {key_prefix(raw) for raw in (self.vault.read(agent, MAIN), self.vault.read(agent, QUARANTINE)) if raw}
        late = sorted({k.key_hash_prefix for k in rows if not k.revoked} - known - held)
        self._report_orphans(agent, late)
        self.ledger.end_late_watches(agent, looked_at)
        return late

    # ------------------------------------------------------------------ import

    async def import_key(self, agent_id: str, raw_key: str) -> str:
        """Adopt a key the agent already has, after proving it is a live key of that agent.
        The key is not delivered (the agent has it); its age for rotation starts now."""
        raw = raw_key.strip()
        if not is_key_token(raw):
            raise ImportRefused(f"{agent_id}: that is not a GreenHelix API key (expected a2a_<tier>_<hex>)")
        prefix = key_prefix(raw)
        async with self._lock(agent_id):
            if self.vault.is_quarantined(agent_id):
                raise ImportRefused(
                    f"{agent_id}: the agent's key is in quarantine (emergency stop); `finops unfreeze {agent_id}` first"
                )
            rows = {k.key_hash_prefix: k for k in await self._agent_keys(agent_id)}
            row = rows.get(prefix)
            if row is None:
                raise ImportRefused(
                    f"{agent_id}: key {_fp(prefix)} is not one of {agent_id}'s keys on the gateway "
                    "(it may belong to another agent); nothing imported"
                )
            if row.revoked:
                raise ImportRefused(
                    f"{agent_id}: key {_fp(prefix)} is revoked on the gateway (at most {GRACE_SECONDS} s of grace "
                    "left); import the agent's current key instead"
                )
            if not await self._authenticates(agent_id, raw):
                raise ImportRefused(f"{agent_id}: the gateway does not accept key {_fp(prefix)}; nothing imported")
            self.vault.write(agent_id, raw, MAIN)
            self.store.record_key(agent_id, prefix, "import")
            self.ledger.record_stored(agent_id, prefix, "import", rotated=False, reason="import")
            for intent in self._pending(agent_id):
                self.store.finish_intent(intent.intent_key, ABANDONED, f"superseded by the import of {_fp(prefix)}")
                # Its rotate may still land: report the key it would mint.
                until = max(self._clock() + LATE_WATCH_SECONDS, settles_at(self._sent_at(intent), self._settle))
                self.ledger.watch_late(agent_id, intent.intent_key, rows, until)
        log.info("%s: imported key %s", agent_id, _fp(prefix))
        return (
            f"{agent_id}: imported key {_fp(prefix)} into {self.vault.path_for(agent_id)}; "
            "it is rotated on its schedule from now on"
        )

    # ------------------------------------------------------------------ due-ness and status

    def _key_since(self, agent_id: str, prefix: str, ledger: Mapping[str, HeldKey]) -> float | None:
        """When the held key's age started: finops' own record of this exact key, else when
        ``apply`` stored it at registration; ``None`` (due at once) when neither knows."""
        held = ledger.get(agent_id)
        if held is not None and held.key_prefix == prefix:
            return held.since
        return self.ledger.registered_at(agent_id, prefix)

    def due(self, desired: DesiredState, now: datetime) -> list[DueKey]:
        """Managed agents whose held key is due by policy. Agents in quarantine, under an
        operator hold or with a rotation pending are left out (the hold owns them; recovery
        finishes the pending one)."""
        holds = self.store.holds()
        pending = {i.agent_id for i in self._pending()}
        ledger = self.ledger.held()
        out: list[DueKey] = []
        for spec in desired.agents():
            agent = spec.agent_id
            if not spec.keys.manage or agent in holds or agent in pending or self.vault.is_quarantined(agent):
                continue
            raw = self.vault.read(agent, MAIN)
            if raw is None or validate_schedule(spec.keys.rotation):
                continue
            since_ts = self._key_since(agent, key_prefix(raw), ledger)
            since = datetime.fromtimestamp(since_ts, UTC) if since_ts is not None else None
            if rotation_due(spec.keys.rotation, since, now):
                out.append(DueKey(agent, spec.keys.rotation, since, next_rotation(spec.keys.rotation, since, now)))
        return out

    def key_status(self, desired: DesiredState, now: datetime | None = None) -> list[KeyStatus]:
        """Per declared agent: the key held, its rotation times, quarantine and orphans."""
        when = now or self._now()
        ledger = self.ledger.held()
        orphans = self.ledger.orphans()
        pending = {i.agent_id for i in self._pending()}
        out: list[KeyStatus] = []
        for spec in desired.agents():
            agent = spec.agent_id
            policy = spec.keys
            sink = self._sink(policy.sink).describe() if policy.manage else ""
            held = self.vault.held(agent)
            fingerprint = _fp(key_prefix(held[0])) if held else None
            record = ledger.get(agent)
            last = record.last_rotated_at if record else None
            since_ts = self._key_since(agent, key_prefix(held[0]), ledger) if held else None
            since = datetime.fromtimestamp(since_ts, UTC) if since_ts is not None else None
            problem = validate_schedule(policy.rotation)
            quarantined = held is not None and held[1] == QUARANTINE
            next_due: datetime | None = None
            due = False
            if policy.manage and held and not quarantined and not problem:
                next_due = next_rotation(policy.rotation, since, when)
                due = next_due <= when
            out.append(
                KeyStatus(
                    agent_id=agent,
                    managed=policy.manage,
                    schedule=policy.rotation,
                    sink=sink,
                    fingerprint=fingerprint,
                    quarantined=quarantined,
                    last_rotation=datetime.fromtimestamp(last, UTC) if last is not None else None,
                    key_since=since,
                    next_due=next_due,
                    due=due,
                    orphans=tuple(_fp(o.key_prefix) for o in orphans.get(agent, ())),
                    pending_rotation=agent in pending,
                    problem=problem,
                )
            )
        return out

    async def held_key_health(self, desired: DesiredState) -> dict[str, HeldKeyHealth]:
        """Per managed agent with a held key: is it still a live key on the gateway? One
        listing for the fleet; a balance read with the held key only when it is listed
        revoked or not listed (it may be inside its grace)."""
        held_keys = {
            s.agent_id: held
            for s in desired.agents()
            if s.keys.manage and (held := self.vault.held(s.agent_id)) is not None
        }
        if not held_keys:
            return {}
        rows = {(k.agent_id, k.key_hash_prefix): k for k in await self.client.list_keys()}
        out: dict[str, HeldKeyHealth] = {}
        for agent, (raw, _slot) in held_keys.items():
            prefix = key_prefix(raw)
            row = rows.get((agent, prefix))
            listed, revoked = row is not None, bool(row and row.revoked)
            works: bool | None = True
            error: str | None = None
            if not listed or revoked:
                try:
                    works = await self._authenticates(agent, raw)
                except GatewayError as exc:
                    works, error = None, scrub(str(exc), raw)
            out[agent] = HeldKeyHealth(
                agent_id=agent,
                fingerprint=_fp(prefix),
                listed=listed,
                revoked=revoked,
                authenticates=works,
                expires_in=self._grace_left(agent, prefix) if revoked else None,
                error=error,
            )
        return out

    def _cannot_rotate(self, spec: AgentSpec) -> str | None:
        agent = spec.agent_id
        if not spec.keys.manage:
            return "key not managed by finops (keys.manage is false)"
        if agent in self.store.holds():
            return "under an operator hold (`finops unfreeze` rotates it)"
        if self.vault.is_quarantined(agent):
            return "key in quarantine (`finops unfreeze` releases it)"
        if self.vault.read(agent, MAIN) is None:
            return f"finops holds no key for it (run `finops keys import {agent}`)"
        return None

    async def rotate_due(
        self,
        desired: DesiredState,
        now: datetime | None = None,
        *,
        agents: Collection[str] | None = None,
        force: bool = False,
    ) -> RotationRun:
        """Recover pending rotations, then rotate every due key (all selected keys with
        ``force``). Each agent is attempted; one agent's failure is recorded, not raised."""
        notes, unresolved, waiting = await self._recover_all()
        run = RotationRun(recovered=notes)
        when = now or self._now()
        specs = {s.agent_id: s for s in desired.agents()}
        if agents is not None:
            named = list(dict.fromkeys(agents))
            for agent in named:
                if agent not in specs:
                    run.failed[agent] = "not declared in the manifests"
            pool = [specs[a] for a in named if a in specs]
        else:
            pool = list(specs.values())
        due_ids = {d.agent_id for d in self.due(desired, when)}
        targets: list[AgentSpec] = []
        for spec in pool:
            problem = self._cannot_rotate(spec)
            if spec.agent_id in waiting:
                run.skipped[spec.agent_id] = waiting[spec.agent_id]
            elif problem is not None:
                if agents is not None:
                    run.failed[spec.agent_id] = problem
                elif spec.keys.manage:
                    run.skipped[spec.agent_id] = problem
            elif force or spec.agent_id in due_ids:
                targets.append(spec)
            else:
                run.skipped[spec.agent_id] = "not due (`finops rotate --now` rotates anyway)"
        reason = "operator request" if force else "scheduled"
        slots = asyncio.Semaphore(MAX_PARALLEL_ROTATIONS)

        async def one(spec: AgentSpec) -> tuple[str, RotationOutcome | None, str | None]:
            async with slots:
                try:
                    return spec.agent_id, await self.rotate(spec, reason=reason), None
                except (FinopsError, OSError) as exc:
                    return spec.agent_id, None, scrub(str(exc))
                except Exception as exc:  # a bug: still isolate the agent, never echo a key
                    log.error("%s: unexpected %s during rotation", spec.agent_id, type(exc).__name__)
                    return spec.agent_id, None, f"unexpected {type(exc).__name__}: {scrub(str(exc))}"

        for agent, outcome, error in await asyncio.gather(*(one(s) for s in targets)):
            if outcome is not None:
                run.rotated.append(outcome)
            else:
                run.failed[agent] = error or "failed"
        selected = {s.agent_id for s in pool}
        for agent, note in unresolved.items():
            if agent in selected and agent not in {o.agent_id for o in run.rotated}:
                run.failed.setdefault(agent, note)
                run.skipped.pop(agent, None)
        return run
