"""Issue 11, item 6: ``finops status`` detects what finops cannot prevent, against the sandbox
as a real HTTP server: two finops with separate state directories funding one agent (and a
real double funding), a deposit someone else made, a duplicate finops-marked webhook, an
intent a crash left unresolved; and a clean converged fleet shows none of it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from controller.keys.rotate import KeyManager
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.status import FleetStatus, fleet_status, render_status
from controller.sandbox.faults import FaultConfig, FaultKind
from controller.sandbox.server import SandboxServer
from controller.sandbox.store import from_atomic
from controller.state import PENDING, StateStore
from policies.currency import to_credits
from policies.detect import (
    DepositOrigin,
    DuplicateWebhooks,
    FindingKind,
    NotChecked,
    UnexplainedBalance,
    UnrecognisedDeposit,
    UnresolvedIntent,
)
from policies.funding import deposit_idempotency_key
from policies.money import format_money
from policies.plan_types import ChangeKind, webhook_marker
from policies.spec import DesiredState
from tests.integration.conftest import FinopsClock, Harness, run_cli
from tests.integration.test_faults import FastHarness
from tests.integration.test_late_outcomes import AGENTS as LATE_AGENTS
from tests.integration.test_late_outcomes import gated as gated  # the fixture
from tests.integration.test_late_outcomes import settle, wait_held, write_repro_fleet

FLEET = "detect"
AGENTS = ("det-a", "det-b")
RATE = Decimal(100)  # the sandbox's credits per USD
FLOOR, TARGET = Decimal("1000.00"), Decimal("2000.00")  # 10 / 20 USD in credits


def write_fleet(directory: Path, agents: tuple[str, ...] = AGENTS) -> DesiredState:
    """Two agents, floor 10 / target 20 USD, caps well above the spend these tests make."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "detect.yaml").write_text(
        "\n".join(
            [
                "apiVersion: finops.greenhelix.net/v1",
                "kind: Fleet",
                f"metadata: {{name: {FLEET}}}",
                "spec:",
                "  currency: USD",
                '  dailyBudgetTotal: "200.00"',
                '  funding: {perRunCeiling: "1000.00"}',
                "  approval:",
                "    maxUnattendedIncrease:",
                '      {dailyCaps: "1000.00", monthlyCaps: "10000.00", funding: "10000.00", agents: 10}',
                '  defaults: {funding: {floor: "10.00", target: "20.00"}}',
                "  tiers:",
                '    worker: {dailyCap: "100.00", monthlyCap: "1000.00"}',
                "  agents:",
                *(f"    - {{id: {a}, tier: worker}}" for a in agents),
                "",
            ]
        ),
        encoding="utf-8",
    )
    return load_manifests(directory)


def other_finops(h: Harness, where: Path) -> Harness:
    """A second finops on the same gateway with its own state directory."""
    return Harness(h.sandbox, StateStore(where / "state-sandbox.db"), KeyVault(where / "secrets"), clock=FinopsClock())


async def status_of(h: Harness, desired: DesiredState) -> FleetStatus:
    async with h.client() as client:
        keys = KeyManager(client, h.store, h.sink, state_path=h.store.path)
        try:
            return await fleet_status(client, desired, h.store, keys, target="sandbox")
        finally:
            keys.close()


def findings(status: FleetStatus, agent: str) -> list[object]:
    return list(next(a for a in status.agents if a.agent_id == agent).findings)


def balance(h: Harness, agent: str) -> Decimal:
    wallet = h.sandbox.store.get_wallet(agent)
    assert wallet is not None
    return from_atomic(wallet.balance)


def admin_deposit(h: Harness, agent: str, amount: Decimal, key: str | None) -> int:
    headers = {"Idempotency-Key": key} if key else {}
    with h.admin() as http:
        r = http.post(f"/v1/billing/wallets/{agent}/deposit", json={"amount": str(amount)}, headers=headers)
        r.raise_for_status()
        return int(r.json()["transaction_id"])


async def converge(h: Harness, desired: DesiredState) -> None:
    result = await h.apply(await h.plan(desired))
    assert result.ok, result.to_dict()
    assert (await h.plan(desired)).empty


async def top_up_again(h: Harness, desired: DesiredState, agent: str) -> int:
    """Spend the agent below its floor and let ``h`` top it up: the id of that deposit."""
    h.spend(agent, balance(h, agent) - FLOOR + Decimal("1.00"))
    plan = await h.plan(desired)
    assert [c.kind for c in plan.changes if c.agent_id == agent] == [ChangeKind.TOP_UP]
    assert (await h.apply(plan)).ok
    assert balance(h, agent) == TARGET
    rows = h.sandbox.store.list_transactions(agent, limit=1, offset=0)
    return rows[0].id


# --------------------------------------------------------------------------- clean


async def test_a_clean_converged_fleet_has_no_findings(harness: Harness, tmp_path: Path) -> None:
    desired = write_fleet(tmp_path / "m")
    await converge(harness, desired)
    await top_up_again(harness, desired, "det-a")  # finops' own second deposit: still clean
    harness.reset_stats()
    status = await status_of(harness, desired)
    assert all(a.findings == [] for a in status.agents), [a.to_dict() for a in status.agents]
    assert status.findings == []
    assert harness.stats()["writes"] == 0  # status reads only
    # One ledger read per agent (each fits one page), one webhook listing for the fleet.
    by_route = harness.stats()["by_route"]
    ledger_reads = sum(n for route, n in by_route.items() if route.endswith("/transactions"))
    assert ledger_reads == len(AGENTS), by_route
    # An agent below its floor: observation reads its ledger for the top-up, detection
    # reuses that read (still one ledger read per agent).
    harness.spend("det-b", balance(harness, "det-b") - FLOOR + Decimal("1.00"))
    harness.reset_stats()
    assert all(a.findings == [] for a in (await status_of(harness, desired)).agents)
    by_route = harness.stats()["by_route"]
    assert sum(n for route, n in by_route.items() if route.endswith("/transactions")) == len(AGENTS), by_route
    # A fresh state (a CI runner) sees finops' deposits by their key shape: nothing either.
    fresh = other_finops(harness, tmp_path / "fresh")
    try:
        assert all(a.findings == [] for a in (await status_of(fresh, desired)).agents)
    finally:
        fresh.store.close()


def test_cli_status_strict_exits_zero_on_a_clean_canonical_fleet_and_one_on_a_foreign_deposit(
    tmp_path: Path, manifests_dir: Path
) -> None:
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        env = {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}
        state = ["--state-dir", str(tmp_path / "A")]
        applied = run_cli(tmp_path, "apply", str(manifests_dir), "--auto-approve", *state, env=env)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        clean = run_cli(tmp_path, "status", str(manifests_dir), "--strict", *state, env=env)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "all clear" in clean.stdout
        as_json = json.loads(
            run_cli(tmp_path, "status", str(manifests_dir), "--format", "json", *state, env=env).stdout
        )
        assert as_json["findings"] == [] and all(a["findings"] == [] for a in as_json["agents"])

        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
            http.post(
                "/v1/billing/wallets/res-01/deposit",
                json={"amount": "150.00"},
                headers={"Idempotency-Key": "someone-elses-key-0001"},
            ).raise_for_status()
        flagged = run_cli(tmp_path, "status", str(manifests_dir), "--strict", *state, env=env)
        assert flagged.returncode == 1, flagged.stdout + flagged.stderr
        assert "DEPOSIT NOT BY FINOPS: 150.00 credits (1.50 USD)" in flagged.stdout
        assert "BALANCE ABOVE TARGET" in flagged.stdout
        assert "someone-elses-key" not in flagged.stdout  # a foreign key is never echoed
        data = json.loads(run_cli(tmp_path, "status", str(manifests_dir), "--format", "json", *state, env=env).stdout)
        [res01] = [a for a in data["agents"] if a["agent_id"] == "res-01"]
        kinds = {f["kind"] for f in res01["findings"]}
        assert kinds == {FindingKind.DEPOSIT_NOT_BY_FINOPS.value, FindingKind.UNEXPLAINED_BALANCE.value}
        [deposit] = [f for f in res01["findings"] if f["kind"] == FindingKind.DEPOSIT_NOT_BY_FINOPS.value]
        assert deposit["origin"] == "foreign" and deposit["amount_credits"] == "150.00" and deposit["amount"] == "1.50"
        [excess] = [f for f in res01["findings"] if f["kind"] == FindingKind.UNEXPLAINED_BALANCE.value]
        assert excess["unexplained_credits"] == "150.00" and excess["unexplained"] == "1.50"
        assert "res-01" in data["flagged"]


# --------------------------------------------------------------------------- deposits


async def test_two_finops_with_separate_states_each_flag_the_others_deposit(harness: Harness, tmp_path: Path) -> None:
    desired = write_fleet(tmp_path / "m")
    await converge(harness, desired)  # A registers and funds both agents
    other = other_finops(harness, tmp_path / "B")
    try:
        by_a = await top_up_again(harness, desired, "det-a")
        by_b = await top_up_again(other, desired, "det-a")  # B's key: epoch = A's deposit
        assert by_b > by_a

        [seen_by_a] = findings(await status_of(harness, desired), "det-a")
        assert isinstance(seen_by_a, UnrecognisedDeposit)
        assert seen_by_a.origin is DepositOrigin.FINOPS_OTHER_STATE and seen_by_a.ledger_id == by_b
        assert seen_by_a.key_verified  # this fleet's derivation for det-a at A's deposit as the epoch
        assert seen_by_a.finops_key == deposit_idempotency_key(FLEET, "det-a", str(by_a))
        assert findings(await status_of(harness, desired), "det-b") == []

        # B registered nothing and started funding det-a at by_b: A's deposits before it are
        # finops' by their key, not another finops' (B cannot tell, and does not guess).
        assert findings(await status_of(other, desired), "det-a") == []
        by_a_again = await top_up_again(harness, desired, "det-a")
        [seen_by_b] = findings(await status_of(other, desired), "det-a")
        assert isinstance(seen_by_b, UnrecognisedDeposit) and seen_by_b.ledger_id == by_a_again
        assert seen_by_b.origin is DepositOrigin.FINOPS_OTHER_STATE
    finally:
        other.store.close()


async def test_a_double_funding_is_flagged_from_either_state_and_from_a_fresh_one(
    harness: Harness, tmp_path: Path
) -> None:
    """The measured incident: a second finops, from a stale balance, deposits again with a
    key of the next epoch right after the first deposit landed. The next plan says "No
    changes" (the balance is above the floor); ``status`` says what happened."""
    desired = write_fleet(tmp_path / "m")
    await converge(harness, desired)
    first = await top_up_again(harness, desired, "det-a")
    [first_row] = harness.sandbox.store.list_transactions("det-a", limit=1, offset=0)
    amount = from_atomic(first_row.amount)
    second = admin_deposit(harness, "det-a", amount, deposit_idempotency_key(FLEET, "det-a", str(first)))
    assert balance(harness, "det-a") == TARGET + amount
    assert (await harness.plan(desired)).empty  # nothing to do: finops never withdraws

    status = await status_of(harness, desired)
    by_kind = {type(f): f for f in findings(status, "det-a")}
    deposit = by_kind[UnrecognisedDeposit]
    assert isinstance(deposit, UnrecognisedDeposit)
    assert deposit.origin is DepositOrigin.FINOPS_OTHER_STATE and deposit.ledger_id == second
    excess = by_kind[UnexplainedBalance]
    assert isinstance(excess, UnexplainedBalance)
    assert (excess.balance, excess.target, excess.unexplained) == (TARGET + amount, TARGET, amount)
    text = render_status(status)
    assert "DEPOSIT BY ANOTHER FINOPS" in text and "possible double funding" in text
    credits = format_money(amount)
    assert f"{credits} credits ({format_money(amount / RATE)} USD) of it is not explained" in text

    fresh = other_finops(harness, tmp_path / "fresh")
    try:
        [seen] = findings(await status_of(fresh, desired), "det-a")  # both deposits carry finops' key
        assert isinstance(seen, UnexplainedBalance)
        assert seen.unexplained == amount and seen.overshoot == amount and seen.other_credits == 0
    finally:
        fresh.store.close()


async def test_a_foreign_deposit_is_flagged_and_the_signup_bonus_is_not(harness: Harness, tmp_path: Path) -> None:
    desired = write_fleet(tmp_path / "m")
    await converge(harness, desired)  # the ledgers hold the signup bonus and finops' top-up
    foreign = admin_deposit(harness, "det-b", Decimal("12.34"), None)
    status = await status_of(harness, desired)
    assert findings(status, "det-a") == []
    kinds = {type(f): f for f in findings(status, "det-b")}
    deposit = kinds[UnrecognisedDeposit]
    assert isinstance(deposit, UnrecognisedDeposit)
    assert (deposit.origin, deposit.ledger_id, deposit.amount, deposit.finops_key) == (
        DepositOrigin.FOREIGN,
        foreign,
        Decimal("12.34"),
        None,
    )
    excess = kinds[UnexplainedBalance]
    assert isinstance(excess, UnexplainedBalance) and excess.unexplained == Decimal("12.34")
    assert "det-b" in [a.agent_id for a in status.flagged] and status.needs_attention


# --------------------------------------------------------------------------- webhooks


async def test_a_second_finops_marked_webhook_is_flagged(harness: Harness, manifests_dir: Path, tmp_path: Path) -> None:
    desired = load_manifests(manifests_dir)
    await converge(harness, desired)
    assert all(a.findings == [] for a in (await status_of(harness, desired)).agents)
    with harness.admin() as http:
        hooks = http.get("/v1/infra/webhooks").json()["webhooks"]
        mine = next(h for h in hooks if h["filter_agent_ids"] == ["res-01"])
        made = http.post(
            "/v1/infra/webhooks",
            json={
                "url": "https://elsewhere.example.com/hook",
                "event_types": [webhook_marker("research"), "billing.deposit"],
                "secret": "x" * 32,
                "filter_agent_ids": ["res-01"],
            },
        )
        made.raise_for_status()
    duplicate = DuplicateWebhooks("res-01", tuple(sorted((mine["id"], made.json()["id"]))))
    assert findings(await status_of(harness, desired), "res-01") == [duplicate]
    fresh = other_finops(harness, tmp_path / "fresh")  # the live markers alone say it
    try:
        assert findings(await status_of(fresh, desired), "res-01") == [duplicate]
    finally:
        fresh.store.close()


# --------------------------------------------------------------------------- intents


class SimulatedCrash(BaseException):
    pass


def test_an_intent_left_by_a_crash_is_flagged_with_its_age_and_settle_time(harness: Harness, tmp_path: Path) -> None:
    desired = write_fleet(tmp_path / "m")
    asyncio.run(converge(harness, desired))
    harness.spend("det-a", balance(harness, "det-a") - FLOOR + Decimal("1.00"))

    def crash(at: str, agent: str) -> None:
        if at == "before_deposit" and agent == "det-a":
            raise SimulatedCrash(at)

    with pytest.raises(SimulatedCrash):
        asyncio.run(harness.apply(asyncio.run(harness.plan(desired)), fault_hook=crash))
    [intent] = harness.store.intents(status=PENDING)
    assert (intent.kind, intent.agent_id) == ("deposit", "det-a")

    [found] = findings(asyncio.run(status_of(harness, desired)), "det-a")
    assert isinstance(found, UnresolvedIntent)
    assert (found.intent_kind, found.past_settle) == ("deposit", False)
    assert found.age_seconds < 60
    assert (
        next(a for a in asyncio.run(status_of(harness, desired)).agents if a.agent_id == "det-a")
        .flags[0]
        .startswith("UNKNOWN OUTCOME: a top_up (deposit) sent")
    )

    # Past the settle time (an operator's FINOPS_SETTLE_SECONDS) and still unresolved (no
    # apply ran since): said so.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FINOPS_SETTLE_SECONDS", "0")
        [found] = findings(asyncio.run(status_of(harness, desired)), "det-a")
    assert isinstance(found, UnresolvedIntent) and found.past_settle and found.settle_seconds == 0
    assert "past its settle time (0 s, FINOPS_SETTLE_SECONDS)" in found.message(RATE, "USD")
    # Its agent removed from the manifests: still flagged, as the fleet's (`--strict` fails).
    without = asyncio.run(status_of(harness, write_fleet(tmp_path / "m2", ("det-b",))))
    assert [(type(f), f.agent_id) for f in without.findings] == [(UnresolvedIntent, "det-a")]
    assert without.needs_attention and "! det-a (not declared): UNKNOWN OUTCOME" in render_status(without)
    assert without.to_dict()["findings"][0]["intent_kind"] == "deposit"
    # An apply inside the settle time cannot conclude anything: still pending, still flagged.
    blocked = asyncio.run(harness.plan(desired))
    assert [b.agent_id for b in blocked.blocked] == ["det-a"]
    assert [i.agent_id for i in harness.store.intents(status=PENDING)] == ["det-a"]
    # Past the settle time, the next apply resolves it (the deposit never went out) and tops up.
    clock = harness.clock
    assert isinstance(clock, FinopsClock)
    clock.past_settle()
    assert asyncio.run(harness.apply(asyncio.run(harness.plan(desired)))).ok
    assert harness.store.intents(status=PENDING) == []
    assert findings(asyncio.run(status_of(harness, desired)), "det-a") == []
    assert balance(harness, "det-a") == to_credits(Decimal("20.00"), RATE)


async def test_an_unreadable_ledger_is_flagged_for_that_agent_only(harness: Harness, tmp_path: Path) -> None:
    desired = write_fleet(tmp_path / "m")
    await converge(harness, desired)
    admin_deposit(harness, "det-b", Decimal("5.00"), None)
    harness.sandbox.faults.configure(FaultConfig(rate=1.0, kinds=(FaultKind.S503,), only=("det-a/transactions",)))
    try:
        status = await status_of(harness, desired)
    finally:
        harness.sandbox.faults.configure(None)
    [not_checked] = findings(status, "det-a")
    assert isinstance(not_checked, NotChecked) and not_checked.what == "ledger"
    assert "det-a" in [a.agent_id for a in status.flagged]
    assert {type(f) for f in findings(status, "det-b")} == {UnrecognisedDeposit, UnexplainedBalance}


async def test_a_late_landing_of_finops_own_deposit_is_pending_not_foreign(
    gated: Callable[[str], FastHarness], tmp_path: Path
) -> None:
    """A deposit finops gave up on lands later (the sandbox's late gate): until an apply
    resolves its intent, status shows the unresolved intent, and its ledger row is finops'
    own by the intent's key (never "another finops" nor a balance it cannot explain)."""
    desired = write_repro_fleet(tmp_path / "m")
    h = gated("/deposit")
    first = await h.apply(await h.plan(desired))
    await wait_held(h, 2)
    assert all(a.error for a in first.agents)
    before = await status_of(h, desired)
    for agent in LATE_AGENTS:
        [pending] = findings(before, agent)
        assert isinstance(pending, UnresolvedIntent) and pending.intent_kind == "deposit"
        assert not pending.past_settle

    assert settle(h, run=True) == 2  # both land, after finops gave up on them
    landed = await status_of(h, desired)
    for agent in LATE_AGENTS:
        assert [type(f) for f in findings(landed, agent)] == [UnresolvedIntent]  # nothing else
    h.sandbox.faults.configure(None)
    clock = h.clock
    assert isinstance(clock, FinopsClock)
    clock.advance(30)
    assert (await h.plan(desired)).empty  # resolves both intents from the ledger
    assert all(a.findings == [] for a in (await status_of(h, desired)).agents)


def test_concurrent_deposits_with_one_key_are_flagged_though_the_ledger_shows_one(tmp_path: Path) -> None:
    """Two finops (or a retry racing a late request) send one deposit key at once: the
    gateway moves the money twice and writes one ledger row (API.md §9). Both think one
    deposit landed; the ledger looks clean; the deposit's result snapshot gives it away."""
    desired = write_fleet(tmp_path / "m")
    with SandboxServer(
        db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key", idempotency_race_window=0.5
    ) as server:
        h = Harness(server, StateStore(tmp_path / "state" / "state.db"), KeyVault(tmp_path / "secrets"))
        try:
            asyncio.run(converge(h, desired))
            h.spend("det-a", balance(h, "det-a") - FLOOR + Decimal("1.00"))
            plan = asyncio.run(h.plan(desired))
            [top_up] = [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]
            key, amount = top_up.args.idempotency_key, top_up.args.amount
            started = balance(h, "det-a")
            twins: list[threading.Thread] = []

            def twin(point: str, agent: str) -> None:
                """Right before finops sends it, the same deposit goes out from elsewhere."""
                if point != "before_deposit" or agent != "det-a":
                    return
                thread = threading.Thread(target=admin_deposit, args=(h, "det-a", amount, key))
                thread.start()
                twins.append(thread)
                deadline = time.monotonic() + 5
                while balance(h, "det-a") == started and time.monotonic() < deadline:
                    time.sleep(0.005)  # its money has moved; its ledger row is not written yet

            result = asyncio.run(h.apply(plan, fault_hook=twin))
            for thread in twins:
                thread.join(10)
            assert result.ok, result.to_dict()
            assert balance(h, "det-a") == TARGET + amount  # credited twice...
            keyed = [
                r for r in server.store.list_transactions("det-a", limit=100, offset=0) if r.idempotency_key == key
            ]
            assert len(keyed) == 1  # ...one ledger row
            assert asyncio.run(h.plan(desired)).empty
            [found] = findings(asyncio.run(status_of(h, desired)), "det-a")
            assert isinstance(found, UnexplainedBalance)
            assert (found.unledgered, found.unexplained, found.other_credits) == (amount, amount, 0)
            assert "that no ledger row shows" in found.message(RATE, "USD")
        finally:
            h.store.close()
