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
import logging
from collections.abc import Collection
from datetime import datetime

from controller.errors import FinopsError
from controller.keys.model import (
    GRACE_SECONDS,
    LATE_WATCH_SECONDS,
    MAX_PARALLEL_ROTATIONS,
    ORPHAN_HELP,
    ROTATE,
    AgentClientFactory,
    DueKey,
    FaultHook,
    HeldKeyHealth,
    ImportRefused,
    KeyManagementError,
    KeyStatus,
    NoKeyHeld,
    RotationError,
    RotationOutcome,
    RotationRun,
    key_fp,
)
from controller.keys.recovery import RotationRecovery
from controller.keys.sinks import scrub
from controller.keys.status import KeyStatusReports
from controller.keys.vault import MAIN, QUARANTINE
from controller.state import ABANDONED
from policies.keyprint import is_key_token, key_prefix
from policies.settle import settles_at
from policies.spec import AgentSpec, DesiredState

log = logging.getLogger("finops.keys")


class KeyManager(RotationRecovery, KeyStatusReports):
    """Rotation, recovery, import, quarantine and status for managed agents' keys."""

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
                    fp = key_fp(key_prefix(held))
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
                    f"{agent_id}: key {key_fp(prefix)} is not one of {agent_id}'s keys on the gateway "
                    "(it may belong to another agent); nothing imported"
                )
            if row.revoked:
                raise ImportRefused(
                    f"{agent_id}: key {key_fp(prefix)} is revoked on the gateway (at most {GRACE_SECONDS} s of grace "
                    "left); import the agent's current key instead"
                )
            if not await self._authenticates(agent_id, raw):
                raise ImportRefused(f"{agent_id}: the gateway does not accept key {key_fp(prefix)}; nothing imported")
            self.vault.write(agent_id, raw, MAIN)
            self.store.record_key(agent_id, prefix, "import")
            self.ledger.record_stored(agent_id, prefix, "import", rotated=False, reason="import")
            for intent in self._pending(agent_id):
                self.store.finish_intent(intent.intent_key, ABANDONED, f"superseded by the import of {key_fp(prefix)}")
                # Its rotate may still land: report the key it would mint.
                until = max(self._clock() + LATE_WATCH_SECONDS, settles_at(self._sent_at(intent), self._settle))
                self.ledger.watch_late(agent_id, intent.intent_key, rows, until)
        log.info("%s: imported key %s", agent_id, key_fp(prefix))
        return (
            f"{agent_id}: imported key {key_fp(prefix)} into {self.vault.describe(agent_id)}; "
            "it is rotated on its schedule from now on"
        )

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


__all__ = [
    "GRACE_SECONDS",
    "LATE_WATCH_SECONDS",
    "MAX_PARALLEL_ROTATIONS",
    "ORPHAN_HELP",
    "ROTATE",
    "AgentClientFactory",
    "DueKey",
    "FaultHook",
    "HeldKeyHealth",
    "ImportRefused",
    "KeyManagementError",
    "KeyManager",
    "KeyStatus",
    "NoKeyHeld",
    "RotationError",
    "RotationOutcome",
    "RotationRun",
]
