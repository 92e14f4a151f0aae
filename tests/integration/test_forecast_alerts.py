"""Forecast and anomaly alerts end to end: spend through the sandbox's paid route as the
agent, the sandbox's clock moved by the test, a real loopback receiver, real SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controller.alerting import alert_state, check_alerts
from controller.alerting.engine import AlertCheckResult
from controller.alerting.signals import SignalCache
from controller.alerting.store import AlertStore
from controller.gateway.client import GatewayClient
from controller.keys.rotate import KeyManager
from controller.keys.vault import KeyVault
from controller.reconcile.status import fleet_status, render_status
from controller.sandbox.clock import MutableClock
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from policies.signal_alerts import SignalKey, SignalKind
from policies.spec import ALERT_EVENT_ANOMALY, ALERT_EVENT_FORECAST, AnomalySpec, DesiredState, SecretRef
from tests.integration.test_alerts import POLICY, Receiver, _desired, _register, _route, _spend, _verify

START = 1_800_000_000 + 1800  # half past an hour (1.8e9 is a whole hour)
DAY = 86_400


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[SandboxServer]:
    """A sandbox whose clock stands still until the test moves it."""
    with SandboxServer(
        db_path=tmp_path / "gateway.db",
        admin_key_file=tmp_path / "admin.key",
        clock=MutableClock(START, frozen=True),
    ) as server:
        yield server


def _with(desired: DesiredState, **changes: Any) -> DesiredState:
    fleets = tuple(replace(f, agents=tuple(replace(a, **changes) for a in f.agents)) for f in desired.fleets)
    return DesiredState(fleets)


class Check:
    """``check_alerts`` as the daemon runs it: one ``SignalCache`` across checks."""

    def __init__(self, sandbox: SandboxServer, desired: DesiredState, state: Path) -> None:
        self.sandbox, self.desired, self.state = sandbox, desired, state
        self.cache = SignalCache()

    async def __call__(self, **kw: Any) -> AlertCheckResult:
        async with GatewayClient(self.sandbox.url, self.sandbox.admin_key, max_attempts=2) as client:
            return await check_alerts(
                client, self.desired, self.state, now=self.sandbox.clock, policy=POLICY, signals=self.cache, **kw
            )


def _signals(state: Path) -> dict[SignalKey, bool]:
    with AlertStore(state) as store:
        return {k: v.fired for k, v in store.signal_slots().items()}


async def test_forecast_fires_once_for_a_burst_then_rearms(
    clocked: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    sandbox, state = clocked, tmp_path / "state.db"
    key = _register(sandbox, "fc-a", daily="1.00", monthly="100.00")
    ref = SecretRef(file=str(secret_file), generate=True)
    route = _route(receiver.url + "/fc/{agent}/{threshold}/{window}", ref, events=(ALERT_EVENT_FORECAST,))
    check = Check(sandbox, _with(_desired(["fc-a"], [route]), forecast_horizon=7200), state)

    quiet = await check()
    assert (quiet.forecasts_fired, quiet.history_reads, receiver.requests) == (0, 1, [])

    _spend(sandbox, key, 5)  # 0.50 of the 1.00 daily cap, in one burst
    sandbox.clock.advance(600)
    burst = await check()
    assert (burst.forecasts_fired, burst.fired, burst.delivered, burst.history_reads) == (1, 0, 1, 0)
    (req,) = receiver.requests
    assert req.path == "/fc/fc-a/forecast/daily"
    _verify(secret_file.read_text().strip(), req)
    body = req.json()
    assert {k: body[k] for k in ("type", "agent", "window", "horizon_seconds", "eta_seconds", "basis")} == {
        "type": "budget.forecast", "agent": "fc-a", "window": "daily", "horizon_seconds": 7200,
        "eta_seconds": 600, "basis": "readings",
    }  # fmt: skip  # 0.50 in 600 s: the other 0.50 in 600 s more
    assert (body["rate_per_hour"], body["spend"], body["cap"], body["currency"]) == ("3.00", "0.50", "1.00", "CREDITS")
    assert body["id"] == body["episode"] == req.headers["X-Finops-Alert-Id"]

    sandbox.clock.advance(60)
    again = await check()
    assert (again.forecasts_fired, again.delivered, len(receiver.requests)) == (0, 0, 1)
    assert _signals(state) == {SignalKey("fc-a", SignalKind.FORECAST, "daily"): True}
    assert alert_state(state) == {}  # no threshold fired: forecast slots are not threshold slots

    sandbox.clock.advance(3600)  # an hour without spend: the rate falls to 0, the slot re-arms
    calm = await check()
    assert (calm.forecasts_fired, calm.history_reads, len(receiver.requests)) == (0, 1, 1)
    assert _signals(state) == {SignalKey("fc-a", SignalKind.FORECAST, "daily"): False}

    _spend(sandbox, key, 3)
    sandbox.clock.advance(600)
    second = await check()
    assert (second.forecasts_fired, len(receiver.requests)) == (1, 2)
    episode2 = receiver.requests[-1].json()
    assert episode2["id"] != body["id"] and episode2["eta_seconds"] == 400  # 0.20 left at 0.30 per 600 s

    check.desired = _with(check.desired, forecast_horizon=None)  # no longer declared: its slots go
    assert (await check()).history_reads == 0
    assert _signals(state) == {}


async def test_forecast_without_a_route_for_it_is_decided_but_sent_nowhere(
    clocked: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    """Routes get only the event types they list: a threshold-only route stays quiet."""
    sandbox, state = clocked, tmp_path / "state.db"
    key = _register(sandbox, "fc-b")
    route = _route(receiver.url + "/t", SecretRef(file=str(secret_file), generate=True))
    check = Check(sandbox, _with(_desired(["fc-b"], [route]), forecast_horizon=7200), state)
    await check()
    _spend(sandbox, key, 5)
    sandbox.clock.advance(600)
    result = await check()
    assert (result.forecasts_fired, result.queued, receiver.requests) == (1, 0, [])


async def test_a_forecast_alert_is_queued_before_delivery_and_resent_with_the_same_id(
    clocked: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    """The decision and the queued body are committed before sending (the threshold
    alerts' outbox): a receiver that is down gets the same bytes later, and a new finops
    process (an empty cache, as after a crash) does not decide the episode again."""
    sandbox, state = clocked, tmp_path / "state.db"
    key = _register(sandbox, "fc-c")
    route = _route(
        receiver.url + "/fc", SecretRef(file=str(secret_file), generate=True), events=(ALERT_EVENT_FORECAST,)
    )
    desired = _with(_desired(["fc-c"], [route]), forecast_horizon=7200)
    check = Check(sandbox, desired, state)
    await check()
    _spend(sandbox, key, 5)
    sandbox.clock.advance(600)
    receiver.fail_next = 100
    down = await check()
    assert (down.forecasts_fired, down.delivered, down.pending) == (1, 0, 1)
    receiver.fail_next = 0
    restarted = Check(sandbox, desired, state)  # nothing in memory: the rate comes from the history
    sandbox.clock.advance(60)
    later = await restarted()
    assert (later.forecasts_fired, later.delivered, later.pending) == (0, 1, 0)
    bodies = {r.body for r in receiver.requests}
    assert len(bodies) == 1 and receiver.delivered[0].json()["type"] == "budget.forecast"


async def test_anomaly_fires_once_for_a_burst_over_a_quiet_baseline(
    clocked: SandboxServer, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    sandbox, state = clocked, tmp_path / "state.db"
    key = _register(sandbox, "an-a", daily="100.00", monthly="1000.00")
    route = _route(receiver.url + "/an/{agent}", SecretRef(file=str(secret_file), generate=True),
                   events=(ALERT_EVENT_ANOMALY,))  # fmt: skip
    rule = AnomalySpec(window_seconds=DAY, baseline_seconds=7 * DAY, multiple=Decimal(2), min_spend=Decimal("0.50"))
    check = Check(sandbox, _with(_desired(["an-a"], [route]), anomaly=rule), state)

    for _ in range(7):  # a week of 0.20 a day
        _spend(sandbox, key, 2)
        sandbox.clock.advance(DAY)
        day = await check()
        assert (day.anomalies_fired, day.agent_errors) == (0, {})
    sandbox.clock.advance(7200)
    _spend(sandbox, key, 10)  # 1.00 in the last 24 h against 0.20 a day
    sandbox.clock.advance(60)
    burst = await check()
    assert (burst.anomalies_fired, burst.delivered) == (1, 1)
    body = receiver.requests[-1].json()
    assert {k: body[k] for k in ("type", "agent", "window", "window_seconds", "baseline_seconds")} == {
        "type": "budget.anomaly", "agent": "an-a", "window": "spend", "window_seconds": DAY,
        "baseline_seconds": 7 * DAY,
    }  # fmt: skip
    # The last 24 h: the burst's 1.00; the 7 days before: 7 × 0.20; 1.00/day ÷ 0.20/day.
    assert (body["spend"], body["baseline_spend"], body["ratio"], body["multiple"], body["min_spend"]) == (
        "1.00", "1.40", "5.00", "2.00", "0.50",
    )  # fmt: skip

    sandbox.clock.advance(60)
    again = await check()
    assert (again.anomalies_fired, len(receiver.requests)) == (0, 1)
    assert _signals(state) == {SignalKey("an-a", SignalKind.ANOMALY, "spend"): True}

    sandbox.clock.advance(DAY)  # the burst leaves the window: recent 0 < 0.8 × minSpend
    calm = await check()
    assert (calm.anomalies_fired, len(receiver.requests)) == (0, 1)
    assert _signals(state) == {SignalKey("an-a", SignalKind.ANOMALY, "spend"): False}


async def test_histories_are_read_only_for_declaring_agents_and_at_most_hourly(
    clocked: SandboxServer, secret_file: Path, tmp_path: Path
) -> None:
    """Reads are budgeted: an agent that declares neither is never read; a declaring one
    once per hour of cache age, or when the change feed says it moved."""
    sandbox, state = clocked, tmp_path / "state.db"
    for agent in ("rb-a", "rb-b", "rb-c"):
        _register(sandbox, agent)
    route = _route("https://alerts.example.com/x", SecretRef(file=str(secret_file), generate=True))
    base = _desired(["rb-a", "rb-b", "rb-c"], [route])
    fleet = base.fleets[0]
    agents = (replace(fleet.agents[0], forecast_horizon=3600), replace(fleet.agents[1], forecast_horizon=3600),
              fleet.agents[2])  # fmt: skip
    check = Check(sandbox, DesiredState((replace(fleet, agents=agents),)), state)
    assert (await check()).history_reads == 2
    for _ in range(5):
        sandbox.clock.advance(600)
        assert (await check()).history_reads == 0
    assert (await check(moved=frozenset({"rb-b", "rb-c"}))).history_reads == 1  # rb-c declares nothing
    sandbox.clock.advance(600)
    assert (await check()).history_reads == 1  # rb-a's history is an hour old
    assert (await check(moved=frozenset())).history_reads == 0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    return tmp_path / "alert-secrets" / "alert-signing.secret"


async def test_status_shows_the_eta_per_window(clocked: SandboxServer, secret_file: Path, tmp_path: Path) -> None:
    """``finops status``: per window the ETA (seconds), its time, the rate and a flag when
    it is within the horizon; from a fresh history read (the last hour's spend)."""
    sandbox = clocked
    key = _register(sandbox, "st-a", daily="1.00", monthly="100.00")
    route = _route("https://alerts.example.com/x", SecretRef(file=str(secret_file), generate=True))
    desired = _with(_desired(["st-a"], [route]), forecast_horizon=7200)
    sandbox.clock.advance(-900)
    _spend(sandbox, key, 2)  # 0.20 a quarter of an hour ago, in the half hour of this hour so far
    sandbox.clock.advance(900)
    store = StateStore(tmp_path / "state.db", clock=sandbox.clock)
    async with GatewayClient(sandbox.url, sandbox.admin_key) as client:
        keys = KeyManager(client, store, KeyVault(tmp_path / "keys"), state_path=store.location, clock=sandbox.clock)
        try:
            status = await fleet_status(client, desired, store, keys, target="sandbox")
        finally:
            keys.close()
            store.close()
    (row,) = status.agents
    # 0.20 in the 1800 s of this hour so far ... spread over the last hour's 3600 s: 0.20/h;
    # 0.80 left: 4 h for the daily cap, beyond the 2 h horizon: no flag.
    assert row.forecast["daily"] == {
        "eta_seconds": 4 * 3600, "exhausts_at": _iso(START + 4 * 3600), "rate_per_hour": "0.20",
        "basis": "history", "within_horizon": False,
    }  # fmt: skip
    assert row.forecast["monthly"]["eta_seconds"] == (Decimal("99.80") / Decimal("0.20")) * 3600
    assert not any(f.startswith("FORECAST") for f in row.flags)
    assert (
        "forecast: daily cap in 4h (0.20 credits/h); monthly cap in 20d19h (0.20 credits/h)"
        in render_status(  # 499 h
            status
        )
    )
    assert row.to_dict()["forecast"] == row.forecast  # status --format json


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
