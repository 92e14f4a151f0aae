"""The one network seam: every HTTP call finops makes to a gateway goes through here.

``GatewayClient`` owns paths, auth, retries, idempotency keys and error mapping; callers
speak in domain terms (``client.deposit(agent, amount, key)``). Tests and fault injection
swap the httpx transport, never this code.

Retry rules follow what is safe on GreenHelix 1.4.8 (API.md §9, §11):
- reads and the budget PUT (a full-replace upsert) are retried on 429, 5xx and transport
  errors, with exponential backoff and jitter (honouring ``Retry-After`` when present);
- non-idempotent writes are retried only when the request provably did not run (connect
  failure, 429); any other failure is an *unknown outcome*;
- a deposit with an unknown outcome is resolved by looking its ``Idempotency-Key`` up in
  the wallet's ledger before retrying with the same key, because the gateway's key is a
  weak, global ledger key (concurrent duplicates move money N times).

Every answer is bounded while it arrives, never after: the body is streamed and the
request is abandoned (its connection closed, not reused) as soon as it passes
``max_response_bytes``, and each request, from the first byte sent to the last byte of the
body, must finish within ``deadline`` seconds (``FINOPS_REQUEST_DEADLINE``, default 30 s),
which a server trickling one byte per read timeout cannot stretch. A request that misses
its deadline is an unknown outcome, exactly like a timeout or a reset. Answers are asked for
uncompressed (``Accept-Encoding: identity``) and a compressed one is refused, so the byte
limit is a limit on what is held in memory, not on what a decompressor may expand.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import urllib.request
from collections import Counter
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

import httpx

from controller.errors import ConfigError, FinopsError
from controller.gateway.errors import (
    Fenced,
    GatewayError,
    NotAdmin,
    NotFound,
    ProtocolViolation,
    RateLimited,
    ServerError,
    UnknownOutcome,
    Unreachable,
    error_class,
)
from controller.gateway.http11 import Header, LeanTransport
from controller.gateway.models import (
    LEADERBOARD_METRICS,
    BudgetStatus,
    DepositResult,
    KeyRecord,
    Leaderboard,
    LeaderboardEntry,
    Registration,
    Rotation,
    Transaction,
    UsageBucket,
    UsageSummary,
    Webhook,
    WebhookDelivery,
    analytics_credits,
)
from policies.keyprint import is_key_token
from policies.money import format_money, from_gateway_number

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Larger answers are refused: no legitimate response we read comes close."""

DEFAULT_REQUEST_DEADLINE = 30.0
"""Seconds one request may take from sending to the last byte of its answer."""

DEADLINE_ENV = "FINOPS_REQUEST_DEADLINE"


def request_deadline(environ: Mapping[str, str] = os.environ) -> float:
    """The per-request deadline: ``FINOPS_REQUEST_DEADLINE`` seconds, else the default."""
    raw = environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_REQUEST_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 3600:
        raise ConfigError(f"{DEADLINE_ENV} must be a number of seconds between 0.1 and 3600, got {raw!r}")
    return value


class Answer:
    """A complete, size-checked HTTP answer: what the rest of the client reads."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(self, status_code: int, headers: httpx.Headers, content: bytes, reason_phrase: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.reason_phrase = reason_phrase

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not (UTF-8) JSON."""
        return json.loads(self.content)


Sleep = Callable[[float], Awaitable[None]]


def _problem_code(body: Mapping[str, Any]) -> str:
    """The gateway has no machine code field; derive it from ``type``'s last segment."""
    type_ = body.get("type")
    if isinstance(type_, str) and type_:
        return type_.rstrip("/").rsplit("/", 1)[-1]
    code = body.get("code")  # batch-style and the rotate 428 body
    return str(code) if code else ""


_SNAPSHOT_MAX_CHARS = 4096
"""A result snapshot is a small JSON object; anything longer is not read (bounded work)."""


def _snapshot_balance(snapshot: object) -> Decimal | None:
    """``new_balance`` from a ledger row's ``result_snapshot`` (a JSON string, or an object),
    or ``None``: it is extra evidence, never required, so an odd one is ignored, not fatal."""
    if isinstance(snapshot, str):
        if len(snapshot) > _SNAPSHOT_MAX_CHARS:
            return None
        try:
            snapshot = json.loads(snapshot)
        except (ValueError, RecursionError):
            return None
    if not isinstance(snapshot, dict) or snapshot.get("new_balance") is None:
        return None
    try:
        return from_gateway_number(snapshot["new_balance"])
    except ValueError:
        return None


_SAFE_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")
"""A path sent as is: what ``httpx.URL`` would not change (agent ids are letters, digits,
``.``, ``_``, ``-``; anything else goes through httpx's percent-encoding)."""


def _environment_proxy(base_url: str) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTPS_PROXY``, ``ALL_PROXY``,
    minus ``NO_PROXY``), as ``httpx.AsyncClient(trust_env=True)`` would pick it. Never for
    plain http: an ``HTTP_PROXY`` would carry the admin key in clear to the proxy (plain
    http is allowed only to loopback or by explicit opt-in, controller/io/target.py)."""
    parts = urlsplit(base_url)
    if parts.scheme.lower() != "https":
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get("https") or proxies.get("all")
    if not proxy or bool(urllib.request.proxy_bypass(parts.hostname or "")):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


_MAX_AGENT_ID_CHARS = 128
"""The gateway's longest agent id (``/v1/register`` accepts 1..128 characters)."""

_MAX_NUMBER_CHARS = 64
"""A numeric field longer than this is refused before ``Decimal`` parses it (bounded work)."""

_MAX_MAGNITUDE = 24
"""Decimal exponents a numeric field may reach either way: the gateway's amounts are 64-bit
integers of 1e-8 credit (below 1e19), its ratios and scores plain floats."""

_ATOMIC_CREDIT = Decimal("0.00000001")
"""The gateway's resolution: it stores every amount as an integer of 1e-8 credit."""

_INTERVAL_SECONDS = {"hour": 3600, "day": 86400}


def _finite_number(raw: object, what: str, path: str) -> Decimal:
    """A JSON number or numeric string as an exact ``Decimal`` (floats through their
    shortest repr); ``ProtocolViolation`` for anything else, NaN and infinities."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ProtocolViolation(f"{what} {raw!r} is not a number", method="GET", path=path)
    text = repr(raw) if isinstance(raw, float) else str(raw).strip()
    if len(text) > _MAX_NUMBER_CHARS:
        raise ProtocolViolation(f"{what} is not a plausible number ({len(text)} characters)", method="GET", path=path)
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ProtocolViolation(f"{what} {raw!r} is not a number", method="GET", path=path) from None
    if not value.is_finite():
        raise ProtocolViolation(f"{what} {raw!r} is not finite", method="GET", path=path)
    exponent = value.as_tuple().exponent
    if value and (value.adjusted() > _MAX_MAGNITUDE or (isinstance(exponent, int) and exponent < -_MAX_MAGNITUDE)):
        # 1e999999 is finite, yet formatting it would write a million digits
        raise ProtocolViolation(f"{what} {raw!r} is out of any plausible range", method="GET", path=path)
    return value


def _since_param(since: float) -> str:
    if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
        raise ValueError(f"since must be finite unix seconds, got {since!r}")
    return repr(float(since))


def _bucket_start(raw: object, step: int, what: str, path: str) -> datetime:
    """A bucket's start: an ISO-8601 time with an offset (as the gateway serialises
    ``timestamp``) or unix seconds (unserialised paths), on a whole ``step`` in UTC."""
    try:
        if isinstance(raw, str) and len(raw) <= _MAX_NUMBER_CHARS:
            start = datetime.fromisoformat(raw)
            if start.tzinfo is None:
                raise ProtocolViolation(f"{what} timestamp {raw!r} has no UTC offset", method="GET", path=path)
            start = start.astimezone(UTC)
        elif isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            start = datetime.fromtimestamp(raw, UTC)
        else:
            raise ProtocolViolation(f"{what} timestamp {raw!r} is not a time", method="GET", path=path)
    except (ValueError, OverflowError, OSError):
        raise ProtocolViolation(f"{what} timestamp {raw!r} is not a time", method="GET", path=path) from None
    seconds = start.timestamp()
    if seconds % step:
        raise ProtocolViolation(f"{what} timestamp {raw!r} is not the start of a bucket", method="GET", path=path)
    return start


class _Retryable(Exception):
    """Internal marker: ``_call`` retries exactly what our rules call safe."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Exchange:
    """One request the client sent (each retry is one), as its observers are told of it."""

    method: str
    path: str
    """The path, without the query."""
    body: bytes | None
    status: int | None
    """The answer's status; ``None``: no answer at all (a transport failure or the request
    deadline: for a write, an unknown outcome)."""


class ClientObserver(Protocol):
    """Instrumentation of the client (the daemon's error metric, the observation store's
    write watch): told of every request once its answer, or the lack of one, is known."""

    def on_exchange(self, exchange: Exchange) -> None: ...


class GatewayClient:
    """Async client for the GreenHelix gateway REST API, used with an admin key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        max_attempts: int = 5,
        concurrency: int = 32,
        deadline: float | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        settle_delays: Sequence[float] = (0.1, 0.5, 1.5),
        sleep: Sleep = asyncio.sleep,
        observer: ClientObserver | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._observer = observer
        self._fence = fence
        """Called before every write request; raises if this process may no longer write
        (``controller.state.lock.WriterLock.check``: the writer lock was lost)."""
        self._api_key = api_key
        # One single-connection transport per request in flight ("lane") rather than one pool
        # of ``concurrency`` connections: httpcore 1.0 scans its whole pool on every request,
        # which made the client, not the gateway, the bottleneck (about 3x the CPU per
        # request at 32 connections). A lane is a ``LeanTransport`` (controller/gateway/http11.py:
        # h11 on an asyncio protocol, a fraction of httpcore's CPU per request), or httpx's own
        # through an environment proxy.
        # Requests go to the lane's transport directly, not through ``httpx.AsyncClient.send``:
        # the client layer (URL merging, cookies, auth and redirect handling finops never
        # uses) cost about 40 % of the CPU per request. An injected transport (tests, fault
        # injection) is the one lane everything uses.
        self._injected = transport
        self._lane_ssl = httpx.create_ssl_context() if transport is None else None
        """Built once: loading the CA bundle costs ~0.1 s."""
        self._lane_proxy = _environment_proxy(self.base_url) if transport is None else None
        self._timeout = timeout
        self._timeouts = httpx.Timeout(timeout).as_dict()
        self._headers: list[tuple[bytes, bytes]] = [(b"Accept-Encoding", b"identity"), (b"User-Agent", b"finops/0.1")]
        self._auth_header = (b"Authorization", f"Bearer {api_key}".encode())
        # The headers of a lean lane's request, built once: per request only the caller's few
        # are added (``_lean_request``); h11 checks and serializes them.
        base = httpx.URL(self.base_url)
        self._key = (base.scheme, base.host, base.port or (443 if base.scheme == "https" else 80))
        self._base_path = base.raw_path.rstrip(b"/")
        self._fixed_headers: list[Header] = [(b"Host", base.netloc), *self._headers]
        self._lean_ok = base.query == b""
        self._lanes: list[httpx.AsyncBaseTransport] = []
        self._idle_lanes: list[httpx.AsyncBaseTransport] = []
        self._max_attempts = max_attempts
        self._deadline = request_deadline() if deadline is None else deadline
        self._max_bytes = max_response_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._settle_delays = tuple(settle_delays)
        self._sleep = sleep
        self.concurrency = concurrency
        """Most requests in flight at once; callers size their own worker pools by it."""
        self._slots = asyncio.Semaphore(concurrency)
        self.calls: Counter[str] = Counter()
        """Requests actually sent, by ``"read"``/``"write"``: lets callers prove idempotence."""

    def __repr__(self) -> str:
        return f"GatewayClient({self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        lanes, self._lanes, self._idle_lanes = self._lanes, [], []
        for lane in lanes:
            await lane.aclose()
        if self._injected is not None:
            await self._injected.aclose()

    async def _retire(self, lane: httpx.AsyncBaseTransport) -> None:
        """Close a lane that got a 404 instead of reusing its connection.

        GreenHelix 1.4.8 leaves a keep-alive connection broken after a 404
        ``wallet-not-found`` (API.md; 19 of 20 later requests on it failed): a write sent
        on it would fail after leaving, an *unknown outcome* that blocks the agent. So a
        connection that answered any 404 never carries another request, twice over:
        ``_read`` stops at the 404 body's declared length, leaving its end unread, and
        httpcore closes a connection whose answer was closed before its end, in whatever
        pool it lives (also an injected transport's, shared by lanes); and a lane that owns
        its connection is retired here, which also covers a 404 without a declared length.
        Only 404s pay (a new connection), which observing a new agent meets once; every
        other answer keeps its connection."""
        self._lanes.remove(lane)
        await lane.aclose()

    def _lane(self) -> httpx.AsyncBaseTransport:
        """An idle lane, or a new one; only called under ``_slots``, so never more than
        ``concurrency`` exist."""
        if self._injected is not None:
            return self._injected
        if self._idle_lanes:
            return self._idle_lanes.pop()
        lane = self._new_lane()
        self._lanes.append(lane)
        return lane

    def _new_lane(self) -> httpx.AsyncBaseTransport:
        """A ``LeanTransport``; httpx's own transport through an environment proxy (https only)."""
        if self._lane_proxy is None:
            return LeanTransport(ssl_context=self._lane_ssl)
        return httpx.AsyncHTTPTransport(
            verify=self._lane_ssl if self._lane_ssl is not None else True,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            proxy=self._lane_proxy,
        )

    def _release(self, lane: httpx.AsyncBaseTransport) -> None:
        if lane is not self._injected:
            self._idle_lanes.append(lane)

    # ------------------------------------------------------------------ plumbing

    def _lean_request(
        self,
        method: str,
        path: str,
        content: bytes | None,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        auth: bool,
    ) -> tuple[bytes, list[Header]] | None:
        """The target and headers for a lean lane, or ``None`` when this request needs
        httpx's URL handling (query parameters, a path outside the plain safe set): those few
        take ``_request`` and the lane's ``handle_async_request``. Both send the same headers."""
        if not self._lean_ok or params or _SAFE_PATH.fullmatch(path) is None or "/." in path:
            return None  # "/.": httpx removes dot segments (``..``), and so must this path
        request_headers = list(self._fixed_headers)
        if auth:
            request_headers.append(self._auth_header)
        if content is not None:
            request_headers += [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(content))]
        elif method in ("POST", "PUT", "PATCH"):
            request_headers.append((b"Content-Length", b"0"))
        if headers:
            request_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        return self._base_path + path.encode(), request_headers

    def _request(
        self,
        method: str,
        path: str,
        content: bytes | None,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        auth: bool,
    ) -> httpx.Request:
        """The request ``httpx.AsyncClient.build_request`` would make from our defaults."""
        req_headers = list(self._headers)
        if auth:
            req_headers.append(self._auth_header)
        if content is not None:
            req_headers.append((b"Content-Type", b"application/json"))
        if headers:
            req_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        url = httpx.URL(self.base_url + path, params=params) if params else httpx.URL(self.base_url + path)
        return httpx.Request(method, url, headers=req_headers, content=content, extensions={"timeout": self._timeouts})

    def _backoff(self, attempt: int, error: GatewayError) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): the server's
        ``Retry-After`` when it gave one (capped), else exponential backoff with jitter."""
        if error.retry_after is not None:
            return min(max(float(error.retry_after), 0.0), self._backoff_max)
        try:
            delay = self._backoff_initial * 2.0 ** (attempt - 1) + random.uniform(0, 1)
        except OverflowError:
            delay = self._backoff_max
        return max(0.0, min(delay, self._backoff_max))

    def _notify(self, method: str, path: str, body: bytes | None, status: int | None) -> None:
        if self._observer is not None:
            self._observer.on_exchange(Exchange(method, path, body, status))

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> Answer:
        """Send once and read the whole (bounded) answer within the deadline; map transport
        failures to ``Unreachable`` (never sent) or ``UnknownOutcome`` (may have run)."""
        content = json.dumps(body).encode() if body is not None else None
        try:
            async with self._slots:
                # The fence is checked once a slot is free, right before sending: a write that
                # waited for a slot behind slow requests never leaves on an older check.
                if method != "GET" and self._fence is not None:
                    try:
                        await asyncio.to_thread(self._fence)
                    except FinopsError as exc:
                        raise Fenced(str(exc), method=method, path=path) from None
                self.calls["read" if method == "GET" else "write"] += 1
                lane = self._lane()
                answered_404 = False
                try:
                    lean = self._lean_request(method, path, content, params, headers, auth)
                    async with asyncio.timeout(self._deadline):
                        if lean is not None and isinstance(lane, LeanTransport):
                            raw = await lane.exchange(
                                self._key,
                                method.encode(),
                                *lean,
                                content or b"",
                                connect_timeout=self._timeout,
                                read_timeout=self._timeout,
                            )
                            answered_404 = raw.status == 404
                            try:
                                raw_headers = httpx.Headers(raw.headers)
                                self._notify(method, path, content, raw.status)
                                reason = raw.reason.decode("ascii", errors="replace")
                                return await self._read(raw.status, raw_headers, raw.body, reason, method, path)
                            finally:
                                await raw.body.aclose()  # unread: the connection is closed, not reused
                        request = self._request(method, path, content, params, headers, auth)
                        response = await lane.handle_async_request(request)
                        response.request = request
                        answered_404 = response.status_code == 404
                        try:
                            self._notify(method, path, content, response.status_code)
                            return await self._read(
                                response.status_code,
                                response.headers,
                                response.aiter_bytes(),
                                response.reason_phrase,
                                method,
                                path,
                            )
                        finally:
                            await response.aclose()  # unread: httpcore closes the connection
                finally:
                    if answered_404 and lane is not self._injected:
                        await self._retire(lane)
                    else:
                        self._release(lane)
        except httpx.TransportError as exc:
            self._notify(method, path, content, None)
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
                raise Unreachable(
                    f"cannot reach {self.base_url}: {type(exc).__name__}", method=method, path=path
                ) from None
            raise UnknownOutcome(f"no usable response ({type(exc).__name__})", method=method, path=path) from None
        except TimeoutError:
            self._notify(method, path, content, None)
            raise UnknownOutcome(
                f"no complete answer within the {self._deadline:g} s request deadline", method=method, path=path
            ) from None

    async def _read(
        self,
        status: int,
        headers: httpx.Headers,
        body: AsyncIterable[bytes],
        reason: str,
        method: str,
        path: str,
    ) -> Answer:
        """The body, refused as soon as it is known to exceed the limit (declared length or
        bytes received), before it is buffered."""

        def too_big(size: str) -> ProtocolViolation:
            return ProtocolViolation(
                f"response of {size} bytes exceeds {self._max_bytes}", status=status, method=method, path=path
            )

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise too_big(declared)
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise ProtocolViolation(
                f"response is {encoding}-encoded although an uncompressed answer was asked for",
                status=status,
                method=method,
                path=path,
            )
        chunks: list[bytes] = []
        size = 0
        # A 404's body is read to its declared length and no further: the answer is whole,
        # but its end is never consumed, so closing the response closes its connection,
        # whichever pool holds it (``_retire``; a lean lane closes an unfinished body too).
        stop_at = int(declared) if status == 404 and declared.isdigit() else -1
        if stop_at:
            async for chunk in body:  # identity: the bytes as received
                size += len(chunk)
                if size > self._max_bytes:
                    raise too_big(f"more than {size}")
                chunks.append(chunk)
                if size == stop_at:
                    break
        return Answer(status, headers, b"".join(chunks), reason)

    def _raise_for(self, method: str, path: str, resp: Answer) -> None:
        if 200 <= resp.status_code < 300:
            return
        if resp.status_code < 400:  # the gateway never redirects: a 3xx body proves nothing
            where = resp.headers.get("location")
            raise ProtocolViolation(
                f"unexpected {resp.status_code} answer" + (f" (redirect to {where})" if where else ""),
                status=resp.status_code,
                method=method,
                path=path,
            )
        code = ""
        detail = resp.reason_phrase or "error"
        try:
            data = resp.json()
        except ValueError:
            data = None
        if isinstance(data, dict):
            code = _problem_code(data)
            raw_detail = data.get("detail") or data.get("message") or data.get("title")
            if isinstance(raw_detail, str) and raw_detail:
                detail = raw_detail[:500]
        retry_after: float | None = None
        if "retry-after" in resp.headers:
            try:
                retry_after = float(resp.headers["retry-after"])
            except ValueError:
                retry_after = None
        cls = error_class(resp.status_code, code)
        raise cls(
            detail,
            status=resp.status_code,
            code=code,
            method=method,
            path=path,
            retry_after=retry_after,
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
        safe: bool,
    ) -> Any:
        """One logical call with retries; returns the decoded JSON body.

        ``safe`` marks requests that can be repeated without effect (reads, full-replace
        PUTs). Unsafe ones are repeated only after failures that prove nothing ran.
        """

        # No retry machinery on the way: almost every call succeeds on its first attempt,
        # and the loop below costs nothing until an attempt fails.
        attempt = 1
        while True:
            try:
                return await self._attempt(method, path, body, params, headers, auth, safe)
            except _Retryable as exc:
                if attempt >= self._max_attempts:
                    raise exc.error from None
                delay = self._backoff(attempt, exc.error)
            await self._sleep(delay)
            attempt += 1

    async def _attempt(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        auth: bool,
        safe: bool,
    ) -> Any:
        """One attempt: the decoded body, or ``_Retryable`` when our rules allow another."""
        try:
            resp = await self._send(method, path, body=body, params=params, headers=headers, auth=auth)
            self._raise_for(method, path, resp)
        except Fenced:
            raise
        except (RateLimited, Unreachable) as exc:
            raise _Retryable(exc) from None
        except (ServerError, UnknownOutcome) as exc:
            if safe:
                raise _Retryable(exc) from None
            raise
        return self._decode(method, path, resp)

    def _decode(self, method: str, path: str, resp: Answer) -> Any:
        try:
            data = resp.json()
        except (ValueError, RecursionError):  # RecursionError: hostile nesting ([[[[…)
            raise ProtocolViolation(
                "response is not valid JSON", status=resp.status_code, method=method, path=path
            ) from None
        if not isinstance(data, dict):
            raise ProtocolViolation("response is not a JSON object", status=resp.status_code, method=method, path=path)
        return data

    @staticmethod
    def _field(data: Mapping[str, Any], name: str, method: str, path: str) -> Any:
        if name not in data:
            raise ProtocolViolation(f"response lacks field {name!r}", method=method, path=path)
        return data[name]

    def _money(self, data: Mapping[str, Any], name: str, method: str, path: str) -> Decimal:
        try:
            return from_gateway_number(self._field(data, name, method, path))
        except ValueError as exc:
            raise ProtocolViolation(f"field {name!r}: {exc}", method=method, path=path) from None

    def _optional_money(self, data: Mapping[str, Any], name: str, method: str, path: str) -> Decimal | None:
        if data.get(name) is None:
            return None
        return self._money(data, name, method, path)

    @staticmethod
    def _strings(data: Mapping[str, Any], name: str, method: str, path: str) -> tuple[str, ...]:
        value = data.get(name) or ()
        if not isinstance(value, (list, tuple)):
            raise ProtocolViolation(f"field {name!r} is not a list", method=method, path=path)
        return tuple(str(v) for v in value)

    @staticmethod
    def _percent(data: Mapping[str, Any], name: str, method: str, path: str) -> float:
        value = data.get(name) or 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolViolation(f"field {name!r} is not a number", method=method, path=path)
        return float(value)

    @staticmethod
    def _wallet_path(agent_id: str, suffix: str) -> str:
        return f"/v1/billing/wallets/{agent_id}/{suffix}"

    # ------------------------------------------------------------------ identity

    async def list_keys(self, agent_id: str | None = None) -> list[KeyRecord]:
        """All API keys (admin only): the gateway's only fleet-wide view of agents."""
        path = "/v1/infra/keys"
        params = {"agent_id": agent_id} if agent_id else None
        try:
            data = await self._call("GET", path, params=params, safe=True)
        except NotAdmin:
            raise NotAdmin(
                "the configured API key is not admin-scoped; finops needs a key with the "
                "'admin' scope to manage other agents' wallets and caps",
                status=403,
                code="forbidden-admin-only",
                method="GET",
                path=path,
            ) from None
        rows = self._field(data, "keys", "GET", path)
        if not isinstance(rows, list):
            raise ProtocolViolation("'keys' is not a list", method="GET", path=path)
        out: list[KeyRecord] = []
        for row in rows:
            if not isinstance(row, dict):
                raise ProtocolViolation("key row is not an object", method="GET", path=path)
            out.append(
                KeyRecord(
                    key_hash_prefix=str(self._field(row, "key_hash_prefix", "GET", path)),
                    agent_id=str(self._field(row, "agent_id", "GET", path)),
                    tier=str(row.get("tier", "")),
                    scopes=self._strings(row, "scopes", "GET", path),
                    created_at=str(row.get("created_at", "")),
                    revoked=bool(row.get("revoked", False)),
                )
            )
        return out

    async def exchange_rate(self, from_currency: str, to_currency: str) -> Decimal:
        """Units of ``to_currency`` per unit of ``from_currency``, at full precision."""
        if from_currency == to_currency:
            return Decimal(1)
        path = "/v1/billing/exchange-rates"
        data = await self._call(
            "GET", path, params={"from_currency": from_currency, "to_currency": to_currency}, safe=True
        )
        raw = self._field(data, "rate", "GET", path)
        try:
            rate = Decimal(str(raw))
        except ArithmeticError:
            raise ProtocolViolation(f"rate {raw!r} is not a number", method="GET", path=path) from None
        if not rate.is_finite() or rate <= 0:
            raise ProtocolViolation(f"rate {raw!r} is not positive", method="GET", path=path)
        return rate

    # ------------------------------------------------------------------ wallets

    async def get_balance(self, agent_id: str) -> Decimal | None:
        """Balance in credits, or ``None`` when the agent has no wallet (not registered)."""
        path = self._wallet_path(agent_id, "balance")
        try:
            data = await self._call("GET", path, safe=True)
        except NotFound:
            return None
        return self._money(data, "balance", "GET", path)

    async def register(self, agent_id: str) -> Registration:
        """Create an agent the only way that yields its own key (API.md §0.1).

        Not idempotent and the key is shown once, so this is never retried blindly; an
        unknown outcome is surfaced for the caller to resolve by re-observing.
        """
        path = "/v1/register"
        data = await self._call("POST", path, body={"agent_id": agent_id}, auth=False, safe=False)
        key = self._field(data, "api_key", "POST", path)
        if not isinstance(key, str) or not is_key_token(key):
            raise ProtocolViolation("register returned no usable api_key", method="POST", path=path)
        return Registration(
            agent_id=str(self._field(data, "agent_id", "POST", path)),
            api_key=key,
            tier=str(data.get("tier", "")),
            balance=self._money(data, "balance", "POST", path),
        )

    async def deposit(
        self, agent_id: str, amount: Decimal, idempotency_key: str, description: str = ""
    ) -> DepositResult:
        """Deposit exactly once per ``idempotency_key``.

        After an unknown outcome (timeout, reset, 5xx, the gateway's 500 IntegrityError) the
        ledger is searched for the key, waiting a little for an in-flight request to land.
        The same key is sent again in this call only after an answer (a 5xx the gateway
        itself gave: the request is over). After no answer at all (timeout, reset) or a
        proxy's 502/504, the gateway may still be running the request, and it credits
        concurrent duplicates of one key twice (API.md §9): the deposit is left unknown, and
        the next run resolves its intent from the ledger instead.
        """
        path = self._wallet_path(agent_id, "deposit")
        body = {"amount": format_money(amount), "currency": "CREDITS", "description": description}
        last: GatewayError | None = None
        for attempt in range(self._max_attempts):
            if attempt:
                await self._sleep(min(self._backoff_max, 0.2 * 2**attempt))
            try:
                data = await self._call(
                    "POST", path, body=body, headers={"Idempotency-Key": idempotency_key}, safe=False
                )
            except (UnknownOutcome, ServerError) as exc:
                last = exc
                tx = await self._settle_and_find(agent_id, idempotency_key)
                if tx is not None:
                    balance = await self.get_balance(agent_id)
                    if balance is None:
                        raise NotFound(f"wallet of {agent_id} vanished", method="GET", path=path) from None
                    return DepositResult(new_balance=balance, transaction_id=tx.id, recovered=True)
                if isinstance(exc, UnknownOutcome) or exc.status in (502, 504):
                    break  # possibly still running on the gateway: never send a concurrent duplicate
                continue
            tx_id = data.get("transaction_id")
            return DepositResult(
                new_balance=self._money(data, "new_balance", "POST", path),
                transaction_id=int(tx_id) if isinstance(tx_id, int) else None,
            )
        raise UnknownOutcome(
            f"deposit of {format_money(amount)} credits to {agent_id} did not complete and no ledger "
            f"entry carries its idempotency key yet ({last}); it is not sent again while the gateway "
            "may still be running it: the next run looks in the ledger first",
            method="POST",
            path=path,
        )

    async def _settle_and_find(self, agent_id: str, idempotency_key: str) -> Transaction | None:
        for delay in self._settle_delays:
            await self._sleep(delay)
            try:
                tx = await self.find_transaction(agent_id, idempotency_key)
            except GatewayError:
                continue
            if tx is not None:
                return tx
        return None

    async def transactions(self, agent_id: str, *, limit: int = 100, offset: int = 0) -> list[Transaction]:
        """One page of the ledger, newest first."""
        path = self._wallet_path(agent_id, "transactions")
        data = await self._call("GET", path, params={"limit": limit, "offset": offset}, safe=True)
        rows = self._field(data, "transactions", "GET", path)
        if not isinstance(rows, list):
            raise ProtocolViolation("'transactions' is not a list", method="GET", path=path)
        out = []
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("id"), int):
                raise ProtocolViolation("transaction row without an integer id", method="GET", path=path)
            key = row.get("idempotency_key")
            out.append(
                Transaction(
                    id=row["id"],
                    amount=self._money(row, "amount", "GET", path),
                    tx_type=str(row.get("tx_type") or row.get("type") or ""),
                    idempotency_key=key if isinstance(key, str) else None,
                    created_at=str(row.get("created_at", "")),
                    new_balance=_snapshot_balance(row.get("result_snapshot")),
                )
            )
        return out

    async def latest_transaction_id(self, agent_id: str) -> int:
        """Id of the newest ledger row (0 if none): the anchor for deposit keys."""
        rows = await self.transactions(agent_id, limit=1)
        return rows[0].id if rows else 0

    async def find_transaction(
        self, agent_id: str, idempotency_key: str, *, pages: int = 5, page_size: int = 100
    ) -> Transaction | None:
        """Search the newest ``pages`` ledger pages for a deposit's idempotency key."""
        for page in range(pages):
            rows = await self.transactions(agent_id, limit=page_size, offset=page * page_size)
            for tx in rows:
                if tx.idempotency_key == idempotency_key:
                    return tx
            if len(rows) < page_size:
                return None
        return None

    # ------------------------------------------------------------------ budgets

    async def get_budget(self, agent_id: str) -> BudgetStatus:
        path = self._wallet_path(agent_id, "budget")
        data = await self._call("GET", path, safe=True)
        for name in ("daily_cap", "monthly_cap"):  # null means "no cap"; absent means a bad answer
            self._field(data, name, "GET", path)
        return BudgetStatus(
            daily_cap=self._optional_money(data, "daily_cap", "GET", path),
            monthly_cap=self._optional_money(data, "monthly_cap", "GET", path),
            daily_spend=self._optional_money(data, "daily_spend", "GET", path) or Decimal("0.00"),
            monthly_spend=self._optional_money(data, "monthly_spend", "GET", path) or Decimal("0.00"),
            daily_pct=self._percent(data, "daily_pct", "GET", path),
            monthly_pct=self._percent(data, "monthly_pct", "GET", path),
            alert_triggered=bool(data.get("alert_triggered", False)),
            cap_exceeded=bool(data.get("cap_exceeded", False)),
        )

    async def set_budget(
        self,
        agent_id: str,
        *,
        daily_cap: Decimal | None,
        monthly_cap: Decimal | None,
        alert_threshold: Decimal,
    ) -> None:
        """Full replace (API.md §4): all three fields are always sent together."""
        path = self._wallet_path(agent_id, "budget")
        body: dict[str, Any] = {
            "daily_cap": format_money(daily_cap) if daily_cap is not None else None,
            "monthly_cap": format_money(monthly_cap) if monthly_cap is not None else None,
            "alert_threshold": float(alert_threshold),
        }
        data = await self._call("PUT", path, body=body, safe=True)
        for name in ("daily_cap", "monthly_cap"):
            self._field(data, name, "PUT", path)
        stored = (
            self._optional_money(data, "daily_cap", "PUT", path),
            self._optional_money(data, "monthly_cap", "PUT", path),
        )
        if stored != (daily_cap, monthly_cap):
            raise ProtocolViolation(
                f"the gateway confirmed caps {stored}, not {(daily_cap, monthly_cap)}", method="PUT", path=path
            )

    # ------------------------------------------------------------------ usage and analytics

    async def leaderboard(self, metric: str = "calls", *, limit: int) -> Leaderboard:
        """``GET /v1/billing/leaderboard``: one free read that ranks every agent with usage.

        ``limit`` has no upper bound on the gateway; ask for more than the agents you
        expect, and check ``complete`` (fewer rows than asked: nobody was cut off). The
        answer is validated row by row (ranks 1..n, unique ids, values that do not rise
        down the board, at most ``limit`` rows), and its size is bounded by the client's
        response limit before it is parsed. ``spend`` values are converted from the
        gateway's atomic units exactly (``analytics_credits``)."""
        if metric not in LEADERBOARD_METRICS:
            raise ValueError(f"unknown leaderboard metric {metric!r} (known: {', '.join(LEADERBOARD_METRICS)})")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"leaderboard limit must be a positive integer, got {limit!r}")
        path = "/v1/billing/leaderboard"
        data = await self._call("GET", path, params={"metric": metric, "limit": limit}, safe=True)
        rows = self._field(data, "leaderboard", "GET", path)
        if not isinstance(rows, list):
            raise ProtocolViolation("'leaderboard' is not a list", method="GET", path=path)
        if len(rows) > limit:
            raise ProtocolViolation(f"{len(rows)} leaderboard rows for a limit of {limit}", method="GET", path=path)
        entries: list[LeaderboardEntry] = []
        seen: set[str] = set()
        previous: Decimal | None = None
        for position, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise ProtocolViolation(f"leaderboard row {position} is not an object", method="GET", path=path)
            rank = row.get("rank")
            if isinstance(rank, bool) or rank != position:
                raise ProtocolViolation(
                    f"leaderboard row {position} has rank {rank!r}, expected {position}", method="GET", path=path
                )
            agent_id = row.get("agent_id")
            if not isinstance(agent_id, str) or not 0 < len(agent_id) <= _MAX_AGENT_ID_CHARS:
                raise ProtocolViolation(f"leaderboard row {position} has no usable agent_id", method="GET", path=path)
            if agent_id in seen:
                raise ProtocolViolation(f"agent {agent_id!r} appears twice on the leaderboard", method="GET", path=path)
            seen.add(agent_id)
            value = self._leaderboard_value(metric, row.get("value"), position, path)
            if previous is not None and value > previous:
                raise ProtocolViolation(
                    f"leaderboard row {position} ranks {value} below {previous}: not sorted", method="GET", path=path
                )
            previous = value
            entries.append(LeaderboardEntry(rank=position, agent_id=agent_id, value=value))
        return Leaderboard(metric=metric, limit=limit, entries=tuple(entries), complete=len(entries) < limit)

    @staticmethod
    def _leaderboard_value(metric: str, raw: object, position: int, path: str) -> Decimal:
        where = f"leaderboard row {position} value"
        if metric == "calls":
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise ProtocolViolation(f"{where} {raw!r} is not a call count", method="GET", path=path)
            return Decimal(raw)
        value = _finite_number(raw, where, path)
        if metric == "spend":
            if value < 0:
                raise ProtocolViolation(f"{where} {raw!r} is negative spend", method="GET", path=path)
            return analytics_credits(value)
        return value

    async def timeseries(
        self, agent_id: str, *, interval: str = "hour", since: float | None = None, limit: int = 24
    ) -> list[UsageBucket]:
        """``GET …/timeseries``: the agent's usage per UTC ``hour`` or ``day`` bucket,
        oldest first; the newest ``limit`` non-empty buckets whose records are at or after
        ``since`` (unix seconds; all time without it). Buckets without usage are absent,
        not zero. ``cost`` is converted from the gateway's atomic units exactly."""
        step = _INTERVAL_SECONDS.get(interval)
        if step is None:
            raise ValueError(f"timeseries interval must be 'hour' or 'day', got {interval!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"timeseries limit must be a positive integer, got {limit!r}")
        params: dict[str, Any] = {"interval": interval, "limit": limit}
        if since is not None:
            params["since"] = _since_param(since)
        path = self._wallet_path(agent_id, "timeseries")
        data = await self._call("GET", path, params=params, safe=True)
        rows = self._field(data, "buckets", "GET", path)
        if not isinstance(rows, list):
            raise ProtocolViolation("'buckets' is not a list", method="GET", path=path)
        if len(rows) > limit:
            raise ProtocolViolation(f"{len(rows)} timeseries buckets for a limit of {limit}", method="GET", path=path)
        buckets: list[UsageBucket] = []
        for position, row in enumerate(rows, start=1):
            where = f"timeseries bucket {position}"
            if not isinstance(row, dict):
                raise ProtocolViolation(f"{where} is not an object", method="GET", path=path)
            start = _bucket_start(row.get("timestamp"), step, where, path)
            if buckets and start <= buckets[-1].start:
                raise ProtocolViolation(f"{where} does not follow the one before it", method="GET", path=path)
            calls = row.get("calls")
            if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
                raise ProtocolViolation(f"{where} calls {calls!r} is not a count", method="GET", path=path)
            cost = _finite_number(row.get("cost"), f"{where} cost", path)
            if cost < 0:
                raise ProtocolViolation(f"{where} cost {row.get('cost')!r} is negative", method="GET", path=path)
            buckets.append(UsageBucket(start=start, calls=calls, cost=analytics_credits(cost)))
        return buckets

    async def usage(self, agent_id: str, *, since: float | None = None) -> UsageSummary:
        """``GET …/usage``: the agent's recorded calls (free ones included) and their cost
        in credits since ``since`` (unix seconds; all time without it). An agent without a
        wallet has zero usage (the gateway answers zeros, not 404)."""
        params = None if since is None else {"since": _since_param(since)}
        path = self._wallet_path(agent_id, "usage")
        data = await self._call("GET", path, params=params, safe=True)
        counts: list[int] = []
        for name in ("total_calls", "total_tokens"):
            raw = self._field(data, name, "GET", path)
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise ProtocolViolation(f"{name} {raw!r} is not a count", method="GET", path=path)
            counts.append(raw)
        cost = _finite_number(self._field(data, "total_cost", "GET", path), "total_cost", path)
        if cost < 0:
            raise ProtocolViolation(f"total_cost {cost} is negative", method="GET", path=path)
        return UsageSummary(
            total_calls=counts[0],
            total_cost=cost.quantize(_ATOMIC_CREDIT, rounding=ROUND_HALF_EVEN),
            total_tokens=counts[1],
        )

    # ------------------------------------------------------------------ keys

    async def rotate_key(self, current_key: str) -> Rotation:
        """Rotate an agent's key (admin only; API.md §6). Not idempotent: a retry mints
        another live key, so an unknown outcome is surfaced, never retried here; the caller
        resolves it by comparing the agent's live key prefixes with what it holds."""
        path = "/v1/infra/keys/rotate"
        data = await self._call(
            "POST",
            path,
            body={"current_key": current_key},
            headers={"X-Rotate-Confirmation": "confirm"},
            safe=False,
        )
        key = self._field(data, "new_key", "POST", path)
        if not isinstance(key, str) or not is_key_token(key):
            raise ProtocolViolation("rotate returned no usable new_key", method="POST", path=path)
        expires = data.get("grace_expires_at")
        return Rotation(
            agent_id=str(self._field(data, "agent_id", "POST", path)),
            new_key=key,
            grace_expires_at=float(expires) if isinstance(expires, (int, float)) else 0.0,
        )

    async def set_frozen(self, agent_id: str, frozen: bool) -> None:
        """Freeze or unfreeze a wallet (admin only). Idempotent; note the gateway "succeeds"
        for wallets that do not exist and cannot report the flag back (API.md §3)."""
        path = self._wallet_path(agent_id, "freeze" if frozen else "unfreeze")
        await self._call("POST", path, safe=True)

    # ------------------------------------------------------------------ webhooks

    def _webhook(self, row: Any, method: str, path: str) -> Webhook:
        if not isinstance(row, dict):
            raise ProtocolViolation("webhook row is not an object", method=method, path=path)
        events = row.get("event_types") or row.get("events") or []
        filters = row.get("filter_agent_ids")
        if isinstance(filters, str):  # stored as JSON text in some versions
            try:
                filters = json.loads(filters)
            except ValueError:
                filters = [filters]
        return Webhook(
            id=str(self._field(row, "id", method, path)),
            url=str(self._field(row, "url", method, path)),
            event_types=tuple(str(e) for e in events),
            filter_agent_ids=tuple(str(a) for a in filters) if isinstance(filters, list) else None,
            secret=str(row.get("secret") or ""),
            created_at=str(row.get("created_at", "")),
        )

    async def list_webhooks(self) -> list[Webhook]:
        """The caller's own active webhooks (admin sees only its own too)."""
        path = "/v1/infra/webhooks"
        data = await self._call("GET", path, safe=True)
        rows = self._field(data, "webhooks", "GET", path)
        if not isinstance(rows, list):
            raise ProtocolViolation("'webhooks' is not a list", method="GET", path=path)
        return [self._webhook(r, "GET", path) for r in rows]

    async def create_webhook(
        self, url: str, event_types: Sequence[str], secret: str, filter_agent_ids: Sequence[str] | None
    ) -> Webhook:
        """Register a webhook. Not idempotent (duplicates get new ids), so never retried
        after an unknown outcome; the reconciler re-lists and matches on URL + events."""
        path = "/v1/infra/webhooks"
        body = {
            "url": url,
            "event_types": list(event_types),
            "secret": secret,
            "filter_agent_ids": list(filter_agent_ids) if filter_agent_ids is not None else None,
        }
        data = await self._call("POST", path, body=body, safe=False)
        return self._webhook(data, "POST", path)

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Soft-delete; ``False`` when it was already gone (the gateway's 404)."""
        path = f"/v1/infra/webhooks/{webhook_id}"
        try:
            await self._call("DELETE", path, safe=True)
        except NotFound:
            return False
        return True

    async def webhook_deliveries(self, webhook_id: str, *, limit: int = 20) -> list[WebhookDelivery]:
        path = f"/v1/infra/webhooks/{webhook_id}/deliveries"
        data = await self._call("GET", path, params={"limit": limit, "offset": 0}, safe=True)
        rows = self._field(data, "deliveries", "GET", path)
        if not isinstance(rows, list):
            raise ProtocolViolation("'deliveries' is not a list", method="GET", path=path)
        out = []
        for row in rows:
            if not isinstance(row, dict):
                raise ProtocolViolation("delivery row is not an object", method="GET", path=path)
            code = row.get("response_code")
            last = row.get("last_attempt_at")
            out.append(
                WebhookDelivery(
                    id=int(row.get("id") or 0),
                    event_type=str(row.get("event_type", "")),
                    status=str(row.get("status", "")),
                    attempts=int(row.get("attempts") or 0),
                    response_code=code if isinstance(code, int) else None,
                    last_attempt_at=float(last) if isinstance(last, (int, float)) else None,
                )
            )
        return out
