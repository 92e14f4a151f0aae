"""The client's lean HTTP/1.1 transport (controller/gateway/http11.py) against a scripted
raw-socket server on 127.0.0.1: framing, keep-alive, reuse only when it is safe, and the
mapping of every broken answer to httpx's error types (which the client turns into
``Unreachable``, never sent, or ``UnknownOutcome``, may have run)."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.errors import FinopsError
from controller.gateway.client import GatewayClient, _environment_proxy
from controller.gateway.errors import (
    Fenced,
    GatewayError,
    ProtocolViolation,
    ServerError,
    UnknownOutcome,
    Unreachable,
)
from controller.gateway.http11 import MAX_HEAD_BYTES, LeanTransport

Reply = Callable[[bytes], bytes | None]
"""Given the request head (and body), the bytes to send back; ``None``: close instead."""


class Close(bytes):
    """Send these bytes, then close the connection."""


def ok(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(*pieces: bytes, trailer: str = "") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in pieces:
        out += f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n"
    return out + b"0\r\n" + trailer.encode() + b"\r\n"


class Scripted:
    """Answers each request with the next reply; counts connections and requests."""

    def __init__(self, replies: list[Reply | bytes | None], *, close_after: bool = False) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests: list[bytes] = []
        self.close_after = close_after
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                reply = self.replies.pop(0)
                data = reply(request) if callable(reply) else reply
                if data is None:
                    return
                writer.write(data)
                await writer.drain()
                if self.close_after or isinstance(reply, Close):
                    return
        finally:
            writer.close()
            self.closed.set()

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def get(transport: LeanTransport, url: str, method: str = "GET", content: bytes = b"") -> httpx.Response:
    request = httpx.Request(method, url, content=content or None, extensions={"timeout": {"read": 5, "connect": 5}})
    response = await transport.handle_async_request(request)
    response.request = request
    await response.aread()
    return response


@pytest.fixture
async def lane() -> AsyncIterator[LeanTransport]:
    transport = LeanTransport()
    yield transport
    await transport.aclose()


async def test_keep_alive_one_connection_for_many_requests(lane: LeanTransport) -> None:
    async with Scripted([ok(b'{"n": %d}' % i) for i in range(5)]) as server:
        for i in range(5):
            response = await get(lane, server.url + f"/v1/x?i={i}")
            assert response.status_code == 200 and response.json() == {"n": i}
        assert server.connections == 1
        assert server.requests[3].startswith(b"GET /v1/x?i=3 HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in server.requests[0]


async def test_a_chunked_body_is_decoded_and_the_connection_reused(lane: LeanTransport) -> None:
    async with Scripted([chunked(b'{"a": ', b"1}", trailer="X-Trailer: y\r\n"), ok(b"{}")]) as server:
        assert (await get(lane, server.url + "/a")).json() == {"a": 1}
        assert (await get(lane, server.url + "/b")).json() == {}
        assert server.connections == 1


async def test_a_body_without_length_ends_at_close_and_the_connection_is_not_reused(lane: LeanTransport) -> None:
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"big": "' + b"x" * 200_000 + b'"}'
    async with Scripted([until_close], close_after=True) as first:
        response = await get(lane, first.url + "/a")
        assert len(response.json()["big"]) == 200_000
    async with Scripted([ok(b"{}"), ok(b"{}")]) as second:
        await get(lane, second.url + "/b")
        await get(lane, second.url + "/c")
        assert second.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        ok(b"{}", "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
async def test_connection_close_and_http_1_0_answers_are_not_reused(lane: LeanTransport, reply: bytes) -> None:
    async with Scripted([reply, ok(b"{}")]) as server:
        await get(lane, server.url + "/a")
        await asyncio.wait_for(server.closed.wait(), 5)
        server.closed.clear()
        await get(lane, server.url + "/b")
        assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(lane: LeanTransport) -> None:
    async with Scripted([ok(b"{}"), ok(b"{}")], close_after=True) as server:
        await get(lane, server.url + "/a")
        await asyncio.wait_for(server.closed.wait(), 5)
        conn = lane._conn
        assert conn is not None
        async with asyncio.timeout(5):  # wait for the loop to deliver the end of the stream
            while not conn.wire.eof:
                await asyncio.sleep(0)
        response = await get(lane, server.url + "/b")
        assert response.status_code == 200 and server.connections == 2


async def test_unsolicited_bytes_after_an_answer_retire_the_connection(lane: LeanTransport) -> None:
    stray = ok(b"{}") + b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    async with Scripted([stray, ok(b'{"fresh": true}')]) as server:
        await get(lane, server.url + "/a")
        assert (await get(lane, server.url + "/b")).json() == {"fresh": True}
        assert server.connections == 2


async def test_an_interim_100_answer_is_skipped(lane: LeanTransport) -> None:
    async with Scripted([b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"x": 1}')]) as server:
        assert (await get(lane, server.url + "/a", "POST", b"{}")).json() == {"x": 1}
        assert b"Content-Length: 2" in server.requests[0]


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (Close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"), "without sending complete message body"),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\n{}", "illegal status line"),
        (b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\n{}", "illegal status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "conflicting Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}", "Only Transfer-Encoding: chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "illegal chunk header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", "malformed chunk footer"),
        (b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\n{}", "illegal header line"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\nContent-Length: 2\r\n\r\n{}", "continuation line at start of headers"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "_SWITCH_UPGRADE event without a pending proposal"),
        (None, "ConnectionClosed when role=SERVER and state=SEND_RESPONSE"),
    ],
)
async def test_broken_answers_are_protocol_errors_and_the_connection_is_dropped(
    lane: LeanTransport, reply: bytes | None, match: str
) -> None:
    async with Scripted([reply, ok(b'{"after": 1}')], close_after=reply is None) as server:
        with pytest.raises(httpx.RemoteProtocolError, match=match):
            await get(lane, server.url + "/a")
        assert lane._conn is None and not lane._busy
    async with Scripted([ok(b'{"after": 1}')]) as fresh:
        assert (await get(lane, fresh.url + "/b")).json() == {"after": 1}


async def test_a_huge_response_head_is_refused_at_its_limit(lane: LeanTransport) -> None:
    endless_header = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES * 4)
    async with Scripted([endless_header]) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="response head longer than"):
            await get(lane, server.url + "/a")
        assert lane._conn is None  # dropped, with what it had buffered


async def test_header_values_with_line_breaks_are_never_sent(lane: LeanTransport) -> None:
    async with Scripted([ok(b"{}")]) as server:
        request = httpx.Request("GET", server.url + "/a", headers={"X-Evil": "a\r\nInjected: 1"})
        with pytest.raises((httpx.LocalProtocolError, httpx.InvalidURL)):
            await lane.handle_async_request(request)
        assert server.requests == []


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lane = LeanTransport()
    with pytest.raises(httpx.ConnectError):
        await get(lane, f"http://127.0.0.1:{port}/a")
    await lane.aclose()


async def test_a_silent_server_is_a_read_timeout(lane: LeanTransport) -> None:
    async with Scripted([lambda _: b"", ok(b"{}")]) as server:
        request = httpx.Request("GET", server.url + "/a", extensions={"timeout": {"read": 0.2, "connect": 5}})
        with pytest.raises(httpx.ReadTimeout):
            await lane.handle_async_request(request)
        assert lane._conn is None


# ----------------------------------------------------------------------------- through the client


def client(url: str, **kw: Any) -> GatewayClient:
    async def no_sleep(_: float) -> None:
        return None

    return GatewayClient(url, "a2a_admin_" + "k" * 24, sleep=no_sleep, **kw)


def balance(value: str) -> bytes:
    return ok(json.dumps({"balance": value}).encode())


async def test_a_read_cut_mid_body_is_retried_on_a_new_connection() -> None:
    cut = Close(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")
    async with Scripted([cut, balance("7.25")]) as server:
        async with client(server.url, max_attempts=3) as gw:
            assert await gw.get_balance("a") == Decimal("7.25")
        assert server.connections == 2
    async with Scripted([cut] * 3) as server:
        async with client(server.url, max_attempts=3) as gw:
            with pytest.raises(UnknownOutcome, match="RemoteProtocolError"):
                await gw.get_balance("a")  # every attempt cut: an unknown, never a value
        assert server.connections == 3


async def test_a_deposit_cut_mid_answer_is_an_unknown_outcome_and_never_resent() -> None:
    cut = Close(b"HTTP/1.1 200 OK\r\nContent-Length: 80\r\n\r\n{")
    empty_ledger = ok(b'{"transactions": []}')
    async with Scripted([cut, empty_ledger, empty_ledger, empty_ledger]) as server:
        async with client(server.url, max_attempts=5, settle_delays=(0, 0, 0)) as gw:
            with pytest.raises(UnknownOutcome):
                await gw.deposit("a", Decimal("1.00"), "finops-dep-1")
        posts = [r for r in server.requests if r.startswith(b"POST ")]
        assert len(posts) == 1 and len(server.requests) == 4  # sent once; then only the ledger was read


async def test_an_oversized_chunked_answer_is_refused_and_its_connection_dropped() -> None:
    big = chunked(*([b"x" * 4096] * 64))
    async with Scripted([big, balance("1.00")]) as server:
        async with client(server.url, max_attempts=1, max_response_bytes=10_000) as gw:
            with pytest.raises(ProtocolViolation, match="exceeds 10000"):
                await gw.get_balance("a")
            assert await gw.get_balance("a") == Decimal("1.00")
        assert server.connections == 2


def test_the_environment_proxy_applies_to_https_only_and_honours_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _environment_proxy("https://gw.example") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    assert _environment_proxy("https://gw.example") == "http://proxy.internal:3128"
    assert _environment_proxy("http://127.0.0.1:8080") is None  # never for plain http
    monkeypatch.setenv("NO_PROXY", ".example")
    assert _environment_proxy("https://gw.example") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("ALL_PROXY", "proxy.internal:3128")
    assert _environment_proxy("https://gw.example") == "http://proxy.internal:3128"


async def test_an_https_gateway_is_reached_through_the_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """As httpx's client did: the lane tunnels through ``HTTPS_PROXY`` (a CONNECT), with no
    DNS lookup of the gateway's name on this side."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    refuse = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    async with Scripted([refuse]) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        async with client("https://gateway.invalid", max_attempts=1) as gw:
            with pytest.raises(GatewayError):
                await gw.get_balance("a")
        assert proxy.requests and proxy.requests[0].startswith(b"CONNECT gateway.invalid:443 HTTP/1.1")


def _head_lines(request: bytes) -> dict[str, str]:
    head = request.split(b"\r\n\r\n", 1)[0].decode()
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])}


async def test_the_prebuilt_head_carries_what_httpx_would_send() -> None:
    """The lean path (a plain path, no query) and httpx's path (a query) send the same
    headers; a body gets its type and exact length; auth=False sends no key."""
    ledger = ok(b'{"transactions": []}')
    deposit = ok(b'{"new_balance": "12.00", "transaction_id": 7}')
    registered = ok(b'{"agent_id": "n", "api_key": "a2a_free_' + b"x" * 24 + b'", "tier": "free", "balance": 5}')
    server = Scripted([balance("1.00"), ledger, deposit, registered])
    async with server, client(server.url + "/", max_attempts=1) as gw:
        await gw.get_balance("agent-1")
        await gw.transactions("agent-1", limit=3)
        await gw.deposit("agent-1", Decimal("2.00"), "finops-dep-9")
        await gw.register("n")
    lean, viahttpx, post, anonymous = server.requests
    assert lean.startswith(b"GET /v1/billing/wallets/agent-1/balance HTTP/1.1\r\n")
    assert viahttpx.startswith(b"GET /v1/billing/wallets/agent-1/transactions?limit=3&offset=0 HTTP/1.1\r\n")
    for request in (lean, viahttpx):
        headers = _head_lines(request)
        assert headers["host"] == server.url.removeprefix("http://")
        assert headers["authorization"] == "Bearer a2a_admin_" + "k" * 24
        assert headers["accept-encoding"] == "identity" and headers["user-agent"] == "finops/0.1"
    body = post.split(b"\r\n\r\n", 1)[1]
    headers = _head_lines(post)
    assert headers["content-type"] == "application/json" and headers["content-length"] == str(len(body))
    assert headers["idempotency-key"] == "finops-dep-9"
    assert json.loads(body) == {"amount": "2.00", "currency": "CREDITS", "description": ""}
    assert "authorization" not in _head_lines(anonymous)


async def test_paths_outside_the_safe_set_are_percent_encoded_by_httpx() -> None:
    server = Scripted([balance("1.00"), balance("1.00")])
    async with server, client(server.url, max_attempts=1) as gw:
        await gw.get_balance("a b/ü")
        await gw.get_balance("x/../..")  # dot segments are resolved exactly as httpx resolves them
    assert server.requests[0].startswith(b"GET /v1/billing/wallets/a%20b/%C3%BC/balance HTTP/1.1\r\n")
    expected = httpx.URL("http://h/v1/billing/wallets/x/../../balance").raw_path
    assert server.requests[1].startswith(b"GET " + expected + b" HTTP/1.1\r\n")


async def test_a_header_value_with_a_line_break_never_reaches_the_wire() -> None:
    server = Scripted([ok(b'{"transactions": []}')] * 4)
    async with server, client(server.url, max_attempts=1, settle_delays=(0,)) as gw:
        with pytest.raises(UnknownOutcome):
            await gw.deposit("a", Decimal("1.00"), "finops-dep-1\r\nX-Evil: 1")
    assert not any(b"X-Evil" in r or r.startswith(b"POST") for r in server.requests)


# ----------------------------------------------------------------------------- TLS


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


class TlsServer(Scripted):
    def __init__(self, replies: list[Reply | bytes | None], cert: Path, key: Path) -> None:
        super().__init__(replies)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)

    async def __aenter__(self) -> TlsServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.url = f"https://localhost:{self._server.sockets[0].getsockname()[1]}"
        return self


@pytest.mark.parametrize("served_name", ["localhost", "other.example"])
async def test_tls_verifies_the_gateways_certificate_and_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served_name: str
) -> None:
    """The lean lanes speak TLS with the client's verifying context: a certificate for
    another name (or from a CA not trusted) is refused before anything is sent."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    trusted, _ = _self_signed(tmp_path, "localhost")
    cert, key = (
        _self_signed(tmp_path, served_name) if served_name != "localhost" else (trusted, tmp_path / "localhost.key")
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted))  # the CA bundle httpx's context loads
    server = TlsServer([balance("3.50"), balance("3.50")], cert, key)
    async with server, client(server.url, max_attempts=1) as gw:
        if served_name == "localhost":
            assert await gw.get_balance("a") == Decimal("3.50")
            assert await gw.get_balance("a") == Decimal("3.50")
            assert server.connections == 1  # kept alive over TLS too
        else:
            with pytest.raises(Unreachable):
                await gw.get_balance("a")
            assert server.requests == []


# ----------------------------------------------------------------------------- retry rules on the lean path


def problem(status: int, code: str, *extra: str) -> bytes:
    body = json.dumps({"type": f"https://api.greenhelix.net/errors/{code}", "title": code, "detail": code}).encode()
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/problem+json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def recording_client(url: str, sleeps: list[float], **kw: Any) -> GatewayClient:
    async def record(delay: float) -> None:
        sleeps.append(delay)

    return GatewayClient(url, "a2a_admin_" + "k" * 24, sleep=record, **kw)


REGISTERED = ok(b'{"agent_id": "n", "api_key": "a2a_free_' + b"x" * 24 + b'", "tier": "free", "balance": 5}')


async def test_a_read_is_retried_with_backoff_until_the_attempts_run_out() -> None:
    sleeps: list[float] = []
    server = Scripted([problem(503, "service-error")] * 4)
    async with server, recording_client(server.url, sleeps, max_attempts=4, backoff_initial=0.2) as gw:
        with pytest.raises(ServerError):
            await gw.get_balance("a")
    assert len(server.requests) == 4 and len(sleeps) == 3
    for attempt, delay in enumerate(sleeps, start=1):  # exponential, with up to 1 s of jitter
        assert 0.2 * 2 ** (attempt - 1) <= delay <= 0.2 * 2 ** (attempt - 1) + 1


async def test_a_write_answered_5xx_is_not_sent_again() -> None:
    sleeps: list[float] = []
    server = Scripted([problem(503, "service-error"), REGISTERED])
    async with server, recording_client(server.url, sleeps, max_attempts=5) as gw:
        with pytest.raises(ServerError):
            await gw.register("n")
    assert len(server.requests) == 1 and sleeps == []


async def test_a_write_refused_with_429_is_sent_again_after_retry_after() -> None:
    sleeps: list[float] = []
    server = Scripted([problem(429, "rate-limit-exceeded", "Retry-After: 2"), REGISTERED])
    async with server, recording_client(server.url, sleeps, max_attempts=5) as gw:
        registration = await gw.register("n")
    assert registration.agent_id == "n" and len(server.requests) == 2 and sleeps == [2.0]


async def test_a_write_to_a_gateway_not_listening_is_retried_as_never_sent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    async with recording_client(f"http://127.0.0.1:{port}", sleeps, max_attempts=3) as gw:
        with pytest.raises(Unreachable):
            await gw.register("n")
    assert len(sleeps) == 2  # connect refused: provably not sent, so safe to repeat


async def test_the_fence_stops_a_write_before_it_leaves() -> None:
    def fence() -> None:
        raise FinopsError("the writer lock was lost")

    server = Scripted([balance("1.00"), REGISTERED])
    async with server, GatewayClient(server.url, "a2a_admin_" + "k" * 24, fence=fence) as gw:
        assert await gw.get_balance("a") == Decimal("1.00")  # reads are not fenced
        with pytest.raises(Fenced):
            await gw.register("n")
    assert [r.split(b" ", 1)[0] for r in server.requests] == [b"GET"]


async def test_a_closed_client_leaves_no_socket_open() -> None:
    """Closing happens before ``aclose`` returns (asyncio closes sockets in a callback): a
    caller that blocks right after (tests waiting for an idle gateway) finds nothing open."""
    server = Scripted([balance("1.00"), balance("1.00")])
    async with server:
        gw = client(server.url, concurrency=2)
        await asyncio.gather(gw.get_balance("a"), gw.get_balance("b"))
        sockets = [
            lane._conn.transport.get_extra_info("socket")
            for lane in gw._lanes
            if isinstance(lane, LeanTransport) and lane._conn
        ]
        assert sockets
        await gw.aclose()
        assert all(sock.fileno() == -1 for sock in sockets)
