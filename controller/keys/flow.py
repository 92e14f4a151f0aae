"""One rotation, step by step: durable intent, ``rotate_key`` (never retried), vault,
delivery (or quarantine), verification, done. See ``controller.keys.rotate``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from controller.gateway.errors import GatewayError, ServerError, UnknownOutcome
from controller.keys.late import LateWatches
from controller.keys.model import (
    GRACE_SECONDS,
    ORIGIN,
    ROTATE,
    NoKeyHeld,
    RotationError,
    RotationOutcome,
    iso_seconds,
    key_fp,
    sink_payload,
)
from controller.keys.sinks import DeliveryError, scrub
from controller.keys.vault import MAIN, QUARANTINE
from controller.state import ABANDONED, DONE, FAILED, PENDING
from policies.keyprint import key_prefix
from policies.spec import KeySinkSpec

log = logging.getLogger("finops.keys")


class RotationFlow(LateWatches):
    """The steps of one rotation, run under the agent's lock."""

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
                f"{agent}: the key finops holds ({key_fp(old)}) does not authenticate as {agent} on the gateway "
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
            "sink": sink_payload(sink),
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
                f"{agent}: the outcome of rotating key {key_fp(old)} is unknown ({scrub(str(exc), held)}). It is not "
                "retried, because a retry would mint another live key; a later run resolves it from the gateway: "
                "at once if it is seen landing, else once its settle time has passed and a fresh look still "
                "shows nothing"
            ) from None
        except GatewayError as exc:
            self.store.finish_intent(intent_key, ABANDONED, f"refused: {scrub(str(exc), held)}")
            raise RotationError(
                f"{agent}: the gateway refused to rotate key {key_fp(old)}: {scrub(str(exc), held)}"
            ) from None
        self._hook("after_rotate", agent)
        new = rotation.new_key
        self.vault.write(agent, new, target)
        self.store.record_key(agent, key_prefix(new), ORIGIN[(source, target)])
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
        origin = ORIGIN[(source, target)]
        self.store.record_key(agent, prefix, origin)
        if target == MAIN:
            try:
                where = await self._sink(sink).deliver(agent, new)
            except DeliveryError as exc:
                problem = scrub(str(exc), new)
                self.store.finish_intent(intent_key, PENDING, f"delivery failed: {problem}")
                until = f"at {iso_seconds(grace)}" if grace else f"{GRACE_SECONDS} s after the rotation"
                raise RotationError(
                    f"{agent}: the new key {key_fp(prefix)} is held by finops but was NOT delivered: {problem}. The "
                    f"agent's previous key {key_fp(old)} stops working {until}. Fix the sink and run `finops rotate "
                    f"--agent {agent}`: it delivers the held key without rotating again"
                ) from None
            self._hook("after_deliver", agent)
        else:
            where = f"quarantine ({self.vault.describe(agent, QUARANTINE)})"
        await self._verify(intent_key, agent, new)
        if source == QUARANTINE and target == MAIN:
            self.vault.clear(agent, QUARANTINE)
        self.ledger.record_stored(agent, prefix, origin, rotated=True, reason=str(payload.get("reason", "")))
        self.store.finish_intent(
            intent_key, DONE, f"{key_fp(old)} -> {key_fp(prefix)}" + (" (recovered)" if recovered else "")
        )
        outcome = RotationOutcome(
            agent_id=agent,
            old_fingerprint=key_fp(old),
            new_fingerprint=key_fp(prefix),
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
                f"{agent}: the new key {key_fp(prefix)} is stored but could not be verified "
                f"({scrub(str(exc), raw)}); the next run verifies it"
            ) from None
        if not works:
            self.store.finish_intent(intent_key, FAILED, "the gateway refuses the new key")
            raise RotationError(
                f"{agent}: the gateway refuses the new key {key_fp(prefix)} that its rotation just returned; "
                "check the gateway, then import a working key with `finops keys import`"
            )
