"""The escalation ladder end to end: a real sandbox over HTTP on a frozen clock, spend made
by the agent itself through the paid route, a real loopback receiver, real SQLite.

Ladder under test (daily window): warn at 75, pause at 90, freeze at 100."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.alerting.engine import AlertCheckResult, check_alerts
from controller.alerting.ladder import Ladder
from controller.gateway.client import GatewayClient
from controller.reconcile.decide import observe_and_plan
from controller.reconcile.holds import unfreeze
from controller.sandbox.clock import MutableClock
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from controller.state.location import StateLocation
from policies.escalation import ACTIVE, PENDING, RELEASED, SUPERSEDED
from policies.exposure import exposure_of
from policies.plan_types import ChangeKind
from policies.spec import (
    ALERT_EVENT_RECOVERED,
    ALERT_EVENT_THRESHOLD,
    AgentSpec,
    AlertRoute,
    DesiredState,
    EscalationRule,
    FleetSpec,
    KeyPolicy,
    SecretRef,
)
from tests.integration.test_alerts import POLICY, Receiver

DAY = 86_400.0
LADDER = (
    EscalationRule(90, "daily", "pause", "auto"),
    EscalationRule(100, "daily", "freeze", "manual"),
)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(
        db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key", clock=MutableClock(frozen=True)
    ) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """Every scenario on both state backends (the decision and its execution are state)."""
    where = tmp_path / "state" / "state.db"
    s = StateStore(StateLocation(where, url=request.getfixturevalue("pg_url")) if request.param != "sqlite" else where)
    yield s
    s.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _desired(receiver: Receiver, tmp_path: Path, ladder: tuple[EscalationRule, ...] = LADDER) -> DesiredState:
    secret = tmp_path / "alert-secrets" / "signing.secret"
    route = AlertRoute(
        receiver.url + "/{agent}",
        (75, 90, 100),
        (ALERT_EVENT_THRESHOLD, ALERT_EVENT_RECOVERED),
        SecretRef(file=str(secret), generate=True),
        allow_insecure=True,
    )
    agent = AgentSpec(
        agent_id="a1",
        fleet="research",
        tier="researcher",
        daily_cap=Decimal("1.00"),
        monthly_cap=Decimal("100.00"),
        funding_floor=Decimal("0.00"),
        funding_target=Decimal("0.00"),
        alert_thresholds=(75, 90, 100),
        alert_routes=(route,),
        keys=KeyPolicy(manage=False),
        escalation=ladder,
    )
    return DesiredState((FleetSpec("research", "CREDITS", Decimal("10.00"), Decimal("0.00"), (agent,)),))


def _admin(sandbox: SandboxServer) -> httpx.Client:
    return httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"})


def _register(sandbox: SandboxServer) -> str:
    key: str = httpx.post(f"{sandbox.url}/v1/register", json={"agent_id": "a1"}).raise_for_status().json()["api_key"]
    with _admin(sandbox) as http:
        http.put(
            "/v1/billing/wallets/a1/budget",
            json={"daily_cap": "1.00", "monthly_cap": "100.00", "alert_threshold": 0.75},
        ).raise_for_status()
    return key


def _paid_calls(sandbox: SandboxServer, key: str, calls: int) -> list[int]:
    """``best_match`` (0.10 each) with the agent's own key; the status of every call."""
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        return [http.get("/v1/marketplace/match", params={"query": "x"}).status_code for _ in range(calls)]


def _batch_call(sandbox: SandboxServer, key: str) -> None:
    """``/v1/batch`` checks no budget cap (API.md §8.2): spend a pause cannot stop."""
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        body = {"calls": [{"tool": "best_match", "params": {"query": "x"}}]}
        assert http.post("/v1/batch", json=body).json()["results"][0]["success"] is True


def _caps(sandbox: SandboxServer) -> tuple[Any, Any]:
    with _admin(sandbox) as http:
        data = http.get("/v1/billing/wallets/a1/budget").raise_for_status().json()
    return data["daily_cap"], data["monthly_cap"]


def _writes(sandbox: SandboxServer) -> int:
    with _admin(sandbox) as http:
        return int(http.get("/_sandbox/stats").json()["writes"])


def _reset(sandbox: SandboxServer) -> None:
    with _admin(sandbox) as http:
        http.post("/_sandbox/stats/reset").raise_for_status()


class Checks:
    """One alert check at a time, as the daemon's alerts job runs it (writer: executes)."""

    def __init__(self, sandbox: SandboxServer, store: StateStore, desired: DesiredState) -> None:
        self.sandbox, self.store, self.desired = sandbox, store, desired

    async def run(self, ladder_cls: type[Ladder] = Ladder) -> AlertCheckResult:
        async with _client(self.sandbox) as client:
            ladder = ladder_cls(client, self.store, None, self.desired, now=self.sandbox.clock)
            return await check_alerts(
                client,
                self.desired,
                self.store.location,
                now=self.sandbox.clock,
                held=frozenset(self.store.holds()),
                policy=POLICY,
                ladder=ladder,
            )


def _bodies(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in receiver.delivered]


async def test_ladder_warns_at_75_pauses_at_90_freezes_at_100_and_a_second_check_changes_nothing(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    key = _register(sandbox)
    checks = Checks(sandbox, store, _desired(receiver, tmp_path))

    assert _paid_calls(sandbox, key, 8) == [200] * 8  # 0.80 of 1.00
    warned = await checks.run()
    assert [(e.threshold, e.action) for e in warned.events] == [(75, None)]
    assert _caps(sandbox) == (1, 100)

    assert _paid_calls(sandbox, key, 1) == [200]  # 0.90: the pause
    paused = await checks.run()
    assert [(e.threshold, e.action) for e in paused.events] == [(90, "pause")]
    assert paused.ok and paused.ladder is not None and paused.ladder.executed == {"pause": 1}
    assert _caps(sandbox) == (0.9, 100)  # the daily cap lowered to what was spent
    assert _paid_calls(sandbox, key, 1) == [402]  # the next paid call is refused
    [row] = store.escalations()
    assert (row.action, row.status, row.cap, row.reason) == (
        "pause",
        ACTIVE,
        Decimal("0.90"),
        "auto: 90 % of daily cap",
    )

    _reset(sandbox)
    again = await checks.run()
    assert again.events == () and again.ladder is not None and again.ladder.cap_writes == 0
    assert _writes(sandbox) == 0  # nothing new: no gateway write at all

    # The reconcile pass keeps the pause: it plans no budget change for the paused agent.
    async with _client(sandbox) as client:
        plan = await observe_and_plan(client, checks.desired, "sandbox", store)
    assert not [c for c in plan.changes if c.kind is ChangeKind.SET_BUDGET]
    assert [(e.agent_id, e.action, e.cap) for e in plan.escalated] == [("a1", "pause", Decimal("0.90"))]

    _batch_call(sandbox, key)  # 1.00 through the one route a cap does not stop
    frozen = await checks.run()
    assert [(e.threshold, e.action) for e in frozen.events] == [(100, "freeze")]
    assert "a1" in store.holds() and store.holds()["a1"].reason == "auto: 100 % of daily cap"
    assert _caps(sandbox) == (0, 0)
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert http.post("/v1/billing/wallets/a1/withdraw", json={"amount": "1.00"}).status_code in (402, 403)
    assert frozen.ladder is not None
    assert frozen.ladder.problems == ["a1: freeze: key not rotated: finops does not manage this agent's key"]

    bodies = _bodies(receiver)
    assert [(b["threshold"], b.get("action")) for b in bodies] == [(75, None), (90, "pause"), (100, "freeze")]

    _reset(sandbox)
    held = await checks.run()  # held: not read, nothing decided, nothing written
    assert held.events == () and held.evaluated == 0 and _writes(sandbox) == 0


async def test_a_pause_is_released_when_the_window_decays_and_caps_are_restored_exactly(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    key = _register(sandbox)
    checks = Checks(sandbox, store, _desired(receiver, tmp_path))
    assert _paid_calls(sandbox, key, 5) == [200] * 5  # 0.50 now
    sandbox.clock.advance(DAY / 2)
    assert _paid_calls(sandbox, key, 4) == [200] * 4  # 0.90 in the window: pause
    await checks.run()
    assert _caps(sandbox) == (0.9, 100)

    sandbox.clock.advance(DAY / 2 + 1)  # the first 0.50 ages out: 0.40 of the declared 1.00
    released = await checks.run()
    assert [(e.type, e.threshold, e.action) for e in released.events] == [
        (ALERT_EVENT_RECOVERED, 75, None),
        (ALERT_EVENT_RECOVERED, 90, "release"),
    ]
    assert _caps(sandbox) == (1, 100)  # exactly the declared caps
    assert [r.status for r in store.escalations()] == [RELEASED]
    assert _paid_calls(sandbox, key, 1) == [200]

    _reset(sandbox)
    assert (await checks.run()).events == ()
    assert _writes(sandbox) == 0


async def test_a_manual_pause_ratchets_down_with_the_decaying_window_until_unfreeze(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    key = _register(sandbox)
    manual = (EscalationRule(90, "daily", "pause", "manual"),)
    desired = _desired(receiver, tmp_path, manual)
    checks = Checks(sandbox, store, desired)
    _paid_calls(sandbox, key, 5)
    sandbox.clock.advance(DAY / 2)
    _paid_calls(sandbox, key, 4)
    await checks.run()
    assert _caps(sandbox) == (0.9, 100)

    sandbox.clock.advance(DAY / 2 + 1)  # 0.40 left in the window: a cap of 0.90 would let 0.50 through
    ratchet = await checks.run()
    assert ratchet.ladder is not None and ratchet.ladder.cap_writes == 1
    assert _caps(sandbox) == (0.4, 100)
    assert _paid_calls(sandbox, key, 1) == [402]
    [row] = store.escalations()
    assert (row.status, row.cap) == (ACTIVE, Decimal("0.40"))

    sandbox.clock.advance(DAY)  # everything aged out: held at 0.00, which the gateway enforces
    await checks.run()
    assert _caps(sandbox) == (0, 100)
    assert _paid_calls(sandbox, key, 1) == [402]

    async with _client(sandbox) as client:
        result = await unfreeze(client, store, None, desired.agents()[0], Decimal(1))
    assert result.ok, result.problems
    assert _caps(sandbox) == (1, 100)
    assert [r.status for r in store.escalations()] == [RELEASED]
    assert _paid_calls(sandbox, key, 1) == [200]


class _Crash(Exception):
    pass


class CrashingLadder(Ladder):
    """Dies after the decision is committed and before anything is executed."""

    async def execute(self) -> Any:
        raise _Crash


async def test_a_crash_between_decide_and_execute_is_resumed_exactly_once(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    key = _register(sandbox)
    checks = Checks(sandbox, store, _desired(receiver, tmp_path))
    _paid_calls(sandbox, key, 9)
    with pytest.raises(_Crash):
        await checks.run(CrashingLadder)
    [row] = store.escalations()
    assert row.status == PENDING and _caps(sandbox) == (1, 100)  # decided, not executed: the crash window

    resumed = await checks.run()
    assert resumed.events == ()  # the crossing was decided once; nothing is decided again
    assert resumed.ladder is not None and resumed.ladder.executed == {"pause": 1}
    assert _caps(sandbox) == (0.9, 100)
    assert _paid_calls(sandbox, key, 1) == [402]
    assert [r.status for r in store.escalations()] == [ACTIVE]

    _reset(sandbox)
    again = await checks.run()
    assert again.ladder is not None and again.ladder.executed == {} and _writes(sandbox) == 0
    assert len(store.escalations()) == 1


async def test_one_check_that_crosses_pause_and_freeze_executes_only_the_freeze(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    key = _register(sandbox)
    checks = Checks(sandbox, store, _desired(receiver, tmp_path))
    _paid_calls(sandbox, key, 10)
    result = await checks.run()
    assert [(e.threshold, e.action) for e in result.events] == [(75, None), (90, "pause"), (100, "freeze")]
    statuses = {r.action: r.status for r in store.escalations()}
    assert statuses == {"pause": SUPERSEDED, "freeze": ACTIVE}
    assert _caps(sandbox) == (0, 0)


def _client(sandbox: SandboxServer) -> GatewayClient:
    return GatewayClient(sandbox.url, sandbox.admin_key)


async def test_an_agent_raising_its_own_cap_while_paused_is_put_back_by_both_the_plan_and_the_ladder(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    """The gateway lets a capped agent raise its own cap (API.md §4): the pause is state in
    finops, so the reconcile pass plans the pause cap back and the next check writes it."""
    key = _register(sandbox)
    checks = Checks(sandbox, store, _desired(receiver, tmp_path))
    _paid_calls(sandbox, key, 9)
    await checks.run()
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        http.put("/v1/billing/wallets/a1/budget", json={"daily_cap": "50.00", "monthly_cap": None}).raise_for_status()
    assert _caps(sandbox) == (50, None)

    async with _client(sandbox) as client:
        plan = await observe_and_plan(client, checks.desired, "sandbox", store)
    [change] = [c for c in plan.changes if c.kind is ChangeKind.SET_BUDGET]
    assert change.args.wire()["daily_cap"] == "0.90" and change.args.wire()["monthly_cap"] == "100.00"
    assert "paused by the escalation ladder" in change.reason

    again = await checks.run()
    assert again.events == () and again.ladder is not None and again.ladder.cap_writes == 1
    assert _caps(sandbox) == (0.9, 100)
    assert _paid_calls(sandbox, key, 1) == [402]


async def test_a_release_never_raises_caps_beyond_what_a_person_approved(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    """A CLI check reads the manifests on disk, which may hold a revision still awaiting
    `finops approve`: restoring its higher caps waits, the pause stays."""
    key = _register(sandbox)
    desired = _desired(receiver, tmp_path)
    smaller = DesiredState(
        tuple(replace(f, agents=tuple(replace(a, daily_cap=Decimal("0.50")) for a in f.agents)) for f in desired.fleets)
    )
    store.record_approval("r1", "test", how="approve", by_key="k", by_user="u", before=None, after=exposure_of(smaller))
    checks = Checks(sandbox, store, desired)
    _paid_calls(sandbox, key, 5)
    sandbox.clock.advance(DAY / 2)
    _paid_calls(sandbox, key, 4)
    await checks.run()
    assert _caps(sandbox) == (0.9, 100)
    sandbox.clock.advance(DAY / 2 + 1)
    waiting = await checks.run()
    assert waiting.ladder is not None and "restoring its caps waits" in waiting.ladder.problems[0]
    assert not waiting.ok and _caps(sandbox) == (0.4, 100)  # ratcheted, not raised
    assert _paid_calls(sandbox, key, 1) == [402]


async def test_an_agent_that_raised_its_own_cap_first_cannot_outrun_its_ladder(
    sandbox: SandboxServer, store: StateStore, receiver: Receiver, tmp_path: Path
) -> None:
    """A laddered agent is judged against its declared caps: raising its own cap on the
    gateway beforehand does not move the crossing (judged against the live cap, 0.90 of 50.00
    would be 1.8 % and nothing would fire)."""
    key = _register(sandbox)
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        http.put("/v1/billing/wallets/a1/budget", json={"daily_cap": "50.00", "monthly_cap": None}).raise_for_status()
    checks = Checks(sandbox, store, _desired(receiver, tmp_path))
    _paid_calls(sandbox, key, 9)
    paused = await checks.run()
    assert [(e.threshold, e.action, e.cap) for e in paused.events] == [
        (75, None, Decimal("1.00")),
        (90, "pause", Decimal("1.00")),
    ]
    assert _caps(sandbox) == (0.9, 100)  # the pause also puts the declared monthly cap back
    assert _paid_calls(sandbox, key, 1) == [402]
