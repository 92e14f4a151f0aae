"""Deposits never double-fund: lost responses, crashes between steps, re-runs.

The fault transport wraps the real HTTP transport: the sandbox really commits the request,
then the client is told the connection dropped, which is exactly the case that causes double
deposits with the gateway's weak idempotency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import httpx
import pytest

from controller.keys.rotate import KeyManager
from controller.reconcile.status import FleetStatus, fleet_status
from policies.plan_types import ChangeKind
from policies.spec import DesiredState
from tests.integration.conftest import FinopsClock, Harness
from tests.integration.test_reconcile import TARGET_CREDITS, balance, deposits


class DropAfterCommit(httpx.AsyncBaseTransport):
    """Forward to the real server, then lose the response of matching requests."""

    def __init__(self, match: Callable[[httpx.Request], bool], times: int = 1) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.match = match
        self.remaining = times
        self.dropped = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.remaining > 0 and self.match(request):
            await response.aread()
            self.remaining -= 1
            self.dropped += 1
            raise httpx.ReadError("connection reset after the server committed", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class SimulatedCrash(BaseException):
    """Raised from a fault hook: like SIGKILL, nothing after it in the process runs."""


def deposit_to(agent: str) -> Callable[[httpx.Request], bool]:
    return lambda r: r.method == "POST" and r.url.path == f"/v1/billing/wallets/{agent}/deposit"


async def test_lost_deposit_response_is_recovered_from_the_ledger_not_repeated(
    harness: Harness, canonical: DesiredState
) -> None:
    transport = DropAfterCommit(deposit_to("res-01"), times=2)
    result = await harness.apply(await harness.plan(canonical), transport=transport)
    assert transport.dropped == 1  # the retry found the ledger entry instead of re-sending
    assert result.ok, result.to_dict()
    [res01] = [a for a in result.agents if a.agent_id == "res-01"]
    assert any("recovered from the ledger" in step for step in res01.applied)
    assert balance(harness, "res-01") == TARGET_CREDITS["res-01"]
    assert len(deposits(harness, "res-01")) == 1


async def test_every_deposit_response_lost_still_funds_each_wallet_exactly_once(
    harness: Harness, canonical: DesiredState
) -> None:
    transport = DropAfterCommit(lambda r: r.url.path.endswith("/deposit"), times=100)
    result = await harness.apply(await harness.plan(canonical), transport=transport)
    assert result.ok, result.to_dict()
    assert transport.dropped == 5
    for agent, target in TARGET_CREDITS.items():
        assert balance(harness, agent) == target
        assert len(deposits(harness, agent)) == 1
    assert (await harness.plan(canonical)).empty


def crashed_apply(harness: Harness, canonical: DesiredState, point: str, victim: str) -> None:
    """Run an apply in its own event loop and crash it: asyncio.run then cancels every other
    in-flight task, so nothing of the crashed run keeps going behind the next one."""

    def crash(at: str, agent: str) -> None:
        if at == point and agent == victim:
            raise SimulatedCrash(at)

    with pytest.raises(SimulatedCrash):
        asyncio.run(harness.apply(asyncio.run(harness.plan(canonical)), fault_hook=crash))


def unlimited(desired: DesiredState) -> DesiredState:
    """Deposits a crash leaves in flight count against the rolling funding limit until
    recovery (which runs after the next plan) proves they never landed, so that plan may
    fund less (test_funding_limits). These tests are about exactly-once, not the limit."""
    return replace(desired, fleets=tuple(replace(f, daily_funding_limit=Decimal(10_000)) for f in desired.fleets))


@pytest.mark.parametrize("point", ["before_deposit", "after_deposit"])
def test_crash_around_a_deposit_converges_without_double_funding(
    harness: Harness, canonical: DesiredState, point: str
) -> None:
    canonical = unlimited(canonical)
    first = asyncio.run(harness.plan(canonical))
    key = next(
        c.args.idempotency_key for c in first.changes if c.kind is ChangeKind.TOP_UP and c.agent_id == "sum-01"
    )
    crashed_apply(harness, canonical, point, "sum-01")
    assert "sum-01" in [i.agent_id for i in harness.store.intents(status="pending", kind="deposit")]

    readonly = asyncio.run(harness.plan(canonical, prepare=False))  # `finops plan`: nothing resolved yet
    assert ChangeKind.TOP_UP not in [c.kind for c in readonly.changes if c.agent_id == "sum-01"]
    # (the simulated SIGKILL also cut other agents' webhook creates short: withheld too)
    assert ("sum-01", ChangeKind.TOP_UP) in [(b.agent_id, b.kind) for b in readonly.blocked]
    result = asyncio.run(harness.apply(readonly))
    assert result.ok, result.to_dict()
    if point == "before_deposit":
        # A crash leaves no proof the request never left: nothing is concluded before the
        # settle time, however empty the ledger looks.
        assert any("not in the ledger yet" in note for note in result.recovered)
        assert "sum-01" in [i.agent_id for i in harness.store.intents(status="pending", kind="deposit")]
        assert ChangeKind.TOP_UP not in [c.kind for c in asyncio.run(harness.plan(canonical)).changes]
        assert isinstance(harness.clock, FinopsClock)
        harness.clock.past_settle()
        retry = asyncio.run(harness.plan(canonical))  # resolved first (as `finops apply` does), then planned
        assert any("sum-01: deposit" in note and "never landed" in note for note in harness.notes)
        top_up = next(c for c in retry.changes if c.kind is ChangeKind.TOP_UP and c.agent_id == "sum-01")
        assert top_up.args.idempotency_key == key  # the same epoch, the same key
        result = asyncio.run(harness.apply(retry))
    else:
        assert any("had landed" in note for note in result.recovered)
    assert result.ok, result.to_dict()
    assert isinstance(harness.clock, FinopsClock)
    harness.clock.past_settle()  # whatever else the crash left unresolved
    for _ in range(3):
        plan = asyncio.run(harness.plan(canonical))
        if plan.empty and not plan.blocked:
            break
        assert asyncio.run(harness.apply(plan)).ok
    assert harness.store.intents(status="pending") == []
    for agent, target in TARGET_CREDITS.items():
        assert balance(harness, agent) == target
        assert len(deposits(harness, agent)) == 1
    assert asyncio.run(harness.plan(canonical)).empty


def test_crash_after_register_before_the_key_is_stored_is_reported_loudly(
    harness: Harness, canonical: DesiredState
) -> None:
    canonical = unlimited(canonical)
    crashed_apply(harness, canonical, "after_register", "cls-01")
    asyncio.run(harness.apply(asyncio.run(harness.plan(canonical))))
    assert any("cls-01: LOST KEY" in note for note in harness.notes)
    assert harness.sink.load("cls-01") is None
    assert balance(harness, "cls-01") == TARGET_CREDITS["cls-01"]  # the wallet is still managed

    # ...and `finops status` keeps saying so after that run, not only in its output.
    async def status() -> FleetStatus:
        async with harness.client() as client:
            keys = KeyManager(client, harness.store, harness.sink, state_path=harness.store.path)
            try:
                return await fleet_status(client, canonical, harness.store, keys, target="sandbox")
            finally:
                keys.close()

    row = next(a for a in asyncio.run(status()).agents if a.agent_id == "cls-01")
    assert any(f.startswith("NO KEY HELD (LOST KEY:") and "keys import cls-01" in f for f in row.flags), row.flags


async def test_saved_deposit_key_is_reused_after_a_crash_before_sending(
    harness: Harness, canonical: DesiredState
) -> None:
    first = await harness.plan(canonical)
    second = await harness.plan(canonical)
    keys = [c.args.idempotency_key for c in first.changes if c.kind is ChangeKind.TOP_UP]
    assert keys == [c.args.idempotency_key for c in second.changes if c.kind is ChangeKind.TOP_UP]
    assert len(set(keys)) == len(keys)
    assert Decimal(first.summary()["top_up_credits"]) == sum(TARGET_CREDITS.values()) - 5 * Decimal("500")
