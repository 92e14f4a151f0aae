"""Budget alerts end to end: real sandbox spend, a real loopback receiver, real SQLite."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from controller.alerting import DeliveryPolicy, alert_state, check_alerts, delivery_log, delivery_status
from controller.alerting.engine import AlertCheckResult
from controller.gateway.client import GatewayClient
from controller.sandbox.server import SandboxServer
from policies.alerts import SIGNATURE_HEADER, sign, verify_v1
from policies.spec import (
    ALERT_EVENT_RECOVERED,
    ALERT_EVENT_THRESHOLD,
    AgentSpec,
    AlertRoute,
    DesiredState,
    FleetSpec,
    SecretRef,
)
from tests.integration.conftest import Harness

POLICY = DeliveryPolicy(attempts_per_check=3, max_attempts=20, backoff_initial=0.001, backoff_max=0.004, timeout=5.0)
BOTH = (ALERT_EVENT_THRESHOLD, ALERT_EVENT_RECOVERED)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Receiver:
    """A loopback alert receiver that records raw bodies and can fail the next N requests."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.fail_next = 0
        self.fail_code = 500
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer._lock:
                    failing = outer.fail_next > 0
                    outer.fail_next -= int(failing)
                    code = outer.fail_code if failing else 204
                    outer.requests.append(Received(self.path, dict(self.headers.items()), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def delivered(self) -> list[Received]:
        return [r for r in self.requests if r.answered == 204]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    # Not in tmp_path/"secrets": that is the harness's key store, which no secret reference
    # may name (controller.io.secretref refuses it).
    return tmp_path / "alert-secrets" / "alert-signing.secret"


def _register(sandbox: SandboxServer, agent_id: str, daily: str = "1.00", monthly: str = "100.00") -> str:
    key: str = (
        httpx.post(f"{sandbox.url}/v1/register", json={"agent_id": agent_id}).raise_for_status().json()["api_key"]
    )
    httpx.put(
        f"{sandbox.url}/v1/billing/wallets/{agent_id}/budget",
        json={"daily_cap": daily, "monthly_cap": monthly, "alert_threshold": 0.75},
        headers={"Authorization": f"Bearer {sandbox.admin_key}"},
    ).raise_for_status()
    return key


def _spend(sandbox: SandboxServer, key: str, calls: int) -> None:
    """Paid calls with the agent's own key: ``best_match`` costs 0.10 each."""
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(calls):
            http.get("/v1/marketplace/match", params={"query": "x"}).raise_for_status()


def _desired(agent_ids: Sequence[str], routes: Sequence[AlertRoute]) -> DesiredState:
    agents = tuple(
        AgentSpec(
            agent_id=a,
            fleet="research",
            tier="researcher",
            daily_cap=Decimal("1.00"),
            monthly_cap=Decimal("100.00"),
            funding_floor=Decimal("0.00"),
            funding_target=Decimal("0.00"),
            alert_thresholds=(75, 90, 100),
            alert_routes=tuple(routes),
        )
        for a in agent_ids
    )
    return DesiredState((FleetSpec("research", "CREDITS", Decimal("10.00"), Decimal("0.00"), agents),))


def _route(
    url: str,
    secret: SecretRef,
    thresholds: tuple[int, ...] = (75, 90, 100),
    events: tuple[str, ...] = (ALERT_EVENT_THRESHOLD,),
    allow_insecure: bool = True,
) -> AlertRoute:
    return AlertRoute(url, thresholds, events, secret, allow_insecure)


class Checker:
    def __init__(self, sandbox: SandboxServer, desired: DesiredState, state: Path) -> None:
        self.sandbox, self.desired, self.state = sandbox, desired, state

    async def __call__(self, **kw: Any) -> AlertCheckResult:
        gateway_transport = kw.pop("gateway_transport", None)
        async with GatewayClient(
            self.sandbox.url, self.sandbox.admin_key, transport=gateway_transport,
            max_attempts=2, backoff_initial=0.001, backoff_max=0.002,
        ) as client:  # fmt: skip
            kw.setdefault("policy", POLICY)
            return await check_alerts(client, self.desired, self.state, now=self.sandbox.clock, **kw)


def _verify(secret: str, req: Received) -> None:
    expected = hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["X-A2A-Signature"], expected)


async def test_crossing_is_delivered_once_signed_and_never_resent(
    harness: Harness, receiver: Receiver, secret_file: Path
) -> None:
    """Alert tables share the open StateStore's database file (one state file per gateway)."""
    sandbox, state = harness.sandbox, harness.store.path
    key = _register(sandbox, "res-a")
    ref = SecretRef(file=str(secret_file), generate=True)
    check = Checker(
        sandbox,
        _desired(["res-a"], [_route(receiver.url + "/hooks/{fleet}/{agent}/{threshold}", ref)]),
        state,
    )
    _spend(sandbox, key, 7)
    quiet = await check()
    assert (quiet.evaluated, quiet.fired, receiver.requests) == (1, 0, [])

    _spend(sandbox, key, 1)
    result = await check()
    assert (result.fired, result.queued, result.delivered, result.pending, result.ok) == (1, 1, 1, 0, True)
    (req,) = receiver.requests
    assert req.path == "/hooks/research/res-a/75"
    assert req.headers["Content-Type"] == "application/json"
    _verify(secret_file.read_text().strip(), req)
    body = req.json()
    assert req.body == json.dumps(body).encode()  # json.dumps default separators, like the gateway
    assert req.headers["X-Finops-Alert-Id"] == body["id"] == body["episode"]
    assert {k: body[k] for k in ("type", "agent", "fleet", "window", "threshold", "percent", "spend", "cap")} == {
        "type": "budget.threshold", "agent": "res-a", "fleet": "research", "window": "daily",
        "threshold": 75, "percent": "80.00", "spend": "0.80", "cap": "1.00",
    }  # fmt: skip
    assert body["currency"] == "CREDITS"

    for _ in range(2):
        again = await check()
        assert (again.fired, again.delivered, again.pending) == (0, 0, 0)
    assert len(receiver.requests) == 1
    fired = alert_state(state)["res-a"]
    assert [(f.window, f.threshold, f.alert_id) for f in fired] == [("daily", 75, body["id"])]
    (status,) = delivery_status(state)["res-a"]
    assert (status.last_ok, status.last_code, status.consecutive_failures, status.failing) == (True, 204, 0, False)
    harness.store.set_hold("res-a", "test")  # the StateStore keeps working beside the alert tables
    assert list(harness.store.holds()) == ["res-a"]


async def test_higher_thresholds_fire_later_to_their_routes(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    key = _register(sandbox, "res-b")
    ref = SecretRef(file=str(secret_file), generate=True)
    routes = [
        _route(receiver.url + "/team/{threshold}", ref, thresholds=(75, 90)),
        _route(receiver.url + "/pager/{window}", ref, thresholds=(100,), events=BOTH),
    ]
    check = Checker(sandbox, _desired(["res-b"], routes), tmp_path / "s.db")
    seen: list[tuple[str, int]] = []
    for calls in (8, 1, 1):
        _spend(sandbox, key, calls)
        result = await check()
        assert (result.fired, result.delivered) == (1, 1)
        last = receiver.requests[-1]
        seen.append((last.path, last.json()["threshold"]))
    assert seen == [("/team/75", 75), ("/team/90", 90), ("/pager/daily", 100)]
    assert receiver.requests[-1].json()["percent"] == "100.00"
    assert len({r.json()["id"] for r in receiver.requests}) == 3 == len(receiver.requests)
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert http.get("/v1/marketplace/match", params={"query": "x"}).status_code == 402  # the cap holds
    assert (await check()).delivered == 0


async def test_receiver_down_is_retried_within_and_across_checks_then_delivered_once(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    key = _register(sandbox, "res-c")
    ref = SecretRef(file=str(secret_file), generate=True)
    state = tmp_path / "s.db"
    check = Checker(sandbox, _desired(["res-c"], [_route(receiver.url + "/a", ref)]), state)
    _spend(sandbox, key, 8)
    receiver.fail_next = 5

    first = await check()
    assert (first.fired, first.delivered, first.failed, first.pending, first.ok) == (1, 0, 1, 1, False)
    assert len(receiver.requests) == 3  # attempts_per_check, with backoff in between
    assert "HTTP 500" in first.delivery_errors[0] and "will retry" in first.delivery_errors[0]
    (status,) = delivery_status(state)["res-c"]
    assert (status.failing, status.consecutive_failures, status.last_code, status.pending) == (True, 3, 500, 1)

    second = await check()  # the receiver recovers on the 6th request
    assert (second.fired, second.delivered, second.pending) == (0, 1, 0)
    assert [r.answered for r in receiver.requests] == [500] * 5 + [204]
    ids = {r.headers["X-Finops-Alert-Id"] for r in receiver.requests}
    assert len(ids) == 1 and len({r.body for r in receiver.requests}) == 1
    assert len({r.headers["X-A2A-Signature"] for r in receiver.requests}) == 1
    (alert_id,) = ids
    log = delivery_log(state, alert_id)
    assert [(a.ok, a.status_code) for a in log] == [(False, 500)] * 5 + [(True, 204)]
    assert all(a.url == receiver.url + "/a" for a in log)
    (status,) = delivery_status(state)["res-c"]
    assert (status.failing, status.consecutive_failures, status.last_ok) == (False, 0, True)

    assert (await check()).delivered == 0
    assert len(receiver.delivered) == 1


async def test_a_client_error_is_not_retried_within_the_check_but_on_the_next(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    key = _register(sandbox, "res-k")
    ref = SecretRef(file=str(secret_file), generate=True)
    check = Checker(sandbox, _desired(["res-k"], [_route(receiver.url + "/a", ref)]), tmp_path / "s.db")
    _spend(sandbox, key, 8)
    receiver.fail_next, receiver.fail_code = 1, 401
    first = await check()
    assert (first.failed, first.pending, [r.answered for r in receiver.requests]) == (1, 1, [401])
    second = await check()
    assert (second.delivered, second.pending, [r.answered for r in receiver.requests]) == (1, 0, [401, 204])


async def test_a_delivery_that_keeps_failing_is_given_up_visibly(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    key = _register(sandbox, "res-d")
    state = tmp_path / "s.db"
    ref = SecretRef(file=str(secret_file), generate=True)
    check = Checker(sandbox, _desired(["res-d"], [_route(receiver.url + "/a", ref)]), state)
    _spend(sandbox, key, 8)
    receiver.fail_next = 100
    policy = DeliveryPolicy(attempts_per_check=3, max_attempts=4, backoff_initial=0.001, backoff_max=0.002)
    assert (await check(policy=policy)).pending == 1
    final = await check(policy=policy)
    assert (final.gave_up, final.pending, len(receiver.requests)) == (1, 0, 4)
    assert "gave up after 4 attempts" in final.delivery_errors[0]
    (status,) = delivery_status(state)["res-d"]
    assert (status.gave_up, status.failing, status.consecutive_failures) == (1, True, 4)
    assert (await check(policy=policy)).gave_up == 0 and len(receiver.requests) == 4


async def test_recovery_when_spend_ages_out_then_a_new_episode(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    key = _register(sandbox, "res-e")
    ref = SecretRef(file=str(secret_file), generate=True)
    state = tmp_path / "s.db"
    check = Checker(sandbox, _desired(["res-e"], [_route(receiver.url + "/a", ref, (75,), BOTH)]), state)
    _spend(sandbox, key, 8)
    await check()
    crossing = receiver.requests[-1].json()

    sandbox.clock.advance(86_400 + 1)  # the rolling 24 h window drops the spend
    result = await check()
    assert (result.fired, result.recovered, result.delivered) == (0, 1, 1)
    recovered = receiver.requests[-1].json()
    assert (recovered["type"], recovered["episode"], recovered["spend"], recovered["percent"]) == (
        "budget.recovered", crossing["id"], "0.00", "0.00",
    )  # fmt: skip
    assert recovered["id"] != crossing["id"]
    _verify(secret_file.read_text().strip(), receiver.requests[-1])
    assert "res-e" not in alert_state(state)
    assert (await check()).recovered == 0

    _spend(sandbox, key, 8)
    again = await check()
    assert again.fired == 1
    new = receiver.requests[-1].json()
    assert new["type"] == "budget.threshold" and new["id"] not in (crossing["id"], recovered["id"])
    assert len(receiver.requests) == 3


class Crash(BaseException):
    """A process dying mid-check (nothing after it runs)."""


class CrashingTransport(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise Crash


async def test_crash_after_deciding_redelivers_the_same_alert_on_the_next_check(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    key = _register(sandbox, "res-f")
    ref = SecretRef(file=str(secret_file), generate=True)
    state = tmp_path / "s.db"
    check = Checker(sandbox, _desired(["res-f"], [_route(receiver.url + "/a", ref)]), state)
    _spend(sandbox, key, 8)
    with pytest.raises(BaseExceptionGroup) as crashed:
        await check(transport=CrashingTransport())
    assert crashed.group_contains(Crash)
    assert receiver.requests == []
    (fired,) = alert_state(state)["res-f"]  # decided and persisted before the send

    result = await check()
    assert (result.fired, result.delivered) == (0, 1)
    (req,) = receiver.requests
    assert req.headers["X-Finops-Alert-Id"] == req.json()["id"] == fired.alert_id
    _verify(secret_file.read_text().strip(), req)


async def test_unsafe_urls_are_refused_and_a_missing_secret_fails_only_its_route(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _register(sandbox, "res-g")
    good = SecretRef(file=str(secret_file), generate=True)
    missing = SecretRef(env="FINOPS_TEST_ALERT_SECRET_UNSET")
    monkeypatch.delenv("FINOPS_TEST_ALERT_SECRET_UNSET", raising=False)
    routes = [
        _route(receiver.url + "/plain", good, allow_insecure=False),
        _route("https://127.0.0.1:9/tls", good, allow_insecure=False),
        _route(receiver.url + "/nosecret", missing),
        _route(receiver.url + "/ok", good),
    ]
    state = tmp_path / "s.db"
    check = Checker(sandbox, _desired(["res-g"], routes), state)
    _spend(sandbox, key, 8)
    result = await check()
    assert (result.refused, result.failed, result.delivered, result.pending) == (2, 1, 1, 1)
    assert [r.path for r in receiver.requests] == ["/ok"]
    errors = "\n".join(result.delivery_errors)
    assert "must use https" in errors and "loopback" in errors
    assert "FINOPS_TEST_ALERT_SECRET_UNSET is not set" in errors
    by_route = {s.route: s for s in delivery_status(state)["res-g"]}
    assert by_route[receiver.url + "/plain"].failing and by_route[receiver.url + "/plain"].refused == 1
    assert "must use https" in by_route[receiver.url + "/plain"].last_error
    assert "loopback" in by_route["https://127.0.0.1:9/tls"].last_error
    assert by_route[receiver.url + "/nosecret"].failing and by_route[receiver.url + "/nosecret"].pending == 1
    assert not by_route[receiver.url + "/ok"].failing

    monkeypatch.setenv("FINOPS_TEST_ALERT_SECRET_UNSET", "late-secret")
    fixed = await check()
    assert (fixed.delivered, fixed.refused, fixed.pending) == (1, 0, 0)
    assert [r.path for r in receiver.requests] == ["/ok", "/nosecret"]
    _verify("late-secret", receiver.requests[-1])
    assert receiver.requests[0].json()["id"] == receiver.requests[1].json()["id"]


class FailOneAgent(httpx.AsyncBaseTransport):
    def __init__(self, agent_id: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.agent_id = agent_id

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if f"/wallets/{self.agent_id}/" in request.url.path:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_one_unreadable_agent_does_not_stop_the_others_and_held_agents_are_skipped(
    sandbox: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    keys = {a: _register(sandbox, a) for a in ("res-h1", "res-h2", "res-h3")}
    ref = SecretRef(file=str(secret_file), generate=True)
    check = Checker(sandbox, _desired(list(keys), [_route(receiver.url + "/{agent}", ref)]), tmp_path / "s.db")
    for key in keys.values():
        _spend(sandbox, key, 8)
    result = await check(gateway_transport=FailOneAgent("res-h1"), held=frozenset({"res-h3"}))
    assert (result.evaluated, result.fired, result.delivered, result.held) == (1, 1, 1, ("res-h3",))
    assert list(result.agent_errors) == ["res-h1"] and "cannot read budget" in result.agent_errors["res-h1"]
    assert [r.path for r in receiver.requests] == ["/res-h2"]
    later = await check()
    assert sorted(r.path for r in receiver.requests) == ["/res-h1", "/res-h2", "/res-h3"]
    assert later.agent_errors == {}


# -- timestamped signatures (X-Finops-Timestamp / X-Finops-Signature) ------------------------------

SNIPPET = Path(__file__).resolve().parents[2] / "examples" / "alert-receiver" / "verify_finops_alert.py"


def _snippet_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verify_finops_alert_it", SNIPPET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_retries_are_re_signed_with_their_send_time_and_a_replay_is_refused(
    harness: Harness, receiver: Receiver, secret_file: Path
) -> None:
    sandbox = harness.sandbox
    key = _register(sandbox, "sig-a")
    check = Checker(
        sandbox,
        _desired(["sig-a"], [_route(receiver.url + "/a", SecretRef(file=str(secret_file), generate=True))]),
        harness.store.path,
    )
    _spend(sandbox, key, 8)
    receiver.fail_next = 3  # the whole first check (3 attempts) fails
    started = int(sandbox.clock())  # the sandbox clock runs (and is finops' clock here)
    first = await check()
    first_window = range(started, int(sandbox.clock()) + 1)
    assert (first.fired, first.delivered, first.pending) == (1, 0, 1)
    sandbox.clock.advance(600)  # the receiver is back ten minutes later
    started = int(sandbox.clock())
    second = await check()
    second_window = range(started, int(sandbox.clock()) + 1)
    assert (second.delivered, second.pending) == (1, 0)

    secret = secret_file.read_text().strip()
    requests = receiver.requests
    assert [r.answered for r in requests] == [500, 500, 500, 204]
    assert len({r.body for r in requests}) == 1 and len({r.headers["X-Finops-Alert-Id"] for r in requests}) == 1
    stamps = [int(r.headers["X-Finops-Timestamp"]) for r in requests]
    assert all(stamp in first_window for stamp in stamps[:3]) and stamps[3] in second_window
    assert stamps[3] >= stamps[0] + 600
    for request, stamp in zip(requests, stamps, strict=True):
        assert request.headers["X-Finops-Signature"].startswith(f"t={stamp},v1=")
        assert verify_v1(secret, request.body, request.headers["X-Finops-Signature"], now=stamp)
        assert request.headers[SIGNATURE_HEADER] == sign(secret, request.body)  # the transition header

    snippet = _snippet_module()
    receiver_side = snippet.FinopsAlertVerifier(secret, clock=sandbox.clock)
    delivered = requests[3]
    alert = receiver_side.verify(
        delivered.body, delivered.headers["X-Finops-Timestamp"], delivered.headers["X-Finops-Signature"]
    )
    assert alert["agent"] == "sig-a" and alert["id"] == delivered.headers["X-Finops-Alert-Id"]
    captured = requests[0]  # an attacker replays the first attempt, signed ten minutes ago
    with pytest.raises(snippet.Rejected, match="stale"):
        receiver_side.verify(
            captured.body, captured.headers["X-Finops-Timestamp"], captured.headers["X-Finops-Signature"]
        )
