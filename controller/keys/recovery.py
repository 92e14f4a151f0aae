"""Converging after a crash: every pending ``rotate`` intent is resolved from the
gateway's key listing and the vault, never by rotating blindly (see ``controller.keys.rotate``).
"""

from __future__ import annotations

import dataclasses

from controller.errors import FinopsError
from controller.gateway.errors import GatewayError
from controller.keys.flow import RotationFlow
from controller.keys.model import (
    GRACE_SECONDS,
    LATE_WATCH_SECONDS,
    ORPHAN_HELP,
    RecoveryStep,
    RotationError,
    RotationOutcome,
    iso_seconds,
    key_fp,
    sink_from_payload,
)
from controller.keys.sinks import scrub
from controller.state import ABANDONED, FAILED, Intent
from policies.keyprint import key_prefix
from policies.settle import is_settled, settles_at
from policies.spec import KeySinkSpec


class RotationRecovery(RotationFlow):
    """Recovery of rotations a crashed or failed run left pending."""

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
                    f"ORPHANED key(s) {', '.join(key_fp(x) for x in late)}: {ORPHAN_HELP}"
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
    ) -> RecoveryStep:
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
        sink = sink_override or sink_from_payload(p.get("sink") or {})
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
                orphans=tuple(key_fp(m) for m in orphans),
            )
            return RecoveryStep(f"{agent}: finished an interrupted rotation: {outcome.describe()}", outcome)
        self._report_orphans(agent, minted)
        orphan_fps = ", ".join(key_fp(m) for m in minted)
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
            return RecoveryStep(
                f"{agent}: LOST KEY: {lost}the key it rotated from ({key_fp(old)}) no longer authenticates (past its "
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
                return RecoveryStep(
                    f"{agent}: an interrupted rotation never reached the gateway (its settle time has passed and "
                    f"the gateway still shows no new key); the key finops holds ({key_fp(old)}) is unchanged, live "
                    "and works"
                )
            if supersede is not None:
                self.store.finish_intent(
                    intent.intent_key, ABANDONED, f"outcome unknown; superseded by {supersede}, watched for landing"
                )
                self.ledger.watch_late(agent, intent.intent_key, listed, watch_until)
                return RecoveryStep(
                    f"{agent}: an earlier rotation's outcome is still unknown; {supersede} does not wait for it (if "
                    "it lands late, the key it mints is reported as an orphan)"
                )
            return RecoveryStep(
                f"{agent}: the outcome of an interrupted rotation of key {key_fp(old)} is still unknown (sent "
                f"{iso_seconds(sent)}; it may still run on the gateway). The held key is live, unrevoked and works. "
                f"No new rotation of {agent} is sent until the rotation is seen landing or its settle time ends at "
                f"{iso_seconds(settles_at(sent, self._settle))} and a fresh look still shows nothing",
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
        outcome = dataclasses.replace(outcome, recovered=True, orphans=tuple(key_fp(m) for m in minted))
        return RecoveryStep(
            f"{agent}: an interrupted rotation left finops holding only a dying key ({why}); the held key still "
            f"authenticated, so finops rotated again from it: {outcome.describe()}",
            outcome,
        )
