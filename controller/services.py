"""The composition root: what every command and job is handed, built once from the options.

``Services`` holds the target, finops' state database, the key store and the clock, and is
the one place a ``GatewayClient`` is constructed (``client()``, and ``agent_client(key)``
for key rotation's checks with an agent's own key). Instrumentation (the daemon's metrics)
hooks into every client it builds through ``observer``.

The key store (``controller.keys.selection``) is opened on first use of ``vault``: commands
that never touch keys (``plan``, e.g. on a CI runner) need no key-encryption key. Every
command that writes passes ``vault`` to what it runs before that runs, so a missing or wrong
key-encryption key stops it before its first gateway write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controller.gateway.client import ClientObserver, GatewayClient
from controller.io.secretref import protect_secret_path
from controller.io.target import Target
from controller.keys.vault import KeyStore
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
    open_vault: Callable[[], KeyStore]
    """Opens the key store (once, on first use of ``vault``)."""
    clock: Callable[[], float] = time.time
    concurrency: int = 32
    observer: ClientObserver | None = None
    """Instrumentation hooked into every client built here (the daemon's error metric)."""
    fence: Callable[[], None] | None = None
    """The writer lock's check (``controller.state.lock``), run before every gateway write
    of every client built here: a process that lost the lock writes nothing more."""
    _vault: KeyStore | None = field(default=None, init=False, repr=False)

    @property
    def vault(self) -> KeyStore:
        """finops' key store (directory or database, see ``controller.keys.selection``)."""
        if self._vault is None:
            self._vault = self.open_vault()
        return self._vault

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
        if self._vault is not None:
            self._vault.close()
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
        from controller.keys.selection import chosen_kind, open_key_store

        location = target.state_location
        secrets_dir = target.secrets_dir(opts.secrets_dir)
        kind = chosen_kind(opts.key_store, location)  # a wrong value fails now, not at first use
        protect_secret_path(secrets_dir)  # no secret reference may name it, even before it is opened
        return cls(
            target=target,
            state=StateStore(location),
            open_vault=lambda: open_key_store(kind, location, secrets_dir),
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
