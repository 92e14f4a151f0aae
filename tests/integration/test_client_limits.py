"""The gateway client bounds every answer while it arrives: size, time, compression.

A real HTTP server on 127.0.0.1 (tests/integration/hostile.py) sends an endless body, 300 MB
bodies with and without a Content-Length, a body or headers trickled one byte at a time, and
a gzip bomb. Memory is measured with tracemalloc around the call; time with a monotonic clock.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from controller.errors import ConfigError
from controller.gateway.client import (
    DEFAULT_REQUEST_DEADLINE,
    MAX_RESPONSE_BYTES,
    GatewayClient,
    request_deadline,
)
from controller.gateway.errors import ProtocolViolation, UnknownOutcome
from tests.integration.hostile import HostileServer


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    with HostileServer(trickle_every=0.2) as server:
        yield server


def client(server: HostileServer, **kw: Any) -> GatewayClient:
    async def no_sleep(_: float) -> None:
        return None

    kw.setdefault("max_attempts", 1)
    return GatewayClient(server.url, "a2a_admin_" + "k" * 24, sleep=no_sleep, **kw)


async def peak_memory(call: Callable[[], Awaitable[object]]) -> tuple[int, BaseException | None]:
    """Peak bytes allocated while ``call`` runs, and what it raised."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    raised: BaseException | None = None
    try:
        await call()
    except Exception as exc:
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, raised


@pytest.mark.parametrize("agent", ["endless", "huge", "huge-declared"])
async def test_oversized_answers_are_refused_while_streaming_with_bounded_memory(
    hostile: HostileServer, agent: str
) -> None:
    async with client(hostile, deadline=20.0) as gw:
        started = time.monotonic()
        peak, raised = await peak_memory(lambda: gw.get_balance(agent))
        elapsed = time.monotonic() - started
    assert isinstance(raised, ProtocolViolation), raised
    assert f"exceeds {MAX_RESPONSE_BYTES}" in str(raised)
    # the 300 MB / endless body was never buffered: at most the cap plus one join of it
    assert peak < 3 * MAX_RESPONSE_BYTES, peak
    assert hostile.bytes_sent < 300 * 1024 * 1024 or agent == "huge-declared"
    assert elapsed < 10.0


async def test_a_declared_length_over_the_cap_is_refused_before_reading(hostile: HostileServer) -> None:
    async with client(hostile, max_response_bytes=1024) as gw:
        with pytest.raises(ProtocolViolation, match=r"response of 314572800 bytes exceeds 1024"):
            await gw.get_balance("huge-declared")


async def test_a_small_cap_bounds_memory_to_that_cap(hostile: HostileServer) -> None:
    cap = 256 * 1024
    async with client(hostile, max_response_bytes=cap) as gw:
        peak, raised = await peak_memory(lambda: gw.get_balance("endless"))
    assert isinstance(raised, ProtocolViolation)
    assert peak < 2 * 1024 * 1024, peak  # not the 8 MiB default, not the endless body


@pytest.mark.parametrize("agent", ["trickle", "trickle-head"])
async def test_a_trickling_server_cannot_outlast_the_request_deadline(hostile: HostileServer, agent: str) -> None:
    """One byte every 0.2 s never trips httpx's per-read timeout (10 s); the deadline
    bounds the whole request instead."""
    async with client(hostile, deadline=1.0) as gw:
        started = time.monotonic()
        with pytest.raises(UnknownOutcome, match=r"within the 1 s request deadline"):
            await gw.get_balance(agent)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5, elapsed


async def test_reads_retry_after_a_missed_deadline_but_stay_bounded(hostile: HostileServer) -> None:
    async with client(hostile, deadline=0.5, max_attempts=3) as gw:
        started = time.monotonic()
        with pytest.raises(UnknownOutcome):
            await gw.get_balance("trickle")
        elapsed = time.monotonic() - started
    assert len([r for r in hostile.requests if "trickle" in r]) == 3
    assert elapsed < 3 * 0.5 + 1.5


async def test_a_deposit_that_misses_its_deadline_is_an_unknown_outcome_never_resent(
    hostile: HostileServer,
) -> None:
    """A timed-out deposit may still land: it is left unknown (the ledger is searched; the
    same key is not sent again while the gateway may be running it)."""
    async with client(hostile, deadline=1.0, max_attempts=3, settle_delays=(0.0,)) as gw:
        with pytest.raises(UnknownOutcome, match="not sent again"):
            await gw.deposit("trickle", Decimal("5.00"), "finops-topup-test")
    deposits = [r for r in hostile.requests if r.startswith("POST") and "/deposit" in r]
    ledger_reads = [r for r in hostile.requests if "/transactions" in r]
    assert len(deposits) == 1
    assert ledger_reads  # resolved by looking, like every other unknown outcome


async def test_a_register_that_misses_its_deadline_is_an_unknown_outcome(hostile: HostileServer) -> None:
    gw = GatewayClient(hostile.url + "/trickle", "a2a_admin_" + "k" * 24, deadline=0.6, max_attempts=3)
    async with gw:
        with pytest.raises(UnknownOutcome):
            await gw.register("new-agent")
    assert len([r for r in hostile.requests if "/v1/register" in r]) == 1


async def test_a_compressed_answer_is_refused_not_inflated(hostile: HostileServer) -> None:
    async with client(hostile) as gw:
        peak, raised = await peak_memory(lambda: gw.get_balance("gzip"))
    assert isinstance(raised, ProtocolViolation)
    assert "gzip-encoded" in str(raised)
    assert peak < 8 * 1024 * 1024  # the 64 MB the bomb expands to was never produced


async def test_well_behaved_answers_still_work_and_ask_for_identity(hostile: HostileServer) -> None:
    async with client(hostile) as gw:
        assert await gw.get_balance("fine") == Decimal("12.50")


def test_the_deadline_comes_from_the_environment_or_the_default() -> None:
    assert request_deadline({}) == DEFAULT_REQUEST_DEADLINE == 30.0
    assert request_deadline({"FINOPS_REQUEST_DEADLINE": "4.5"}) == 4.5
    for bad in ["0", "-1", "nan", "inf", "soon", "7200"]:
        with pytest.raises(ConfigError, match="FINOPS_REQUEST_DEADLINE"):
            request_deadline({"FINOPS_REQUEST_DEADLINE": bad})


async def test_a_plain_http_gateway_is_never_reached_through_an_environment_proxy(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx sends plain-http requests to ``HTTP_PROXY`` in clear, Authorization header
    included, even for 127.0.0.1: the admin key would leave the machine."""
    with HostileServer() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        async with client(hostile) as gw:
            assert await gw.get_balance("fine") == Decimal("12.50")
        assert proxy.requests == []
    assert any("/fine/" in r for r in hostile.requests)
