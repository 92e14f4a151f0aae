"""GatewayClient against a real sandbox, with faults injected at the httpx transport."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.gateway.errors import InvalidRequest, NotFound, ProtocolViolation, RateLimited
from controller.sandbox.server import SandboxServer


class Scripted(httpx.AsyncBaseTransport):
    """Answer matching requests from a script of canned responses, forward the rest."""

    def __init__(self, match: Callable[[httpx.Request], bool], script: list[httpx.Response]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.match = match
        self.script = list(script)
        self.seen = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.match(request):
            self.seen += 1
            if self.script:
                return self.script.pop(0)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def problem(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        headers={"content-type": "application/problem+json", **(headers or {})},
        json={
            "type": f"https://api.greenhelix.net/errors/{code}",
            "title": "x",
            "status": status,
            "detail": f"{code} happened",
            "instance": "/",
        },
    )


def client_for(sandbox: SandboxServer, transport: httpx.AsyncBaseTransport, sleeps: list[float]) -> GatewayClient:
    async def record(delay: float) -> None:
        sleeps.append(delay)

    return GatewayClient(sandbox.url, sandbox.admin_key, transport=transport, sleep=record, max_attempts=4)


def balance_path(r: httpx.Request) -> bool:
    return r.url.path.endswith("/balance")


async def test_reads_are_retried_on_5xx_and_429_honouring_retry_after(sandbox: SandboxServer) -> None:
    transport = Scripted(
        balance_path, [problem(503, "service-error"), problem(429, "rate-limit-exceeded", {"Retry-After": "3"})]
    )
    sleeps: list[float] = []
    async with client_for(sandbox, transport, sleeps) as client:
        assert await client.get_balance("finops-admin") is not None
    assert transport.seen == 3
    assert sleeps[1] == 3.0  # the server's Retry-After, not our own backoff


async def test_retries_stop_and_the_typed_error_surfaces(sandbox: SandboxServer) -> None:
    transport = Scripted(balance_path, [problem(429, "rate-limit-exceeded")] * 10)
    async with client_for(sandbox, transport, []) as client:
        with pytest.raises(RateLimited, match="rate-limit-exceeded happened"):
            await client.get_balance("finops-admin")
    assert transport.seen == 4


async def test_problem_json_maps_to_typed_errors(sandbox: SandboxServer) -> None:
    async with GatewayClient(sandbox.url, sandbox.admin_key) as client:
        assert await client.get_balance("nobody-here") is None
        with pytest.raises(InvalidRequest) as info:
            await client.deposit("finops-admin", Decimal("-1.00"), "k-negative")
        assert info.value.status == 422
        with pytest.raises(NotFound):
            await client.deposit("nobody-here", Decimal("1.00"), "k-missing")


@pytest.mark.parametrize(
    ("response", "fragment"),
    [
        (httpx.Response(200, content=b"<html>oops</html>"), "not valid JSON"),
        (httpx.Response(200, json=["a", "list"]), "not a JSON object"),
        (httpx.Response(200, json={"unexpected": 1}), "lacks field 'balance'"),
        (httpx.Response(200, json={"balance": "lots"}), "field 'balance'"),
        (httpx.Response(200, content=b"{" + b" " * (9 * 1024 * 1024) + b"}"), "exceeds"),
    ],
)
async def test_malformed_gateway_answers_are_clear_errors(
    sandbox: SandboxServer, response: httpx.Response, fragment: str
) -> None:
    transport = Scripted(balance_path, [response])
    async with client_for(sandbox, transport, []) as client:
        with pytest.raises(ProtocolViolation, match=fragment):
            await client.get_balance("finops-admin")


async def test_deposit_after_5xx_with_no_ledger_entry_retries_with_the_same_key(sandbox: SandboxServer) -> None:
    seen_keys: list[str] = []

    def deposit(r: httpx.Request) -> bool:
        if r.url.path.endswith("/deposit"):
            seen_keys.append(r.headers["Idempotency-Key"])
            return True
        return False

    transport = Scripted(deposit, [problem(503, "service-error")])
    sleeps: list[float] = []
    async with client_for(sandbox, transport, sleeps) as client:
        before = await client.get_balance("finops-admin")
        assert before is not None
        result = await client.deposit("finops-admin", Decimal("12.34"), "finops-test-key-1")
        assert result.new_balance == before + Decimal("12.34")
        assert not result.recovered
    assert seen_keys == ["finops-test-key-1", "finops-test-key-1"]
