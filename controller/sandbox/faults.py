"""Seeded fault injection: the sandbox misbehaving on purpose, reproducibly.

A real gateway times out, resets connections, sheds load and, worst of all, commits a
write and then loses the response. The controller claims to survive all of that (no
double deposit, no crash, convergence on the next pass); this layer lets tests and
``bench/chaos.py`` prove it against the real sandbox over real HTTP.

It is ASGI middleware around the whole app, so the gateway code stays unaware of it. Only
``/v1/*`` routes are ever faulted, never ``/_sandbox/*`` (the tests' own eyes). Off by
default: a ``FaultConfig`` with ``rate=0`` passes every request straight through.

Spec syntax (``SandboxServer(faults=...)``, ``serve(faults=...)``, env
``FINOPS_SANDBOX_FAULTS``): comma-separated ``key=value`` pairs, kinds joined by ``+``::

    seed=7,rate=0.2,kinds=500+503+429+hang+reset+drop,retry_after=0,hang=30

=============  =======================================================  ============
key            meaning                                                  default
=============  =======================================================  ============
``seed``       integer seed; the same seed faults the same requests     ``0``
``rate``       fraction of eligible requests faulted, 0..1               ``0`` (off)
``kinds``      ``+``-joined kinds below, or ``all``                      the first six
``retry_after``  seconds sent in the 429's ``Retry-After`` header        ``0``
``hang``       seconds a ``hang`` holds the request at most (it also     ``30``
               ends when the client gives up), and a ``late`` one always
``only``       ``+``-joined fragments of ``"METHOD /path"``: fault only    every request
               requests that contain one (``only=/register+POST /v1/infra``)
=============  =======================================================  ============

Kinds, and whether the request runs (commits) on the gateway:

- ``503``: problem+json 503 at the edge. Never runs.
- ``429``: problem+json 429 with ``Retry-After``. Never runs.
- ``500``: the request runs, then its response is replaced by a problem+json 500, as the
  gateway's own IntegrityError 500 after money already moved. Runs.
- ``hang``: no answer until the client gives up (or ``hang`` seconds), then the
  connection is closed. Never runs.
- ``reset``: the connection is closed at once, without a response. Never runs.
- ``drop``: the request runs to completion, then the connection is closed without a
  response: the lost response that causes double deposits. Runs.
- ``late`` (only by name or ``all``): held ``hang`` seconds, then runs after the client
  has given up; its response goes nowhere. A request stuck in a queue. Runs, late.
  With ``FaultInjector.gate_late(True)`` a late request is instead held until the test
  calls ``release_late(run=True)`` (it runs then) or ``release_late(run=False)`` (it is
  dropped unrun: lost in the queue), so a test decides *when* it lands, not a timer.

Reproducible under concurrency: the fate of a request is drawn from
``random.Random(f"{seed}:{method} {path}:{body digest}:{n}")``, where ``n`` counts earlier
identical requests. Each agent's requests get the same fates in every run with the same
seed, whatever order concurrent agents' requests arrive in.

Closing a connection without a response needs the transport, which ASGI does not expose;
``AbortableH11Protocol`` (used by ``SandboxServer`` and ``serve``) puts its ``abort``
into the request's ``scope["state"]``. Under another server, an abort degrades into the
server's own 500.

A ``Tripwire`` calls a function when the sandbox receives its N-th write: the crash tests
SIGKILL the finops process at an exact point in its run, not after a racy delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("finops.sandbox.faults")

ENV_VAR = "FINOPS_SANDBOX_FAULTS"
ABORT_STATE_KEY = "finops.sandbox.abort"
"""Key of the transport's ``abort`` in ``scope["state"]`` (see ``AbortableH11Protocol``)."""
CONNECTION_STATE_KEY = "finops.sandbox.connection"
"""Key of a dict that lives as long as the connection, in every request's ``scope["state"]``
(``controller.sandbox.quirks`` remembers there that a connection is broken)."""
FAULTED_PREFIX = "/v1/"
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PROBLEM_TYPE_BASE = "https://api.greenhelix.net/errors/"
_TRACE_LIMIT = 100_000


class FaultKind(StrEnum):
    S500 = "500"
    S503 = "503"
    S429 = "429"
    HANG = "hang"
    RESET = "reset"
    DROP = "drop"
    LATE = "late"

    @property
    def runs(self) -> bool:
        """Whether the faulted request still runs (commits) on the gateway."""
        return self in {FaultKind.S500, FaultKind.DROP, FaultKind.LATE}


DEFAULT_KINDS: tuple[FaultKind, ...] = (
    FaultKind.S500,
    FaultKind.S503,
    FaultKind.S429,
    FaultKind.HANG,
    FaultKind.RESET,
    FaultKind.DROP,
)
ALL_KINDS: tuple[FaultKind, ...] = tuple(FaultKind)


@dataclass(frozen=True)
class FaultConfig:
    """What to inject; ``FaultConfig()`` injects nothing. See the module docstring."""

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[FaultKind, ...] = DEFAULT_KINDS
    retry_after: float = 0.0
    hang: float = 30.0
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(FaultKind(k) for k in self.kinds))  # accept plain strings
        object.__setattr__(self, "only", tuple(self.only))
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"faults: rate must be between 0 and 1, got {self.rate}")
        if self.retry_after < 0:
            raise ValueError(f"faults: retry_after must be >= 0, got {self.retry_after}")
        if self.hang <= 0:
            raise ValueError(f"faults: hang must be > 0, got {self.hang}")
        if not self.kinds:
            raise ValueError("faults: kinds must name at least one kind")

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse ``seed=7,rate=0.2,kinds=500+drop,...``; ``""``/``off``/``none`` mean off.
        Raises ``ValueError`` with a message naming the bad part."""
        text = spec.strip()
        if text.lower() in {"", "off", "none", "0"}:
            return cls()
        values: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key, raw = key.strip().lower(), raw.strip()
            if not sep or not raw:
                raise ValueError(f"faults: expected key=value, got {part.strip()!r}")
            if key in values:
                raise ValueError(f"faults: {key!r} given twice")
            try:
                if key == "seed":
                    values[key] = int(raw)
                elif key in {"rate", "retry_after", "hang"}:
                    values[key] = float(raw)
                elif key == "kinds":
                    values[key] = _parse_kinds(raw)
                elif key == "only":
                    values[key] = tuple(p.strip() for p in raw.split("+") if p.strip())
                else:
                    raise ValueError(f"faults: unknown key {key!r} (known: seed, rate, kinds, retry_after, hang, only)")
            except ValueError as exc:
                if str(exc).startswith("faults:"):
                    raise
                raise ValueError(f"faults: {key}={raw!r} is not a valid value") from None
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultConfig:
        return cls.parse((os.environ if environ is None else environ).get(ENV_VAR, ""))

    @classmethod
    def coerce(cls, value: FaultConfig | str | None) -> FaultConfig:
        if value is None:
            return cls()
        return value if isinstance(value, FaultConfig) else cls.parse(value)

    def to_spec(self) -> str:
        """The canonical spec string; ``parse(c.to_spec()) == c``."""
        if not self.enabled:
            return "off"
        spec = (
            f"seed={self.seed},rate={self.rate:g},kinds={'+'.join(k.value for k in self.kinds)},"
            f"retry_after={self.retry_after:g},hang={self.hang:g}"
        )
        return spec + (f",only={'+'.join(self.only)}" if self.only else "")

    def covers(self, method: str, path: str) -> bool:
        request = f"{method} {path}"
        return not self.only or any(fragment in request for fragment in self.only)


def _parse_kinds(raw: str) -> tuple[FaultKind, ...]:
    if raw.lower() == "all":
        return ALL_KINDS
    kinds: list[FaultKind] = []
    for name in raw.split("+"):
        try:
            kind = FaultKind(name.strip().lower())
        except ValueError:
            known = "+".join(k.value for k in FaultKind)
            raise ValueError(f"faults: unknown kind {name.strip()!r} (known: {known}, or all)") from None
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


@dataclass
class _HeldLate:
    """One ``late`` request held at the gate: ``run`` is set by ``release_late``."""

    label: str
    run: bool | None = None


@dataclass
class Tripwire:
    """Calls ``action`` when the sandbox receives the ``after_writes``-th ``/v1`` write
    since arming (1-based), before that write runs. With ``commit`` the write then runs
    and its response is dropped (the caller died after sending it); without, the write is
    dropped unrun (the caller died before it left)."""

    after_writes: int
    action: Callable[[], None]
    commit: bool = True
    fired_on: str | None = field(default=None, init=False)
    """``"METHOD /path"`` of the write it fired on."""


class FaultInjector:
    """The decisions and counters of the fault layer; one per sandbox app.

    Thread-safe: the app decides on the server's event-loop thread while tests read the
    counters and reconfigure from theirs.
    """

    def __init__(self, config: FaultConfig | str | None = None) -> None:
        self._lock = threading.Lock()
        self._config = FaultConfig.coerce(config)
        self._seen: Counter[tuple[str, str, str]] = Counter()
        self._injected: Counter[FaultKind] = Counter()
        self._eligible = 0
        self._writes = 0
        self._trace: list[tuple[str, str, str]] = []
        self._tripwire: Tripwire | None = None
        self._late_gate = False
        self._held: list[_HeldLate] = []

    @property
    def config(self) -> FaultConfig:
        return self._config

    @property
    def active(self) -> bool:
        """Whether requests must go through the fault path at all (else: untouched)."""
        return self._config.enabled or self._tripwire is not None

    def configure(self, config: FaultConfig | str | None, *, reset: bool = True) -> None:
        """Switch to another config; ``reset`` also zeroes counters, occurrence counts and
        the trace, so the new seed's fates start from the same point in every run."""
        new = FaultConfig.coerce(config)
        with self._lock:
            self._config = new
            if reset:
                self._seen.clear()
                self._injected.clear()
                self._eligible = 0
                self._trace.clear()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No faults inside the block (a clean observation); counters and occurrence
        counts are kept, so the seeded sequence resumes where it stopped."""
        with self._lock:
            saved = self._config
            self._config = replace(saved, rate=0.0)
        try:
            yield
        finally:
            with self._lock:
                self._config = saved

    def arm(self, tripwire: Tripwire) -> None:
        if tripwire.after_writes < 1:
            raise ValueError("a tripwire fires on the 1st write at the earliest")
        with self._lock:
            self._writes = 0
            self._tripwire = tripwire

    def disarm(self) -> Tripwire | None:
        with self._lock:
            tripwire, self._tripwire = self._tripwire, None
            return tripwire

    # ---------------------------------------------------------------- the late gate

    def gate_late(self, on: bool = True) -> None:
        """While on, ``late`` requests wait for ``release_late`` instead of ``hang`` seconds."""
        with self._lock:
            self._late_gate = on

    def hold_late(self, label: str) -> _HeldLate | None:
        """A ticket for a late request if the gate is on (else ``None``: use ``hang``)."""
        with self._lock:
            if not self._late_gate:
                return None
            ticket = _HeldLate(label)
            self._held.append(ticket)
            return ticket

    def held_late(self) -> list[str]:
        """``"METHOD /path"`` of the late requests waiting at the gate now."""
        with self._lock:
            return [t.label for t in self._held if t.run is None]

    def release_late(self, *, run: bool = True, only: str | None = None) -> int:
        """Let every held late request (those whose label contains ``only``) run, or drop
        them unrun; returns how many. The caller then waits for the sandbox to be idle
        (``SandboxServer.wait_idle``) before looking at its state."""
        with self._lock:
            chosen = [t for t in self._held if t.run is None and (only is None or only in t.label)]
            for ticket in chosen:
                ticket.run = run
            self._held = [t for t in self._held if t.run is None]
            return len(chosen)

    # ---------------------------------------------------------------- decisions

    def decide(self, method: str, path: str, body: bytes) -> FaultKind | None:
        """The fate of one request: ``None`` (served normally) or the fault to inject."""
        digest = hashlib.sha256(body).hexdigest()[:16] if body else "-"
        with self._lock:
            config = self._config
            self._eligible += 1
            if not config.enabled or not config.covers(method, path):
                return None
            key = (method, path, digest)
            n = self._seen[key]
            self._seen[key] = n + 1
            rng = random.Random(f"{config.seed}:{method} {path}:{digest}:{n}")
            if rng.random() >= config.rate:
                return None
            kind = rng.choice(config.kinds)
            self._injected[kind] += 1
            if len(self._trace) < _TRACE_LIMIT:
                self._trace.append((method, path, kind.value))
            return kind

    def note_write(self, method: str, path: str) -> Tripwire | None:
        """Count a write; returns the tripwire if this write trips it (once)."""
        if method not in _WRITE_METHODS:
            return None
        with self._lock:
            self._writes += 1
            tripwire = self._tripwire
            if tripwire is None or self._writes < tripwire.after_writes:
                return None
            self._tripwire = None
            tripwire.fired_on = f"{method} {path}"
            return tripwire

    # ---------------------------------------------------------------- reporting

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected so far, by kind (every kind listed, zeros included)."""
        with self._lock:
            return {k.value: self._injected.get(k, 0) for k in FaultKind}

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._injected.values())

    def trace(self) -> list[tuple[str, str, str]]:
        """``(method, path, kind)`` of every injected fault, in injection order."""
        with self._lock:
            return list(self._trace)

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /_sandbox/faults``."""
        with self._lock:
            tripwire = self._tripwire
            return {
                "spec": self._config.to_spec(),
                "enabled": self._config.enabled,
                "eligible_requests": self._eligible,
                "injected": {k.value: self._injected.get(k, 0) for k in FaultKind},
                "total": sum(self._injected.values()),
                "writes_seen": self._writes,
                "tripwire": None
                if tripwire is None
                else {"after_writes": tripwire.after_writes, "commit": tripwire.commit},
            }


# --------------------------------------------------------------------------- ASGI mechanics


class AbortableH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the transport's ``abort`` and a per-connection state
    dict in every request's ``scope["state"]`` (uvicorn copies that mapping per request,
    shallowly: the dict is the connection's), so the fault layer and the gateway's
    connection quirks can close a connection without answering."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app_state = {**self.app_state, ABORT_STATE_KEY: transport.abort, CONNECTION_STATE_KEY: {}}


_ANSWERS: dict[FaultKind, tuple[int, str, str]] = {
    FaultKind.S503: (503, "service-unavailable", "Service temporarily unavailable (injected fault)"),
    FaultKind.S429: (429, "rate-limit-exceeded", "Rate limit exceeded (injected fault)"),
    FaultKind.S500: (500, "internal-error", "Internal server error (injected fault, after the request ran)"),
}
"""The kinds that answer with problem+json; the others close the connection unanswered."""


def _problem(kind: FaultKind, path: str, headers: Mapping[str, str]) -> list[Message]:
    status, code, detail = _ANSWERS[kind]
    title = HTTPStatus(status).phrase
    body = json.dumps(
        {"type": _PROBLEM_TYPE_BASE + code, "title": title, "status": status, "detail": detail, "instance": path}
    ).encode()
    raw_headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    return [
        {"type": "http.response.start", "status": status, "headers": raw_headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


async def _discard(message: Message) -> None:
    """The ``send`` of a request whose response is lost."""


class FaultMiddleware:
    """Applies ``FaultInjector`` decisions to ``/v1/*`` requests (see the module docstring)."""

    def __init__(self, app: ASGIApp, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(FAULTED_PREFIX) or not self.injector.active:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        body, replay = await _buffer(receive)
        tripwire = self.injector.note_write(method, path)
        if tripwire is not None:
            tripwire.action()
            if tripwire.commit:
                await self.app(scope, replay, _discard)
            await abort_connection(scope)
            return
        kind = self.injector.decide(method, path, body)
        if kind is None:
            await self.app(scope, replay, send)
            return
        config = self.injector.config
        if kind is FaultKind.LATE:
            ticket = self.injector.hold_late(f"{method} {path}")
            if ticket is None:
                await asyncio.sleep(config.hang)
            else:
                while ticket.run is None:
                    await asyncio.sleep(0.005)
                if not ticket.run:
                    await abort_connection(scope)
                    return
        if kind.runs:
            await self.app(scope, replay, _discard)
        elif kind is FaultKind.HANG:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_until_disconnect(receive), timeout=config.hang)
        if kind in _ANSWERS:
            headers = {"Retry-After": f"{config.retry_after:g}"} if kind is FaultKind.S429 else {}
            for message in _problem(kind, path, headers):
                await send(message)
        else:
            await abort_connection(scope)


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body (the fate depends on it), and a ``receive`` that replays it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected before the body arrived
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def abort_connection(scope: Scope) -> None:
    """Close the request's connection at once, without an answer."""
    abort = scope.get("state", {}).get(ABORT_STATE_KEY)
    if abort is None:
        logger.warning("sandbox faults: this server cannot close a connection; it answers 500 instead")
        return
    abort()
    # Let the server see the connection lost before the app returns, or it would try to
    # send its "no response" 500 on a closed transport.
    await asyncio.sleep(0)


__all__ = [
    "ABORT_STATE_KEY",
    "ALL_KINDS",
    "CONNECTION_STATE_KEY",
    "DEFAULT_KINDS",
    "ENV_VAR",
    "AbortableH11Protocol",
    "FaultConfig",
    "FaultInjector",
    "FaultKind",
    "FaultMiddleware",
    "Tripwire",
    "abort_connection",
]
