"""A fresh state directory (every CI runner has one) against a converged gateway plans
nothing (issue 11, "live-first plans"): what the gateway cannot report is *unverified*, not
a change, and finops' generated webhook secret is re-derived from finops' own live webhooks
(the gateway lists their secrets in clear to the admin key) instead of being replaced."""

from __future__ import annotations

from pathlib import Path

from controller.io.secretref import managed_secret_dir
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from policies.keyprint import secret_fingerprint
from policies.plan_types import ChangeKind
from tests.integration.conftest import Harness
from tests.integration.test_cli import finops

SECRET_FILE = "gateway-webhook-research.secret"


def _fresh(h: Harness, where: Path) -> Harness:
    """The same gateway seen from a state directory that has never been used."""
    return Harness(h.sandbox, StateStore(where / "state-sandbox.db"), KeyVault(where / "secrets"))


def _live_secret_fps(h: Harness) -> set[str]:
    with h.admin() as http:
        return {secret_fingerprint(str(w["secret"])) for w in http.get("/v1/infra/webhooks").json()["webhooks"]}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


async def test_converged_fleet_from_a_fresh_state_plans_nothing_and_lists_the_unverified(
    harness: Harness, manifests_dir: Path, tmp_path: Path
) -> None:
    desired = load_manifests(manifests_dir)
    assert (await harness.apply(await harness.plan(desired))).ok
    fresh = _fresh(harness, tmp_path / "fresh")
    try:
        harness.reset_stats()
        plan = await fresh.plan(desired, prepare=False)  # `finops plan`: read-only
        assert plan.empty, [(c.agent_id, c.kind.value, c.diff) for c in plan.changes]
        assert sorted((u.agent_id, u.field, u.desired) for u in plan.unverified) == sorted(
            (a.agent_id, "alert_threshold", "0.75") for a in desired.agents()
        )
        assert harness.stats()["writes"] == 0
        # Read-only: nothing was written on finops' side either.
        assert not (managed_secret_dir(fresh.store.path) / SECRET_FILE).exists()
    finally:
        fresh.store.close()


async def test_apply_from_a_fresh_state_writes_nothing_and_adopts_the_live_secret(
    harness: Harness, manifests_dir: Path, tmp_path: Path
) -> None:
    desired = load_manifests(manifests_dir)
    assert (await harness.apply(await harness.plan(desired))).ok
    live_fps = _live_secret_fps(harness)
    assert len(live_fps) == 1
    fresh = _fresh(harness, tmp_path / "fresh")
    try:
        harness.reset_stats()
        plan = await fresh.plan(desired)  # `finops apply`: prepare first
        assert plan.empty, [(c.agent_id, c.kind.value, c.diff) for c in plan.changes]
        result = await fresh.apply(plan)
        assert result.ok and result.writes == 0
        assert harness.stats()["writes"] == 0
        adopted = managed_secret_dir(fresh.store.path) / SECRET_FILE
        assert adopted.stat().st_mode & 0o777 == 0o600
        assert {secret_fingerprint(adopted.read_text().strip())} == live_fps
        assert any("adopted from finops' own webhooks" in n for n in fresh.notes)
        assert not any(adopted.read_text().strip() in n for n in fresh.notes)  # fingerprints, never the secret
        # ... and it stays converged from that state directory.
        assert (await fresh.plan(desired)).empty
    finally:
        fresh.store.close()


async def test_disagreeing_live_secrets_are_not_guessed(harness: Harness, manifests_dir: Path, tmp_path: Path) -> None:
    desired = load_manifests(manifests_dir)
    assert (await harness.apply(await harness.plan(desired))).ok
    # One agent's finops-owned hook now carries another secret (e.g. a second finops with
    # its own state directory replaced it).
    with harness.admin() as http:
        hook = http.get("/v1/infra/webhooks").json()["webhooks"][0]
        one = str(hook["filter_agent_ids"][0])
        http.post(
            "/v1/infra/webhooks",
            json={
                "url": hook["url"],
                "event_types": hook["event_types"],
                "secret": "f" * 64,
                "filter_agent_ids": [one],
            },
        ).raise_for_status()
        http.delete(f"/v1/infra/webhooks/{hook['id']}").raise_for_status()
    assert len(_live_secret_fps(harness)) == 2
    fresh = _fresh(harness, tmp_path / "fresh")
    try:
        plan = await fresh.plan(desired)
        assert not (managed_secret_dir(fresh.store.path) / SECRET_FILE).exists()
        assert any("different secrets: not guessing" in w for w in plan.warnings)
        creates = [c for c in plan.changes if c.kind is ChangeKind.CREATE_WEBHOOK]
        assert len(creates) == len(desired.agents()) and one in {c.agent_id for c in creates}
    finally:
        fresh.store.close()


async def test_a_recorded_threshold_change_is_still_planned(harness: Harness, manifests_dir: Path) -> None:
    assert (await harness.apply(await harness.plan(load_manifests(manifests_dir)))).ok
    _edit(manifests_dir / "research-fleet.yaml", "thresholds: [75, 90, 100]   #", "thresholds: [60, 90, 100]   #")
    _edit(manifests_dir / "research-fleet.yaml", "thresholds: [75, 90]", "thresholds: [60, 90]")
    plan = await harness.plan(load_manifests(manifests_dir))
    assert {(c.kind, d.field, d.before, d.after) for c in plan.changes for d in c.diff} == {
        (ChangeKind.SET_BUDGET, "alert_threshold", "0.75", "0.6")
    }
    assert plan.unverified == ()


async def test_a_caps_change_from_a_fresh_state_writes_the_threshold_too(
    harness: Harness, manifests_dir: Path, tmp_path: Path
) -> None:
    desired = load_manifests(manifests_dir)
    assert (await harness.apply(await harness.plan(desired))).ok
    agent = next(iter(desired.agents())).agent_id
    with harness.admin() as http:
        http.put(f"/v1/billing/wallets/{agent}/budget", json={"daily_cap": "1.00"}).raise_for_status()
    fresh = _fresh(harness, tmp_path / "fresh")
    try:
        plan = await fresh.plan(desired)
        [change] = plan.changes
        assert change.kind is ChangeKind.SET_BUDGET and change.agent_id == agent
        assert "alert_threshold" in {d.field for d in change.diff}
        assert agent not in {u.agent_id for u in plan.unverified} and len(plan.unverified) == len(desired.agents()) - 1
        assert (await fresh.apply(plan)).ok
        assert str(fresh.store.budget_writes()[agent].alert_threshold) == change.args.wire()["alert_threshold"]
        after = await fresh.plan(desired)
        assert after.empty and agent not in {u.agent_id for u in after.unverified}
    finally:
        fresh.store.close()


def test_cli_plan_detailed_exitcode_from_a_fresh_state_dir_is_zero(tmp_path: Path, manifests_dir: Path) -> None:
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        env = {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}
        applied = finops(
            tmp_path, "apply", str(manifests_dir), "--auto-approve", "--state-dir", str(tmp_path / "A"), env=env
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        fresh = tmp_path / "FRESH"
        plan = finops(tmp_path, "plan", str(manifests_dir), "--detailed-exitcode", "--state-dir", str(fresh), env=env)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "No changes" in plan.stdout
        assert plan.stdout.count("? unverified") == 5
        as_json = finops(tmp_path, "plan", str(manifests_dir), "--format", "json", "--state-dir", str(fresh), env=env)
        assert as_json.returncode == 0
        assert '"unverified": 5' in as_json.stdout
        assert not list(fresh.glob("**/*.secret"))  # plan wrote nothing
