"""``finops report`` against the sandbox as a real HTTP server: spend driven through the paid
route with the agents' own keys, the sandbox clock placed around a month boundary; the
report's figures are checked against the sandbox's own database (usage rows and ledger)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

import controller.cli.report as report_cli
from controller.cli.report import read_fleet
from controller.io.target import target_name
from controller.manifest.loader import load_manifests
from controller.sandbox.clock import MutableClock
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from policies.funding_window import DEPOSIT_KEY_PREFIX
from policies.keyprint import contains_key_material
from policies.report import CSV_COLUMNS, NO_LABEL, GroupBy, build_report, parse_period
from policies.spec import DesiredState
from tests.integration.conftest import Harness, run_cli

DAY = 86_400
ATOMIC = Decimal(100_000_000)


def month_starts(now: float) -> tuple[float, float, str]:
    """The start of the previous and of the current UTC month, and the previous one's label."""
    today = datetime.fromtimestamp(now, UTC)
    current = datetime(today.year, today.month, 1, tzinfo=UTC)
    previous = datetime(current.year - (current.month == 1), (current.month - 2) % 12 + 1, 1, tzinfo=UTC)
    return previous.timestamp(), current.timestamp(), f"{previous.year:04d}-{previous.month:02d}"


PREV, CURR, PREV_LABEL = month_starts(time.time())


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    """A sandbox whose clock stands still (exact boundaries), two days before this month."""
    clock = MutableClock(CURR - 2 * DAY + 3600, frozen=True)
    with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key", clock=clock) as server:
        yield server


@pytest.fixture
def desired(manifests_dir: Path) -> DesiredState:
    """The canonical fleet, with cls-01's labels removed (the ``(none)`` group)."""
    workers = manifests_dir / "research-workers.yaml"
    text = workers.read_text()
    marker = (
        "tier: classifier          # 15.00/day, 300.00/month, funding from the fleet defaults\n"
        "      labels: {role: worker}"
    )
    assert marker in text
    workers.write_text(text.replace(marker, "tier: classifier"))
    return load_manifests(manifests_dir)


def paid_calls(sandbox: SandboxServer, key: str, calls: int) -> None:
    """``best_match`` with the agent's own key: 0.10 credits each, charged and recorded."""
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(calls):
            http.get("/v1/marketplace/match", params={"query": "x"}).raise_for_status()


def at(sandbox: SandboxServer, moment: float) -> None:
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as http:
        http.post("/_sandbox/clock", json={"set": moment}).raise_for_status()


def sandbox_truth(db: Path, agent: str, start: float, end: float) -> tuple[int, Decimal, Decimal, Decimal]:
    """From the sandbox's own database: usage calls and cost, charged amount and finops'
    deposits of ``agent`` in ``[start, end)`` (credits)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        calls, cost = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM usage_records WHERE agent_id=? AND created_at>=? "
            "AND created_at<?",
            (agent, start, end),
        ).fetchone()
        charged = conn.execute(
            "SELECT COALESCE(-SUM(amount), 0) FROM transactions WHERE agent_id=? AND tx_type='charge' "
            "AND created_at>=? AND created_at<?",
            (agent, start, end),
        ).fetchone()[0]
        deposits = conn.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM transactions WHERE agent_id=? AND tx_type='deposit' "
            "AND idempotency_key LIKE ? AND created_at>=? AND created_at<?",
            (agent, DEPOSIT_KEY_PREFIX + "%", start, end),
        ).fetchone()[0]
    return calls, Decimal(cost) / ATOMIC, Decimal(charged) / ATOMIC, Decimal(deposits) / ATOMIC


async def spend_around_the_boundary(harness: Harness, desired: DesiredState) -> None:
    """Apply (register, fund, cap) two days before this month, then spend on both sides of
    the month boundary, to the second."""
    plan = await harness.plan(desired)
    result = await harness.apply(plan)
    assert result.ok, result
    sandbox = harness.sandbox
    keys: dict[str, str] = {}
    for spec in desired.agents():
        key = harness.sink.read(spec.agent_id)
        assert key is not None, spec.agent_id
        keys[spec.agent_id] = key
    paid_calls(sandbox, keys["res-01"], 3)  # CURR - 2 days + 1 h
    at(sandbox, CURR - DAY + 7200)
    paid_calls(sandbox, keys["orch-01"], 7)
    at(sandbox, CURR - 1)  # the last second of the previous month
    paid_calls(sandbox, keys["res-01"], 2)
    paid_calls(sandbox, keys["sum-01"], 1)
    at(sandbox, CURR)  # the first instant of this month: not the previous month's
    paid_calls(sandbox, keys["res-01"], 4)
    paid_calls(sandbox, keys["cls-01"], 2)


async def test_the_report_equals_the_sandbox_ledger_for_the_period(
    harness: Harness, desired: DesiredState, tmp_path: Path
) -> None:
    await spend_around_the_boundary(harness, desired)
    db = tmp_path / "gateway.db"
    harness.store.set_hold("sum-01", "runaway spend")
    harness.reset_stats()
    now = time.time()
    period = parse_period(PREV_LABEL, None, now)
    assert (period.start, period.end) == (PREV, CURR)
    async with harness.client() as client:
        agents = await read_fleet(client, desired, period, now, harness.store.adjustments(), harness.store.holds())
    assert harness.stats()["writes"] == 0  # reads only
    by_id = {a.agent_id: a for a in agents}
    assert all(a.error is None for a in agents), [a.error for a in agents]
    for agent in agents:
        calls, cost, charged, deposits = sandbox_truth(db, agent.agent_id, PREV, CURR)
        assert (agent.calls, agent.spend, agent.top_ups) == (calls, cost, deposits), agent.agent_id
        assert agent.spend == charged  # every metered fee is also a ledger charge
        assert agent.top_ups_complete
        assert sum(agent.daily_spend.values(), Decimal(0)) == agent.spend  # the days add up to the period
    # And in absolute terms: 0.10 per call, the calls at CURR (and after) excluded.
    assert (by_id["res-01"].calls, by_id["res-01"].spend) == (5, Decimal("0.50"))
    assert (by_id["orch-01"].spend, by_id["sum-01"].spend, by_id["cls-01"].spend) == (
        Decimal("0.70"),
        Decimal("0.10"),
        Decimal("0"),
    )
    # funded to its 75.00 USD (7500 credits) target, the 500-credit signup bonus included
    assert (by_id["res-01"].top_ups, by_id["res-01"].top_up_count) == (Decimal("7000.00"), 1)
    assert by_id["res-01"].daily_spend == {CURR - 2 * DAY: Decimal("0.30"), CURR - DAY: Decimal("0.20")}
    assert by_id["orch-01"].daily_spend == {CURR - DAY: Decimal("0.70")}

    report = build_report(period, GroupBy("label", "role"), agents, generated_at=now)
    groups = {g.key: g for g in report.groups}
    assert list(groups) == ["lead", "worker", NO_LABEL]
    assert groups[NO_LABEL].agents == ("cls-01",)
    assert groups["worker"].spend == Decimal("0.60") and groups["lead"].spend == Decimal("0.70")
    assert (groups["worker"].holds, groups["lead"].holds, report.total.holds) == (("sum-01",), (), ("sum-01",))
    assert report.total.spend == sum((a.spend for a in agents), Decimal(0)) == Decimal("1.30")
    # peak: the busiest UTC day of orch-01 (0.70 credits) over its 80.00 USD = 8000 credits cap
    assert groups["lead"].peak_utilization == Decimal("0.70") / Decimal("8000.00")

    # The next month's first instant belongs to the next month (start inclusive).
    day = parse_period(datetime.fromtimestamp(CURR, UTC).strftime("%Y-%m-%d"), None, now)
    async with harness.client() as client:
        first_day = {a.agent_id: a for a in await read_fleet(client, desired, day, now, {}, {})}
    assert (first_day["res-01"].calls, first_day["res-01"].spend) == (4, Decimal("0.40"))
    assert first_day["cls-01"].spend == Decimal("0.20")


async def test_cli_csv_has_the_focus_headers_and_the_same_totals(
    harness: Harness, desired: DesiredState, manifests_dir: Path, tmp_path: Path
) -> None:
    await spend_around_the_boundary(harness, desired)
    harness.reset_stats()
    sandbox = harness.sandbox
    args = [
        "--gateway",
        sandbox.url,
        "--api-key-file",
        str(tmp_path / "admin.key"),
        "--state-dir",
        str(tmp_path / "cli"),
    ]
    out = tmp_path / "report.csv"
    done = run_cli(
        tmp_path,
        "report",
        str(manifests_dir),
        "--period",
        PREV_LABEL,
        "--by",
        "agent",
        "--format",
        "csv",
        "--out",
        str(out),
        *args,
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(io.StringIO(out.read_text(), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["ResourceId"] for r in rows} == {a.agent_id for a in desired.agents()}
    res01 = next(r for r in rows if r["ResourceId"] == "res-01")
    # 0.50 credits = 0.005 USD: shown half-even as 0.00 USD and declared inexact, the credits exact
    assert (res01["BilledCost"], res01["x_BilledCostExact"], res01["BillingCurrency"]) == ("0.00", "false", "USD")
    assert (res01["x_BilledCostCredits"], res01["x_BilledCostCreditsExact"], res01["x_Calls"]) == ("0.50", "true", "5")
    assert (res01["x_TopUpsCredits"], res01["x_TopUps"], res01["x_TopUpCount"]) == ("7000.00", "70.00", "1")
    assert res01["x_DailyCapCredits"] == "3000.00"
    assert (res01["ChargePeriodStart"], res01["ChargePeriodEnd"]) == (
        datetime.fromtimestamp(PREV, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        datetime.fromtimestamp(CURR, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    assert json.loads(res01["Tags"]) == {"role": "worker", "team": "research"}
    assert sum(Decimal(r["x_BilledCostCredits"]) for r in rows) == Decimal("1.30")

    as_json = run_cli(tmp_path, "report", str(manifests_dir), "--period", PREV_LABEL, "--format", "json", *args)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["format_version"] == 1 and data["by"] == "fleet"
    assert data["total"]["spend_credits"] == "1.30" and data["total"]["spend"] == "0.01"
    assert data["total"]["spend_exact"] is False  # 1.30 credits is 0.013 USD: shown rounded, declared

    as_text = run_cli(tmp_path, "report", str(manifests_dir), "--since", "45d", "--by", "label:role", *args)
    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    assert any(line.startswith("Spend report last 45d") for line in lines)
    (worker,) = [line for line in lines if line.startswith("worker")]
    assert "0.01 USD (1.00 credits)" in worker  # res-01: 3 + 2 + 4 calls, sum-01: 1, across the boundary
    (total,) = [line for line in lines if line.startswith("(total)")]
    assert "1.90 credits" in total  # + orch-01's 7 calls and cls-01's 2 (cls-01 has no role: "(none)")
    assert any(line.startswith("(none)") for line in lines)
    keys = [p.read_text().strip() for p in (tmp_path / "secrets").rglob("*") if p.is_file()]
    assert keys
    for output in (as_text, as_json, done):
        assert not contains_key_material(output.stdout + output.stderr)
        assert not any(key in output.stdout + output.stderr for key in keys)
    assert harness.stats()["writes"] == 0
    assert not [p for p in (tmp_path / "cli").rglob("*") if p.is_file()]  # no state was created

    future = run_cli(tmp_path, "report", str(manifests_dir), "--period", "2999-01", *args)
    assert future.returncode == 1 and "future" in future.stderr


async def test_a_failing_agent_is_reported_and_the_others_still_are(
    harness: Harness, desired: DesiredState, manifests_dir: Path, tmp_path: Path
) -> None:
    await spend_around_the_boundary(harness, desired)
    sandbox = harness.sandbox
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as http:
        http.post(
            "/_sandbox/faults", json={"spec": "seed=1,rate=1,kinds=503,retry_after=0,only=/wallets/sum-01/usage"}
        ).raise_for_status()
    state_dir = tmp_path / "cli"
    state = StateStore(state_dir / f"state-{target_name(sandbox.url)}.db")  # the CLI's state, with a hold
    state.set_hold("res-02", "runaway spend")
    state.close()
    args = ["--gateway", sandbox.url, "--api-key-file", str(tmp_path / "admin.key"), "--state-dir", str(state_dir)]
    done = run_cli(tmp_path, "report", str(manifests_dir), "--period", PREV_LABEL, "--by", "agent", *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED sum-01" in done.stdout
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith(("res-0", "sum-01"))}
    assert "0.50 credits" in rows["res-01"]
    assert rows["res-02"].endswith(" 1") and rows["res-01"].endswith(" 0")  # the Holds column, from the state
    assert "(1 failed)" in rows["sum-01"]


async def test_a_ledger_longer_than_the_bound_gives_a_declared_lower_bound(
    harness: Harness, desired: DesiredState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """res-01's ledger, newest first: 4 charges of this month, 5 of the previous one, then
    finops' deposit. Read 5 rows at most: the deposit is never reached, and the report says
    its top-ups are incomplete instead of reporting 0 as if it were the whole story."""
    await spend_around_the_boundary(harness, desired)
    monkeypatch.setattr(report_cli, "LEDGER_PAGE", 5)
    monkeypatch.setattr(report_cli, "MAX_LEDGER_ROWS", 5)
    now = time.time()
    period = parse_period(PREV_LABEL, None, now)
    async with harness.client() as client:
        agents = {a.agent_id: a for a in await read_fleet(client, desired, period, now, {}, {})}
    assert (agents["res-01"].top_ups, agents["res-01"].top_ups_complete) == (Decimal(0), False)
    assert (agents["res-02"].top_ups, agents["res-02"].top_ups_complete) == (Decimal("7000.00"), True)
    report = build_report(period, GroupBy("agent"), list(agents.values()), generated_at=now)
    assert not report.total.top_ups_complete and report.ok  # a lower bound, not a failure


class Rewriter(httpx.AsyncBaseTransport):
    """The real sandbox behind a liar that edits the JSON of the answers whose path
    contains ``fragment`` (``edit`` returns the new body)."""

    def __init__(self, fragment: str, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fragment = fragment
        self.edit = edit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.fragment not in request.url.path:
            return response
        body = json.loads(await response.aread())
        await response.aclose()
        return httpx.Response(response.status_code, json=self.edit(body))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _drop_oldest_bucket(body: dict[str, Any]) -> dict[str, Any]:
    return {"buckets": body["buckets"][1:]}


def _unreadable_deposit_times(body: dict[str, Any]) -> dict[str, Any]:
    rows = body["transactions"]
    return {"transactions": [{**r, "created_at": "yesterday"} if r["tx_type"] == "deposit" else r for r in rows]}


@pytest.mark.parametrize(
    ("fragment", "edit"),
    [("/res-01/timeseries", _drop_oldest_bucket), ("/res-01/transactions", _unreadable_deposit_times)],
)
async def test_an_answer_that_cannot_be_the_whole_story_is_never_reported_as_a_figure(
    harness: Harness, desired: DesiredState, fragment: str, edit: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """A timeseries missing a day (a capped ``limit``) fails the agent: it no longer adds up
    to the gateway's usage. A finops deposit whose time cannot be read cannot be placed in or
    out of the period: the top-ups are declared incomplete. The other agents are unaffected."""
    await spend_around_the_boundary(harness, desired)
    now = time.time()
    period = parse_period(PREV_LABEL, None, now)
    async with harness.client(Rewriter(fragment, edit)) as client:
        agents = {a.agent_id: a for a in await read_fleet(client, desired, period, now, {}, {})}
    res01 = agents["res-01"]
    if "timeseries" in fragment:
        assert res01.error is not None and "does not add up" in res01.error
    else:
        assert res01.error is None and not res01.top_ups_complete and res01.top_ups == Decimal(0)
    others = [a for a in agents.values() if a.agent_id != "res-01"]
    assert all(a.error is None and a.top_ups_complete for a in others)
    assert agents["orch-01"].spend == Decimal("0.70")
