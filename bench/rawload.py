"""Measure a server's request ceiling with a client that costs almost nothing.

Keep-alive HTTP/1.1 over raw asyncio streams, requests pre-encoded, one request in flight
per connection: the client spends a few microseconds per request, so on a shared box the
figure is the server's limit rather than the load generator's (an httpx client would eat
much of the same CPU it is trying to measure).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadResult:
    requests: int
    """Responses received with a 2xx status."""
    failures: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def encode_get(host: str, port: int, path: str, api_key: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: finops-bench/rawload"]
    if api_key is not None:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length:
        await reader.readexactly(length)
    return status


async def hammer(
    host: str, port: int, requests: Sequence[bytes], *, concurrency: int = 64, seconds: float = 3.0
) -> LoadResult:
    """Send ``requests`` round-robin over ``concurrency`` connections for ``seconds``."""
    ok = failed = 0
    deadline = 0.0

    async def worker(offset: int) -> None:
        nonlocal ok, failed
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while time.perf_counter() < deadline:
                writer.write(requests[i % len(requests)])
                i += concurrency
                status = await _read_response(reader)
                if 200 <= status < 300:
                    ok += 1
                else:
                    failed += 1
        finally:
            writer.close()
            await writer.wait_closed()

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return LoadResult(ok, failed, time.perf_counter() - start)
