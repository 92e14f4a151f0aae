"""The shared state of ``KeyManager``: its collaborators (gateway client, state store,
vault, key ledger, clock) and the small gateway and intent look-ups every part uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, Forbidden
from controller.gateway.models import KeyRecord
from controller.keys.model import (
    ROTATE,
    AgentClientFactory,
    FaultHook,
)
from controller.keys.sinks import DEFAULT_COMMAND_TIMEOUT_S, KeySink, sink_for
from controller.keys.store import KeyLedger
from controller.keys.vault import KeyStore
from controller.state import PENDING, Intent, StateStore
from controller.state.location import StateLocation
from policies.spec import KeySinkSpec


class KeyManagerCore:
    """Collaborators and plumbing shared by rotation, recovery, late watches and status."""

    def __init__(
        self,
        client: GatewayClient,
        store: StateStore,
        vault: KeyStore,
        *,
        state_path: Path | StateLocation,
        clock: Callable[[], float] = time.time,
        fault_hook: FaultHook | None = None,
        agent_client_factory: AgentClientFactory | None = None,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
        settle_seconds: float | None = None,
    ) -> None:
        from controller.reconcile.apply import configured_settle_seconds  # apply is the settle time's owner

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
