"""The sandbox gateway over real HTTP: shapes, status codes and quirks of API.md.

Every test starts its own ``SandboxServer`` on 127.0.0.1 with a frozen clock, so time
only moves when a test moves it and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import stat
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.io.secretfile import read_secret_file
from controller.sandbox.server import MutableClock, SandboxServer, provision_admin_key
from controller.sandbox.store import SandboxStore
from policies.keyprint import key_prefix

T0 = 1_800_000_000.0
PROBLEM = "application/problem+json"


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(clock=MutableClock(T0, frozen=True)) as server:
        yield server


@pytest.fixture
def client(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, timeout=10.0) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def admin(sandbox: SandboxServer) -> dict[str, str]:
    return auth(sandbox.admin_key)


def register(client: httpx.Client, agent_id: str) -> str:
    r = client.post("/v1/register", json={"agent_id": agent_id})
    assert r.status_code == 201, r.text
    key: str = r.json()["api_key"]
    return key


def assert_problem(r: httpx.Response, status: int, code: str, detail: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["type"] == f"https://api.greenhelix.net/errors/{code}"
    assert body["status"] == status
    assert body["instance"] == r.request.url.path
    if detail is not None:
        assert body["detail"] == detail
    return body


def balance(client: httpx.Client, sandbox: SandboxServer, agent_id: str) -> Decimal:
    r = client.get(f"/v1/billing/wallets/{agent_id}/balance", headers=admin(sandbox))
    assert r.status_code == 200, r.text
    return Decimal(r.json()["balance"])


def match(client: httpx.Client, key: str, **headers: str) -> httpx.Response:
    return client.get("/v1/marketplace/match", params={"query": "gpu"}, headers={**auth(key), **headers})


# --------------------------------------------------------------------------- basics


def test_health_is_public_and_request_id_is_echoed(client: httpx.Client) -> None:
    r = client.get("/v1/health", headers={"X-Request-ID": "req-123"})
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "version": "1.4.8-sandbox"}
    assert r.headers["x-request-id"] == "req-123"
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    generated = client.get("/v1/health").headers["x-request-id"]
    assert len(generated) == 36  # a UUID4


def test_missing_and_invalid_keys_are_401(client: httpx.Client) -> None:
    path = "/v1/billing/wallets/x/balance"
    assert_problem(client.get(path), 401, "missing-key", "Missing API key")
    assert_problem(client.get(path, headers=auth("nope")), 401, "authentication-error", "Invalid key format")
    r = client.get(path, headers={"X-API-Key": "a2a_free_000000000000000000000000"})
    body = assert_problem(r, 401, "authentication-error", "API key not found")
    assert body["title"] == "Unauthorized"
    assert r.headers["x-request-id"]


def test_path_and_body_hygiene(client: httpx.Client, sandbox: SandboxServer) -> None:
    assert_problem(client.get("/v1/billing/wallets/a%2Fb/balance"), 400, "encoded-path-separator")
    assert_problem(client.get(f"/v1/billing/wallets/{'x' * 129}/balance"), 400, "path-too-long")
    big = b'{"amount": "1", "description": "' + b"x" * (1024 * 1024) + b'"}'
    r = client.post("/v1/billing/wallets/a/deposit", content=big, headers=admin(sandbox))
    assert_problem(r, 413, "payload-too-large")
    assert_problem(client.get("/v1/nothing-here"), 404, "http-error")


# --------------------------------------------------------------------------- register and wallets


def test_register_gives_a_free_key_and_the_signup_bonus(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.post("/v1/register", json={"agent_id": "bot-1"})
    assert r.status_code == 201
    body = r.json()
    assert body["agent_id"] == "bot-1"
    assert body["tier"] == "free"
    assert body["balance"] == 500 and isinstance(body["balance"], int)  # raw number, not "500.00"
    assert body["api_key"].startswith("a2a_free_") and len(body["api_key"]) == len("a2a_free_") + 24
    assert body["identity_registered"] is False
    assert balance(client, sandbox, "bot-1") == Decimal("500.00")

    again = client.post("/v1/register", json={"agent_id": "bot-1"})
    assert_problem(again, 409, "already-exists", "Agent 'bot-1' is already registered")


def test_register_rejects_bad_bodies_with_400(client: httpx.Client) -> None:
    r = client.post("/v1/register", json={"agent_id": "bot-2", "tier": "pro"})
    assert_problem(r, 400, "bad-request", "Invalid request body")
    assert_problem(client.post("/v1/register", content=b"{"), 400, "bad-request")


def test_register_refuses_an_agent_whose_wallet_the_admin_created(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.post("/v1/billing/wallets", json={"agent_id": "managed", "signup_bonus": False}, headers=admin(sandbox))
    assert r.status_code == 201
    assert_problem(client.post("/v1/register", json={"agent_id": "managed"}), 409, "already-exists")


def test_create_wallet_bonus_default_and_exists_is_400(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.post("/v1/billing/wallets", json={"agent_id": "w1", "signup_bonus": False}, headers=admin(sandbox))
    assert r.status_code == 201
    body = r.json()
    assert body["balance"] == "0.00"
    assert body["created_at"].endswith("+00:00") and "T" in body["created_at"]
    r = client.post("/v1/billing/wallets", json={"agent_id": "w2"}, headers=admin(sandbox))
    assert r.json()["balance"] == "500.00"  # signup_bonus defaults to true
    r = client.post("/v1/billing/wallets", json={"agent_id": "w1"}, headers=admin(sandbox))
    assert_problem(r, 400, "validation-error", "Wallet already exists for agent w1")
    r = client.post("/v1/billing/wallets", json={"agent_id": "bad id"}, headers=admin(sandbox))
    assert_problem(r, 422, "validation-error")


def test_balance_of_missing_wallet_is_404(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.get("/v1/billing/wallets/ghost/balance", headers=admin(sandbox))
    assert_problem(r, 404, "wallet-not-found")


# --------------------------------------------------------------------------- deposits


def test_deposit_returns_new_balance_and_transaction_id(client: httpx.Client, sandbox: SandboxServer) -> None:
    register(client, "d1")
    r = client.post("/v1/billing/wallets/d1/deposit", json={"amount": 100}, headers=admin(sandbox))
    assert r.status_code == 200
    body = r.json()
    assert body["new_balance"] == "600.00"
    assert isinstance(body["transaction_id"], int)
    assert r.headers["x-charged"] == "0.00"
    assert "x-ratelimit-limit" not in r.headers  # admin gets no rate-limit headers


def test_deposit_idempotency_key_is_global_and_blind_to_the_body(client: httpx.Client, sandbox: SandboxServer) -> None:
    register(client, "i1")
    register(client, "i2")
    first = client.post(
        "/v1/billing/wallets/i1/deposit",
        json={"amount": "10.00"},
        headers={**admin(sandbox), "Idempotency-Key": "dep-1"},
    )
    assert first.status_code == 200
    assert first.json()["new_balance"] == "510.00"

    same = client.post(
        "/v1/billing/wallets/i1/deposit",
        json={"amount": "10.00"},
        headers={**admin(sandbox), "Idempotency-Key": "dep-1"},
    )
    assert same.json() == first.json()
    # Another wallet and another amount: the first call's snapshot, and no money moves.
    other = client.post(
        "/v1/billing/wallets/i2/deposit",
        json={"amount": "999.00"},
        headers={**admin(sandbox), "Idempotency-Key": "dep-1"},
    )
    assert other.status_code == 200
    assert other.json() == first.json()
    assert balance(client, sandbox, "i1") == Decimal("510.00")
    assert balance(client, sandbox, "i2") == Decimal("500.00")

    txs = client.get("/v1/billing/wallets/i1/transactions", headers=admin(sandbox)).json()["transactions"]
    keyed = [t for t in txs if t["idempotency_key"] == "dep-1"]
    assert len(keyed) == 1
    assert keyed[0]["id"] == first.json()["transaction_id"]
    assert keyed[0]["amount"] == "10.00"
    assert set(keyed[0]) == {
        "id",
        "agent_id",
        "amount",
        "tx_type",
        "type",
        "description",
        "currency",
        "created_at",
        "timestamp",
        "idempotency_key",
        "result_snapshot",
    }
    assert [t["tx_type"] for t in txs] == ["deposit", "signup_bonus"]  # newest first


def test_deposit_body_validation_is_422(client: httpx.Client, sandbox: SandboxServer) -> None:
    register(client, "v1")
    path = "/v1/billing/wallets/v1/deposit"
    r = client.post(path, json={"amount": "1.005"}, headers=admin(sandbox))
    assert "body.amount" in assert_problem(r, 422, "validation-error")["detail"]
    r = client.post(path, json={"amount": 0}, headers=admin(sandbox))
    assert_problem(r, 422, "validation-error", "body.amount: Input should be greater than 0")
    r = client.post(path, json={"amount": "5", "idempotency_key": "k"}, headers=admin(sandbox))
    assert_problem(r, 422, "validation-error", "body.idempotency_key: Extra inputs are not permitted")
    r = client.post(path, json={"amount": 1_000_000_001}, headers=admin(sandbox))
    assert_problem(r, 422, "validation-error")
    assert balance(client, sandbox, "v1") == Decimal("500.00")


def test_deposit_tier_limit_applies_to_agents_not_admin(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "lim")
    r = client.post("/v1/billing/wallets/lim/deposit", json={"amount": 1001}, headers=auth(key))
    assert_problem(r, 403, "deposit-limit-exceeded", "Deposit amount exceeds free-tier limit of 1,000 credits")
    ok = client.post("/v1/billing/wallets/lim/deposit", json={"amount": 1000}, headers=auth(key))
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit"] == "100"
    big = client.post("/v1/billing/wallets/lim/deposit", json={"amount": 5_000_000}, headers=admin(sandbox))
    assert big.status_code == 200


def test_withdraw_insufficient_balance_message(client: httpx.Client, sandbox: SandboxServer) -> None:
    register(client, "wd")
    r = client.post("/v1/billing/wallets/wd/withdraw", json={"amount": "29.50"}, headers=admin(sandbox))
    assert r.json() == {"new_balance": "470.50"}
    r = client.post("/v1/billing/wallets/wd/withdraw", json={"amount": 1000}, headers=admin(sandbox))
    assert_problem(
        r, 402, "insufficient-balance", "Agent wd: insufficient balance in CREDITS. Requested 1000.0, available 470.5"
    )


def test_freeze_is_admin_only_blocks_deposits_but_not_charges(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "fz")
    assert_problem(client.post("/v1/billing/wallets/fz/freeze", headers=auth(key)), 403, "admin-only")
    r = client.post("/v1/billing/wallets/fz/freeze", headers=admin(sandbox))
    assert r.json() == {"agent_id": "fz", "frozen": True}
    r = client.post("/v1/billing/wallets/fz/deposit", json={"amount": 1}, headers=admin(sandbox))
    assert_problem(r, 403, "wallet-frozen")
    assert match(client, key).status_code == 200  # metered charges ignore the freeze
    assert balance(client, sandbox, "fz") == Decimal("499.90")
    ghost = client.post("/v1/billing/wallets/nobody/freeze", headers=admin(sandbox))
    assert ghost.status_code == 200  # "succeeds" for a wallet that does not exist
    client.post("/v1/billing/wallets/fz/unfreeze", headers=admin(sandbox))
    r = client.post("/v1/billing/wallets/fz/deposit", json={"amount": 1}, headers=admin(sandbox))
    assert r.status_code == 200


def test_ownership_blocks_a_non_admin_key_on_another_agent(client: httpx.Client) -> None:
    key_a = register(client, "own-a")
    register(client, "own-b")
    for method, path, body in (
        ("GET", "/v1/billing/wallets/own-b/balance", None),
        ("POST", "/v1/billing/wallets/own-b/deposit", {"amount": 1}),
        ("PUT", "/v1/billing/wallets/own-b/budget", {"daily_cap": 1}),
        ("GET", "/v1/billing/wallets/own-b/transactions", None),
    ):
        r = client.request(method, path, json=body, headers=auth(key_a))
        assert_problem(r, 403, "forbidden", "Forbidden: you do not have access to this resource")
    assert client.get("/v1/billing/wallets/own-a/balance", headers=auth(key_a)).status_code == 200


# --------------------------------------------------------------------------- budgets and spend


def test_budget_put_is_a_full_replace_with_aliases(client: httpx.Client, sandbox: SandboxServer) -> None:
    path = "/v1/billing/wallets/bud/budget"
    r = client.put(path, json={"daily_cap": "5.00", "monthly_cap": 50, "alert_threshold": 0.5}, headers=admin(sandbox))
    assert r.json() == {"agent_id": "bud", "daily_cap": 5, "monthly_cap": 50, "alert_threshold": 0.5}
    r = client.put(path, json={"monthly": "20.5"}, headers=admin(sandbox))
    assert r.json() == {"agent_id": "bud", "daily_cap": None, "monthly_cap": 20.5, "alert_threshold": 0.8}
    status = client.get(path, headers=admin(sandbox)).json()
    assert status["daily_cap"] is None and status["monthly_cap"] == 20.5
    r = client.put(path, json={"daily_cap": "-5", "alert_threshold": 7}, headers=admin(sandbox))
    assert r.status_code == 200  # nothing is validated
    assert_problem(client.put(path, json={"daily_cap": 1, "x": 1}, headers=admin(sandbox)), 422, "validation-error")


def test_budget_status_for_unknown_agent_is_zeros_and_nulls(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.get("/v1/billing/wallets/never-seen/budget", headers=admin(sandbox))
    assert r.json() == {
        "agent_id": "never-seen",
        "daily_spend": 0,
        "daily_cap": None,
        "daily_pct": 0,
        "monthly_spend": 0,
        "monthly_cap": None,
        "monthly_pct": 0,
        "alert_triggered": False,
        "cap_exceeded": False,
    }


def test_paid_call_hits_the_daily_cap_and_spend_ages_out(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "spender")
    client.put(
        "/v1/billing/wallets/spender/budget", json={"daily_cap": "0.25", "monthly_cap": 10}, headers=admin(sandbox)
    )
    for _ in range(2):
        r = match(client, key)
        assert r.status_code == 200
        assert r.headers["x-charged"] == "0.10"
    status = client.get("/v1/billing/wallets/spender/budget", headers=auth(key)).json()
    assert status == {
        "agent_id": "spender",
        "daily_spend": 0.2,
        "daily_cap": 0.25,
        "daily_pct": 80,
        "monthly_spend": 0.2,
        "monthly_cap": 10,
        "monthly_pct": 2,
        "alert_triggered": True,
        "cap_exceeded": False,
    }
    assert_problem(
        match(client, key),
        402,
        "budget-exceeded",
        "Daily budget cap exceeded: spent 0.20 + pending 0.10 > cap 0.25 credits.",
    )
    assert balance(client, sandbox, "spender") == Decimal("499.80")

    sandbox.clock.advance(86399)
    assert match(client, key).status_code == 402  # still inside the rolling 24 h
    sandbox.clock.advance(2)
    assert match(client, key).status_code == 200  # the first two calls aged out
    status = client.get("/v1/billing/wallets/spender/budget", headers=auth(key)).json()
    assert status["daily_spend"] == 0.1 and status["monthly_spend"] == 0.3


def test_monthly_cap_message(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "monthly")
    client.put("/v1/billing/wallets/monthly/budget", json={"monthly_cap": "0.1"}, headers=admin(sandbox))
    assert match(client, key).status_code == 200
    sandbox.clock.advance(2 * 86400)
    assert_problem(
        match(client, key),
        402,
        "budget-exceeded",
        "Monthly budget cap exceeded: spent 0.10 + pending 0.10 > cap 0.10 credits.",
    )


def test_over_cap_agent_cannot_deposit_but_admin_can(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "capped")
    for _ in range(3):
        assert match(client, key).status_code == 200
    client.put("/v1/billing/wallets/capped/budget", json={"daily_cap": "0.25"}, headers=admin(sandbox))
    r = client.post("/v1/billing/wallets/capped/deposit", json={"amount": 5}, headers=auth(key))
    assert_problem(
        r, 402, "budget-exceeded", "Daily budget cap exceeded: spent 0.30 + pending 0.00 > cap 0.25 credits."
    )
    r = client.post("/v1/billing/wallets/capped/withdraw", json={"amount": 5}, headers=auth(key))
    assert_problem(r, 402, "budget-exceeded")
    # Zero-cost calls without an amount still work, and admin is never blocked.
    assert client.get("/v1/billing/wallets/capped/balance", headers=auth(key)).status_code == 200
    r = client.post("/v1/billing/wallets/capped/deposit", json={"amount": 5}, headers=admin(sandbox))
    assert r.status_code == 200
    assert match(client, sandbox.admin_key).status_code == 200
    # The capped agent may raise its own cap.
    r = client.put("/v1/billing/wallets/capped/budget", json={"daily_cap": 100}, headers=auth(key))
    assert r.status_code == 200
    r = client.post("/v1/billing/wallets/capped/deposit", json={"amount": 5}, headers=auth(key))
    assert r.status_code == 200


def test_reused_request_id_charges_every_time_but_counts_spend_once(
    client: httpx.Client, sandbox: SandboxServer
) -> None:
    key = register(client, "reuse")
    for _ in range(3):
        assert match(client, key, **{"X-Request-ID": "same-id"}).status_code == 200
    assert balance(client, sandbox, "reuse") == Decimal("499.70")
    usage = client.get("/v1/billing/wallets/reuse/usage", headers=auth(key)).json()
    assert usage["total_cost"] == 0.1
    status = client.get("/v1/billing/wallets/reuse/budget", headers=auth(key)).json()
    assert status["daily_spend"] == 0.1


def test_paid_call_needs_balance(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "poor")
    client.post("/v1/billing/wallets/poor/withdraw", json={"amount": "499.95"}, headers=admin(sandbox))
    assert_problem(match(client, key), 402, "insufficient-balance", "Insufficient balance: 0.05 < 0.1 credits required")


def test_usage_since_and_exchange_rates(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "fx")
    match(client, key)
    usage = client.get("/v1/billing/wallets/fx/usage", params={"since": T0 + 1}, headers=auth(key)).json()
    assert usage == {"total_calls": 0, "total_cost": 0, "total_tokens": 0}
    r = client.get(
        "/v1/billing/exchange-rates", params={"from_currency": "CREDITS", "to_currency": "USD"}, headers=auth(key)
    )
    assert r.json() == {"from_currency": "CREDITS", "to_currency": "USD", "rate": "0.01"}
    r = client.get(
        "/v1/billing/exchange-rates", params={"from_currency": "USD", "to_currency": "CREDITS"}, headers=auth(key)
    )
    assert r.json()["rate"] == "100"
    r = client.get(
        "/v1/billing/exchange-rates", params={"from_currency": "CREDITS", "to_currency": "EUR"}, headers=auth(key)
    )
    assert r.json()["rate"] == str(Decimal(1) / Decimal(110))  # full precision, not 2 dp


async def test_concurrent_duplicates_of_one_deposit_key_all_move_money() -> None:
    """API.md §9: N parallel deposits with one key credit N times, write one ledger row,
    and all but one answer 500 IntegrityError."""
    with SandboxServer(clock=MutableClock(T0, frozen=True), idempotency_race_window=0.5) as sb:
        headers = {**auth(sb.admin_key), "Idempotency-Key": "parallel"}
        async with httpx.AsyncClient(base_url=sb.url, timeout=10.0) as c:
            responses = await asyncio.gather(
                *(
                    c.post("/v1/billing/wallets/finops-admin/deposit", json={"amount": 10}, headers=headers)
                    for _ in range(5)
                )
            )
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200, 500, 500, 500, 500]
            failed = next(r for r in responses if r.status_code == 500)
            assert failed.json()["type"].endswith("/internal-error")
            r = await c.get("/v1/billing/wallets/finops-admin/balance", headers=auth(sb.admin_key))
            assert r.json() == {"balance": "550.00"}
            txs = (await c.get("/v1/billing/wallets/finops-admin/transactions", headers=auth(sb.admin_key))).json()
            assert [t["idempotency_key"] for t in txs["transactions"]].count("parallel") == 1


# --------------------------------------------------------------------------- rate limits


def test_free_agent_is_rate_limited_after_the_hourly_limit(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "chatty")
    statuses = [client.get("/v1/billing/wallets/chatty/balance", headers=auth(key)) for _ in range(101)]
    assert all(r.status_code == 200 for r in statuses[:99])
    limited = statuses[99]
    assert_problem(limited, 429, "rate-limit-exceeded", "Rate limit exceeded: 100/100 per hour")
    assert "retry-after" not in limited.headers and "x-ratelimit-limit" not in limited.headers
    assert statuses[98].headers["x-ratelimit-remaining"] == "1"
    assert statuses[100].status_code == 429  # rejected calls count too
    sandbox.clock.advance(3601)
    assert client.get("/v1/billing/wallets/chatty/balance", headers=auth(key)).status_code == 200


def test_listing_own_keys_spends_the_create_key_quota(client: httpx.Client) -> None:
    key = register(client, "lister")
    results = [client.get("/v1/billing/keys", headers=auth(key)) for _ in range(20)]
    assert all(r.status_code == 200 for r in results[:19])
    assert_problem(results[19], 429, "rate-limit-exceeded")
    rows = results[0].json()["keys"]
    assert rows == [
        {
            "key_hash_prefix": key_prefix(key),
            "agent_id": "lister",
            "owner": "self",
            "tier": "free",
            "scopes": ["read", "write"],
            "created_at": rows[0]["created_at"],
            "revoked": False,
        }
    ]


# --------------------------------------------------------------------------- keys


def test_infra_keys_is_admin_only_and_lists_every_agent(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "k-agent")
    assert_problem(client.get("/v1/infra/keys", headers=auth(key)), 403, "forbidden-admin-only")
    rows = client.get("/v1/infra/keys", headers=admin(sandbox)).json()["keys"]
    assert {r["agent_id"] for r in rows} == {"finops-admin", "k-agent"}
    assert all(r["owner"] == "admin" for r in rows)
    only = client.get("/v1/infra/keys", params={"agent_id": "k-agent"}, headers=admin(sandbox)).json()["keys"]
    assert [r["key_hash_prefix"] for r in only] == [key_prefix(key)]


def test_key_creation_tier_escalation_rules(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = register(client, "esc")
    r = client.post("/v1/billing/keys", json={"tier": "pro"}, headers=auth(key))
    assert_problem(r, 403, "forbidden", "Tier escalation denied: your tier 'free' cannot create 'pro' keys")
    r = client.post("/v1/billing/keys", json={"tier": "free"}, headers=auth(key))
    assert r.status_code == 201
    assert set(r.json()) == {"key", "agent_id", "tier", "created_at"}
    assert r.json()["agent_id"] == "esc"
    r = client.post("/v1/billing/keys", json={"tier": "enterprise"}, headers=admin(sandbox))
    assert_problem(r, 403, "forbidden", "Tier escalation denied: your tier 'admin' cannot create 'enterprise' keys")
    assert_problem(
        client.post("/v1/billing/keys", json={"tier": "admin"}, headers=admin(sandbox)),
        400,
        "validation-error",
        "Unknown tier 'admin'",
    )
    r = client.post("/v1/billing/keys", json={"tier": "pro"}, headers=admin(sandbox))
    assert r.json()["agent_id"] == "finops-admin"  # always the caller's own agent
    assert_problem(client.post("/v1/infra/keys", json={}), 410, "endpoint-moved")


def test_revoke_searches_only_the_callers_keys_and_has_a_grace(client: httpx.Client, sandbox: SandboxServer) -> None:
    agent_key = register(client, "victim")
    r = client.post("/v1/infra/keys/revoke", json={"key_hash_prefix": key_prefix(agent_key)}, headers=admin(sandbox))
    assert r.status_code == 200 and r.json() == {"revoked": False}

    spare = client.post("/v1/billing/keys", json={"tier": "free"}, headers=admin(sandbox)).json()["key"]
    r = client.post("/v1/infra/keys/revoke", json={"key_hash_prefix": key_prefix(spare)}, headers=admin(sandbox))
    assert r.json() == {"revoked": True, "key_hash_prefix": key_prefix(spare)}
    sandbox.clock.advance(299)
    assert client.get("/v1/billing/wallets/finops-admin/balance", headers=auth(spare)).status_code == 200
    sandbox.clock.advance(2)
    r = client.get("/v1/billing/wallets/finops-admin/balance", headers=auth(spare))
    assert_problem(r, 401, "authentication-error", "API key has been revoked")


def test_rotate_needs_confirmation_drops_scopes_and_is_not_idempotent(
    client: httpx.Client, sandbox: SandboxServer
) -> None:
    agent_key = register(client, "rot")
    path = "/v1/infra/keys/rotate"
    r = client.post(path, json={"current_key": agent_key}, headers=admin(sandbox))
    assert r.status_code == 428
    assert r.headers["content-type"] == "application/json"
    assert r.json()["type"].endswith("rotate-confirmation-required")
    assert_problem(
        client.post(path, json={"current_key": agent_key}, headers=auth(agent_key)), 403, "forbidden-admin-only"
    )

    confirm = {**admin(sandbox), "X-Rotate-Confirmation": "confirm"}
    first = client.post(path, json={"current_key": agent_key}, headers=confirm)
    assert first.status_code == 200
    body = first.json()
    assert body["agent_id"] == "rot" and body["tier"] == "free" and body["revoked"] is False
    assert body["grace_period_seconds"] == 300 and body["grace_expires_at"] == int(T0) + 300
    second = client.post(path, json={"current_key": agent_key}, headers=confirm)
    assert second.status_code == 200
    assert second.json()["new_key"] != body["new_key"]  # a retry mints another live key

    sandbox.clock.advance(299)
    assert client.get("/v1/billing/wallets/rot/balance", headers=auth(agent_key)).status_code == 200
    sandbox.clock.advance(2)
    assert_problem(
        client.get("/v1/billing/wallets/rot/balance", headers=auth(agent_key)),
        401,
        "authentication-error",
        "API key has been revoked",
    )
    for new in (body["new_key"], second.json()["new_key"]):
        assert client.get("/v1/billing/wallets/rot/balance", headers=auth(new)).status_code == 200
    r = client.post(path, json={"current_key": agent_key}, headers=confirm)
    assert_problem(r, 403, "forbidden", "Key validation failed")


def test_rotating_the_admin_key_yields_a_non_admin_key(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.post(
        "/v1/infra/keys/rotate",
        json={"current_key": sandbox.admin_key},
        headers={**admin(sandbox), "X-Rotate-Confirmation": "confirm"},
    )
    new_key = r.json()["new_key"]
    assert r.json()["tier"] == "enterprise"
    assert_problem(client.get("/v1/infra/keys", headers=auth(new_key)), 403, "forbidden-admin-only")


# --------------------------------------------------------------------------- webhooks


def pro_key(sandbox: SandboxServer, agent_id: str) -> str:
    raw, _ = sandbox.store.create_key(agent_id, "pro", now=sandbox.clock())
    return raw


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8080/hook", "Blocked IP range (127.0.0.0/8)"),
        ("https://127.0.0.1/hook", "Blocked IP range (127.0.0.0/8)"),
        ("https://10.1.2.3/hook", "Blocked IP range (10.0.0.0/8)"),
        ("https://169.254.169.254/latest", "Blocked IP range (169.254.0.0/16)"),
        ("https://[::1]/hook", "Blocked IP range (::1/128)"),
        ("http://localhost/hook", "Blocked hostname"),
        ("https://metadata.google.internal/x", "Blocked hostname"),
        ("http://hooks.example.com/x", "Webhook URL must use HTTPS scheme"),
        ("https://[::ffff:127.0.0.1]/hook", "Webhook URL must not target"),
        ("ftp://hooks.example.com/x", "Unsupported scheme"),
    ],
)
def test_webhook_ssrf_rules(client: httpx.Client, sandbox: SandboxServer, url: str, message: str) -> None:
    key = pro_key(sandbox, "hooker")
    r = client.post(
        "/v1/infra/webhooks", json={"url": url, "event_types": ["billing.deposit"], "secret": "s"}, headers=auth(key)
    )
    assert assert_problem(r, 400, "validation-error")["detail"].startswith(message)


def test_webhook_lifecycle(client: httpx.Client, sandbox: SandboxServer) -> None:
    key = pro_key(sandbox, "hooker")
    other = pro_key(sandbox, "someone-else")
    free = register(client, "free-hooker")
    body = {"url": "https://hooks.example.com/finops", "events": ["budget.threshold"], "secret": "shh"}
    assert_problem(client.post("/v1/infra/webhooks", json=body, headers=auth(free)), 403, "insufficient-tier")
    assert_problem(
        client.post("/v1/infra/webhooks", json={**body, "secret": ""}, headers=auth(key)), 400, "validation-error"
    )

    r = client.post("/v1/infra/webhooks", json=body, headers=auth(key))
    assert r.status_code == 201
    hook = r.json()
    assert hook["id"].startswith("whk-") and len(hook["id"]) == 4 + 24
    assert r.headers["location"] == f"/v1/infra/webhooks/{hook['id']}"
    assert hook["active"] == 1 and hook["secret"] == "shh" and hook["agent_id"] == "hooker"
    assert hook["event_types"] == ["budget.threshold"]
    listed = client.get("/v1/infra/webhooks", headers=auth(key)).json()["webhooks"]
    assert listed == [hook]
    assert client.get("/v1/infra/webhooks", headers=auth(other)).json() == {"webhooks": []}
    assert client.get("/v1/infra/webhooks", headers=admin(sandbox)).json() == {"webhooks": []}

    for method in ("GET", "PUT", "PATCH"):
        assert_problem(client.request(method, f"/v1/infra/webhooks/{hook['id']}", headers=auth(key)), 405, "http-error")

    ping = client.post(f"/v1/infra/webhooks/{hook['id']}/test", headers=auth(key))
    assert ping.json() == {"delivery_id": ping.json()["delivery_id"], "status": "pending", "response_code": None}
    deliveries = client.get(f"/v1/infra/webhooks/{hook['id']}/deliveries", headers=auth(key)).json()["deliveries"]
    assert len(deliveries) == 1
    assert deliveries[0]["event_type"] == "test.ping"
    assert json.loads(deliveries[0]["payload"])["type"] == "test.ping"
    assert deliveries[0]["last_attempt_at"] == T0 and deliveries[0]["next_retry_at"] == T0 + 10

    assert_problem(client.delete(f"/v1/infra/webhooks/{hook['id']}", headers=auth(other)), 403, "forbidden")
    assert_problem(client.delete(f"/v1/infra/webhooks/{hook['id']}", headers=admin(sandbox)), 403, "forbidden")
    assert client.delete(f"/v1/infra/webhooks/{hook['id']}", headers=auth(key)).json() == {"deleted": True}
    assert_problem(client.delete(f"/v1/infra/webhooks/{hook['id']}", headers=auth(key)), 404, "not-found")
    assert client.get("/v1/infra/webhooks", headers=auth(key)).json() == {"webhooks": []}


def test_webhook_ping_through_a_delivery_double() -> None:
    received: list[tuple[str, bytes, dict[str, str]]] = []

    def deliver(url: str, body: bytes, headers: Any) -> tuple[int | None, str]:
        received.append((url, body, dict(headers)))
        return 200, "ok"

    with SandboxServer(clock=MutableClock(T0, frozen=True), deliver=deliver) as sb, httpx.Client(base_url=sb.url) as c:
        key = pro_key(sb, "pinged")
        hook = c.post(
            "/v1/infra/webhooks",
            json={"url": "https://hooks.example.com/x", "event_types": ["a"], "secret": "k"},
            headers=auth(key),
        ).json()
        r = c.post(f"/v1/infra/webhooks/{hook['id']}/test", headers=auth(key))
        assert r.json()["status"] == "delivered" and r.json()["response_code"] == 200
    url, body, headers = received[0]
    assert url == "https://hooks.example.com/x"
    assert headers["X-A2A-Signature"] == hmac.new(b"k", body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- stats, clock, batch


def test_stats_count_reads_and_writes_per_route(client: httpx.Client, sandbox: SandboxServer) -> None:
    register(client, "st")
    r = client.post("/_sandbox/stats/reset", headers=admin(sandbox))
    assert r.json() == {"reset": True}
    client.post("/v1/billing/wallets/st/deposit", json={"amount": 1}, headers=admin(sandbox))
    client.post("/v1/billing/wallets/st/deposit", json={"amount": 2}, headers=admin(sandbox))
    client.get("/v1/billing/wallets/st/balance", headers=admin(sandbox))
    client.get("/_sandbox/stats", headers=admin(sandbox))  # sandbox routes are not counted
    expected = {
        "requests": 3,
        "reads": 1,
        "writes": 2,
        "by_route": {"GET /v1/billing/wallets/{agent_id}/balance": 1, "POST /v1/billing/wallets/{agent_id}/deposit": 2},
    }
    assert sandbox.stats == expected
    assert client.get("/_sandbox/stats", headers=admin(sandbox)).json() == expected
    assert_problem(client.get("/_sandbox/stats"), 401, "missing-key")
    key = register(client, "st2")
    assert_problem(client.get("/_sandbox/stats", headers=auth(key)), 403, "forbidden-admin-only")


def test_clock_moves_over_http(client: httpx.Client, sandbox: SandboxServer) -> None:
    r = client.post("/_sandbox/clock", json={"advance": 301}, headers=admin(sandbox))
    assert r.json() == {"now": T0 + 301}
    assert sandbox.clock() == T0 + 301


def test_batch_skips_budget_and_deposit_limits_and_applies_ownership_to_admin(
    client: httpx.Client, sandbox: SandboxServer
) -> None:
    key = register(client, "batcher")
    client.put("/v1/billing/wallets/batcher/budget", json={"daily_cap": "0.05"}, headers=admin(sandbox))
    calls = [
        {"tool": "best_match", "params": {"query": "x"}},
        {"tool": "deposit", "params": {"agent_id": "batcher", "amount": 5000}},
        {"tool": "get_balance", "params": {"agent_id": "someone-else"}},
        {"tool": "no_such_tool", "params": {}},
    ]
    r = client.post("/v1/batch", json={"calls": calls}, headers=auth(key))
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["success"] is True
    assert results[1] == {"success": True, "result": {"new_balance": 5499.9}}
    assert results[2]["error"]["code"] == "forbidden"
    assert results[3]["error"]["code"] == "unknown_tool"
    r = client.post(
        "/v1/batch",
        json={"calls": [{"tool": "get_balance", "params": {"agent_id": "batcher"}}]},
        headers=admin(sandbox),
    )
    assert r.json()["results"][0]["error"]["code"] == "forbidden"
    r = client.post("/v1/batch", json={"calls": calls * 3}, headers=auth(key))
    assert_problem(r, 400, "batch-too-large")


# --------------------------------------------------------------------------- provisioning and persistence


def test_admin_key_file_is_private_and_reused_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "sandbox.db"
    key_file = tmp_path / "keys" / "admin.key"
    with SandboxServer(db_path=db, admin_key_file=key_file) as first, httpx.Client(base_url=first.url) as c:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert read_secret_file(key_file) == first.admin_key
        assert first.admin_key.startswith("a2a_enterprise_")
        register(c, "persisted")
        assert balance(c, first, "finops-admin") == Decimal("500.00")
    with SandboxServer(db_path=db, admin_key_file=key_file) as second, httpx.Client(base_url=second.url) as c:
        assert second.admin_key == first.admin_key
        assert balance(c, second, "persisted") == Decimal("500.00")


def test_provision_replaces_a_key_that_is_no_longer_valid(tmp_path: Path) -> None:
    store = SandboxStore(None)
    key_file = tmp_path / "admin.key"
    key_file.write_text("a2a_enterprise_000000000000000000000000\n")
    raw = provision_admin_key(store, key_file, now=T0)
    assert raw != "a2a_enterprise_000000000000000000000000"
    assert provision_admin_key(store, key_file, now=T0) == raw
    store.close()


def test_expired_read_only_and_old_keys(client: httpx.Client, sandbox: SandboxServer) -> None:
    register(client, "scoped")
    expired, _ = sandbox.store.create_key("scoped", "free", now=T0, expires_at=T0 + 60)
    read_only, _ = sandbox.store.create_key("scoped", "free", now=T0, scopes=["read"])
    path = "/v1/billing/wallets/scoped/balance"
    assert client.get(path, headers=auth(expired)).status_code == 200
    assert_problem(
        client.post("/v1/billing/wallets/scoped/deposit", json={"amount": 1}, headers=auth(read_only)),
        403,
        "scope-violation",
    )
    assert client.get(path, headers=auth(read_only)).status_code == 200
    sandbox.clock.advance(61)
    assert_problem(client.get(path, headers=auth(expired)), 401, "authentication-error", "API key has expired")
    assert "x-key-age-warning" not in client.get(path, headers=auth(read_only)).headers
    sandbox.clock.advance(91 * 86400)
    assert "x-key-age-warning" in client.get(path, headers=auth(read_only)).headers


def test_legacy_routes(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 301 and r.headers["location"] == "/v1/health"
    r = client.post("/v1/execute", json={"tool": "get_balance", "params": {}})
    assert_problem(r, 410, "endpoint-removed")
    assert r.headers["deprecation"] == "true"
