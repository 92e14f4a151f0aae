"""The daemon's gateway-error metric hooks into the client's httpx event hooks: every
answer is seen on every lane, and the client keeps its own connection lanes."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry, Counter

from controller.daemon.metrics import GatewayErrorCounter
from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, Unreachable
from controller.sandbox.server import SandboxServer


def _counter() -> tuple[Counter, CollectorRegistry]:
    registry = CollectorRegistry()
    return Counter("gw_errors", "errors", ["status"], registry=registry), registry


def _count(registry: CollectorRegistry, status: str) -> float:
    return registry.get_sample_value("gw_errors_total", {"status": status}) or 0.0


async def test_error_answers_are_counted_on_every_lane_and_404_is_not(sandbox: SandboxServer) -> None:
    errors, registry = _counter()
    observer = GatewayErrorCounter(errors)
    async with GatewayClient(sandbox.url, sandbox.admin_key, concurrency=4, observer=observer) as client:
        balances = await asyncio.gather(*(client.get_balance(f"nobody-{i}") for i in range(8)))
        assert balances == [None] * 8  # 404: how finops learns an agent is not registered
        assert client._lanes == []  # a lane that answered 404 is retired: the gateway breaks that connection
        await asyncio.gather(*(client.get_balance("finops-admin") for _ in range(8)))
        assert 1 < len(client._lanes) <= 4  # its own lanes, not one shared pool
    assert _count(registry, "404") == 0
    async with GatewayClient(sandbox.url, "a2a_not_a_real_key_000000000000", observer=observer) as bad:
        with pytest.raises(AuthenticationFailed):
            await bad.get_balance("nobody-0")
    assert _count(registry, "401") >= 1


async def test_a_request_without_any_answer_is_counted_as_a_transport_error() -> None:
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    errors, registry = _counter()
    async with GatewayClient(
        f"http://127.0.0.1:{port}", "k", max_attempts=1, observer=GatewayErrorCounter(errors)
    ) as client:
        with pytest.raises(Unreachable):
            await client.get_balance("a")
    assert _count(registry, "transport") == 1
