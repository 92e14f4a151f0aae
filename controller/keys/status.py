"""Due-ness and status: which keys are due for rotation, the per-agent key status rows,
and whether each held key still authenticates.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from controller.gateway.errors import GatewayError
from controller.keys.late import LateWatches
from controller.keys.model import (
    DueKey,
    HeldKeyHealth,
    KeyStatus,
    key_fp,
)
from controller.keys.sinks import scrub
from controller.keys.store import HeldKey
from controller.keys.vault import MAIN, QUARANTINE
from policies.keyprint import key_prefix
from policies.rotation import next_rotation, rotation_due, validate_schedule
from policies.spec import AgentSpec, DesiredState


class KeyStatusReports(LateWatches):
    """Due keys, key status and held-key health."""

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
            fingerprint = key_fp(key_prefix(held[0])) if held else None
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
                    orphans=tuple(key_fp(o.key_prefix) for o in orphans.get(agent, ())),
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
                fingerprint=key_fp(prefix),
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
