"""Issue 9, item 1: requests that run on the gateway *after* finops gave up on them.

The sandbox's ``late`` fault holds a request at a gate (``FaultInjector.gate_late``) until
the test lets it run or drops it, so *when* it lands is the test's decision, not a timer's.
finops' own clock is injected (``FinopsClock``) to cross the settle time without sleeping.

What must hold (``policies.settle``, ``policies.funding``):
- one funding decision keeps one deposit key whatever the ledger does meanwhile (the
  signup bonus landing, spend), so two attempts of it can never both land;
- an unresolved deposit, registration or webhook create is resolved from the gateway
  before any new one of its kind for that agent, and "never landed" is concluded only
  after the settle time, by a fresh look;
- a finops-marked webhook finops has no record of is recognised as finops' own, and a
  duplicate is removed;
- a newly registered agent never stays uncapped: if its caps cannot be set it is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.daemon.passes import Reconciler
from controller.daemon.revisions import RevisionLog
from controller.daemon.source import DirectorySource
from controller.keys.rotate import KeyManager
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.apply import AUTO_HOLD_REASON
from controller.reconcile.status import fleet_status
from controller.sandbox.faults import FaultConfig, FaultKind
from controller.sandbox.server import ADMIN_AGENT_ID, SandboxServer
from controller.sandbox.store import from_atomic
from controller.state import PENDING, StateStore
from policies.plan_types import WEBHOOK_MARKER_PREFIX, ChangeKind
from policies.spec import DesiredState
from tests.integration.conftest import CANONICAL, FinopsClock
from tests.integration.test_faults import (
    FINOPS_DEPOSIT_PREFIX,
    FastHarness,
    assert_converged,
    finops_deposits,
    lost_keys,
)

AGENTS = ("late-a", "late-b")
TARGET = Decimal("2000.00")  # 20.00 USD at 100 credits per USD


def write_repro_fleet(directory: Path) -> DesiredState:
    """The issue's repro: a USD fleet, per-run ceiling 1000, floor 10 / target 20, two new agents.
    Its approval bound lets the daemon apply it unattended: these tests are about outcomes,
    not exposure review (tests/integration/test_exposure.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "late.yaml").write_text(
        "\n".join(
            [
                "apiVersion: finops.greenhelix.net/v1",
                "kind: Fleet",
                "metadata: {name: late}",
                "spec:",
                "  currency: USD",
                '  dailyBudgetTotal: "100.00"',
                '  funding: {perRunCeiling: "1000.00"}',
                "  approval:",
                "    maxUnattendedIncrease:",
                '      {dailyCaps: "1000.00", monthlyCaps: "10000.00", funding: "10000.00", agents: 10}',
                '  defaults: {funding: {floor: "10.00", target: "20.00"}}',
                "  tiers:",
                '    worker: {dailyCap: "5.00", monthlyCap: "100.00"}',
                "  agents:",
                *(f"    - {{id: {a}, tier: worker}}" for a in AGENTS),
                "",
            ]
        ),
        encoding="utf-8",
    )
    return load_manifests(directory)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Callable[[str], FastHarness]]:
    """A harness whose sandbox holds every ``late`` request matching ``only`` at the gate."""
    opened: list[tuple[SandboxServer, StateStore]] = []

    def make(only: str) -> FastHarness:
        n = len(opened)
        sandbox = SandboxServer(
            db_path=tmp_path / f"gateway-{n}.db",
            faults=FaultConfig(rate=1.0, kinds=(FaultKind.LATE,), hang=60, only=(only,)),
        ).start()
        sandbox.faults.gate_late(True)
        state = StateStore(tmp_path / f"state-{n}" / "state.db")
        opened.append((sandbox, state))
        return FastHarness(sandbox, state, KeyVault(tmp_path / f"secrets-{n}"))

    yield make
    for sandbox, _state in opened:
        sandbox.faults.release_late(run=False)
    for sandbox, state in opened:
        state.close()
        sandbox.stop()


def clock(harness: FastHarness) -> FinopsClock:
    assert isinstance(harness.clock, FinopsClock)
    return harness.clock


def balance(harness: FastHarness, agent: str) -> Decimal:
    wallet = harness.sandbox.store.get_wallet(agent)
    assert wallet is not None
    return from_atomic(wallet.balance)


def finops_keys(harness: FastHarness, agent: str) -> list[str]:
    rows = harness.sandbox.store.list_transactions(agent, limit=1000, offset=0)
    return [
        r.idempotency_key for r in rows if r.idempotency_key and r.idempotency_key.startswith(FINOPS_DEPOSIT_PREFIX)
    ]


def settle(harness: FastHarness, *, run: bool) -> int:
    """Let the held requests run (or drop them), and wait until the sandbox is done."""
    released = harness.sandbox.faults.release_late(run=run)
    harness.sandbox.wait_idle(timeout=30)
    return released


async def wait_held(harness: FastHarness, count: int) -> None:
    for _ in range(2000):
        if len(harness.sandbox.faults.held_late()) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"expected {count} held requests, got {harness.sandbox.faults.held_late()}")


# --------------------------------------------------------------------------- deposits


async def test_the_issue_repro_a_late_deposit_is_never_made_twice(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    """apply (times out) → apply again → the late deposits land → apply: 2000.00, not 3500.00."""
    desired = write_repro_fleet(tmp_path / "m")
    harness = gated("/deposit")
    first_plan = await harness.plan(desired)
    keys = {c.agent_id: c.args.idempotency_key for c in first_plan.changes if c.kind is ChangeKind.TOP_UP}
    first = await harness.apply(first_plan)
    await wait_held(harness, 2)
    assert all(a.error and "deposit" in a.error for a in first.agents), first.to_dict()
    assert {i.agent_id for i in harness.store.intents(status=PENDING, kind="deposit")} == set(AGENTS)

    clock(harness).advance(30)  # the repro's second apply, well inside the settle time
    second_plan = await harness.plan(desired)
    assert not [c for c in second_plan.changes if c.kind is ChangeKind.TOP_UP]
    assert {(b.agent_id, b.kind) for b in second_plan.blocked} == {(a, ChangeKind.TOP_UP) for a in AGENTS}
    second = await harness.apply(second_plan)
    assert second.writes == 0 and len(harness.sandbox.faults.held_late()) == 2  # nothing new sent
    async with harness.client() as client:  # `finops status` says so too
        manager = KeyManager(client, harness.store, harness.sink, state_path=harness.store.path)
        try:
            status = await fleet_status(client, desired, harness.store, manager, target="sandbox")
        finally:
            manager.close()
    assert all(any(f.startswith("UNKNOWN OUTCOME: a top_up") for f in row.flags) for row in status.agents)

    assert settle(harness, run=True) == 2  # the held deposits land, after finops gave up on them
    harness.sandbox.faults.configure(None)
    clock(harness).advance(30)
    third = await harness.plan(desired)  # resolves the intents from the ledger first
    assert third.empty and not third.blocked, third
    assert any("had landed" in note for note in harness.notes)
    for agent in AGENTS:
        assert balance(harness, agent) == TARGET
        assert finops_keys(harness, agent) == [keys[agent]]
    await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)


async def test_a_late_deposit_proven_lost_after_the_settle_time_is_made_once_with_the_same_key(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    desired = write_repro_fleet(tmp_path / "m")
    harness = gated("/deposit")
    keys = {
        c.agent_id: c.args.idempotency_key
        for c in (await harness.plan(desired)).changes
        if getattr(c.args, "idempotency_key", None)
    }
    await harness.apply(await harness.plan(desired))
    await wait_held(harness, 2)
    assert settle(harness, run=False) == 2  # lost in the queue: never reaches the ledger
    harness.sandbox.faults.configure(None)

    # The ledger is empty, but that proves nothing before the settle time.
    clock(harness).advance(599)
    plan = await harness.plan(desired)
    assert not [c for c in plan.changes if c.kind is ChangeKind.TOP_UP] and len(plan.blocked) == 2
    assert (await harness.apply(plan)).writes == 0

    clock(harness).advance(2)  # past the settle time: a fresh look still finds nothing
    plan = await harness.plan(desired)
    assert any("never landed" in note for note in harness.notes)
    retried = {c.agent_id: c.args.idempotency_key for c in plan.changes if c.kind is ChangeKind.TOP_UP}
    assert retried == keys  # one decision, one key, whatever the ledger did (the bonus landed)
    assert (await harness.apply(plan)).ok
    for agent in AGENTS:
        assert balance(harness, agent) == TARGET and finops_keys(harness, agent) == [keys[agent]]


async def test_even_a_deposit_landing_after_the_settle_time_cannot_fund_twice(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    """Defence in depth: were the settle time too short (a request held longer than it),
    the re-sent deposit carries the same key, so the late original moves no money."""
    desired = write_repro_fleet(tmp_path / "m")
    harness = gated("/deposit")
    await harness.apply(await harness.plan(desired))
    await wait_held(harness, 2)
    clock(harness).past_settle()  # the assumption broken on purpose: still held, yet "settled"
    harness.sandbox.faults.configure(None)  # the gate keeps the two it holds
    result = await harness.apply(await harness.plan(desired))
    assert result.ok and all(balance(harness, a) == TARGET for a in AGENTS)
    assert settle(harness, run=True) == 2  # the originals run now, with the same keys
    for agent in AGENTS:
        assert balance(harness, agent) == TARGET
        assert len(finops_keys(harness, agent)) == 1


# --------------------------------------------------------------------------- register


async def test_a_late_registration_is_not_repeated_and_its_agent_is_capped_and_funded(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    desired = write_repro_fleet(tmp_path / "m")
    harness = gated("/v1/register")
    first = await harness.apply(await harness.plan(desired))
    await wait_held(harness, 2)
    assert all(a.error and "not registered again" in a.error for a in first.agents), first.to_dict()

    clock(harness).advance(60)
    plan = await harness.plan(desired)
    assert plan.empty and {(b.agent_id, b.kind) for b in plan.blocked} == {(a, ChangeKind.REGISTER) for a in AGENTS}
    assert (await harness.apply(plan)).writes == 0 and len(harness.sandbox.faults.held_late()) == 2

    settle(harness, run=True)  # the registrations land; their keys go nowhere
    harness.sandbox.faults.configure(None)
    plan = await harness.plan(desired)
    assert sum("LOST KEY" in n for n in harness.notes) == 2
    kinds = {(c.agent_id, c.kind) for c in plan.changes}
    assert kinds == {(a, k) for a in AGENTS for k in (ChangeKind.SET_BUDGET, ChangeKind.TOP_UP)}  # capped, funded
    assert (await harness.apply(plan)).ok
    convergence = await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)
    assert convergence.lost_keys == set(AGENTS)
    assert {i.agent_id for i in harness.store.intents(kind="register", status="failed")} == set(AGENTS)


async def test_a_late_registration_proven_lost_is_made_again_and_its_key_held(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    desired = write_repro_fleet(tmp_path / "m")
    harness = gated("/v1/register")
    await harness.apply(await harness.plan(desired))
    await wait_held(harness, 2)
    settle(harness, run=False)
    harness.sandbox.faults.configure(None)
    assert (await harness.plan(desired)).empty  # not settled: nothing registered again yet
    clock(harness).past_settle()
    plan = await harness.plan(desired)
    assert [c.kind for c in plan.changes].count(ChangeKind.REGISTER) == 2
    assert (await harness.apply(plan)).ok
    convergence = await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)
    assert convergence.lost_keys == set()
    assert all(harness.sink.load(a) is not None for a in AGENTS)


# --------------------------------------------------------------------------- webhooks


def marked_hooks(harness: FastHarness) -> list[Any]:
    return [
        h
        for h in harness.sandbox.store.list_webhooks(ADMIN_AGENT_ID)
        if any(e.startswith(WEBHOOK_MARKER_PREFIX) for e in h.event_types)
    ]


async def test_a_late_webhook_create_is_not_repeated_before_it_settles(gated: Callable[[str], FastHarness]) -> None:
    canonical = load_manifests(CANONICAL)
    declared = {a.agent_id for a in canonical.agents() if a.gateway_webhooks}
    harness = gated("POST /v1/infra/webhooks")
    await harness.apply(await harness.plan(canonical))
    await wait_held(harness, len(declared))
    clock(harness).advance(60)
    plan = await harness.plan(canonical)
    assert not [c for c in plan.changes if c.kind is ChangeKind.CREATE_WEBHOOK]
    assert {b.agent_id for b in plan.blocked if b.kind is ChangeKind.CREATE_WEBHOOK} == declared
    await harness.apply(plan)
    assert len(harness.sandbox.faults.held_late()) == len(declared)  # no second create was sent
    settle(harness, run=True)
    harness.sandbox.faults.configure(None)
    plan = await harness.plan(canonical)
    assert plan.empty and not plan.blocked, plan
    assert sorted(h.filter_agent_ids[0] for h in marked_hooks(harness)) == sorted(declared)
    assert {h.id for h in marked_hooks(harness)} == set(harness.store.managed_webhooks())


async def test_a_duplicate_left_by_a_late_create_is_recognised_and_removed(gated: Callable[[str], FastHarness]) -> None:
    """The settle time broken on purpose: finops creates again, then the late one lands.
    The second finops-marked webhook for the agent is finops' own and is deleted."""
    canonical = load_manifests(CANONICAL)
    declared = {a.agent_id for a in canonical.agents() if a.gateway_webhooks}
    harness = gated("POST /v1/infra/webhooks")
    await harness.apply(await harness.plan(canonical))
    await wait_held(harness, len(declared))
    clock(harness).past_settle()
    harness.sandbox.faults.configure(None)
    assert (await harness.apply(await harness.plan(canonical))).ok  # creates them again
    settle(harness, run=True)  # ...and the originals land too: two per agent
    assert len(marked_hooks(harness)) == 2 * len(declared)
    plan = await harness.plan(canonical)
    deletes = [c for c in plan.changes if c.kind is ChangeKind.DELETE_WEBHOOK]
    assert sorted(c.agent_id for c in deletes) == sorted(declared) and len(plan.changes) == len(deletes)
    assert (await harness.apply(plan)).ok
    hooks = marked_hooks(harness)
    assert sorted(h.filter_agent_ids[0] for h in hooks) == sorted(declared)
    assert {h.id for h in hooks} == set(harness.store.managed_webhooks())
    assert (await harness.plan(canonical)).empty


async def test_only_provably_finops_webhooks_are_adopted(gated: Callable[[str], FastHarness]) -> None:
    """A marked webhook for one declared agent is finops' (adopted, then a duplicate is
    deleted); unmarked ones, ones for two agents, or for an undeclared agent stay alone."""
    canonical = load_manifests(CANONICAL)
    harness = gated("/never-faulted")
    assert (await harness.apply(await harness.plan(canonical))).ok
    fleet = next(a.fleet for a in canonical.agents() if a.agent_id == "res-01")
    url = "https://hooks.example.net/extra"
    with harness.admin() as admin:

        def create(events: list[str], agents: list[str]) -> str:
            body = {"url": url, "event_types": events, "secret": "s" * 32, "filter_agent_ids": agents}
            response = admin.post("/v1/infra/webhooks", json=body)
            response.raise_for_status()
            return str(response.json()["id"])

        duplicate = create(["billing.deposit", f"{WEBHOOK_MARKER_PREFIX}{fleet}"], ["res-01"])
        foreign = [
            create(["billing.deposit"], ["res-01"]),
            create([f"{WEBHOOK_MARKER_PREFIX}{fleet}"], ["res-01", "res-02"]),
            create([f"{WEBHOOK_MARKER_PREFIX}{fleet}"], ["nobody-declared"]),
            create([f"{WEBHOOK_MARKER_PREFIX}other-fleet"], ["res-01"]),
        ]
    plan = await harness.plan(canonical)
    deletes = [(c.kind, getattr(c.args, "webhook_id", None)) for c in plan.changes]
    assert deletes == [(ChangeKind.DELETE_WEBHOOK, duplicate)]
    assert (
        any(duplicate in w and "adopted" in w for w in plan.warnings) or duplicate in harness.store.managed_webhooks()
    )
    assert (await harness.apply(plan)).ok
    left = {h.id for h in harness.sandbox.store.list_webhooks(ADMIN_AGENT_ID)}
    assert duplicate not in left and set(foreign) <= left
    assert not set(foreign) & set(harness.store.managed_webhooks())
    assert (await harness.plan(canonical)).empty


# --------------------------------------------------------------------------- never uncapped


async def test_a_new_agent_whose_caps_cannot_be_set_is_held_unfunded_then_capped_and_released(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    desired = write_repro_fleet(tmp_path / "m")
    harness = gated("/never-faulted")
    harness.sandbox.faults.configure(FaultConfig(rate=1.0, kinds=(FaultKind.S503,), only=("/budget",)))
    result = await harness.apply(await harness.plan(desired))
    assert all(a.error and "HELD" in a.error for a in result.agents), result.to_dict()
    holds = harness.store.holds()
    assert {a: (h.auto, h.reason) for a, h in holds.items()} == {a: (True, AUTO_HOLD_REASON) for a in AGENTS}
    assert all(finops_deposits(harness.sandbox, a) == 0 for a in AGENTS)  # no money before caps

    harness.sandbox.faults.configure(None)
    plan = await harness.plan(desired)
    assert {(c.agent_id, c.kind) for c in plan.changes} == {(a, ChangeKind.SET_BUDGET) for a in AGENTS}
    assert {h.agent_id for h in plan.held if h.auto} == set(AGENTS)
    assert (await harness.apply(plan)).ok
    assert harness.store.holds() == {}
    assert (await harness.apply(await harness.plan(desired))).ok  # now funded
    await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)


def test_an_automatic_hold_never_replaces_or_lifts_an_operators(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    try:
        store.set_hold("a", "operator: incident 7")
        store.set_hold("a", AUTO_HOLD_REASON, auto=True)
        assert not store.clear_auto_hold("a")
        assert store.holds()["a"].reason == "operator: incident 7" and not store.holds()["a"].auto
        store.set_hold("b", AUTO_HOLD_REASON, auto=True)
        store.set_hold("b", "operator: freeze")  # an operator's freeze takes over
        assert not store.clear_auto_hold("b") and not store.holds()["b"].auto
    finally:
        store.close()


# --------------------------------------------------------------------------- the daemon path


async def test_the_daemon_obeys_the_same_rule_for_a_late_deposit(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    """The repro with ``finops run``: passes every 60 s while the deposits are held."""
    manifests = tmp_path / "m"
    desired = write_repro_fleet(manifests)
    harness = gated("/deposit")
    now = FinopsClock()
    revisions = RevisionLog(harness.store.path, clock=now)

    def client() -> Any:
        return harness.client(transport=httpx.AsyncHTTPTransport())

    daemon = Reconciler(
        target="sandbox",
        source=DirectorySource(manifests),
        store=harness.store,
        sink=harness.sink,
        revisions=revisions,
        client_factory=client,
        clock=now,
    )
    try:
        first = await daemon.run()
        await wait_held(harness, 2)
        assert set(first.failed_agents) == set(AGENTS)
        for _ in range(3):  # later passes, inside the settle time: nothing sent again
            now.advance(60)
            daemon.backoff = type(daemon.backoff)()  # no backoff: the rule must hold on its own
            await daemon.run()
        assert len(harness.sandbox.faults.held_late()) == 2
        assert all(finops_deposits(harness.sandbox, a) == 0 for a in AGENTS)
        settle(harness, run=True)
        harness.sandbox.faults.configure(None)
        now.advance(60)
        await daemon.run()
        for agent in AGENTS:
            assert balance(harness, agent) == TARGET and finops_deposits(harness.sandbox, agent) == 1
        assert not harness.store.intents(status=PENDING)
        await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)
    finally:
        revisions.close()


def test_lost_keys_helper_sees_no_loss_on_a_clean_fleet(tmp_path: Path) -> None:
    """``lost_keys`` (used above) must be able to say "none": a sanity check of the checker."""
    with SandboxServer(db_path=tmp_path / "g.db") as sandbox:
        desired = write_repro_fleet(tmp_path / "m")
        harness = FastHarness(sandbox, StateStore(tmp_path / "s.db"), KeyVault(tmp_path / "k"))
        try:
            assert asyncio.run(harness.apply(asyncio.run(harness.plan(desired)))).ok
            assert lost_keys(sandbox, harness.sink, desired) == set()
        finally:
            harness.store.close()
