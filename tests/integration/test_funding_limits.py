"""Funding is bounded over time, not just per run (issue 9, item 4), against a real sandbox.

The repro: an agent withdraws its own balance with its own key between daemon passes, and
the daemon re-funds it on every pass. finops must stop at the fleet's rolling 24 h funding
limit (counting every credit it put in, signup bonuses included, from durable records), and
stop refunding an agent whose balance falls without matching metered spend at its declared
limit. Time is the sandbox's clock, moved by hand; the state store is stamped with it too.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from controller.cli.views import render_markdown, render_text
from controller.daemon.logs import configure_logging
from controller.daemon.passes import PassResult, Reconciler
from controller.daemon.revisions import RevisionLog
from controller.daemon.source import DirectorySource
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.sandbox.server import SandboxServer
from controller.sandbox.store import to_atomic
from controller.state import StateStore
from policies.funding_window import WINDOW_SECONDS, DeferReason
from policies.keyprint import contains_key_material
from policies.plan_types import ChangeKind, Plan
from policies.spec import DesiredState
from tests.integration.conftest import CANONICAL, Harness
from tests.integration.test_cli import finops

RATE = Decimal(100)  # the sandbox's USD → credits rate


UNATTENDED = '{dailyCaps: "1000000.00", monthlyCaps: "1000000.00", funding: "1000000.00", agents: 1000}'
"""These fleets let finops apply any increase on its own (``spec.approval``): these tests are
about funding over time, not about exposure review (tests/integration/test_exposure.py)."""


def write_fleet(directory: Path, *, agents: list[str], funding: str, worker: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "apiVersion: finops.greenhelix.net/v1",
        "kind: Fleet",
        "metadata: {name: leaky}",
        "spec:",
        "  currency: USD",
        '  dailyBudgetTotal: "100.00"',
        f"  funding: {funding}",
        f"  approval: {{maxUnattendedIncrease: {UNATTENDED}}}",
        "  tiers:",
        f"    worker: {worker}",
        "  agents:",
        *(f"    - {{id: {a}, tier: worker}}" for a in agents),
    ]
    (directory / "fleet.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@dataclass
class World:
    harness: Harness
    reconciler: Reconciler
    manifests: Path
    logs: io.StringIO

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines()]

    @property
    def sandbox(self) -> SandboxServer:
        return self.harness.sandbox

    async def daemon_pass(self, advance: float = 5.0) -> PassResult:
        self.sandbox.clock.advance(advance)
        return await self.reconciler.run()

    def withdraw_all(self, agent: str) -> Decimal:
        """The agent empties its own wallet with its own key (what no cap can stop)."""
        return self.withdraw(agent, None)

    def withdraw(self, agent: str, amount: Decimal | None) -> Decimal:
        key = self.harness.sink.load(agent)
        assert key is not None
        with httpx.Client(base_url=self.sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
            if amount is None:
                amount = Decimal(http.get(f"/v1/billing/wallets/{agent}/balance").json()["balance"])
            if amount > 0:
                http.post(f"/v1/billing/wallets/{agent}/withdraw", json={"amount": str(amount)}).raise_for_status()
        return amount

    def finops_credits(self, agents: list[str], *, within: float = WINDOW_SECONDS) -> Decimal:
        """Every credit finops put in within ``within`` seconds, as the gateway's ledger shows
        it: its deposits (idempotency-key prefix) and the signup bonuses of its registrations."""
        now = self.sandbox.clock()
        total = Decimal(0)
        for agent in agents:
            for row in self.sandbox.store.list_transactions(agent, limit=10_000, offset=0):
                ours = row.tx_type == "signup_bonus" or (row.idempotency_key or "").startswith("finops-topup-")
                if ours and row.created_at > now - within:
                    total += Decimal(row.amount) / 10**8
        return total

    async def plan(self, desired: DesiredState | None = None) -> Plan:
        return await self.harness.plan(desired or load_manifests(self.manifests))


Factory = Callable[[Path], World]


@pytest.fixture
def world_factory(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Factory]:
    opened: list[tuple[StateStore, RevisionLog]] = []

    def build(manifests: Path) -> World:
        store = StateStore(tmp_path / "state" / f"state-{len(opened)}.db", clock=sandbox.clock)
        revisions = RevisionLog(store.path, clock=sandbox.clock)
        opened.append((store, revisions))
        harness = Harness(sandbox, store, KeyVault(tmp_path / "secrets"))
        logs = io.StringIO()
        reconciler = Reconciler(
            target="sandbox",
            source=DirectorySource(manifests),
            store=store,
            sink=harness.sink,
            revisions=revisions,
            client_factory=harness.client,
            clock=sandbox.clock,
            log=configure_logging("json", stream=logs, secrets=[sandbox.admin_key]),
        )
        return World(harness, reconciler, manifests, logs)

    yield build
    for store, revisions in opened:
        revisions.close()
        store.close()


WORKER_LOOSE = '{dailyCap: "10.00", monthlyCap: "100.00", funding: {floor: "10.00", target: "20.00", maxUnexplainedPerDay: "1000.00"}}'  # noqa: E501
WORKER_DEFAULT = '{dailyCap: "10.00", monthlyCap: "100.00", funding: {floor: "10.00", target: "20.00"}}'


async def test_an_agent_draining_its_own_wallet_gets_no_more_than_the_fleet_daily_limit(
    world_factory: Factory, tmp_path: Path
) -> None:
    """The issue's repro with the per-agent outflow limit set out of the way: only the fleet's
    rolling limit stands between the thief and the fleet's money."""
    manifests = write_fleet(
        tmp_path / "m",
        agents=["thief"],
        funding='{perRunCeiling: "20.00", dailyLimit: "50.00"}',
        worker=WORKER_LOOSE,
    )
    world = world_factory(manifests)
    first = await world.daemon_pass()
    assert first.result == "ok" and first.applied == {"register": 1, "top_up": 1, "set_budget": 1}
    stolen = Decimal(0)
    for _ in range(10):  # every 5 s: withdraw everything, then a daemon pass
        stolen += world.withdraw_all("thief")
        result = await world.daemon_pass()
        assert result.completed and not result.violations
        assert world.finops_credits(["thief"]) <= Decimal("5000.00")
    assert world.finops_credits(["thief"]) == Decimal("5000.00")  # 50.00 USD, not a cent more
    assert stolen == Decimal("5000.00")

    plan = await world.plan()
    [window] = plan.funding
    assert (window.limit, window.used, window.left) == (Decimal("5000.00"), Decimal("5000.00"), 0)
    assert not [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]
    assert [d.reason for d in plan.deferred] == [DeferReason.FLEET_DAILY_LIMIT]
    [flag] = plan.outflow
    assert flag.agent_id == "thief" and flag.unexplained >= Decimal("3000.00") and not flag.refunding_stopped
    text = render_text(plan)
    assert "funding in the last 24 h: 50.00 used + 0.00 planned of 50.00 USD; 0.00 USD left" in text
    assert "0.00 USD left" in render_markdown(plan)
    deferrals = [line for line in world.log_lines() if line["msg"] == "funding deferred"]
    assert deferrals and deferrals[-1]["agent"] == "thief" and deferrals[-1]["reason"] == "fleet-daily-limit"

    # 24 h after the first funding the window has room again: funding resumes, still bounded.
    world.sandbox.clock.advance(WINDOW_SECONDS)
    resumed = await world.daemon_pass()
    assert resumed.applied.get("top_up") == 1
    assert world.finops_credits(["thief"]) <= Decimal("5000.00")


async def test_a_fresh_state_database_still_sees_finops_credits_in_the_ledger(
    world_factory: Factory, tmp_path: Path
) -> None:
    manifests = write_fleet(
        tmp_path / "m",
        agents=["thief"],
        funding='{perRunCeiling: "20.00", dailyLimit: "50.00"}',
        worker=WORKER_LOOSE,
    )
    world = world_factory(manifests)
    await world.daemon_pass()
    world.withdraw_all("thief")
    await world.daemon_pass()
    world.withdraw_all("thief")
    remembered = (await world.plan()).funding[0]
    assert remembered.used == Decimal("4000.00")

    fresh = world_factory(manifests)  # a new machine: an empty state database
    seen = (await fresh.plan()).funding[0]
    assert seen.used == Decimal("4000.00")  # the bonus and both deposits, read back from the ledger
    assert seen.planned == Decimal("1000.00")


async def test_unexplained_outflow_is_flagged_and_refunding_stops_by_default(
    world_factory: Factory, tmp_path: Path
) -> None:
    manifests = write_fleet(
        tmp_path / "m", agents=["thief", "honest"], funding='{perRunCeiling: "40.00"}', worker=WORKER_DEFAULT
    )
    world = world_factory(manifests)
    await world.daemon_pass()
    assert world.withdraw_all("thief") == Decimal("2000.00")
    world.harness.spend("honest", Decimal("1500.00"))  # metered spend: refunded as usual

    plan = await world.plan()
    [flag] = plan.outflow
    assert (flag.agent_id, flag.unexplained, flag.limit, flag.refunding_stopped) == (
        "thief",
        Decimal("2000.00"),
        Decimal("0.00"),
        True,
    )
    assert [(c.agent_id, c.kind) for c in plan.changes] == [("honest", ChangeKind.TOP_UP)]
    [deferred] = plan.deferred
    assert deferred.agent_id == "thief" and deferred.reason is DeferReason.UNEXPLAINED_OUTFLOW

    for _ in range(3):
        await world.daemon_pass()
    assert world.finops_credits(["thief"]) == Decimal("2000.00")  # the initial funding only
    assert world.finops_credits(["honest"]) == Decimal("3500.00")  # initial funding + the refill


async def test_signup_bonuses_count_against_the_daily_limit(world_factory: Factory, tmp_path: Path) -> None:
    """Sixty new agents would bring 30,000 credits of signup bonus: only what fits the daily
    limit is registered, the rest waits (uncapped nowhere: no wallet, no key)."""
    agents = [f"new-{i:02d}" for i in range(60)]
    manifests = write_fleet(
        tmp_path / "m",
        agents=agents,
        funding='{perRunCeiling: "1000.00", dailyLimit: "20.00"}',
        worker='{dailyCap: "1.00", monthlyCap: "10.00", funding: {floor: "1.00", target: "2.00"}}',
    )
    world = world_factory(manifests)
    plan = await world.plan()
    registered = [c.agent_id for c in plan.changes if c.kind is ChangeKind.REGISTER]
    assert registered == agents[:4]  # 4 x 5.00 USD of bonus = the 20.00 USD limit
    assert len(plan.deferred) == 56 and {d.kind for d in plan.deferred} == {ChangeKind.REGISTER}
    assert {c.agent_id for c in plan.changes} == set(agents[:4])

    await world.daemon_pass()
    await world.daemon_pass()
    assert sum(world.sandbox.store.get_wallet(a) is not None for a in agents) == 4
    assert world.finops_credits(agents) == Decimal("2000.00")

    world.sandbox.clock.advance(WINDOW_SECONDS)
    await world.daemon_pass()
    assert sum(world.sandbox.store.get_wallet(a) is not None for a in agents) == 8
    assert world.finops_credits(agents) == Decimal("2000.00")  # in the last 24 h


async def test_a_per_run_ceiling_of_zero_refuses_registrations_for_their_bonus(
    world_factory: Factory, tmp_path: Path
) -> None:
    agents = [f"new-{i:02d}" for i in range(3)]
    manifests = write_fleet(
        tmp_path / "m",
        agents=agents,
        funding='{perRunCeiling: "0.00"}',
        worker='{dailyCap: "1.00", monthlyCap: "10.00", funding: {floor: "1.00", target: "2.00"}}',
    )
    world = world_factory(manifests)
    result = await world.daemon_pass()
    assert result.result == "refused" and "signup bonuses" in result.violations[0]
    assert all(world.sandbox.store.get_wallet(a) is None for a in agents)


def test_plan_and_status_show_what_is_left_of_the_days_funding_limit(tmp_path: Path) -> None:
    """As an operator sees it: the CLI against a sandbox, `status --strict` failing on an
    agent with unexplained outflow."""
    work = tmp_path / "work"
    shutil.copytree(CANONICAL, work / "manifests")
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        env = {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}
        planned = finops(work, "plan", env=env)
        assert planned.returncode == 0, planned.stderr
        # Canonical fleet: 500.00 ceiling + 200.00 daily total; 440.00 USD to fund (bonuses included).
        assert "funding in the last 24 h: 0.00 used + 440.00 planned of 700.00 USD; 260.00 USD left" in planned.stdout
        as_json = json.loads(finops(work, "plan", "--format", "json", env=env).stdout)
        assert as_json["funding"][0]["left"] == "260.00" and as_json["funding"][0]["limit_credits"] == "70000.00"
        applied = finops(work, "apply", "--auto-approve", env=env)
        assert applied.returncode == 0, applied.stdout + applied.stderr

        host = next((work / ".finops" / "secrets").iterdir())
        key = (host / "cls-01.key").read_text().strip()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
            http.post("/v1/billing/wallets/cls-01/withdraw", json={"amount": "3000.00"}).raise_for_status()

        status = finops(work, "status", "--strict", env=env)
        assert status.returncode == 1
        assert "Fleet research funding, rolling 24 h: 440.00 of 700.00 USD used, 260.00 left" in status.stdout
        assert "UNEXPLAINED OUTFLOW: 30.00 USD" in status.stdout and "refunding stopped" in status.stdout
        data = json.loads(finops(work, "status", "--format", "json", env=env).stdout)
        assert data["funding"][0]["available"] == "260.00" and "cls-01" in data["flagged"]
        for text in (planned.stdout, applied.stdout, status.stdout, status.stderr):
            assert not contains_key_material(text)


def test_schema_documents_the_new_funding_fields(tmp_path: Path) -> None:
    """(Bad values are in the bad-manifest corpus: ``funding_window_fields_invalid``.)"""
    schema = json.loads(finops(tmp_path, "schema").stdout)
    defs = schema["$defs"]
    assert "dailyLimit" in defs["FleetFunding"]["properties"]
    assert "maxUnexplainedPerDay" in defs["Funding"]["properties"]


async def test_outflow_hidden_behind_a_page_of_metered_charges_is_still_seen(
    world_factory: Factory, tmp_path: Path
) -> None:
    """A withdrawal followed by 250 paid calls sits on the third ledger page: still read."""
    manifests = write_fleet(tmp_path / "m", agents=["thief"], funding='{perRunCeiling: "20.00"}', worker=WORKER_DEFAULT)
    world = world_factory(manifests)
    await world.daemon_pass()
    world.withdraw("thief", Decimal("1500.00"))
    for _ in range(250):
        world.harness.spend("thief", Decimal("0.10"))
    plan = await world.plan()
    [flag] = plan.outflow
    assert flag.unexplained == Decimal("1500.00") and flag.complete
    assert not [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]


async def test_charges_the_budget_never_metered_count_as_unexplained_outflow(
    world_factory: Factory, tmp_path: Path
) -> None:
    """Reusing one request id, an agent is charged on every call but metered once (API.md
    §4): its balance falls without matching metered spend, however the rows are labelled."""
    manifests = write_fleet(tmp_path / "m", agents=["thief"], funding='{perRunCeiling: "20.00"}', worker=WORKER_DEFAULT)
    world = world_factory(manifests)
    await world.daemon_pass()
    for _ in range(11):
        world.sandbox.store.record_usage_and_charge(
            "thief", "best_match", to_atomic(Decimal("100.00")), "reused-request-id", now=world.sandbox.clock()
        )
    plan = await world.plan()
    [flag] = plan.outflow
    assert flag.unexplained == Decimal("999.89")  # 1100 charged - 100 metered - 11 x 0.01 tolerance
    assert flag.refunding_stopped and not [c for c in plan.changes if c.kind is ChangeKind.TOP_UP]


class LoseDeposits(httpx.AsyncBaseTransport):
    """Deposits time out before reaching the gateway: their outcome is unknown to finops."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/deposit"):
            raise httpx.ReadTimeout("no answer", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_deposit_of_unknown_outcome_counts_until_proven_not_landed(
    world_factory: Factory, tmp_path: Path
) -> None:
    manifests = write_fleet(
        tmp_path / "m",
        agents=["a", "b"],
        funding='{perRunCeiling: "40.00", dailyLimit: "80.00"}',
        worker=WORKER_DEFAULT,
    )
    world = world_factory(manifests)
    await world.daemon_pass()  # registered and funded: 2 x 20.00 USD
    for agent in ("a", "b"):
        world.harness.spend(agent, Decimal("1500.00"))
    lost = await world.harness.apply(await world.plan(), transport=LoseDeposits())
    assert not lost.ok  # both top-ups unknown: their intents stay pending
    assert world.finops_credits(["a", "b"]) == Decimal("4000.00")  # nothing moved

    replan = await world.plan()
    [window] = replan.funding
    assert window.used == Decimal("7000.00")  # what landed, plus two deposits that may still land
    # Their outcome is unknown: no new deposit for either until the ledger resolves them.
    assert not [c for c in replan.changes if c.kind is ChangeKind.TOP_UP]
    assert sorted((b.agent_id, b.kind) for b in replan.blocked) == [("a", ChangeKind.TOP_UP), ("b", ChangeKind.TOP_UP)]

    world.harness.clock.past_settle()  # type: ignore[attr-defined]
    settled = await world.plan()  # resolves them first: not in the ledger after the settle time
    assert any("never landed" in note for note in world.harness.notes)
    [window] = settled.funding
    assert window.used == Decimal("4000.00")  # released: proven never landed
    # The same decisions again (same funding epoch, same key), each counted once.
    assert [str(c.args.amount) for c in settled.changes if c.kind is ChangeKind.TOP_UP] == ["1500.00", "1500.00"]
    assert window.planned == Decimal("3000.00") and not settled.deferred

    second = await world.harness.apply(settled)
    assert second.ok
    assert world.finops_credits(["a", "b"]) == Decimal("7000.00")
    assert (await world.plan()).funding[0].used == Decimal("7000.00")
