"""A lean HTTP/1.1 transport: one keep-alive connection, one request at a time.

``GatewayClient`` keeps one of these per request in flight (a "lane"). It replaces httpx's
default transport (httpcore + anyio + h11) on the plan path, where that stack cost about
0.25 ms of CPU per request, more than the gateway's own work on loopback: an
``asyncio.Protocol`` with a byte buffer and a strict hand-written parser for the small
subset of HTTP/1.1 a JSON API uses costs a tenth of that.

It is an ``httpx.AsyncBaseTransport`` and raises httpx's exception types, so the client's
error mapping (``ConnectError``/``ConnectTimeout``: never sent; anything later: unknown
outcome) and every injected test transport keep working unchanged. Bounded by
construction: the response head is at most ``MAX_HEAD_BYTES``, a chunk-size line or a
trailer at most ``MAX_LINE_BYTES``, the receive buffer pauses the socket above
``HIGH_WATER`` bytes, and the body is handed out in pieces as it arrives (the client stops
reading at its size limit and closes the connection). A connection is reused only after a
complete, length-delimited answer with nothing unread, no ``Connection: close``, and no
sign (end of stream, error, unsolicited bytes) that the server gave up on it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx

MAX_HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 4 * 1024
MAX_TRAILER_BYTES = 16 * 1024
HIGH_WATER = 256 * 1024
PIECE = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_BODY_STATUS = (204, 304)


class _Wire(asyncio.Protocol):
    """The socket's bytes in one buffer; a coroutine waits for more with ``_more``."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- protocol callbacks (the event loop)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading (the request's coroutine)
    async def _more(self, timeout: float | None) -> None:
        """Wait until more bytes, the end of the stream or an error arrive."""
        if self.error is not None:
            raise httpx.ReadError(f"connection failed: {type(self.error).__name__}")
        if self.eof:
            raise httpx.RemoteProtocolError("server closed the connection before the answer was complete")
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise httpx.ReadTimeout("no data within the read timeout") from None
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        if self._paused and len(self.buf) <= HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read_until(self, sep: bytes, limit: int, timeout: float | None, what: str) -> bytes:
        """Bytes up to and including ``sep``, at most ``limit`` of them."""
        start = 0
        while True:
            at = self.buf.find(sep, start)
            if at >= 0:
                if at + len(sep) > limit:
                    break
                return self._take(at + len(sep))
            if len(self.buf) > limit:
                break
            start = max(0, len(self.buf) - len(sep) + 1)
            await self._more(timeout)
        raise httpx.RemoteProtocolError(f"{what} longer than {limit} bytes")

    async def read_some(self, most: int, timeout: float | None) -> bytes:
        """Between 1 and ``most`` bytes; ``b""`` only at a clean end of the stream."""
        while not self.buf:
            if self.eof and self.error is None:
                return b""
            await self._more(timeout)
        return self._take(most)


class _Connection:
    def __init__(self, key: tuple[str, str, int], wire: _Wire) -> None:
        self.key = key
        self.wire = wire

    @property
    def transport(self) -> asyncio.Transport:
        assert self.wire.transport is not None
        return self.wire.transport

    def reusable(self) -> bool:
        """Idle and, as far as anything received says, still open on both ends."""
        w = self.wire
        return not (w.eof or w.error is not None or w.buf or self.transport.is_closing())

    def close(self) -> None:
        if self.wire.transport is not None:
            self.wire.transport.close()


class _Body(httpx.AsyncByteStream):
    """The answer's body, read piece by piece as it arrives; the connection goes back to
    the lane only when the body was read to its declared end."""

    def __init__(self, lane: LeanTransport, conn: _Connection, framing: str, length: int, timeout: float | None):
        self._lane = lane
        self._conn = conn
        self._framing = framing  # "none" | "length" | "chunked" | "close"
        self._remaining = length
        self._timeout = timeout
        self._done = framing == "none"
        self._reuse = True
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        wire, timeout = self._conn.wire, self._timeout
        try:
            if self._framing == "length":
                while self._remaining > 0:
                    piece = await wire.read_some(min(self._remaining, PIECE), timeout)
                    if not piece:
                        raise httpx.RemoteProtocolError("server closed the connection before the body was complete")
                    self._remaining -= len(piece)
                    yield piece
            elif self._framing == "chunked":
                async for piece in self._chunks(wire, timeout):
                    yield piece
            elif self._framing == "close":
                self._reuse = False
                while piece := await wire.read_some(PIECE, timeout):
                    yield piece
            self._done = True
        except BaseException:  # broken, timed out, cancelled or abandoned: never reused
            self._reuse = False
            self._release()
            raise

    async def _chunks(self, wire: _Wire, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            line = await wire.read_until(b"\r\n", MAX_LINE_BYTES, timeout, "a chunk-size line")
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text) or len(size_text) > 16:
                raise httpx.RemoteProtocolError("malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                trailers = 0
                while True:  # trailers, ignored, then the empty line
                    line = await wire.read_until(b"\r\n", MAX_LINE_BYTES, timeout, "a trailer line")
                    trailers += len(line)
                    if trailers > MAX_TRAILER_BYTES:
                        raise httpx.RemoteProtocolError("trailers too long")
                    if line == b"\r\n":
                        return
            while size > 0:
                piece = await wire.read_some(min(size, PIECE), timeout)
                if not piece:
                    raise httpx.RemoteProtocolError("server closed the connection inside a chunk")
                size -= len(piece)
                yield piece
            if await wire.read_until(b"\r\n", 2, timeout, "a chunk's end") != b"\r\n":
                raise httpx.RemoteProtocolError("malformed chunk end")

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._lane._release(self._conn, reuse=self._done and self._reuse)

    async def aclose(self) -> None:
        self._release()


def _parse_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError("malformed status line")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
            raise httpx.RemoteProtocolError("malformed header line")
        headers.append((name, value.strip(b" \t")))
    return version, int(code), reason, headers


def _framing(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    """How the body ends: ``none``, ``length`` (with the length), ``chunked`` or ``close``."""
    if method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200:
        return "none", 0
    encodings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
    lengths = {v for n, v in headers if n.lower() == b"content-length"}
    if encodings:
        if lengths or b",".join(encodings).strip().lower() != b"chunked":
            raise httpx.RemoteProtocolError("unsupported or ambiguous transfer-encoding")
        return "chunked", 0
    if lengths:
        if len(lengths) != 1:
            raise httpx.RemoteProtocolError("conflicting content-length headers")
        raw = next(iter(lengths))
        if not raw.isdigit() or len(raw) > 18:
            raise httpx.RemoteProtocolError("malformed content-length")
        length = int(raw)
        return ("length", length) if length else ("none", 0)
    return "close", 0


def _keeps_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    tokens = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")}
    return version == b"HTTP/1.1" and b"close" not in tokens


_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def header_safe(value: bytes) -> bool:
    """No control characters (CR, LF, NUL...) that could end a header line early."""
    return _CONTROL.search(value) is None


class RawAnswer:
    """An answer's status line and headers as received; ``body`` yields the rest."""

    __slots__ = ("body", "headers", "reason", "status", "version")

    def __init__(
        self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]], body: _Body
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.body = body


class LeanTransport(httpx.AsyncBaseTransport):
    """One HTTP/1.1 connection, kept alive between requests; never two requests at once."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._conn: _Connection | None = None
        self._busy = False

    async def _connect(self, key: tuple[str, str, int], timeout: float | None) -> _Connection:
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self._ssl or ssl.create_default_context()
        elif scheme != "http":
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, wire = await loop.create_connection(
                    _Wire, host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within {timeout} s") from None
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, DNS, TLS handshake
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {type(exc).__name__}") from None
        return _Connection(key, wire)

    async def exchange(
        self,
        key: tuple[str, str, int],
        method: str,
        head: bytes,
        content: bytes,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        close: bool = False,
    ) -> RawAnswer:
        """Send ``head`` (request line and headers, ending with the empty line) and
        ``content``; return the answer once its head has arrived, its body still to read
        (``answer.body``, which must be closed). ``close``: the request asked for
        ``Connection: close``. The caller builds ``head`` from validated parts."""
        if self._busy:
            raise RuntimeError("a LeanTransport serves one request at a time")
        conn = self._conn
        if conn is not None and (conn.key != key or not conn.reusable()):
            conn.close()
            self._conn = conn = None
        if conn is None:
            conn = await self._connect(key, connect_timeout)
        self._busy = True
        self._conn = conn
        try:
            try:
                conn.transport.write(head + content if content else head)
            except (OSError, RuntimeError) as exc:
                raise httpx.WriteError(f"cannot send: {type(exc).__name__}") from None
            wire = conn.wire
            version, status, reason, headers = _parse_head(
                await wire.read_until(b"\r\n\r\n", MAX_HEAD_BYTES, read_timeout, "the response head")
            )
            while 100 <= status < 200:  # interim answers (100 Continue): the real one follows
                if status == 101:
                    raise httpx.RemoteProtocolError("unexpected protocol switch")
                version, status, reason, headers = _parse_head(
                    await wire.read_until(b"\r\n\r\n", MAX_HEAD_BYTES, read_timeout, "the response head")
                )
            framing, length = _framing(method, status, headers)
        except BaseException:
            self._release(conn, reuse=False)
            raise
        body = _Body(self, conn, framing, length, read_timeout)
        if close or not _keeps_alive(version, headers):
            body._reuse = False
        return RawAnswer(status, reason, version, headers, body)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0))
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        lines = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            if not header_safe(name) or not header_safe(value):
                raise httpx.LocalProtocolError("header with a control character")
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        answer = await self.exchange(
            key,
            request.method,
            b"".join(lines),
            request.content,  # the client sends small, fully built bodies
            connect_timeout=timeouts.get("connect"),
            read_timeout=timeouts.get("read"),
            close=request.headers.get("connection", "").lower() == "close",
        )
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=answer.body,
            extensions={"http_version": answer.version, "reason_phrase": answer.reason},
        )

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        self._busy = False
        if not reuse:
            conn.close()
            if self._conn is conn:
                self._conn = None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            # asyncio closes the socket in a callback of the next loop iteration: let it run,
            # so a closed client has no connection left open (a caller may block right after)
            await asyncio.sleep(0)
