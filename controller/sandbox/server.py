"""Running the sandbox: an in-thread server for tests and the ``finops sandbox`` command.

Tests start one server each, so start-up and shutdown must be fast: the listening socket
is bound before uvicorn starts (the port is known at once), and uvicorn's 100 ms
shutdown poll is replaced by an event that ``stop()`` sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn

from controller.errors import ConfigError
from controller.io.secretfile import read_secret_file, write_secret_file
from controller.sandbox.app import create_app
from controller.sandbox.clock import MutableClock
from controller.sandbox.faults import AbortableH11Protocol, FaultConfig, FaultInjector
from controller.sandbox.gateway import WebhookDeliverer
from controller.sandbox.quirks import QuirkCounters
from controller.sandbox.records import WalletExists, hash_key
from controller.sandbox.store import SandboxStore as SandboxStore
from policies.keyprint import fingerprint

ADMIN_AGENT_ID = "finops-admin"
ADMIN_SCOPES = ("read", "write", "admin")
_START_TIMEOUT_S = 10.0
# Longer than httpx's 5 s pool expiry, so a client never reuses a connection the server
# is closing at the same instant (a transport race, not gateway behaviour).
_KEEP_ALIVE_S = 15


def provision_admin_key(store: SandboxStore, key_file: Path, *, now: float | None = None) -> str:
    """The sandbox's ``provision_admin_key.py``: an enterprise key with the admin scope
    for ``finops-admin``, whose wallet gets the 500 signup bonus. A key file whose key is
    still valid is reused, so restarting the sandbox keeps the operator's key."""
    key_file = Path(key_file)
    if key_file.exists():
        existing = read_secret_file(key_file)
        if existing and _is_live_admin_key(store, existing, time.time() if now is None else now):
            return existing
    raw = mint_admin_key(store, now=now)
    write_secret_file(key_file, raw + "\n")
    return raw


def mint_admin_key(store: SandboxStore, *, now: float | None = None) -> str:
    """Create the admin wallet (if missing) and a fresh admin key; returns the raw key."""
    at = time.time() if now is None else now
    with contextlib.suppress(WalletExists):
        store.create_wallet(ADMIN_AGENT_ID, 0, signup_bonus=True, now=at)
    raw, _ = store.create_key(ADMIN_AGENT_ID, "enterprise", scopes=ADMIN_SCOPES, now=at)
    return raw


def _is_live_admin_key(store: SandboxStore, raw: str, now: float) -> bool:
    record = store.get_key(hash_key(raw))
    return (
        record is not None
        and record.is_admin
        and not record.revoked
        and (record.expires_at is None or record.expires_at > now)
    )


class _Uvicorn(uvicorn.Server):
    """uvicorn with an event-driven exit and a start-up signal for the launching thread."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.ready.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # every wake-up refreshes the Date header
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn always pauses 100 ms before draining; an idle sandbox has nothing to
        # drain, and tests stop hundreds of them.
        if self.server_state.connections or self.server_state.tasks:
            await super().shutdown(sockets=sockets)
            return
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()

    def request_exit(self) -> None:
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)


class SandboxServer:
    """A sandbox gateway on 127.0.0.1 in a background thread.

    ::

        with SandboxServer(clock=MutableClock(frozen=True)) as sb:
            httpx.get(f"{sb.url}/v1/health")
            sb.clock.advance(301)
            sb.stats["writes"]

    ``faults`` (a ``FaultConfig`` or spec string, see ``controller.sandbox.faults``) makes
    it misbehave on purpose; ``sb.faults`` reconfigures, suspends and counts at run time.
    It is off unless given here: a test's sandbox never picks up the environment. The real
    gateway's quirks are on, as everywhere in the sandbox: ``sb.quirks`` counts the
    connections a 404 wallet-not-found broke (``controller.sandbox.quirks``).
    """

    def __init__(
        self,
        db_path: Path | None = None,
        admin_key_file: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: MutableClock | None = None,
        deliver: WebhookDeliverer | None = None,
        idempotency_race_window: float = 0.0,
        access_log: bool = False,
        faults: FaultConfig | str | None = None,
        wallet_404_breaks_connection: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.clock = clock if clock is not None else MutableClock()
        self.store = SandboxStore(db_path)
        self.admin_key_file = admin_key_file
        if admin_key_file is not None:
            self.admin_key = provision_admin_key(self.store, admin_key_file, now=self.clock())
        else:
            self.admin_key = mint_admin_key(self.store, now=self.clock())
        self.faults = FaultInjector(faults)
        self.quirks = QuirkCounters()
        """What the real gateway's connection quirks did (``controller.sandbox.quirks``)."""
        self.app = create_app(
            self.store,
            clock=self.clock,
            deliver=deliver,
            idempotency_race_window=idempotency_race_window,
            faults=self.faults,
            wallet_404_breaks_connection=wallet_404_breaks_connection,
            quirks=self.quirks,
        )
        self._access_log = access_log
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError("sandbox server is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> dict[str, object]:
        """``{"requests", "reads", "writes", "by_route"}`` since start or the last reset."""
        return self.store.request_counts()

    def reset_stats(self) -> None:
        self.store.reset_request_counts()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no connection is open and no request is running: a killed client's
        last requests may still be on their way through the server when its process is gone."""
        deadline = time.monotonic() + timeout
        while (server := self._server) is not None and (server.server_state.connections or server.server_state.tasks):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sandbox still busy after {timeout} s")
            time.sleep(0.005)

    def start(self) -> SandboxServer:
        if self._thread is not None:
            return self
        # proto must be IPPROTO_TCP, or asyncio skips TCP_NODELAY on accepted sockets and
        # every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"sandbox: cannot listen on {self.host}:{self.port}: {exc}") from None
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=self._access_log,
            lifespan="off",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=_KEEP_ALIVE_S,
            http=AbortableH11Protocol,
        )
        server = _Uvicorn(config)
        self._server = server
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="finops-sandbox", daemon=True)
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.ready.wait(0.005):
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("sandbox server failed to start")
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.request_exit()
        if thread is not None:
            thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None
        self._socket = None
        self.store.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(
    host: str, port: int, db_path: Path, admin_key_file: Path, faults: FaultConfig | str | None = None
) -> None:
    """Foreground sandbox for ``finops sandbox``; returns on Ctrl-C / SIGTERM. ``faults``
    unset means the ``FINOPS_SANDBOX_FAULTS`` environment variable (unset: no faults)."""
    try:
        config = FaultConfig.from_env() if faults is None else FaultConfig.coerce(faults)
    except ValueError as exc:
        raise ConfigError(f"sandbox: {exc}") from None
    store = SandboxStore(db_path)
    key = provision_admin_key(store, admin_key_file)
    app = create_app(store, clock=MutableClock(), faults=FaultInjector(config))
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        store.close()
        raise ConfigError(f"sandbox: cannot listen on {host}:{port}: {exc}; pick another --port") from None
    bound_port = sock.getsockname()[1]
    print(
        f"sandbox: listening on http://{host}:{bound_port}, db {db_path}, "
        f"admin key {fingerprint(key)} in {admin_key_file}",
        flush=True,
    )
    if config.enabled:
        print(f"sandbox: injecting faults on /v1/*: {config.to_spec()}", flush=True)
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=_KEEP_ALIVE_S,
        http=AbortableH11Protocol,
    )
    try:
        uvicorn.Server(uv_config).run(sockets=[sock])
    finally:
        sock.close()
        store.close()


def temporary_db_path() -> Path:
    """A throwaway on-disk database, for benchmarks that want WAL rather than memory."""
    return Path(tempfile.mkdtemp(prefix="finops-sandbox-")) / "sandbox.db"


__all__ = [
    "ADMIN_AGENT_ID",
    "MutableClock",
    "SandboxServer",
    "SandboxStore",
    "mint_admin_key",
    "provision_admin_key",
    "serve",
    "temporary_db_path",
]
