"""Writes finops makes invalidate what the observation store knows of the agent written to.

Hooked into every gateway client the daemon builds (a ``ClientObserver``, next to the error
metric), so no writer (apply, holds, rebalancing, rotation, an escalation action, code not
written yet) can forget it. The invalidation happens when the write's answer arrives, or when
it got none (an unknown outcome): with the store's per-agent generation, a read that was in
flight at that moment is not kept, and a read answered before the write ran completes before
the invalidation, which then marks it stale.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from controller.gateway.client import ClientObserver, Exchange
from controller.observation.store import ObservationStore

WALLETS = "/v1/billing/wallets"
CREATES = frozenset({WALLETS, "/v1/register"})
"""Writes that name their agent in the body, not the path."""


def written_agents(method: str, path: str, body: bytes | None) -> tuple[str, ...] | None:
    """The agents a request may change the balance or budget of: ``()`` for reads and for
    writes that touch neither (keys, webhooks); ``None``: a wallet write whose agent cannot
    be told (everything must be read again)."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return ()
    path = path.split("?", 1)[0].rstrip("/")
    if path in CREATES:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return None
        agent = data.get("agent_id") if isinstance(data, dict) else None
        return (agent,) if isinstance(agent, str) and agent else None
    if path.startswith(WALLETS + "/"):
        agent = path[len(WALLETS) + 1 :].split("/", 1)[0]
        return (agent,) if agent else None
    if path.startswith("/v1/batch"):
        return None
    return ()


class WriteWatch:
    """A ``ClientObserver`` that invalidates the store on every write's outcome, then hands
    the event on to the other observers (the daemon's error metric)."""

    def __init__(self, store: ObservationStore, inner: Sequence[ClientObserver] = ()) -> None:
        self.store = store
        self.inner = tuple(inner)

    def on_exchange(self, exchange: Exchange) -> None:
        agents = written_agents(exchange.method, exchange.path, exchange.body)
        if agents is None:
            self.store.invalidate_all()
        for agent in agents or ():
            self.store.invalidate(agent)
        for observer in self.inner:
            observer.on_exchange(exchange)
