"""Issue 9 item 5: an increase of money exposure is never applied unattended.

Real parts: the sandbox over HTTP on 127.0.0.1, the daemon's reconciler stepped with an
injected clock (directory and git sources), and the ``finops`` CLI as a subprocess for
``approve``, ``apply --auto-approve``, ``plan`` and ``status``. The repro is a commit that
raises a funding target and ``perRunCeiling`` together: it must move no money beyond the
exposure last approved until an operator holding the admin key approves it."""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controller.daemon.source import DirectorySource, directory_digest
from controller.io.target import _slug
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from policies.keyprint import fingerprint
from policies.spec import DesiredState
from tests.integration import test_daemon as daemon_tests
from tests.integration.conftest import CANONICAL, Harness
from tests.integration.test_daemon import (
    Rig,
    balance,
    budget,
    commit,
    drift,
    git,
    git_source,
    override_res01,
)

rig_factory = daemon_tests.rig_factory  # the daemon tests' fixtures, shared by name
upstream = daemon_tests.upstream

FLEET = "research-fleet.yaml"


@pytest.fixture
def harness(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Harness]:
    """The daemon's state where the CLI finds it for this gateway (``--state-dir STATE``)."""
    store = StateStore(tmp_path / "state" / f"state-{_slug(sandbox.url)}.db")
    yield Harness(sandbox, store, KeyVault(tmp_path / "secrets"))
    store.close()


def _state_url(store: StateStore) -> list[str]:
    """The CLI on the harness's state backend (``tests/integration/test_on_postgresql.py``)."""
    # The harness keeps agents' keys in a directory store: the CLI uses the same one.
    return ["--state-url", store.location.url, "--key-store", "directory"] if store.location.url else []


def finops(
    harness: Harness, tmp_path: Path, *args: str, stdin: str | None = None, key_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}
    target = [
        "--gateway",
        harness.sandbox.url,
        "--api-key-file",
        str(key_file or tmp_path / "admin.key"),
        "--state-dir",
        str(tmp_path / "state"),
        "--secrets-dir",
        str(tmp_path / "secrets"),
        *_state_url(harness.store),
    ]
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args, *target],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        check=False,
    )


def raise_funding(manifests: Path, target: str = "5000.00", ceiling: str = "6000.00") -> None:
    """The repro: one change raising res-01's funding target and the fleet's perRunCeiling."""
    override_res01(manifests, f'funding: {{target: "{target}"}}')
    fleet = manifests / FLEET
    text = fleet.read_text()
    assert 'perRunCeiling: "500.00"' in text
    fleet.write_text(text.replace('perRunCeiling: "500.00"', f'perRunCeiling: "{ceiling}"'))


def drain(harness: Harness, agent: str, amount: str = "5000.00") -> None:
    """The agent spends its wallet down (metered gateway spend). Not a withdrawal: that is
    unexplained outflow, which finops does not refund by default (``maxUnexplainedPerDay``),
    and these tests are about approval, not about outflow."""
    harness.spend(agent, Decimal(amount))


def deposits(harness: Harness) -> int:
    return sum(n for route, n in harness.stats()["by_route"].items() if "deposit" in route)


def approve(harness: Harness, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = finops(harness, tmp_path, "approve", *args)
    assert "Traceback" not in result.stderr
    return result


# ---------------------------------------------------------------------- the daemon, directory source


async def test_the_repro_is_held_back_until_approved_and_the_last_approved_revision_stays_enforced(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness, tmp_path: Path
) -> None:
    rig = rig_factory(DirectorySource(manifests_dir))
    await rig.step()
    good = rig.last.revision
    assert rig.last.result == "ok" and good is not None and good.startswith("dir:")
    first = harness.store.last_approval()
    assert first is not None and first.how == "bootstrap" and first.revision == good

    raise_funding(manifests_dir)
    held = directory_digest(manifests_dir)
    drain(harness, "res-01")  # 2500 credits: below the floor under either revision
    drift(harness, "res-02")
    harness.reset_stats()
    ran = await rig.step(60)

    # Nothing beyond the approved exposure: res-01 is topped up to the *old* target (75 USD).
    assert balance(harness, "res-01") == Decimal("7500.00")
    assert budget(harness, "res-02") == Decimal("3000.00")  # the old revision is still enforced
    assert rig.last.revision == good and rig.last.seen_revision == held
    assert rig.last.awaiting is not None and rig.last.awaiting.revision == held
    assert ran["reconcile"].result == "partial" and ran["reconcile"].fields["awaiting_approval"] == held
    ready, why = rig.daemon.ready()
    assert not ready and held in why and f"finops approve {held}" in why and "funding targets" in why
    assert rig.sample("finops_revision_awaiting_approval") == 1
    assert rig.sample("finops_exposure_increase", fleet="research", dimension="funding_targets") == 4925.0
    assert rig.sample("finops_exposure_increase", fleet="research", dimension="per_run_ceiling") == 5500.0
    # The default daily funding limit (perRunCeiling + dailyBudgetTotal) rises with the ceiling.
    assert rig.sample("finops_exposure_increase", fleet="research", dimension="daily_funding_limit") == 5500.0
    status = json.loads((tmp_path / "state" / "daemon-status.json").read_text())
    assert status["awaiting_approval"]["revision"] == held and status["applied_revision"] == good
    assert any(line["msg"].startswith("manifest revision held back") for line in rig.log_lines())

    await rig.step(60)  # still held: no deposit at the new target, pass after pass
    assert balance(harness, "res-01") == Decimal("7500.00")

    shown = approve(harness, tmp_path, "--show")
    assert shown.returncode == 0 and held in shown.stdout and "+4925.00 USD in funding targets" in shown.stdout
    state = finops(harness, tmp_path, "status", str(manifests_dir), "--strict")
    assert state.returncode == 1 and f"WAITING FOR APPROVAL: revision {held}" in state.stdout

    approved = approve(harness, tmp_path, held[:10])  # a unique prefix will do
    assert approved.returncode == 0, approved.stderr
    record = harness.store.last_approval()
    assert record is not None and record.revision == held and record.how == "approve"
    assert record.by_key == fingerprint(harness.sandbox.admin_key) and record.by_user == getpass.getuser()
    assert harness.sandbox.admin_key not in approved.stdout + approved.stderr

    drain(harness, "res-01")  # below the floor again: now topped up to the approved target
    await rig.step(60)  # the approval is picked up by the next pass
    assert rig.last.revision == held and rig.last.awaiting is None and rig.last.result == "ok"
    assert balance(harness, "res-01") == Decimal("500000.00")
    assert rig.daemon.ready()[0]
    assert rig.sample("finops_revision_awaiting_approval") == 0
    assert rig.sample("finops_exposure_increase", fleet="research", dimension="funding_targets") == 0
    assert harness.store.pending_revisions() == []


async def test_a_restarted_daemon_keeps_enforcing_the_approved_directory_revision_from_its_bundle(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness
) -> None:
    await rig_factory(DirectorySource(manifests_dir)).step()
    good = harness.store.last_approval()
    assert good is not None and harness.store.bundle(good.revision) is not None
    raise_funding(manifests_dir)
    drain(harness, "res-01")

    restarted = rig_factory(DirectorySource(manifests_dir))  # only the state database remembers
    await restarted.step()
    assert restarted.last.revision == good.revision and restarted.last.awaiting is not None
    assert balance(harness, "res-01") == Decimal("7500.00")  # the old target, from the bundle
    assert any(line["msg"] == "restored the last applied revision" for line in restarted.log_lines())


async def test_small_increases_cannot_creep_past_the_bound_and_lowering_never_waits(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness
) -> None:
    rig = rig_factory(DirectorySource(manifests_dir))
    await rig.step()
    baseline = rig.last.revision
    override_res01(manifests_dir, 'funding: {target: "375.00"}')  # +300 USD: within the 500 bound
    await rig.step(60)
    step1 = rig.last.revision
    assert step1 != baseline and rig.last.awaiting is None
    workers = manifests_dir / "research-workers.yaml"
    workers.write_text(workers.read_text().replace('target: "375.00"', 'target: "675.00"'))  # +600 over approved
    await rig.step(60)
    assert rig.last.revision == step1 and rig.last.awaiting is not None
    assert "funding targets +600.00 USD" in str(rig.last.awaiting.review.excesses[0])

    shutil.rmtree(manifests_dir)
    shutil.copytree(CANONICAL, manifests_dir)
    override_res01(manifests_dir, 'dailyCap: "25.00"')  # below the approved exposure: applied at once
    await rig.step(60)
    assert rig.last.awaiting is None and rig.last.revision == directory_digest(manifests_dir)
    assert budget(harness, "res-01") == Decimal("2500.00") and rig.daemon.ready()[0]
    assert harness.store.pending_revisions() == []


# ---------------------------------------------------------------------- the daemon, git source


async def test_a_commit_raising_exposure_and_its_own_bound_waits_and_a_lowering_commit_applies_at_once(
    rig_factory: Callable[..., Rig], upstream: Path, tmp_path: Path, harness: Harness
) -> None:
    rig = rig_factory(git_source(upstream, tmp_path))
    first_sha = git(upstream, "rev-parse", "HEAD")
    await rig.step()
    assert rig.last.revision == first_sha

    raise_funding(upstream / "manifests")
    fleet = upstream / "manifests" / FLEET
    fleet.write_text(fleet.read_text().replace('funding: "500.00"', 'funding: "1000000.00"'))  # its own bound
    raised = commit(upstream, "raise res-01's target, the ceiling and the bound")
    drain(harness, "res-01")
    await rig.step(30)
    assert rig.last.revision == first_sha and rig.last.awaiting is not None
    assert rig.last.awaiting.revision == raised
    assert balance(harness, "res-01") == Decimal("7500.00")

    restarted = rig_factory(git_source(upstream, tmp_path))  # a restart checks the old commit out again
    await restarted.step()
    assert restarted.last.revision == first_sha and restarted.last.awaiting is not None

    git(upstream, "revert", "--no-edit", "HEAD")
    override_res01(upstream / "manifests", 'dailyCap: "25.00"')
    lowered = commit(upstream, "lower res-01's daily cap")
    await rig.step(30)
    assert rig.last.revision == lowered and rig.last.awaiting is None
    assert budget(harness, "res-01") == Decimal("2500.00")
    assert rig.sample("finops_revision_awaiting_approval") == 0


async def test_once_exits_1_while_the_newest_revision_waits(tmp_path: Path, harness: Harness) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    fleet = tmp_path / "manifests" / FLEET
    text = fleet.read_text()
    start, end = text.index("  approval:\n"), text.index("  # Lowest precedence")
    fleet.write_text(text[:start] + text[end:])  # no spec.approval: every increase needs a person
    once = finops(harness, tmp_path, "run", "--once", "manifests", "--log-format", "json")
    assert once.returncode == 1
    docs = [json.loads(line) for line in once.stderr.splitlines() if line.startswith("{")]
    finished = next(d for d in docs if d["msg"].startswith("reconcile finished"))
    assert finished["result"] == "awaiting-approval"
    assert harness.stats()["writes"] == 0


# ---------------------------------------------------------------------- hand-run apply


def plan_json(harness: Harness, tmp_path: Path) -> dict[str, Any]:
    result = finops(harness, tmp_path, "plan", "manifests", "--format", "json")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_apply_auto_approve_refuses_above_the_bound_until_finops_approve(tmp_path: Path, harness: Harness) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    first = finops(harness, tmp_path, "apply", "manifests", "--auto-approve")
    assert first.returncode == 0, first.stderr
    assert "Exposure (spending authority vs nothing approved yet)" in first.stdout

    raise_funding(tmp_path / "manifests")
    drain(harness, "res-01")
    revision = directory_digest(tmp_path / "manifests")
    plan = plan_json(harness, tmp_path)
    assert plan["summary"]["approval_required"] is True and plan["summary"]["exposure_increase"] is True
    (fleet,) = plan["exposure"]["fleets"]
    assert fleet["delta"]["funding_targets"] == "+4925.00" and fleet["delta"]["daily_caps"] == "0.00"
    text = finops(harness, tmp_path, "plan", "manifests")
    head = text.stdout.split("\n\n", 1)[0]
    assert "+4925.00 USD in funding targets" in head and "needs `finops approve`" in head

    harness.reset_stats()
    refused = finops(harness, tmp_path, "apply", "manifests", "--auto-approve")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"finops approve {revision} manifests" in refused.stderr
    assert harness.stats()["writes"] == 0 and balance(harness, "res-01") == Decimal("2500.00")

    rebalance = finops(harness, tmp_path, "rebalance", "manifests")  # writes caps on these baselines: refused too
    assert rebalance.returncode == 1 and f"finops approve {revision} manifests" in rebalance.stderr

    agent_key = next((tmp_path / "secrets").glob("*.key"))  # a working key, but not an admin key
    not_admin = finops(harness, tmp_path, "approve", revision, "manifests", key_file=agent_key)
    assert not_admin.returncode == 1 and "admin" in not_admin.stderr and "Traceback" not in not_admin.stderr
    assert agent_key.read_text().strip() not in not_admin.stdout + not_admin.stderr
    assert harness.store.last_approval() is not None and harness.store.last_approval().how == "bootstrap"  # type: ignore[union-attr]

    wrong = approve(harness, tmp_path, "dir:0000000000000000", "manifests")
    assert wrong.returncode == 1 and revision in wrong.stderr  # approve what you reviewed, nothing else
    approved = approve(harness, tmp_path, revision, "manifests")
    assert approved.returncode == 0, approved.stderr
    applied = finops(harness, tmp_path, "apply", "manifests", "--auto-approve")
    assert applied.returncode == 0, applied.stderr
    assert balance(harness, "res-01") == Decimal("500000.00")
    assert plan_json(harness, tmp_path)["summary"]["approval_required"] is False


def test_without_a_policy_even_the_first_unattended_apply_waits(tmp_path: Path, harness: Harness) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    fleet = tmp_path / "manifests" / FLEET
    text = fleet.read_text()
    fleet.write_text(text[: text.index("  approval:\n")] + text[text.index("  # Lowest precedence") :])
    refused = finops(harness, tmp_path, "apply", "manifests", "--auto-approve")
    assert refused.returncode == 1 and "5 agent(s), 0 allowed unattended" in refused.stderr
    assert harness.stats()["writes"] == 0


def test_a_confirmed_interactive_apply_is_recorded_as_an_approval(
    tmp_path: Path, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from click.testing import CliRunner

    import controller.cli.app as cli_module

    shutil.copytree(CANONICAL, tmp_path / "manifests")
    raise_funding(tmp_path / "manifests")  # above the bound even at bootstrap: 4925 + … > 500
    monkeypatch.setattr(cli_module, "sys", SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True)))
    args = ["apply", "manifests", "--gateway", harness.sandbox.url, "--api-key-file", str(tmp_path / "admin.key")]
    args += ["--state-dir", str(tmp_path / "state"), "--secrets-dir", str(tmp_path / "secrets")]
    args += _state_url(harness.store)
    result = CliRunner().invoke(cli_module.cli, args, input="yes\n")
    assert result.exit_code == 0, result.output
    assert "answering yes approves dir:" in result.output
    record = harness.store.last_approval()
    assert record is not None and record.how == "apply"
    assert record.revision == directory_digest(tmp_path / "manifests")
    assert record.by_key == fingerprint(harness.sandbox.admin_key)
    assert balance(harness, "res-01") == Decimal("500000.00")


def small_fleet(directory: Path, agents: list[str], daily_limit: str) -> DesiredState:
    """No ``spec.approval`` (bound 0) and no managed keys: only exposure and funding matter."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "apiVersion: finops.greenhelix.net/v1",
        "kind: Fleet",
        "metadata: {name: small}",
        "spec:",
        "  currency: USD",
        '  dailyBudgetTotal: "100.00"',
        f'  funding: {{perRunCeiling: "100.00", dailyLimit: "{daily_limit}"}}',
        "  tiers:",
        '    worker: {dailyCap: "5.00", monthlyCap: "50.00", funding: {floor: "10.00", target: "20.00"}}',
        "  agents:",
        *(f"    - {{id: {a}, tier: worker}}" for a in agents),
    ]
    (directory / "fleet.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_manifests(directory)


def test_a_revision_above_its_own_bound_is_no_bootstrap_even_when_its_funding_is_deferred(
    sandbox: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exposure review meets the funding limits: with no approval on record (finops upgraded,
    or a fresh state directory over a running fleet), a revision adding an agent waits for a
    person. If the agent's registration is deferred by the rolling funding limit, the
    unattended apply has nothing to write now; it must still not record the revision as the
    bootstrap baseline, or the same apply a day later would register the agent unreviewed."""
    from click.testing import CliRunner

    import controller.cli.app as cli_module
    import controller.services as services_module

    state = tmp_path / "state" / f"state-{_slug(sandbox.url)}.db"
    store = StateStore(state, clock=sandbox.clock)  # finops' funding window runs on the sandbox's clock
    # The composition root builds the state database for every command.
    monkeypatch.setattr(services_module, "StateStore", functools.partial(StateStore, clock=sandbox.clock))
    try:
        fleet = tmp_path / "manifests"
        earlier = Harness(sandbox, store, KeyVault(tmp_path / "secrets"), clock=sandbox.clock)
        plan = asyncio.run(earlier.plan(small_fleet(fleet, ["a", "b"], "40.00")))
        assert asyncio.run(earlier.apply(plan)).ok
        assert store.last_approval() is None  # a fleet finops ran before approvals were recorded

        small_fleet(fleet, ["a", "b", "c"], "40.00")  # +1 agent; the 40.00 USD of the day are used
        args = ["apply", str(fleet), "--auto-approve", "--gateway", sandbox.url]
        args += ["--api-key-file", str(tmp_path / "admin.key"), "--state-dir", str(tmp_path / "state")]
        args += ["--secrets-dir", str(tmp_path / "secrets")]
        deferred = CliRunner().invoke(cli_module.cli, args)
        assert "deferred by the funding limits" in deferred.output, deferred.output
        assert deferred.exit_code == 0  # nothing written now: no change to refuse
        assert "fleet small: +3 agent(s), 0 allowed unattended" in deferred.output  # vs nothing approved
        assert sandbox.store.get_wallet("c") is None
        assert store.last_approval() is None  # not the baseline: it is above its own bound

        sandbox.clock.advance(86_400 + 60)  # the window has room again
        later = CliRunner().invoke(cli_module.cli, args)
        assert later.exit_code == 1 and f"finops approve {directory_digest(fleet)}" in later.output
        assert sandbox.store.get_wallet("c") is None and store.last_approval() is None
    finally:
        store.close()
