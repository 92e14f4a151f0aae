"""The real gateway's habit of breaking a keep-alive connection after a 404
wallet-not-found, reproduced by the sandbox (on by default), and a client that copes by
construction: a connection that answered 404 never carries another request, so the writes
that follow the observation of a new agent never meet a broken connection."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.reconcile.apply import Unknown
from controller.reconcile.decide import observe_and_plan
from controller.reconcile.pipeline import applier_for, execute
from controller.sandbox.server import ADMIN_AGENT_ID, MutableClock, SandboxServer
from policies.spec import DesiredState
from tests.integration.conftest import Harness

T0 = 1_800_000_000.0


@pytest.fixture
def frozen_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(clock=MutableClock(T0, frozen=True)) as server:
        yield server


def admin_headers(sandbox: SandboxServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {sandbox.admin_key}"}


def deposits_of(sandbox: SandboxServer, agent_id: str) -> list[int]:
    return [t.amount for t in sandbox.store.list_transactions(agent_id, limit=100, offset=0) if t.tx_type == "deposit"]


async def test_the_quirk_breaks_a_naive_keep_alive_client(frozen_sandbox: SandboxServer) -> None:
    """Regression guard for the sandbox itself: if the quirk silently stopped existing, the
    client's defence would go untested. A plain httpx client that reuses its connection
    after a 404 wallet-not-found loses the next request, here a deposit: to that client an
    unknown outcome."""
    sandbox = frozen_sandbox
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=sandbox.url, headers=admin_headers(sandbox), limits=limits) as naive:
        missing = await naive.get("/v1/billing/wallets/new-agent/balance")
        assert missing.status_code == 404
        assert missing.json()["type"].endswith("/wallet-not-found")
        assert missing.headers.get("connection", "").lower() != "close"  # nothing tells the client to drop it
        with pytest.raises(httpx.RemoteProtocolError):
            await naive.post(
                f"/v1/billing/wallets/{ADMIN_AGENT_ID}/deposit",
                json={"amount": "5.00"},
                headers={"Idempotency-Key": "naive-1"},
            )
        # the connection is gone now; a new one works again
        assert (await naive.get(f"/v1/billing/wallets/{ADMIN_AGENT_ID}/balance")).status_code == 200
    assert sandbox.quirks.snapshot() == {"broken_connections": 1, "refused_requests": 1}
    assert deposits_of(sandbox, ADMIN_AGENT_ID) == []  # the sandbox did not run it (the real gateway: unknowable)


async def test_other_404s_and_other_answers_leave_the_connection_usable(frozen_sandbox: SandboxServer) -> None:
    sandbox = frozen_sandbox
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=sandbox.url, headers=admin_headers(sandbox), limits=limits) as naive:
        assert (await naive.delete("/v1/infra/webhooks/whk-000000000000000000000000")).status_code == 404
        assert (await naive.get("/v1/no-such-route")).status_code == 404
        assert (await naive.get(f"/v1/billing/wallets/{ADMIN_AGENT_ID}/balance")).status_code == 200
    assert sandbox.quirks.snapshot() == {"broken_connections": 0, "refused_requests": 0}


async def test_the_quirk_can_be_switched_off_for_a_kinder_sandbox() -> None:
    with SandboxServer(clock=MutableClock(T0, frozen=True), wallet_404_breaks_connection=False) as sandbox:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=sandbox.url, headers=admin_headers(sandbox), limits=limits) as naive:
            assert (await naive.get("/v1/billing/wallets/new-agent/balance")).status_code == 404
            assert (await naive.get(f"/v1/billing/wallets/{ADMIN_AGENT_ID}/balance")).status_code == 200
        assert sandbox.quirks.snapshot() == {"broken_connections": 0, "refused_requests": 0}


async def test_client_writes_after_observing_missing_agents_on_one_lane(frozen_sandbox: SandboxServer) -> None:
    """One lane (``concurrency=1``): every request would reuse the same connection if the
    client let it. Balance read of a missing agent, then register, deposit and budget
    writes for it, five times over: no failure, no retry, nothing refused."""
    sandbox = frozen_sandbox
    agents = [f"agent-{i}" for i in range(5)]
    async with GatewayClient(sandbox.url, sandbox.admin_key, concurrency=1, max_attempts=1) as client:
        for agent in agents:
            assert await client.get_balance(agent) is None  # 404 wallet-not-found: the connection is retired
            await client.register(agent)
            result = await client.deposit(agent, Decimal("25.00"), f"key-{agent}")
            assert result.new_balance == Decimal("525.00") and not result.recovered
            await client.set_budget(
                agent, daily_cap=Decimal("10.00"), monthly_cap=Decimal("100.00"), alert_threshold=Decimal("0.8")
            )
            assert await client.get_balance(agent) == Decimal("525.00")
        assert client.calls == {"read": 10, "write": 15}  # max_attempts=1: every call succeeded first time
    assert sandbox.quirks.snapshot() == {"broken_connections": 5, "refused_requests": 0}
    assert all(deposits_of(sandbox, agent) == [2_500_000_000] for agent in agents)


async def test_a_transport_shared_by_every_lane_never_reuses_a_404_connection(frozen_sandbox: SandboxServer) -> None:
    """An injected transport (tests, proxies) holds one pool for all lanes, out of the
    client's hands: the 404's connection is still closed, because its answer is read to
    the declared length and closed before its end."""
    sandbox = frozen_sandbox
    shared = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    async with GatewayClient(sandbox.url, sandbox.admin_key, transport=shared, max_attempts=1) as client:
        for i in range(3):
            assert await client.get_balance(f"new-{i}") is None
            await client.register(f"new-{i}")
            await client.deposit(f"new-{i}", Decimal("1.00"), f"shared-{i}")
    assert sandbox.quirks.snapshot() == {"broken_connections": 3, "refused_requests": 0}
    assert all(deposits_of(sandbox, f"new-{i}") == [100_000_000] for i in range(3))


async def test_observe_then_apply_a_new_fleet_on_one_client_has_no_unknown_outcome(
    harness: Harness, canonical: DesiredState
) -> None:
    """The real sequence: ``observe`` reads the balance of agents that do not exist yet
    (404 each), then ``apply`` registers, funds and caps them, on the same client."""
    async with harness.client(concurrency=1, max_attempts=1) as client:
        plan = await observe_and_plan(client, canonical, "sandbox", harness.store)
        applier = applier_for(client, harness.store, harness.sink, canonical, clock=harness.clock)
        result = await execute(applier, harness.store, plan, clock=harness.clock)
    unknown = [o for agent in result.agents for o in agent.outcomes if isinstance(o, Unknown)]
    assert unknown == [] and result.ok, result.to_dict()
    assert len(result.agents) == len(canonical.agents()) == 5
    quirks = harness.sandbox.quirks.snapshot()
    assert quirks["broken_connections"] >= 5  # every new agent's balance read
    assert quirks["refused_requests"] == 0
