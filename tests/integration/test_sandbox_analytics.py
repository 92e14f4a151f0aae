"""The sandbox's leaderboard, timeseries and usage over real HTTP, read raw (the gateway's
wire shapes, atomic-unit bug included) and through ``GatewayClient`` (typed, converted).

Agents spend with their own keys through the sandbox's routes (``best_match`` costs 0.10,
free reads cost nothing but are recorded), on a frozen sandbox clock that only the tests
move."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.gateway.errors import Forbidden
from controller.sandbox.server import ADMIN_AGENT_ID, MutableClock, SandboxServer
from controller.sandbox.store import LEADERBOARD_HIDDEN_PREFIXES

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: on a whole hour
HOUR = 3600.0


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(clock=MutableClock(T0, frozen=True)) as server:
        yield server


@pytest.fixture
def http(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    # a new connection per request: these tests read wire shapes, not connection quirks
    with httpx.Client(base_url=sandbox.url, timeout=10.0, headers={"Connection": "close"}) as client:
        yield client


def register(http: httpx.Client, agent_id: str) -> str:
    r = http.post("/v1/register", json={"agent_id": agent_id})
    assert r.status_code == 201, r.text
    key: str = r.json()["api_key"]
    return key


def as_agent(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def paid_calls(http: httpx.Client, key: str, n: int) -> None:
    for _ in range(n):
        assert http.get("/v1/marketplace/match", params={"query": "x"}, headers=as_agent(key)).status_code == 200


def free_calls(http: httpx.Client, key: str, agent_id: str, n: int) -> None:
    for _ in range(n):
        assert http.get(f"/v1/billing/wallets/{agent_id}/balance", headers=as_agent(key)).status_code == 200


def admin_client(sandbox: SandboxServer) -> GatewayClient:
    return GatewayClient(sandbox.url, sandbox.admin_key, backoff_initial=0.01, backoff_max=0.05)


def recorded_calls(sandbox: SandboxServer, agent_id: str) -> int:
    return sandbox.store.usage_summary(agent_id, None).total_calls


# ------------------------------------------------------------------ leaderboard


async def test_leaderboard_ranks_agents_with_usage_by_their_own_calls(
    sandbox: SandboxServer, http: httpx.Client
) -> None:
    keys = {agent: register(http, agent) for agent in ("agent-a", "agent-b", "agent-c", "idle-1")}
    paid_calls(http, keys["agent-a"], 2)
    free_calls(http, keys["agent-a"], "agent-a", 3)  # free calls count too: 5 in all
    paid_calls(http, keys["agent-b"], 5)  # ties with agent-a: ids decide
    free_calls(http, keys["agent-c"], "agent-c", 1)
    async with admin_client(sandbox) as client:
        await client.get_balance(ADMIN_AGENT_ID)  # a usage record of the admin's own
        board = await client.leaderboard("calls", limit=100)
    values = board.values()
    assert "idle-1" not in values  # registered, never called anything: no usage, not listed
    for agent in ("agent-a", "agent-b", "agent-c"):
        assert values[agent] == recorded_calls(sandbox, agent)  # the ledger's own count
    assert [e.rank for e in board.entries] == list(range(1, len(board.entries) + 1))
    ours = [e.agent_id for e in board.entries if e.agent_id.startswith("agent-")]
    assert ours == ["agent-a", "agent-b", "agent-c"]  # 5, 5 (tie: by id), 1
    assert board.complete
    # the admin's own reads are its usage too, as on the gateway (every successful call records one)
    assert values[ADMIN_AGENT_ID] == recorded_calls(sandbox, ADMIN_AGENT_ID) - 1  # minus this very read


async def test_leaderboard_spend_is_sent_in_atomic_units_and_read_as_credits(
    sandbox: SandboxServer, http: httpx.Client
) -> None:
    key = register(http, "agent-a")
    paid_calls(http, key, 3)
    raw = http.get("/v1/billing/leaderboard", params={"metric": "spend", "limit": 5}, headers=as_agent(key))
    assert raw.status_code == 200, raw.text
    row = next(r for r in raw.json()["leaderboard"] if r["agent_id"] == "agent-a")
    assert row["value"] == 30_000_000  # the 1.4.8 bug: a JSON number of 1e-8 credits
    async with admin_client(sandbox) as client:
        board = await client.leaderboard("spend", limit=5)
    assert board.values()["agent-a"] == Decimal("0.30")
    assert board.values()["agent-a"] == Decimal(sandbox.store.usage_summary("agent-a", None).total_cost) / 10**8


async def test_leaderboard_hides_test_prefixes_case_sensitively(sandbox: SandboxServer, http: httpx.Client) -> None:
    hidden = [f"{prefix}one" for prefix in LEADERBOARD_HIDDEN_PREFIXES]
    visible = ["Test-upper", "contest-1", "perfect"]
    for agent in hidden + visible:
        free_calls(http, register(http, agent), agent, 1)
    async with admin_client(sandbox) as client:
        board = await client.leaderboard("calls", limit=10_000)
    assert set(LEADERBOARD_HIDDEN_PREFIXES) == {"test-", "perf-", "audit-", "stress-"}
    assert not set(hidden) & set(board.values())
    assert set(visible) <= set(board.values())
    # hidden before the limit applies: a board of 4 holds 4 visible agents
    async with admin_client(sandbox) as client:
        small = await client.leaderboard("calls", limit=4)
    assert len(small.entries) == 4 and not small.complete


async def test_leaderboard_limit_has_no_upper_bound_and_a_full_board_is_incomplete(
    sandbox: SandboxServer, http: httpx.Client
) -> None:
    for agent in ("agent-a", "agent-b"):
        free_calls(http, register(http, agent), agent, 1)
    admin = as_agent(sandbox.admin_key)
    r = http.get("/v1/billing/leaderboard", params={"metric": "calls", "limit": 10**9}, headers=admin)
    # the admin's first read is recorded after it answered: 2 agents with usage
    assert r.status_code == 200 and len(r.json()["leaderboard"]) == 2
    async with admin_client(sandbox) as client:
        assert (await client.leaderboard("calls", limit=3)).complete is False
        assert (await client.leaderboard("calls", limit=4)).complete is True
        assert [e.agent_id for e in (await client.leaderboard("calls", limit=1)).entries] == [ADMIN_AGENT_ID]


async def test_leaderboard_defaults_bad_metric_and_unmodelled_metrics(
    sandbox: SandboxServer, http: httpx.Client
) -> None:
    key = register(http, "agent-a")
    paid_calls(http, key, 1)
    default = http.get("/v1/billing/leaderboard", headers=as_agent(key))  # a free agent may read it
    assert default.status_code == 200
    assert {r["agent_id"]: r["value"] for r in default.json()["leaderboard"]}["agent-a"] == 10_000_000  # spend
    bad = http.get("/v1/billing/leaderboard", params={"metric": "volume"}, headers=as_agent(key))
    assert bad.status_code == 400 and bad.json()["type"].endswith("/validation-error")
    assert bad.json()["detail"] == "Unknown metric: volume"
    for metric in ("trust_score", "revenue", "rating"):  # nothing the sandbox holds ranks these
        r = http.get("/v1/billing/leaderboard", params={"metric": metric}, headers=as_agent(key))
        assert r.status_code == 200 and r.json() == {"leaderboard": []}
    assert http.get("/v1/billing/leaderboard", params={"limit": "ten"}, headers=as_agent(key)).status_code == 422


async def test_a_ten_thousand_agent_leaderboard_is_one_fast_read(sandbox: SandboxServer) -> None:
    store = sandbox.store
    for i in range(10_000):
        store.record_usage_and_charge(f"agent-{i:05d}", "get_balance", 0, None, now=T0)
    for _ in range(20_000):  # the admin's reads pile up usage rows: the board must not scan them
        store.record_usage_and_charge(ADMIN_AGENT_ID, "get_balance", 0, None, now=T0)
    started = time.perf_counter()
    async with admin_client(sandbox) as client:
        board = await client.leaderboard("calls", limit=20_000)
    elapsed = time.perf_counter() - started
    assert len(board.entries) == 10_001 and board.complete
    assert board.values()["agent-09999"] == 1
    assert elapsed < 5.0, elapsed  # about 0.1 s here; generous for a loaded 2-core machine


# ------------------------------------------------------------------ timeseries


async def test_timeseries_buckets_by_hour_oldest_first_without_empty_buckets(
    sandbox: SandboxServer, http: httpx.Client
) -> None:
    key = register(http, "agent-a")
    sandbox.clock.advance(10 * 60)  # 08:10
    paid_calls(http, key, 2)
    free_calls(http, key, "agent-a", 1)
    sandbox.clock.advance(2 * HOUR + 5)  # 10:10:05; the 09:00 bucket stays empty
    paid_calls(http, key, 1)
    # read as the admin: the agent's own read would be one more usage record of its own
    raw = http.get("/v1/billing/wallets/agent-a/timeseries", headers=as_agent(sandbox.admin_key))
    assert raw.status_code == 200, raw.text
    assert raw.json() == {
        "buckets": [
            {"timestamp": "2027-01-15T08:00:00+00:00", "calls": 3, "cost": "20000000.00"},
            {"timestamp": "2027-01-15T10:00:00+00:00", "calls": 1, "cost": "10000000.00"},
        ]
    }
    async with admin_client(sandbox) as client:
        buckets = await client.timeseries("agent-a")
        newest = await client.timeseries("agent-a", limit=1)
        since = await client.timeseries("agent-a", since=T0 + HOUR)
        days = await client.timeseries("agent-a", interval="day")
        usage = await client.usage("agent-a")
    assert [(b.start, b.calls, b.cost) for b in buckets] == [
        (datetime(2027, 1, 15, 8, tzinfo=UTC), 3, Decimal("0.20")),
        (datetime(2027, 1, 15, 10, tzinfo=UTC), 1, Decimal("0.10")),
    ]
    assert newest == buckets[1:]  # the newest limit buckets, not the oldest
    assert since == buckets[1:]
    assert [(b.start, b.calls, b.cost) for b in days] == [(datetime(2027, 1, 15, tzinfo=UTC), 4, Decimal("0.30"))]
    assert sum(b.calls for b in buckets) == usage.total_calls == 4
    assert sum(b.cost for b in buckets) == usage.total_cost == Decimal("0.30")


async def test_timeseries_ownership_interval_and_a_missing_wallet(sandbox: SandboxServer, http: httpx.Client) -> None:
    key_a = register(http, "agent-a")
    register(http, "agent-b")
    other = http.get("/v1/billing/wallets/agent-b/timeseries", headers=as_agent(key_a))
    assert other.status_code == 403 and other.json()["type"].endswith("/forbidden")
    bad = http.get("/v1/billing/wallets/agent-a/timeseries", params={"interval": "week"}, headers=as_agent(key_a))
    assert bad.status_code == 400 and bad.json()["detail"] == "Invalid interval 'week': must be one of ['day', 'hour']"
    async with admin_client(sandbox) as client:
        assert await client.timeseries("nobody") == []  # no wallet: no usage, not a 404
        assert (await client.usage("nobody")).total_calls == 0
    async with GatewayClient(sandbox.url, key_a) as agent_client:
        with pytest.raises(Forbidden):
            await agent_client.timeseries("agent-b")
        assert await agent_client.timeseries("agent-a") == []  # its own: allowed, and its reads so far


# ------------------------------------------------------------------ usage


async def test_usage_since_counts_records_at_or_after_it(sandbox: SandboxServer, http: httpx.Client) -> None:
    key = register(http, "agent-a")
    paid_calls(http, key, 2)  # at T0
    sandbox.clock.advance(100)
    paid_calls(http, key, 1)  # at T0 + 100
    async with admin_client(sandbox) as client:
        everything = await client.usage("agent-a")
        at_second = await client.usage("agent-a", since=T0 + 100)
        after = await client.usage("agent-a", since=T0 + 100.5)
    assert (everything.total_calls, everything.total_cost) == (3, Decimal("0.30"))
    assert (at_second.total_calls, at_second.total_cost) == (1, Decimal("0.10"))  # >= since
    assert (after.total_calls, after.total_cost, after.total_tokens) == (0, Decimal(0), 0)
