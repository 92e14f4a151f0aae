"""Connection-level quirks of the real gateway that the sandbox reproduces, on by default.

**A 404 ``wallet-not-found`` breaks its keep-alive connection.** On GreenHelix 1.4.8, after
a 404 ``wallet-not-found`` answer, 19 of the next 20 requests sent on that same
connection failed (the handler's exception leaves the connection in a bad state, API.md
§10: "The 404/400 raised by some handlers is also logged as an ASGI traceback"). The
sandbox makes this deterministic: the answer goes out complete and *without*
``Connection: close`` (the client has no reason to drop the connection), and the next
request that arrives on that connection is not run: the connection is closed without an
answer. To the client this is a reset on a reused connection, and for a write it is an
*unknown outcome*. A client must therefore never send another request on a connection that
answered 404 (``GatewayClient`` retires it). A request that got the connection closed
did not run on the sandbox; on the real gateway it cannot be known.

Closing a connection needs the transport: ``AbortableH11Protocol`` (``faults.py``) puts its
``abort`` and a per-connection state dict into every request's ``scope["state"]``. Under
another server the quirk does nothing.
"""

from __future__ import annotations

import threading
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.sandbox.faults import CONNECTION_STATE_KEY, abort_connection

BROKEN = "broken-by-wallet-not-found"
"""Key in the per-connection state: set once the connection answered a wallet-not-found 404."""

_WALLET_NOT_FOUND = b'/errors/wallet-not-found"'
_MAX_SNIFF_BYTES = 4096


class QuirkCounters:
    """What the quirks did, for tests (thread-safe: read from the test's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.broken_connections = 0
        """Connections that answered a wallet-not-found 404 and were then left broken."""
        self.refused_requests = 0
        """Requests that arrived on a broken connection and got it closed, unanswered."""

    def note_broken(self) -> None:
        with self._lock:
            self.broken_connections += 1

    def note_refused(self) -> None:
        with self._lock:
            self.refused_requests += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"broken_connections": self.broken_connections, "refused_requests": self.refused_requests}


class WalletNotFoundBreaksConnection:
    """ASGI middleware for the 404 ``wallet-not-found`` quirk (module docstring)."""

    def __init__(self, app: ASGIApp, *, enabled: bool = True, counters: QuirkCounters | None = None) -> None:
        self.app = app
        self.enabled = enabled
        self.counters = counters if counters is not None else QuirkCounters()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection: dict[str, Any] | None = scope.get("state", {}).get(CONNECTION_STATE_KEY)
        if scope["type"] != "http" or not self.enabled or connection is None:
            await self.app(scope, receive, send)
            return
        if connection.get(BROKEN):
            self.counters.note_refused()
            await abort_connection(scope)
            return
        status = 0
        sniffed = b""

        async def watch(message: Message) -> None:
            nonlocal status, sniffed
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 404:
                if len(sniffed) < _MAX_SNIFF_BYTES:
                    sniffed += message.get("body", b"")[:_MAX_SNIFF_BYTES]
                if not message.get("more_body", False) and _WALLET_NOT_FOUND in sniffed:
                    connection[BROKEN] = True
                    self.counters.note_broken()
            await send(message)

        await self.app(scope, receive, watch)
