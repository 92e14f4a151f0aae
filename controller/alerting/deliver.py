"""Sending queued alerts: signed POSTs with retries, every attempt logged.

Guarantees: at-least-once per (alert, route). Within one check a delivery is retried with
exponential backoff on connect errors, timeouts, 5xx and 429 (the receiver is down or busy;
resending is harmless because receivers deduplicate on the alert id). Any other answer
(3xx, 4xx) is not retried within the check, since the same request would get the same
answer, but the row stays pending and is tried again on the next check, in case the
receiver is being fixed. After ``max_attempts`` attempts in total the row is marked
``gave_up``: that is visible in ``finops status``, never silent.

The exact stored bytes are sent every time, so the body (and its legacy body-only
``X-A2A-Signature``) is identical across retries and checks, with the same alert id; each
attempt carries its own send time in ``X-Finops-Timestamp`` and an ``X-Finops-Signature``
over that time and the body, so a receiver can refuse a stale or replayed alert.

Redirects are not followed (a redirect could point at an internal host the URL check would
have refused). Once one delivery to an origin has exhausted its retries, the origin's other
alerts wait for the next check instead of each spending its own backoff on a receiver that
is down.

Receivers are contacted defensively: the URL rules are applied again before each send, and
again at connect time to the addresses the host resolves to, connecting to the address that
was checked (``controller/alerting/guard.py``); the response body is never read, and each
attempt, from connecting to the status line and headers, must finish within
``DeliveryPolicy.deadline`` seconds, so a receiver trickling bytes cannot hold a check.
A host that is or resolves to a refused address fails that attempt (it is retried on later
checks, in case DNS is being fixed, and given up after ``max_attempts``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from controller.alerting.guard import AddressRefused, GuardedTransport, Resolver, system_resolver
from controller.alerting.store import DELIVERED, GAVE_UP, REFUSED, AlertStore, OutboxRow
from controller.errors import ConfigError, FinopsError
from controller.io.secretref import resolve_secret
from policies.alerts import redact_url, signature_headers
from policies.spec import SecretRef
from policies.urls import check_url_safety

logger = logging.getLogger("finops.alerts")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class DeliveryPolicy:
    """Retry budget and timing. Defaults suit a daemon checking every minute or so: four
    tries within a check (about 0.5 + 1 + 2 s of backoff), and 60 tries in total before a
    delivery is given up."""

    attempts_per_check: int = 4
    max_attempts: int = 60
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    timeout: float = 10.0
    """httpx's per-operation timeout (connect, each read, each write)."""
    deadline: float = 30.0
    """Seconds one attempt may take in all, however slowly the receiver trickles bytes."""
    concurrency: int = 8
    """Origins (scheme, host, port) delivered to in parallel; one origin is sequential."""
    retention: float = 30 * 86400.0
    """Finished outbox rows and log entries older than this are pruned."""


DEFAULT_POLICY = DeliveryPolicy()


class Outcome(Enum):
    DELIVERED = "delivered"
    RECEIVER_DOWN = "receiver_down"
    """Retries exhausted on 5xx/429/transport errors: skip the origin for this check."""
    FAILED = "failed"
    GAVE_UP = "gave_up"
    REFUSED = "refused"
    FENCED = "fenced"
    """This finops lost the writer lock: nothing more is sent; the row stays pending for
    the replica that holds it now."""


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    gave_up: int = 0
    refused: int = 0
    deferred: int = 0
    """Not attempted this check because the same receiver was down (or this finops was fenced)."""
    fenced: bool = False
    """Stopped sending because the writer lock was lost (``fence`` raised)."""
    errors: list[str] = field(default_factory=list)
    """One line per failed delivery: agent, redacted URL, what went wrong."""


class _Retry(Exception):
    """The receiver is unavailable (5xx, 429, connect error, timeout): try again."""


class _Rejected(Exception):
    """The receiver answered, but not 2xx: do not retry within this check."""


class SecretCache:
    """Resolves each referenced secret once per check; a failure is remembered as a message
    so every route using that secret reports it, and no route crashes the check."""

    def __init__(self) -> None:
        self._values: dict[SecretRef, str | ConfigError] = {}

    def get(self, ref: SecretRef) -> str:
        if ref not in self._values:
            try:
                self._values[ref] = resolve_secret(ref)
            except ConfigError as exc:
                self._values[ref] = exc
        value = self._values[ref]
        if isinstance(value, ConfigError):
            raise value
        return value


def _origin(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port}"
    except ValueError:
        return url


class Deliverer:
    def __init__(
        self,
        store: AlertStore,
        http: httpx.AsyncClient,
        *,
        now: Clock,
        policy: DeliveryPolicy,
        sleep: Sleep = asyncio.sleep,
        insecure_http: httpx.AsyncClient | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        """``http`` sends to routes under the URL rules; ``insecure_http`` (default: the
        same client) to routes with ``allowInsecure``. ``fence`` (the writer lock's check)
        runs before every attempt: once it raises, nothing more is sent."""
        self._fence = fence
        self._store = store
        self._http = http
        self._insecure_http = insecure_http if insecure_http is not None else http
        self._now = now
        self._policy = policy
        self._sleep = sleep
        self._secrets = SecretCache()
        self.report = DeliveryReport()

    async def run(self) -> DeliveryReport:
        groups: dict[str, list[OutboxRow]] = {}
        for row in self._store.pending():
            groups.setdefault(_origin(row.url), []).append(row)
        slots = asyncio.Semaphore(self._policy.concurrency)

        async def one_origin(rows: list[OutboxRow]) -> None:
            async with slots:
                for i, row in enumerate(rows):
                    if await self.deliver(row) in (Outcome.RECEIVER_DOWN, Outcome.FENCED):
                        self.report.deferred += len(rows) - i - 1
                        return

        async with asyncio.TaskGroup() as tg:
            for rows in groups.values():
                tg.create_task(one_origin(rows))
        return self.report

    async def deliver(self, row: OutboxRow) -> Outcome:
        shown = redact_url(row.url)
        problem = check_url_safety(row.url, allow_insecure=row.allow_insecure)
        if problem:
            # Only reachable for rows queued by an older finops; new rows are refused at enqueue.
            self._attempt(row, shown, ok=False, code=None, error=f"refused: {problem}")
            self._store.set_status(row.id, REFUSED, self._now())
            self.report.refused += 1
            return Outcome.REFUSED
        remaining = self._policy.max_attempts - row.attempts
        if remaining <= 0:
            return self._give_up(row, shown)
        try:
            secret = self._secrets.get(row.secret)
        except ConfigError as exc:
            self._attempt(row, shown, ok=False, code=None, error=str(exc))
            return self._failed(row, shown, str(exc), remaining - 1)
        budget = min(self._policy.attempts_per_check, remaining)
        tries = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(budget),
            wait=wait_exponential_jitter(
                multiplier=self._policy.backoff_initial,
                max=self._policy.backoff_max,
                jitter=self._policy.backoff_initial,
            ),
            retry=retry_if_exception_type(_Retry),
            reraise=True,
            sleep=self._sleep,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if not await self._may_send():
                        return Outcome.FENCED
                    tries += 1
                    headers = signature_headers(secret, row.body, row.alert_id, now=self._now())
                    await self._post(row, shown, headers)
        except (_Retry, _Rejected) as exc:
            left = remaining - tries
            if left <= 0:
                return self._give_up(row, shown)
            self._failed(row, shown, str(exc), left)
            return Outcome.RECEIVER_DOWN if isinstance(exc, _Retry) else Outcome.FAILED
        self._store.set_status(row.id, DELIVERED, self._now())
        self.report.delivered += 1
        logger.info("alert %s delivered to %s (%s, agent %s)", row.alert_id, shown, row.event_type, row.agent_id)
        return Outcome.DELIVERED

    async def _post(self, row: OutboxRow, shown: str, headers: dict[str, str]) -> None:
        http = self._insecure_http if row.allow_insecure else self._http
        try:
            # Only the status matters; the body is never read, so a receiver cannot make
            # finops buffer an arbitrarily large answer.
            async with asyncio.timeout(self._policy.deadline):
                async with http.stream("POST", row.url, content=row.body, headers=headers) as resp:
                    code = resp.status_code
        except AddressRefused as exc:
            error = f"refused at connect time: {exc}"
            self._attempt(row, shown, ok=False, code=None, error=error)
            raise _Rejected(error) from None
        except TimeoutError:
            error = f"no answer within the {self._policy.deadline:g} s deadline"
            self._attempt(row, shown, ok=False, code=None, error=error)
            raise _Retry(error) from None
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._attempt(row, shown, ok=False, code=None, error=error)
            raise _Retry(error) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._attempt(row, shown, ok=False, code=None, error=error)
            raise _Rejected(error) from None
        if 200 <= code < 300:
            self._attempt(row, shown, ok=True, code=code, error="")
            return
        error = f"HTTP {code}"
        self._attempt(row, shown, ok=False, code=code, error=error)
        if code >= 500 or code == 429:
            raise _Retry(error)
        raise _Rejected(error)

    async def _may_send(self) -> bool:
        if self._fence is None:
            return True
        if not self.report.fenced:
            try:
                await asyncio.to_thread(self._fence)
            except FinopsError as exc:
                self.report.fenced = True
                self.report.errors.append(f"alerts not sent: {exc}")
                logger.error("alert delivery stopped: %s", exc)
        return not self.report.fenced

    def _attempt(self, row: OutboxRow, shown: str, *, ok: bool, code: int | None, error: str) -> None:
        self._store.record_attempt(row, shown, self._now(), ok=ok, code=code, error=error)
        if not ok:
            logger.warning("alert %s to %s failed: %s", row.alert_id, shown, error)

    def _failed(self, row: OutboxRow, shown: str, error: str, left: int) -> Outcome:
        if left <= 0:
            return self._give_up(row, shown)
        self.report.failed += 1
        self.report.errors.append(f"{row.agent_id}: alert {row.alert_id} to {shown}: {error} (will retry)")
        return Outcome.FAILED

    def _give_up(self, row: OutboxRow, shown: str) -> Outcome:
        attempts = self._store.attempts_of(row.id)
        message = f"gave up after {attempts} attempts"
        self._store.set_status(row.id, GAVE_UP, self._now(), error=None)
        self.report.gave_up += 1
        self.report.errors.append(f"{row.agent_id}: alert {row.alert_id} to {shown}: {message}")
        logger.error("alert %s to %s: %s", row.alert_id, shown, message)
        return Outcome.GAVE_UP


async def deliver_pending(
    store: AlertStore,
    *,
    now: Clock,
    transport: httpx.AsyncBaseTransport | None = None,
    policy: DeliveryPolicy = DEFAULT_POLICY,
    sleep: Sleep = asyncio.sleep,
    resolver: Resolver = system_resolver,
    fence: Callable[[], None] | None = None,
) -> DeliveryReport:
    """Try every pending outbox row once (with in-check retries); see the module doc.

    Without an injected ``transport`` (tests inject faults there), connections go through
    the guard: resolved once by ``resolver``, checked, pinned."""

    def client(via: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=via,
            timeout=policy.timeout,
            follow_redirects=False,
            headers={"User-Agent": "finops-alerts/0.1"},
        )

    if transport is not None:
        strict: httpx.AsyncBaseTransport = transport
        insecure: httpx.AsyncBaseTransport = transport
    else:
        ssl_context = httpx.create_ssl_context()
        strict = GuardedTransport(resolver, enforce=True, ssl_context=ssl_context)
        insecure = GuardedTransport(resolver, enforce=False, ssl_context=ssl_context)
    async with (
        client(strict) as http,
        client(insecure) as insecure_http,
    ):
        deliverer = Deliverer(
            store, http, now=now, policy=policy, sleep=sleep, insecure_http=insecure_http, fence=fence
        )
        return await deliverer.run()
