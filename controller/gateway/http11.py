"""A lean HTTP/1.1 transport: one keep-alive connection, one request at a time.

``GatewayClient`` keeps one of these per request in flight (a "lane"). It replaces httpx's
default transport (httpcore + anyio + h11) on the plan path, where that stack cost about
0.25 ms of CPU per request, more than the gateway's own work on loopback. The lane keeps
only the I/O: an ``asyncio.Protocol`` with a byte buffer. Every byte of HTTP/1.1 (the
request's serialization, the answer's status line, headers, framing by Content-Length,
chunked encoding with its trailers, or the end of the stream, interim 1xx answers,
HTTP/1.0 and ``Connection: close``) is h11's work: a small, strict, well-tested sans-I/O
state machine (the one httpcore itself uses), so no framing rule is written here.

It is an ``httpx.AsyncBaseTransport`` and raises httpx's exception types, so the client's
error mapping (``ConnectError``/``ConnectTimeout``: never sent; anything later: unknown
outcome) and every injected test transport keep working unchanged. Bounded by
construction: the response head (with any interim answers) is at most ``MAX_HEAD_BYTES``,
as is any other incomplete piece h11 holds (a chunk-size line, the trailers); the receive
buffer pauses the socket above ``HIGH_WATER`` bytes and h11 is fed at most ``PIECE`` bytes
at a time, only when it needs more, so the body is handed out in pieces as it arrives (the
client stops reading at its size limit and closes the connection). A connection is reused
only when h11 puts both sides in ``DONE`` (a complete answer, no ``Connection: close``, no
HTTP/1.0, not delimited by the end of the stream) with nothing unread, and nothing
(end of stream, error, unsolicited bytes) says that the server gave up on it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import h11
import httpx

MAX_HEAD_BYTES = 64 * 1024
HIGH_WATER = 256 * 1024
PIECE = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

Header = tuple[bytes, bytes]


class _Wire(asyncio.Protocol):
    """The socket's bytes in one buffer; a coroutine waits for more with ``wait``."""

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
    async def wait(self, timeout: float | None) -> None:
        """Wait until more bytes, the end of the stream or an error arrive."""
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

    def take(self, most: int) -> bytes:
        """Up to ``most`` of the buffered bytes."""
        if len(self.buf) <= most:
            data = bytes(self.buf)
            self.buf.clear()
        else:
            data = bytes(self.buf[:most])
            del self.buf[:most]
        if self._paused and len(self.buf) <= HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data


class _Connection:
    """One socket and the h11 state machine that parses and frames what goes over it."""

    def __init__(self, key: tuple[str, str, int], wire: _Wire) -> None:
        self.key = key
        self.wire = wire
        self.machine = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.head_budget: int | None = None
        """Bytes h11 may still be fed while the answer's head is awaited (``None`` after)."""

    @property
    def transport(self) -> asyncio.Transport:
        assert self.wire.transport is not None
        return self.wire.transport

    def reusable(self) -> bool:
        """Idle and, as far as anything received says, still open on both ends."""
        w, states = self.wire, self.machine
        return (
            states.our_state is h11.IDLE
            and states.their_state is h11.IDLE
            and not (w.eof or w.error is not None or w.buf or self.transport.is_closing())
        )

    def finish_cycle(self) -> bool:
        """After the answer's ``EndOfMessage``: make the connection ready for the next
        request if h11 says both sides are done (keep-alive, framed by length) and nothing
        arrived after the answer; ``False``: it must be closed."""
        states = self.machine
        if states.our_state is not h11.DONE or states.their_state is not h11.DONE:
            return False  # Connection: close, HTTP/1.0, or a body ended by the end of the stream
        try:
            if states.next_event() is not h11.NEED_DATA:  # PAUSED: unsolicited bytes; ConnectionClosed
                return False
        except h11.RemoteProtocolError:
            return False
        if self.wire.buf or self.wire.eof:
            return False
        states.start_next_cycle()
        return True

    async def next_event(self, timeout: float | None) -> object:
        """h11's next event, feeding it from the socket (at most ``PIECE`` bytes at a time,
        and no more than the head's budget while the head is awaited) until it has one."""
        states, wire = self.machine, self.wire
        while True:
            try:
                event = states.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from None
            if event is not h11.NEED_DATA:
                return event
            most = PIECE
            if self.head_budget is not None:
                if self.head_budget <= 0:
                    raise httpx.RemoteProtocolError(f"response head longer than {MAX_HEAD_BYTES} bytes")
                most = min(most, self.head_budget)
            while not wire.buf:
                if wire.error is not None:
                    raise httpx.ReadError(f"connection failed: {type(wire.error).__name__}")
                if wire.eof:
                    break
                await wire.wait(timeout)
            data = wire.take(most)
            if self.head_budget is not None:
                self.head_budget -= len(data)
            states.receive_data(data)  # empty: the end of the stream

    def close(self) -> None:
        if self.wire.transport is not None:
            self.wire.transport.close()


class _Body(httpx.AsyncByteStream):
    """The answer's body, read piece by piece as it arrives; the connection goes back to
    the lane only when the body was read to its end and h11 says the connection is reusable."""

    def __init__(self, lane: LeanTransport, conn: _Connection, timeout: float | None, *, reuse: bool):
        self._lane = lane
        self._conn = conn
        self._timeout = timeout
        self._reuse = reuse
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, timeout = self._conn, self._timeout
        try:
            while True:
                event = await conn.next_event(timeout)
                if type(event) is h11.Data:
                    yield bytes(event.data)
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} inside an answer's body")
            self._reuse = self._reuse and conn.finish_cycle()
        except BaseException:  # broken, timed out, cancelled or abandoned: never reused
            self._reuse = False
            self._release(done=False)
            raise
        self._release(done=True)

    def _release(self, *, done: bool) -> None:
        if not self._released:
            self._released = True
            self._lane._release(self._conn, reuse=done and self._reuse)

    async def aclose(self) -> None:
        self._release(done=False)  # after a complete read, already released (and reused)


class RawAnswer:
    """An answer's status line and headers as received; ``body`` yields the rest."""

    __slots__ = ("body", "headers", "reason", "status", "version")

    def __init__(self, status: int, reason: bytes, version: bytes, headers: list[Header], body: _Body) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.body = body


def _both_framings(headers: Iterable[Header]) -> bool:
    """Transfer-Encoding and Content-Length together: h11 lets the first win (RFC 9112
    6.3); a gateway that sends both is refused, as RFC 9112 advises, never guessed at."""
    names = {name for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


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
        method: bytes,
        target: bytes,
        headers: list[Header],
        content: bytes,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> RawAnswer:
        """Send the request (``headers`` include ``Host`` and, with ``content``, its
        ``Content-Length``); return the answer once its head has arrived, its body still to
        read (``answer.body``, which must be closed). h11 refuses a header or target it
        could not send intact (``httpx.LocalProtocolError``) before anything leaves."""
        if self._busy:
            raise RuntimeError("a LeanTransport serves one request at a time")
        try:
            request = h11.Request(method=method, target=target, headers=headers)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        conn = self._conn
        if conn is not None and (conn.key != key or not conn.reusable()):
            conn.close()
            self._conn = conn = None
        if conn is None:
            conn = await self._connect(key, connect_timeout)
        self._busy = True
        self._conn = conn
        try:
            states = conn.machine
            try:
                data = states.send(request)
                if content:
                    data += states.send(h11.Data(data=content))
                data += states.send(h11.EndOfMessage())
            except h11.LocalProtocolError as exc:  # a body longer or shorter than its Content-Length
                raise httpx.LocalProtocolError(str(exc)) from None
            try:
                conn.transport.write(data)
            except (OSError, RuntimeError) as exc:
                raise httpx.WriteError(f"cannot send: {type(exc).__name__}") from None
            conn.head_budget = MAX_HEAD_BYTES
            while True:
                event = await conn.next_event(read_timeout)
                if type(event) is h11.Response:
                    break
                if type(event) is not h11.InformationalResponse:  # interim answers (100 Continue) are skipped
                    raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} instead of an answer")
            conn.head_budget = None
            if _both_framings(event.headers):
                raise httpx.RemoteProtocolError("answer with both transfer-encoding and content-length")
        except BaseException:
            self._release(conn, reuse=False)
            raise
        body = _Body(self, conn, read_timeout, reuse=True)
        return RawAnswer(event.status_code, event.reason, event.http_version, event.headers.raw_items(), body)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0))
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        answer = await self.exchange(
            key,
            request.method.encode(),
            url.raw_path,
            request.headers.raw,
            request.content,  # the client sends small, fully built bodies
            connect_timeout=timeouts.get("connect"),
            read_timeout=timeouts.get("read"),
        )
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=answer.body,
            extensions={"http_version": b"HTTP/" + answer.version, "reason_phrase": answer.reason},
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
