"""The composition root: what every command and job is handed, built once from the options.

``Services`` holds the target, finops' state database, the key vault and the clock, and is
the one place a ``GatewayClient`` is constructed (``client()``, and ``agent_client(key)``
for key rotation's checks with an agent's own key). Instrumentation (the daemon's metrics)
hooks into every client it builds through ``observer``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.gateway.client import ClientObserver, GatewayClient
from controller.io.target import Target
from controller.keys.vault import KeyVault
from controller.state import StateStore

if TYPE_CHECKING:
    from controller.cli.options import TargetOptions
    from controller.keys.rotate import KeyManager

AGENT_CLIENT_ATTEMPTS = 3
"""An agent's own key is used only to verify it: few attempts, the admin client does the rest."""


@dataclass
class Services:
    target: Target
    state: StateStore
    vault: KeyVault
    clock: Callable[[], float] = time.time
    concurrency: int = 32
    observer: ClientObserver | None = None
    """Instrumentation hooked into every client built here (the daemon's error metric)."""
    fence: Callable[[], None] | None = None
    """The writer lock's check (``controller.state.lock``), run before every gateway write
    of every client built here: a process that lost the lock writes nothing more."""

    def client(self) -> GatewayClient:
        """A client with the target's admin key (use as ``async with``)."""
        return GatewayClient(
            self.target.url, self.target.api_key, concurrency=self.concurrency, observer=self.observer, fence=self.fence
        )

    def agent_client(self, api_key: str) -> GatewayClient:
        """A client authenticating with an agent's own key (key rotation's verification)."""
        return GatewayClient(
            self.target.url, api_key, max_attempts=AGENT_CLIENT_ATTEMPTS, observer=self.observer, fence=self.fence
        )

    def key_manager(self, client: GatewayClient) -> KeyManager:
        """Key management over ``client``, on these services' state, vault and clock."""
        from controller.keys.rotate import KeyManager

        return KeyManager(
            client,
            self.state,
            self.vault,
            state_path=self.state.location,
            clock=self.clock,
            agent_client_factory=self.agent_client,
        )

    def close(self) -> None:
        self.state.close()

    @classmethod
    def build(
        cls,
        target: Target,
        opts: TargetOptions,
        *,
        clock: Callable[[], float] = time.time,
        observer: ClientObserver | None = None,
        fence: Callable[[], None] | None = None,
    ) -> Services:
        """The services for ``target`` as the command-line options configure them."""
        return cls(
            target=target,
            state=StateStore(target.state_location),
            vault=KeyVault(target.secrets_dir(opts.secrets_dir)),
            clock=clock,
            concurrency=opts.concurrency,
            observer=observer,
            fence=fence,
        )


@contextmanager
def open_services(
    target: Target,
    opts: TargetOptions,
    *,
    clock: Callable[[], float] = time.time,
    observer: ClientObserver | None = None,
    fence: Callable[[], None] | None = None,
) -> Iterator[Services]:
    """``Services.build``, closed on exit."""
    services = Services.build(target, opts, clock=clock, observer=observer, fence=fence)
    try:
        yield services
    finally:
        services.close()
