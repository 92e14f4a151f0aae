"""The sandbox with a fixed delay before every ``/v1/*`` request: a network round trip.

On loopback a request costs only CPU, so nothing is gained by overlapping requests beyond
using a second core; against a real gateway most of a request's time is the round trip,
which is what concurrency hides. The delay is an ``asyncio.sleep`` inside the sandbox, so
it costs neither side any CPU and holds the client's connection exactly as a round trip
would. Only the benchmark uses this (``bench.scale --rtt-ms``); it prints the same
"listening on" line as ``finops sandbox`` so ``SandboxProcess`` can start either.

    python -m bench.latency_sandbox --rtt-ms 20 --db DB --admin-key-file KEY
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from controller.sandbox.app import create_app
from controller.sandbox.clock import MutableClock
from controller.sandbox.server import provision_admin_key
from controller.sandbox.store import SandboxStore


class RoundTrip:
    """ASGI middleware: wait ``seconds`` before handling a gateway request."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1/"):
            await asyncio.sleep(self.seconds)
        await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(description="sandbox with a simulated round trip per request")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--admin-key-file", type=Path, required=True)
    parser.add_argument("--rtt-ms", type=float, required=True)
    args = parser.parse_args()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    store = SandboxStore(args.db)
    provision_admin_key(store, args.admin_key_file)
    app = RoundTrip(create_app(store, clock=MutableClock()), args.rtt_ms / 1000)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    print(f"sandbox: listening on http://{args.host}:{sock.getsockname()[1]}, rtt {args.rtt_ms} ms", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=15)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        store.close()


if __name__ == "__main__":
    main()
