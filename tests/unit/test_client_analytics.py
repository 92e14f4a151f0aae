"""Decoding of the gateway's analytics reads (leaderboard, timeseries, usage): shapes are
validated strictly, the 1.4.8 atomic-unit bug is converted exactly and in one place, and a
hostile answer can neither crash the client nor make it allocate without bound.

The transport is an ``httpx.MockTransport``: this is pure decoding, the sandbox serving
the same reads is tested in ``tests/integration/test_sandbox_analytics.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.gateway.client import GatewayClient
from controller.gateway.errors import ProtocolViolation
from controller.gateway.models import ANALYTICS_ATOMIC_DIGITS, Leaderboard, analytics_credits


def client_answering(body: Any, seen: list[httpx.Request] | None = None, *, raw: bytes | None = None) -> GatewayClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if raw is not None:
            return httpx.Response(200, content=raw, headers={"content-type": "application/json"})
        return httpx.Response(200, json=body)

    async def no_sleep(_: float) -> None:
        return None

    return GatewayClient(
        "http://gateway.test", "a2a_enterprise_" + "0" * 24, transport=httpx.MockTransport(handler), sleep=no_sleep
    )


def board(*rows: tuple[str, Any]) -> dict[str, Any]:
    return {"leaderboard": [{"rank": i, "agent_id": a, "value": v} for i, (a, v) in enumerate(rows, start=1)]}


# ------------------------------------------------------------------ the atomic-unit bug


def test_the_atomic_unit_scale_is_the_gateway_bug_of_1_4_8() -> None:
    assert ANALYTICS_ATOMIC_DIGITS == 8
    assert analytics_credits(Decimal(40000000)) == Decimal("0.40")
    assert analytics_credits(Decimal("30000000.00")) == Decimal("0.30")


@given(st.integers(min_value=0, max_value=10**30))
def test_atomic_conversion_is_exact_at_any_size(atomic: int) -> None:
    credits = analytics_credits(Decimal(atomic))
    # exact whatever the decimal context's precision (28 digits by default, exceeded here):
    # the same digits, the point moved 8 places, nothing rounded
    assert credits.as_tuple().digits == Decimal(atomic).as_tuple().digits
    assert credits.as_tuple().exponent == -ANALYTICS_ATOMIC_DIGITS
    whole, _, fraction = f"{credits:f}".partition(".")
    assert int(whole + fraction) == atomic


def test_a_sub_cent_fee_is_kept_not_rounded() -> None:
    # a 2 % intent fee on 1.23 credits is 0.0246 credits = 2460000 atomic units
    assert analytics_credits(Decimal(2460000)) == Decimal("0.0246")


# ------------------------------------------------------------------ leaderboard


async def test_leaderboard_calls_decodes_counts_and_asks_for_the_limit() -> None:
    seen: list[httpx.Request] = []
    async with client_answering(board(("agent-a", 12), ("agent-b", 12), ("agent-c", 3)), seen) as client:
        result = await client.leaderboard("calls", limit=5)
    assert isinstance(result, Leaderboard)
    assert result.values() == {"agent-a": Decimal(12), "agent-b": Decimal(12), "agent-c": Decimal(3)}
    assert [e.rank for e in result.entries] == [1, 2, 3]
    assert result.complete  # 3 rows < limit 5: nobody with usage was cut off
    assert seen[0].url.path == "/v1/billing/leaderboard"
    assert dict(seen[0].url.params) == {"metric": "calls", "limit": "5"}
    assert seen[0].method == "GET"


async def test_leaderboard_is_incomplete_when_it_fills_the_limit() -> None:
    async with client_answering(board(("agent-a", 5), ("agent-b", 4))) as client:
        result = await client.leaderboard("calls", limit=2)
    assert not result.complete


async def test_leaderboard_spend_is_converted_from_atomic_units() -> None:
    async with client_answering(board(("agent-a", 40000000), ("agent-b", 2460000), ("agent-c", 0))) as client:
        result = await client.leaderboard("spend", limit=10)
    assert result.values() == {"agent-a": Decimal("0.40"), "agent-b": Decimal("0.0246"), "agent-c": Decimal(0)}


async def test_leaderboard_of_an_empty_gateway_is_complete() -> None:
    async with client_answering({"leaderboard": []}) as client:
        result = await client.leaderboard("calls", limit=1)
    assert result.entries == () and result.complete


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "lacks field 'leaderboard'"),
        ({"leaderboard": {"agent-a": 1}}, "not a list"),
        ({"leaderboard": ["agent-a"]}, "not an object"),
        ({"leaderboard": [{"rank": 2, "agent_id": "agent-a", "value": 1}]}, "rank 2, expected 1"),
        ({"leaderboard": [{"rank": True, "agent_id": "agent-a", "value": 1}]}, "rank True"),
        ({"leaderboard": [{"rank": 1, "agent_id": "", "value": 1}]}, "agent_id"),
        ({"leaderboard": [{"rank": 1, "agent_id": 7, "value": 1}]}, "agent_id"),
        ({"leaderboard": [{"rank": 1, "agent_id": "x" * 129, "value": 1}]}, "agent_id"),
        (board(("agent-a", 2), ("agent-a", 1)), "appears twice"),
        (board(("agent-a", 1), ("agent-b", 2)), "not sorted"),
        (board(("agent-a", "12")), "not a call count"),
        (board(("agent-a", 1.5)), "not a call count"),
        (board(("agent-a", -1)), "not a call count"),
        (board(("agent-a", True)), "not a call count"),
        (board(("agent-a", None)), "not a call count"),
        (board(*((f"agent-{i}", 10 - i) for i in range(4))), "4 leaderboard rows for a limit of 3"),
    ],
)
async def test_leaderboard_garbage_is_a_protocol_violation(body: Any, message: str) -> None:
    async with client_answering(body) as client:
        with pytest.raises(ProtocolViolation, match=message):
            await client.leaderboard("calls", limit=3)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-5", None, [1], "1e999999", "9" * 65])
async def test_leaderboard_spend_garbage_is_a_protocol_violation(value: Any) -> None:
    async with client_answering(board(("agent-a", value))) as client:
        with pytest.raises(ProtocolViolation):
            await client.leaderboard("spend", limit=3)


async def test_leaderboard_other_metrics_keep_the_gateway_number() -> None:
    async with client_answering(board(("agent-a", 0.91), ("agent-b", 0.5))) as client:
        result = await client.leaderboard("trust_score", limit=3)
    assert result.values() == {"agent-a": Decimal("0.91"), "agent-b": Decimal("0.5")}


@pytest.mark.parametrize(("metric", "limit"), [("volume", 10), ("calls", 0), ("calls", -1), ("calls", True)])
async def test_leaderboard_bad_arguments_fail_before_sending(metric: str, limit: int) -> None:
    seen: list[httpx.Request] = []
    async with client_answering(board(), seen) as client:
        with pytest.raises(ValueError):
            await client.leaderboard(metric, limit=limit)
    assert seen == []


async def test_a_ten_thousand_agent_leaderboard_parses_within_the_response_bound() -> None:
    rows = [(f"agent-{i:05d}", 20000 - i) for i in range(10_000)]
    body = board(*rows)
    assert len(json.dumps(body)) < 8 * 1024 * 1024
    async with client_answering(body) as client:
        result = await client.leaderboard("calls", limit=10_001)
    assert len(result.entries) == 10_000 and result.complete
    assert result.values()["agent-09999"] == Decimal(10001)


async def test_a_leaderboard_larger_than_the_response_bound_is_refused_before_parsing() -> None:
    # a hostile gateway answering 10 MiB: refused while it arrives, never parsed
    raw = b'{"leaderboard": [' + b'{"rank": 1, "agent_id": "a", "value": 1},' * 260_000 + b"]}"
    async with client_answering(None, raw=raw) as client:
        with pytest.raises(ProtocolViolation, match="exceeds"):
            await client.leaderboard("calls", limit=10**9)


async def test_hostile_nesting_is_a_protocol_violation_not_a_crash() -> None:
    async with client_answering(None, raw=b"[" * 200_000 + b"]" * 200_000) as client:
        with pytest.raises(ProtocolViolation, match="not valid JSON"):
            await client.leaderboard("calls", limit=10)


# ------------------------------------------------------------------ timeseries


def buckets(*rows: tuple[Any, Any, Any]) -> dict[str, Any]:
    return {"buckets": [{"timestamp": t, "calls": c, "cost": cost} for t, c, cost in rows]}


async def test_timeseries_decodes_buckets_and_converts_cost() -> None:
    seen: list[httpx.Request] = []
    body = buckets(
        ("2026-11-29T17:00:00+00:00", 8, "30000000.00"),
        ("2026-11-29T19:00:00+00:00", 1, "0.00"),
        (1795982400, 2, 2460000),  # unserialised paths give unix seconds and numbers
    )
    async with client_answering(body, seen) as client:
        result = await client.timeseries("agent-a", since=1795968000.5, limit=3)
    assert [(b.start, b.calls, b.cost) for b in result] == [
        (datetime(2026, 11, 29, 17, tzinfo=UTC), 8, Decimal("0.30")),
        (datetime(2026, 11, 29, 19, tzinfo=UTC), 1, Decimal(0)),
        (datetime(2026, 11, 29, 20, tzinfo=UTC), 2, Decimal("0.0246")),
    ]
    assert seen[0].url.path == "/v1/billing/wallets/agent-a/timeseries"
    assert dict(seen[0].url.params) == {"interval": "hour", "limit": "3", "since": "1795968000.5"}


async def test_timeseries_day_buckets_and_no_since_by_default() -> None:
    seen: list[httpx.Request] = []
    async with client_answering(buckets(("2026-11-28T00:00:00+00:00", 3, "10000000.00")), seen) as client:
        result = await client.timeseries("agent-a", interval="day")
    assert result[0].start == datetime(2026, 11, 28, tzinfo=UTC)
    assert dict(seen[0].url.params) == {"interval": "day", "limit": "24"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "lacks field 'buckets'"),
        ({"buckets": "none"}, "not a list"),
        ({"buckets": [3]}, "not an object"),
        (buckets(("2026-11-29T17:00:00", 1, "0.00")), "no UTC offset"),
        (buckets(("yesterday", 1, "0.00")), "not a time"),
        (buckets((None, 1, "0.00")), "not a time"),
        (buckets((1e300, 1, "0.00")), "not a time"),
        (buckets(("2026-11-29T17:30:00+00:00", 1, "0.00")), "not the start of a bucket"),
        (buckets(("2026-11-29T18:00:00+00:00", 1, "0.00"), ("2026-11-29T17:00:00+00:00", 1, "0.00")), "follow"),
        (buckets(("2026-11-29T17:00:00+00:00", 1, "0.00"), ("2026-11-29T17:00:00+00:00", 1, "0.00")), "follow"),
        (buckets(("2026-11-29T17:00:00+00:00", -1, "0.00")), "not a count"),
        (buckets(("2026-11-29T17:00:00+00:00", "1", "0.00")), "not a count"),
        (buckets(("2026-11-29T17:00:00+00:00", 1, "-100.00")), "negative"),
        (buckets(("2026-11-29T17:00:00+00:00", 1, "NaN")), "not finite"),
        (buckets(("2026-11-29T17:00:00+00:00", 1, "thirty")), "not a number"),
        (buckets(*((f"2026-11-29T{h:02d}:00:00+00:00", 1, "0.00") for h in range(3))), "3 timeseries buckets"),
    ],
)
async def test_timeseries_garbage_is_a_protocol_violation(body: Any, message: str) -> None:
    async with client_answering(body) as client:
        with pytest.raises(ProtocolViolation, match=message):
            await client.timeseries("agent-a", limit=2)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.timeseries("agent-a", interval="week"),
        lambda c: c.timeseries("agent-a", limit=0),
        lambda c: c.timeseries("agent-a", since=float("nan")),
        lambda c: c.usage("agent-a", since=float("inf")),
    ],
)
async def test_timeseries_and_usage_bad_arguments_fail_before_sending(call: Callable[[GatewayClient], Any]) -> None:
    seen: list[httpx.Request] = []
    async with client_answering(buckets(), seen) as client:
        with pytest.raises(ValueError):
            await call(client)
    assert seen == []


# ------------------------------------------------------------------ usage


async def test_usage_decodes_credits_at_atomic_resolution() -> None:
    seen: list[httpx.Request] = []
    body = {"total_calls": 8, "total_cost": 0.30000000000000004, "total_tokens": 0}
    async with client_answering(body, seen) as client:
        summary = await client.usage("agent-a", since=1795968000)
    assert (summary.total_calls, summary.total_cost, summary.total_tokens) == (8, Decimal("0.3"), 0)
    assert summary.total_cost == Decimal("0.30000000")  # float noise below 1e-8 dropped, nothing above
    assert dict(seen[0].url.params) == {"since": "1795968000.0"}


async def test_usage_keeps_a_sub_cent_fee() -> None:
    async with client_answering({"total_calls": 1, "total_cost": 0.0246, "total_tokens": 0}) as client:
        summary = await client.usage("agent-a")
    assert summary.total_cost == Decimal("0.0246")


@pytest.mark.parametrize(
    "body",
    [
        {"total_calls": 1, "total_cost": 0.1},
        {"total_cost": 0.1, "total_tokens": 0},
        {"total_calls": 1, "total_tokens": 0},
        {"total_calls": -1, "total_cost": 0.1, "total_tokens": 0},
        {"total_calls": 1.0, "total_cost": 0.1, "total_tokens": 0},
        {"total_calls": 1, "total_cost": "lots", "total_tokens": 0},
        {"total_calls": 1, "total_cost": -0.1, "total_tokens": 0},
        {"total_calls": 1, "total_cost": 0.1, "total_tokens": False},
    ],
)
async def test_usage_garbage_is_a_protocol_violation(body: dict[str, Any]) -> None:
    async with client_answering(body) as client:
        with pytest.raises(ProtocolViolation):
            await client.usage("agent-a")
