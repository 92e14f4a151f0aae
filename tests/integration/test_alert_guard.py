"""Alert delivery checks the receiver again when it connects, and bounds each attempt.

Real loopback receivers (tests/integration/test_alerts.py's Receiver, and the hostile
server), a real sandbox for the budget readings, and an injected resolver: the tests never
touch DNS, and names like ``alerts.example.com`` reach only what the resolver says.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import httpcore
import pytest

from controller.alerting.guard import AddressRefused, GuardedBackend
from policies.spec import SecretRef
from tests.integration.conftest import Harness
from tests.integration.hostile import HostileServer
from tests.integration.test_alerts import POLICY, Checker, Receiver, _desired, _register, _route, _spend


class FakeResolver:
    """Answers from a table; records every lookup. A name not in the table does not resolve."""

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = dict(table)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return self.table[host]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    with HostileServer(trickle_every=0.2) as server:
        yield server


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def _crossing(harness: Harness, tmp_path: Path, url: str, *, allow_insecure: bool) -> Checker:
    """One agent over its 75 % threshold, with one route to ``url``."""
    key = _register(harness.sandbox, "res-g")
    ref = SecretRef(file=str(tmp_path / "alert.secret"), generate=True)
    _spend(harness.sandbox, key, 8)
    route = _route(url, ref, thresholds=(75,), allow_insecure=allow_insecure)
    return Checker(harness.sandbox, _desired(["res-g"], [route]), harness.store.path)


async def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time(
    harness: Harness, tmp_path: Path, receiver: Receiver
) -> None:
    port = _port(receiver.url)
    resolver = FakeResolver({"alerts.example.com": ["127.0.0.1"]})
    check = await _crossing(
        harness, tmp_path, f"https://alerts.example.com:{port}/hooks/{{agent}}", allow_insecure=False
    )
    result = await check(resolver=resolver)
    assert result.fired == 1 and result.delivered == 0
    assert receiver.requests == []  # nothing reached the loopback receiver
    assert resolver.lookups == ["alerts.example.com"]
    assert any("resolves to 127.0.0.1, which is a loopback address" in e for e in result.delivery_errors)


@pytest.mark.parametrize(
    "answers",
    [["10.0.0.7"], ["100.100.100.200"], ["93.184.216.34", "169.254.169.254"], ["::ffff:127.0.0.1"], ["fd00::1"]],
)
async def test_any_internal_answer_refuses_the_connection(answers: list[str]) -> None:
    class NeverConnect(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, *args: object, **kwargs: object) -> httpcore.AsyncNetworkStream:
            raise AssertionError("connected although an answer was internal")

    backend = GuardedBackend(FakeResolver({"alerts.example.com": answers}), enforce=True, inner=NeverConnect())
    with pytest.raises(AddressRefused, match="resolves to"):
        await backend.connect_tcp("alerts.example.com", 443)


async def test_the_connection_goes_to_the_address_that_was_checked(
    harness: Harness, tmp_path: Path, receiver: Receiver
) -> None:
    """Pinning: the name resolves once (to the loopback receiver, allowed for an
    allowInsecure route), and the request arrives there with the URL's Host header."""
    port = _port(receiver.url)
    resolver = FakeResolver({"alerts.example.com": ["127.0.0.1"]})
    check = await _crossing(harness, tmp_path, f"http://alerts.example.com:{port}/hooks/{{agent}}", allow_insecure=True)
    result = await check(resolver=resolver)
    assert result.delivered == 1, result.delivery_errors
    (req,) = receiver.requests
    assert req.headers["Host"] == f"alerts.example.com:{port}"
    assert resolver.lookups == ["alerts.example.com"]


async def test_a_rebinding_answer_cannot_swap_the_checked_address() -> None:
    """The resolver answers a public address first and loopback afterwards (DNS rebinding);
    the guard asks once and connects to exactly what it checked."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> Sequence[str]:
        lookups.append(host)
        return next(answers)

    connected: list[str] = []

    class Recording(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, host: str, port: int, *args: object, **kw: object) -> httpcore.AsyncNetworkStream:
            connected.append(host)
            raise httpcore.ConnectError("recorded, not connected")

    backend = GuardedBackend(rebinding, enforce=True, inner=Recording())
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("alerts.example.com", 443)
    assert (lookups, connected) == (["alerts.example.com"], ["93.184.216.34"])


async def test_unicode_and_local_names_are_refused_before_resolving() -> None:
    resolver = FakeResolver({})
    backend = GuardedBackend(resolver, enforce=True)
    for host in ["127.0.0.1", "100.100.100.200", "localhost", "metadata.google.internal", "intranet"]:
        with pytest.raises(AddressRefused):
            await backend.connect_tcp(host, 443)
    assert resolver.lookups == []


async def test_a_name_that_does_not_resolve_is_a_retryable_failure(harness: Harness, tmp_path: Path) -> None:
    check = await _crossing(harness, tmp_path, "https://nowhere.example.com/hooks/{agent}", allow_insecure=False)
    result = await check(resolver=FakeResolver({}))
    assert result.delivered == 0 and result.pending == 1  # kept for the next check
    assert any("cannot resolve nowhere.example.com" in e for e in result.delivery_errors)


async def test_a_trickling_receiver_cannot_hold_a_check_past_the_deadline(
    harness: Harness, tmp_path: Path, hostile: HostileServer
) -> None:
    check = await _crossing(harness, tmp_path, hostile.url + "/trickle-head/{agent}", allow_insecure=True)
    policy = replace(POLICY, attempts_per_check=2, deadline=0.5)
    started = time.monotonic()
    result = await check(policy=policy)
    elapsed = time.monotonic() - started
    assert result.delivered == 0 and result.pending == 1
    assert any("no answer within the 0.5 s deadline" in e for e in result.delivery_errors)
    assert elapsed < 2 * 0.5 + 2.0, elapsed


async def test_an_endless_answer_body_is_never_read(harness: Harness, tmp_path: Path, hostile: HostileServer) -> None:
    check = await _crossing(harness, tmp_path, hostile.url + "/endless/{agent}", allow_insecure=True)
    tracemalloc.start()
    try:
        started = time.monotonic()
        result = await check()
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.delivered == 1  # the 200 status line is the answer
    assert peak < 16 * 1024 * 1024, peak
    assert elapsed < 5.0
