"""Gateway webhooks reconciled like everything else: create, replace, prune what finops owns."""

from __future__ import annotations

import re
from pathlib import Path

from controller.io.secretref import managed_secret_dir
from controller.manifest.loader import load_manifests
from policies.plan_types import ChangeKind, webhook_marker
from tests.integration.conftest import Harness


def _hooks(h: Harness) -> list[dict[str, object]]:
    with h.admin() as http:
        rows: list[dict[str, object]] = http.get("/v1/infra/webhooks").json()["webhooks"]
    return rows


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


async def test_apply_creates_one_marked_webhook_per_agent_then_nothing(harness: Harness, manifests_dir: Path) -> None:
    desired = load_manifests(manifests_dir)
    result = await harness.apply(await harness.plan(desired))
    assert result.ok, result.to_dict()
    hooks = _hooks(harness)
    assert sorted(tuple(h["filter_agent_ids"]) for h in hooks) == sorted((a.agent_id,) for a in desired.agents())  # type: ignore[arg-type]
    for hook in hooks:
        assert webhook_marker("research") in hook["event_types"]  # type: ignore[operator]
        assert hook["url"] == f"https://alerts.example.com/gateway/{hook['filter_agent_ids'][0]}"  # type: ignore[index]
    # The gateway lists webhook secrets in clear: they are finops-generated, kept 0600 in
    # finops' state directory, and never the secret that signs finops' own alerts.
    generated = managed_secret_dir(harness.store.path) / "gateway-webhook-research.secret"
    assert generated.stat().st_mode & 0o777 == 0o600
    assert {h["secret"] for h in hooks} == {generated.read_text().strip()}
    alert_secret = Path("alert-signing.secret")  # the harness loads without a state directory: cwd
    assert not alert_secret.exists() or alert_secret.read_text().strip() not in {h["secret"] for h in hooks}

    harness.reset_stats()
    again = await harness.plan(desired)
    assert again.empty, [c.reason for c in again.changes]
    assert harness.stats()["writes"] == 0


async def test_changed_url_is_replaced_create_then_delete(harness: Harness, manifests_dir: Path) -> None:
    await harness.apply(await harness.plan(load_manifests(manifests_dir)))
    before = {h["id"] for h in _hooks(harness)}
    _edit(manifests_dir / "research-fleet.yaml", "https://alerts.example.com/gateway/{agent}", "https://hooks.example.net/{fleet}/{agent}")
    plan = await harness.plan(load_manifests(manifests_dir))
    kinds = [c.kind for c in plan.changes]
    assert kinds.count(ChangeKind.CREATE_WEBHOOK) == 5 and kinds.count(ChangeKind.DELETE_WEBHOOK) == 5
    assert all(c.kind in (ChangeKind.CREATE_WEBHOOK, ChangeKind.DELETE_WEBHOOK) for c in plan.changes)
    create = next(c for c in plan.changes if c.kind is ChangeKind.CREATE_WEBHOOK)
    assert "cannot update" in create.reason
    assert [(d.field, d.after) for d in create.diff] == [("url", f"https://hooks.example.net/research/{create.agent_id}")]
    result = await harness.apply(plan)
    assert result.ok
    after = _hooks(harness)
    assert len(after) == 5 and not before & {h["id"] for h in after}
    assert (await harness.plan(load_manifests(manifests_dir))).empty


async def test_threshold_edit_plans_exactly_that_change(harness: Harness, manifests_dir: Path) -> None:
    await harness.apply(await harness.plan(load_manifests(manifests_dir)))
    _edit(manifests_dir / "research-fleet.yaml", "thresholds: [75, 90, 100]   #", "thresholds: [60, 90, 100]   #")
    _edit(manifests_dir / "research-fleet.yaml", "thresholds: [75, 90]", "thresholds: [60, 90]")
    plan = await harness.plan(load_manifests(manifests_dir))
    assert {c.kind for c in plan.changes} == {ChangeKind.SET_BUDGET}
    assert len(plan.changes) == 5
    assert {(d.field, d.before, d.after) for c in plan.changes for d in c.diff} == {("alert_threshold", "0.75", "0.6")}


async def test_removed_agent_webhook_is_pruned_only_when_asked_and_foreign_hooks_survive(
    harness: Harness, manifests_dir: Path
) -> None:
    await harness.apply(await harness.plan(load_manifests(manifests_dir)))
    with harness.admin() as http:
        foreign = http.post(
            "/v1/infra/webhooks",
            json={"url": "https://other.example.com/x", "event_types": ["billing.deposit"], "secret": "s3"},
        ).json()
        # Looks like ours (marker) but finops' state never recorded it: the second key is missing.
        lookalike = http.post(
            "/v1/infra/webhooks",
            json={
                "url": "https://alerts.example.com/gateway/cls-01",
                "event_types": ["billing.deposit", webhook_marker("research")],
                "secret": "s4",
                "filter_agent_ids": ["cls-01"],
            },
        ).json()
    workers = manifests_dir / "research-workers.yaml"
    text = workers.read_text()
    workers.write_text(re.sub(r"\n    - id: cls-01\n(      .*\n)+", "\n", text))
    desired = load_manifests(manifests_dir)
    assert "cls-01" not in {a.agent_id for a in desired.agents()}

    plan = await harness.plan(desired)
    assert not [c for c in plan.changes if c.kind is ChangeKind.DELETE_WEBHOOK]
    assert any("cls-01" in w and "--prune" in w for w in plan.warnings)
    assert any(foreign["id"] in u for u in plan.unmanaged_webhooks)
    assert any(lookalike["id"] in u and "not proven ours" in u for u in plan.unmanaged_webhooks)

    pruning = await harness.plan(desired, prune=True)
    deletes = [c for c in pruning.changes if c.kind is ChangeKind.DELETE_WEBHOOK]
    assert [c.agent_id for c in deletes] == ["cls-01"]
    assert deletes[0].args.webhook_id != lookalike["id"]
    assert (await harness.apply(pruning)).ok
    left = {h["id"] for h in _hooks(harness)}
    assert foreign["id"] in left and lookalike["id"] in left
    assert len(left) == 4 + 2
