"""The daemon's shared observation, change feed and rolling resync, against a real sandbox.

A daemon (reconcile pass + alerts job) is stepped by hand on an injected clock; agents spend
through the sandbox's paid route with their own keys; a loopback receiver takes the alerts;
``/_sandbox/stats`` counts what each pass read."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import Any

import httpx
import pytest

from controller.daemon.command import DaemonContext
from controller.daemon.logs import configure_logging
from controller.daemon.metrics import DaemonMetrics, GatewayErrorCounter
from controller.daemon.passes import Reconciler
from controller.daemon.revisions import RevisionLog
from controller.daemon.scheduled import alerts_job, rebalance_job
from controller.daemon.scheduler import Daemon
from controller.daemon.source import DirectorySource
from controller.gateway.client import GatewayClient
from controller.io.target import Target
from controller.observation.feed import FeedSync
from controller.observation.store import Field, Freshness, ObservationStore
from controller.observation.watch import WriteWatch
from controller.state import PENDING
from tests.integration.conftest import Harness
from tests.integration.test_alerts import Receiver
from tests.integration.test_daemon import FakeClock

BUDGET = "GET /v1/billing/wallets/{agent_id}/budget"
BALANCE = "GET /v1/billing/wallets/{agent_id}/balance"
SET_BUDGET = "PUT /v1/billing/wallets/{agent_id}/budget"
LEADERBOARD = "GET /v1/billing/leaderboard"
BOTS = tuple(f"bot-{i:02d}" for i in range(1, 11))
HIDDEN = "test-11"
AGENTS = (*BOTS, HIDDEN)
INTERVAL = 60.0
PERIOD = 600.0

FLEET = """\
apiVersion: finops.greenhelix.net/v1
kind: Fleet
metadata:
  name: feed
spec:
  currency: CREDITS
  dailyBudgetTotal: "100.00"
  funding:
    perRunCeiling: "6000.00"
  alerts:
    thresholds: [75, 90, 100]
    signingSecret: {file: alert-signing.secret, generate: true}
    allowInsecure: true
    routes:
      - url: RECEIVER/hooks/{agent}/{window}/{threshold}
  keys:
    manage: true
  rebalancing:
    enabled: true
    interval: 1m
  approval:
    maxUnattendedIncrease: {dailyCaps: "100.00", monthlyCaps: "1000.00", funding: "10000.00", agents: 20}
  defaults:
    funding: {floor: "0.00", target: "0.00"}
  tiers:
    worker:
      dailyCap: "1.00"
      monthlyCap: "50.00"
  agents:
"""


@dataclass
class FeedRig:
    daemon: Daemon
    clock: FakeClock
    feed: FeedSync
    harness: Harness
    receiver: Receiver
    ctx: DaemonContext

    @property
    def store(self) -> ObservationStore:
        return self.feed.store

    async def step(self, advance: float = INTERVAL) -> dict[str, Any]:
        self.clock.advance(advance)
        ran = dict(await self.daemon.step())
        for name, result in ran.items():
            assert result.ok, f"{name}: {result.message}"
        return ran

    def key(self, agent: str) -> str:
        key = self.harness.sink.load(agent)
        assert key is not None
        return key

    def spend(self, agent: str, calls: int) -> None:
        """Paid calls (``best_match``, 0.10 each) with the agent's own key."""
        auth = {"Authorization": f"Bearer {self.key(agent)}"}
        with httpx.Client(base_url=self.harness.sandbox.url, headers=auth) as h:
            for _ in range(calls):
                h.get("/v1/marketplace/match", params={"query": "x"}).raise_for_status()

    def read_now(self, field: Field) -> set[str]:
        """The agents whose ``field`` was read at the current instant of finops' clock."""
        out = set()
        for agent in AGENTS:
            view = self.store.view(agent)
            reading = view.balance if field is Field.BALANCE else view.budget
            if reading is not None and reading.at == self.clock():
                out.add(agent)
        return out

    def alerts(self) -> list[str]:
        return [r.path for r in self.receiver.delivered]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def feed_rig(harness: Harness, receiver: Receiver, tmp_path: Path) -> Iterator[Callable[..., FeedRig]]:
    opened: list[RevisionLog] = []

    def build(*, enabled: bool = True) -> FeedRig:
        manifests = tmp_path / "feed-manifests"
        manifests.mkdir(exist_ok=True)
        agents = "".join(f"    - {{id: {a}, tier: worker}}\n" for a in AGENTS)
        (manifests / "fleet.yaml").write_text(FLEET.replace("RECEIVER", receiver.url) + agents)
        clock = FakeClock()
        metrics = DaemonMetrics()
        log = configure_logging("json", stream=io.StringIO(), secrets=[harness.sandbox.admin_key])
        revisions = RevisionLog(harness.store.path, clock=clock)
        opened.append(revisions)
        store = ObservationStore(clock)
        feed = FeedSync(store, interval_s=INTERVAL, resync_period_s=PERIOD, enabled=enabled)

        def client() -> GatewayClient:
            return harness.client(observer=WriteWatch(store, [GatewayErrorCounter(metrics.gateway_errors)]))

        reconciler = Reconciler(
            target="sandbox",
            source=DirectorySource(manifests),
            store=harness.store,
            sink=harness.sink,
            revisions=revisions,
            client_factory=client,
            clock=clock,
            log=log,
            observation=feed,
        )
        feed.authoritative = lambda: frozenset(
            [*harness.store.holds(), *(i.agent_id for i in harness.store.intents(status=PENDING))]
        ) | reconciler.failing()
        daemon = Daemon(
            reconciler, metrics=metrics, interval_s=INTERVAL, jitter_s=0, git_poll_s=30, clock=clock, rng=Random(1),
            log=log, status_file=tmp_path / "state" / "daemon-status.json",
        )  # fmt: skip
        target = Target("sandbox", harness.sandbox.url, harness.sandbox.admin_key, embedded=False, state_dir=tmp_path)
        ctx = DaemonContext(daemon, target, harness.store, harness.sink, metrics, client, clock, None, None, feed)

        async def no_backoff(seconds: float) -> None:
            pass

        async def loopback(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        job = alerts_job(ctx, now=clock, resolver=loopback, sleep=no_backoff)
        daemon.add_job("alerts", job, interval_s=INTERVAL, jitter_s=0, exclusive=False)
        return FeedRig(daemon, clock, feed, harness, receiver, ctx)

    yield build
    for revisions in opened:
        revisions.close()


def reads(stats: dict[str, Any], route: str) -> int:
    return int(stats["by_route"].get(route, 0))


async def converged(rig: FeedRig) -> None:
    """The first pass registers and caps every agent; the next one sees the feed's baseline."""
    await rig.step(0)
    await rig.step()
    assert (rig.feed.previous is not None) == rig.feed.enabled


async def test_a_spend_between_two_polls_is_seen_and_alerted_at_the_next_alerts_run(
    feed_rig: Callable[..., FeedRig],
) -> None:
    rig = feed_rig()
    await converged(rig)
    before = rig.feed.last  # the alerts job's last poll: the balances of its resync share are read next
    assert before is not None
    rig.harness.reset_stats()
    await rig.step()  # a quiet interval: the hidden agent and the resync's share only
    quiet = rig.harness.stats()
    resync = rig.feed.last
    assert resync is not None and resync.moved == frozenset({HIDDEN})
    assert len(resync.resynced) == 2  # ceil(11 agents x 60 s / 600 s)
    assert rig.read_now(Field.BUDGET) == {HIDDEN} | resync.resynced
    assert rig.read_now(Field.BALANCE) == {HIDDEN} | before.resynced
    # two polls per pass (the reconcile pass's and the alerts job's): the hidden agent is read at each
    assert reads(quiet, BUDGET) == 2 + len(resync.resynced)
    assert reads(quiet, BALANCE) == 1 + len(before.resynced)
    assert reads(quiet, LEADERBOARD) == 2 and quiet["writes"] == 0

    rig.spend("bot-04", 8)  # 0.80 of a 1.00 daily cap: past 75 %
    previous = rig.feed.last
    rig.harness.reset_stats()
    await rig.step()
    stats = rig.harness.stats()
    assert rig.alerts() == ["/hooks/bot-04/daily/75"]
    last = rig.feed.last
    assert last is not None and last.moved == frozenset({"bot-04", HIDDEN})
    assert "bot-04" in rig.read_now(Field.BUDGET) & rig.read_now(Field.BALANCE)
    unmoved = set(BOTS) - {"bot-04"} - last.resynced - previous.resynced
    assert len(unmoved) >= 3
    assert not unmoved & (rig.read_now(Field.BUDGET) | rig.read_now(Field.BALANCE))  # not moved: not read
    assert reads(stats, BUDGET) == 1 + 2 + len(last.resynced)  # bot-04 once, the hidden agent twice


async def test_a_hidden_prefix_agent_is_watched_every_interval(feed_rig: Callable[..., FeedRig]) -> None:
    rig = feed_rig()
    await converged(rig)
    for _ in range(3):
        await rig.step()
        assert HIDDEN in rig.read_now(Field.BUDGET)
    rig.spend(HIDDEN, 9)
    await rig.step()
    assert rig.alerts() == [f"/hooks/{HIDDEN}/daily/75", f"/hooks/{HIDDEN}/daily/90"]


def _raise_cap(rig: FeedRig, agent: str, key: str) -> None:
    with httpx.Client(base_url=rig.harness.sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        http.put(
            f"/v1/billing/wallets/{agent}/budget", json={"daily_cap": "500.00", "monthly_cap": "9000.00"}
        ).raise_for_status()


def _cap(rig: FeedRig, agent: str) -> Decimal:
    with rig.harness.admin() as http:
        return Decimal(str(http.get(f"/v1/billing/wallets/{agent}/budget").json()["daily_cap"]))


async def test_a_cap_raised_by_the_agent_itself_is_reverted_at_the_next_pass(
    feed_rig: Callable[..., FeedRig],
) -> None:
    """Raising its own cap is a call: the feed sees the agent move."""
    rig = feed_rig()
    await converged(rig)
    _raise_cap(rig, "bot-07", rig.key("bot-07"))
    assert _cap(rig, "bot-07") == Decimal("500")
    await rig.step()
    assert _cap(rig, "bot-07") == Decimal("1")
    assert rig.feed.last is not None and rig.feed.last.moved is not None and "bot-07" in rig.feed.last.moved


async def test_a_cap_raised_by_the_admin_is_reverted_within_the_resync_period(
    feed_rig: Callable[..., FeedRig],
) -> None:
    """An admin's change moves nobody's count: only the rolling resync sees it, within the period."""
    rig = feed_rig()
    await converged(rig)
    for agent in BOTS:  # every bot raised at once: the resync must come round to each of them
        _raise_cap(rig, agent, rig.harness.sandbox.admin_key)
    elapsed = 0.0
    reverted_at: dict[str, float] = {}
    while elapsed < PERIOD and len(reverted_at) < len(BOTS):
        await rig.step()
        elapsed += INTERVAL
        for agent in BOTS:
            if agent not in reverted_at and _cap(rig, agent) == Decimal("1"):
                reverted_at[agent] = elapsed
        assert rig.feed.last is not None and not set(BOTS) & (rig.feed.last.moved or set())
    assert set(reverted_at) == set(BOTS)
    assert max(reverted_at.values()) <= PERIOD
    assert min(reverted_at.values()) < max(reverted_at.values())  # spread over the period, not at once


async def test_a_failed_leaderboard_poll_falls_back_to_full_reads(feed_rig: Callable[..., FeedRig]) -> None:
    rig = feed_rig()
    await converged(rig)
    with rig.harness.admin() as http:
        http.post("/_sandbox/faults", json={"spec": "seed=1,rate=1,kinds=503,retry_after=0,only=/leaderboard"})
    rig.spend("bot-02", 8)
    rig.harness.reset_stats()
    clock_before = rig.clock()
    await rig.step()
    assert rig.clock() > clock_before
    last = rig.feed.last
    assert last is not None and last.moved is None and last.error is not None
    stats = rig.harness.stats()  # both polls failed: both jobs read everything, as without the feed
    assert reads(stats, BUDGET) == 2 * len(AGENTS) and reads(stats, BALANCE) == len(AGENTS)
    assert rig.read_now(Field.BUDGET) == set(AGENTS)
    assert rig.alerts() == ["/hooks/bot-02/daily/75"]
    with rig.harness.admin() as http:
        http.post("/_sandbox/faults", json={"spec": ""})
    await rig.step()  # the feed is back: the baseline kept from before the failure
    assert rig.feed.last is not None and rig.feed.last.moved is not None


async def test_without_the_feed_every_pass_reads_every_agent(feed_rig: Callable[..., FeedRig]) -> None:
    """``--no-change-feed``: today's design, the comparison the benchmark prints."""
    rig = feed_rig(enabled=False)
    await converged(rig)
    rig.harness.reset_stats()
    await rig.step()
    stats = rig.harness.stats()
    assert reads(stats, LEADERBOARD) == 0  # the pass reads balance and budget, the alerts job every budget again
    assert reads(stats, BUDGET) == 2 * len(AGENTS) and reads(stats, BALANCE) == len(AGENTS)


async def test_a_write_finops_makes_invalidates_the_agent_and_a_read_in_flight_is_not_kept(
    harness: Harness,
) -> None:
    """The write watch sits in the client: the write's answer marks the agent stale; a read
    that overlapped it (answered after the invalidation) is dropped, not kept as fresh."""
    clock = FakeClock()
    store = ObservationStore(clock)
    async with harness.client() as admin:
        await admin.register("bot-99")
    need = Freshness(balance=1e9, budget=1e9)
    async with harness.client(observer=WriteWatch(store)) as client:
        first = await store.ensure(client, ["bot-99"], need)
        assert first.read == {"bot-99": frozenset(Field)} and not first.errors
        assert (await store.ensure(client, ["bot-99"], need)).requests == 0  # fresh: nothing read
        await client.set_budget("bot-99", daily_cap=Decimal("2.00"), monthly_cap=None, alert_threshold=Decimal("0.8"))
        again = await store.ensure(client, ["bot-99"], need)
        assert again.read == {"bot-99": frozenset(Field)}
        view = store.view("bot-99")
        assert view.budget is not None and view.budget.value.daily_cap == Decimal("2.00")

        generation = store.generation("bot-99")
        store.mark_stale(["bot-99"], [Field.BUDGET])
        original = client.get_budget

        async def write_lands_meanwhile(agent_id: str) -> Any:
            answer = await original(agent_id)
            store.invalidate(agent_id)  # as the watch does when a concurrent write's answer arrives
            return answer

        client.get_budget = write_lands_meanwhile  # type: ignore[method-assign]
        await store.ensure(client, ["bot-99"], need)
        assert store.generation("bot-99") == generation + 1
        assert store.due("bot-99", need, clock()) == frozenset(Field)  # not kept: read again next time


async def test_an_unreadable_agent_is_isolated_and_authoritative_agents_are_always_read(harness: Harness) -> None:
    clock = FakeClock()
    store = ObservationStore(clock)
    async with harness.client() as admin:
        await admin.register("bot-98")
    need = Freshness(budget=1e9)
    with harness.admin() as http:
        http.post("/_sandbox/faults", json={"spec": "seed=1,rate=1,kinds=503,retry_after=0,only=bot-97"})
    async with harness.client(max_attempts=2) as client:
        done = await store.ensure(client, ["bot-97", "bot-98"], need)
        assert set(done.errors) == {"bot-97"} and "bot-98" in done.read
        assert store.view("bot-98").budget is not None
        assert (await store.ensure(client, ["bot-98"], need)).requests == 0
        assert (await store.ensure(client, ["bot-98"], need, authoritative={"bot-98"})).requests == 1
        assert (await store.ensure(client, ["bot-98"], need, authoritative={"bot-98"})).requests == 1
        # released from the authoritative set: read once more, then fresh again
        assert (await store.ensure(client, ["bot-98"], need)).requests == 1
        assert (await store.ensure(client, ["bot-98"], need)).requests == 0


def test_stats_routes_are_the_sandbox_templates(harness: Harness) -> None:
    """The route labels this file counts by are the sandbox's (a rename would zero them)."""
    with harness.admin() as http:
        http.get("/v1/billing/wallets/nobody/budget")
        stats = http.get("/_sandbox/stats").json()
    assert BUDGET in stats["by_route"], json.dumps(stats)


async def test_spend_through_batch_moves_the_feed_too(feed_rig: Callable[..., FeedRig]) -> None:
    """``/v1/batch`` skips the budget check (API.md §8.2) but records usage per call: the
    agent moves on the leaderboard and its crossing is alerted at the next run."""
    rig = feed_rig()
    await converged(rig)
    calls = [{"tool": "best_match", "params": {"query": "x"}}] * 9
    auth = {"Authorization": f"Bearer {rig.key('bot-05')}"}
    with httpx.Client(base_url=rig.harness.sandbox.url, headers=auth) as http:
        answer = http.post("/v1/batch", json={"calls": calls}).raise_for_status().json()
    assert all(r["success"] for r in answer["results"])
    await rig.step()
    assert rig.feed.last is not None and rig.feed.last.moved is not None and "bot-05" in rig.feed.last.moved
    assert rig.alerts() == ["/hooks/bot-05/daily/75", "/hooks/bot-05/daily/90"]


async def test_money_moved_without_usage_is_seen_within_the_resync_period(feed_rig: Callable[..., FeedRig]) -> None:
    """An admin's deposit is no call of the agent's: the feed cannot see it, the resync does."""
    rig = feed_rig()
    await converged(rig)
    with rig.harness.admin() as http:
        for agent in BOTS:
            http.post(f"/v1/billing/wallets/{agent}/deposit", json={"amount": "3.00"}).raise_for_status()
        actual = {a: Decimal(http.get(f"/v1/billing/wallets/{a}/balance").json()["balance"]) for a in BOTS}
    seen_at: dict[str, float] = {}
    elapsed = 0.0
    while elapsed < PERIOD and len(seen_at) < len(BOTS):
        await rig.step()
        elapsed += INTERVAL
        for agent in BOTS:
            view = rig.store.view(agent)
            if agent not in seen_at and view.balance is not None and view.balance.value == actual[agent]:
                seen_at[agent] = elapsed
    assert set(seen_at) == set(BOTS) and max(seen_at.values()) <= PERIOD


async def test_rebalancing_reads_spend_through_the_shared_store(feed_rig: Callable[..., FeedRig]) -> None:
    """The rebalance job decides from the store: a busy agent gets budget from idle ones,
    and the job reads no budget the feed and the resync did not mark stale."""
    rig = feed_rig()
    rig.daemon.add_job("rebalance", rebalance_job(rig.ctx, now=rig.clock), interval_s=INTERVAL, jitter_s=0)
    await converged(rig)
    before = {a: _cap(rig, a) for a in AGENTS}
    rig.spend("bot-06", 9)  # 90 %: a receiver; every other agent is idle (a donor)
    rig.harness.reset_stats()
    await rig.step()
    stats = rig.harness.stats()
    after = {a: _cap(rig, a) for a in AGENTS}
    assert after["bot-06"] > before["bot-06"]
    assert sum(after.values()) == sum(before.values())
    last = rig.feed.last
    assert last is not None and last.moved == frozenset({"bot-06", HIDDEN})
    assert reads(stats, BUDGET) == len(last.moved | last.resynced) + 1  # the hidden agent at both polls
    assert reads(stats, SET_BUDGET) == sum(1 for a in AGENTS if after[a] != before[a])
    for agent in AGENTS:  # what rebalancing wrote is not trusted from memory: read again
        if after[agent] != before[agent]:
            assert rig.store.due(agent, Freshness(budget=1e9), rig.clock()) == {Field.BUDGET}


async def test_the_alerts_job_gets_every_agent_moved_since_its_own_last_poll(harness: Harness) -> None:
    """Another job's poll in between does not hide a move from the owner (what ``moved``
    passes on to the jobs that follow the alerts run)."""
    clock = FakeClock()
    feed = FeedSync(ObservationStore(clock), interval_s=INTERVAL, resync_period_s=PERIOD)
    agents = ["bot-a", "bot-b", "bot-c"]
    async with harness.client() as client:
        for agent in agents:
            await client.register(agent)
        first = await feed.sync(client, agents, owner=True)
        assert first.moved is None  # no baseline yet: anything may have moved
        assert (await feed.sync(client, agents, owner=True)).moved == frozenset()
        harness.spend("bot-a", Decimal("0.10"))
        clock.advance(INTERVAL / 2)
        other = await feed.sync(client, agents)  # the reconcile pass, half an interval later
        assert other.polled and other.moved == frozenset({"bot-a"})
        harness.spend("bot-b", Decimal("0.10"))
        clock.advance(1)
        assert not (await feed.sync(client, agents)).polled  # polled a second ago: not again
        owner = await feed.sync(client, agents, owner=True)
        assert owner.moved == frozenset({"bot-a", "bot-b"})
        assert (await feed.sync(client, agents, owner=True)).moved == frozenset()
