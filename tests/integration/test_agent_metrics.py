"""Per-agent metrics fed by real reconcile passes against the sandbox: every declared agent
has its series from the first pass, figures follow the gateway (spend driven through the
paid route), a hold shows up, only declared manifest labels become label names, an agent
removed from the manifests loses its series, and /metrics serves it all over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.daemon.metrics import DaemonMetrics, MetricsServer
from controller.daemon.passes import Reconciler, record_pass
from controller.daemon.revisions import RevisionLog
from controller.daemon.source import DirectorySource
from tests.integration.conftest import Harness

FLEET = "research-fleet.yaml"
WORKERS = "research-workers.yaml"
AGENTS = {"orch-01", "res-01", "res-02", "sum-01", "cls-01"}


@pytest.fixture
def revisions(harness: Harness) -> Iterator[RevisionLog]:
    log = RevisionLog(harness.store.path, clock=harness.clock)
    yield log
    log.close()


def _declare_labels(manifests: Path) -> None:
    """Export ``team`` and ``role``; give res-01 an undeclared label that must stay out."""
    fleet = manifests / FLEET
    fleet.write_text(fleet.read_text().replace("  approval:\n", "  metrics: {labels: [team, role]}\n  approval:\n", 1))
    workers = manifests / WORKERS
    text = workers.read_text().replace("labels: {role: worker}", "labels: {role: worker, secret-project: x1}", 1)
    workers.write_text(text)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _agent_series(text: str, name: str) -> dict[str, dict[str, str]]:
    """agent id → labels of ``name``'s series (the first per agent)."""
    out: dict[str, dict[str, str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.setdefault(s.labels["agent"], dict(s.labels))
    return out


def _spend(harness: Harness, agent: str, calls: int) -> None:
    key = harness.sink.read(agent)
    assert key is not None
    with httpx.Client(base_url=harness.sandbox.url, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(calls):
            http.get("/v1/marketplace/match", params={"query": "x"}).raise_for_status()


async def test_agent_gauges_follow_passes_holds_and_the_manifests(
    harness: Harness, manifests_dir: Path, revisions: RevisionLog
) -> None:
    _declare_labels(manifests_dir)
    metrics = DaemonMetrics()
    reconciler = Reconciler(
        target="sandbox",
        source=DirectorySource(manifests_dir),
        store=harness.store,
        sink=harness.sink,
        revisions=revisions,
        client_factory=harness.client,
        clock=harness.clock,
    )

    async def step() -> str:
        result = await reconciler.run()
        assert result.completed, result.message
        record_pass(metrics, result)
        return metrics.render().decode()

    with MetricsServer(metrics, lambda: (True, "ready"), port=0) as server, httpx.Client(base_url=server.url) as http:
        first = await step()  # registers the agents: observed before they existed
        holds = _agent_series(first, "finops_agent_hold_active")
        assert set(holds) == AGENTS  # every declared agent, from the first export
        assert _agent_series(first, "finops_agent_balance_credits") == {}
        assert holds["res-01"] == {"agent": "res-01", "fleet": "research", "team": "research", "role": "worker",
                                   "kind": holds["res-01"]["kind"]}  # fmt: skip
        assert "secret_project" not in first and "secret-project" not in first

        _spend(harness, "res-01", 5)  # 5 paid calls of 0.10 credits
        await step()
        scraped = http.get("/metrics").text
    samples = _samples(scraped)
    labels = frozenset({"agent": "res-01", "fleet": "research", "team": "research", "role": "worker"}.items())

    def value(name: str, **extra: str) -> float:
        return samples[(name, labels | frozenset(extra.items()))]

    with harness.admin() as admin:
        live = admin.get("/v1/billing/wallets/res-01/budget").json()
        balance = admin.get("/v1/billing/wallets/res-01/balance").json()["balance"]
    assert value("finops_agent_spend_credits", window="daily") == float(Decimal(str(live["daily_spend"]))) == 0.5
    assert value("finops_agent_cap_credits", window="daily") == float(Decimal(str(live["daily_cap"])))
    assert value("finops_agent_utilization_ratio", window="daily") == pytest.approx(
        float(Decimal("0.5") / Decimal(str(live["daily_cap"])))
    )
    assert value("finops_agent_balance_credits") == float(Decimal(str(balance)))
    assert value("finops_agent_hold_active", kind="freeze") == 0.0
    assert value("finops_agent_key_age_seconds") >= 0
    assert 0 < value("finops_agent_key_next_rotation_seconds") <= 7 * 86400
    assert [v for (name, _), v in samples.items() if name == "finops_build_info"] == [1.0]

    harness.store.set_hold("res-02", "operator: investigating")
    workers = manifests_dir / WORKERS
    lines = workers.read_text().splitlines(keepends=True)
    at = lines.index("    - id: cls-01\n")
    assert lines[at + 1].lstrip().startswith("tier: classifier") and lines[at + 2].lstrip().startswith("labels:")
    workers.write_text("".join(lines[:at] + lines[at + 3 :]))
    after = await step()
    holds = _agent_series(after, "finops_agent_hold_active")
    assert set(holds) == AGENTS - {"cls-01"}  # removed from the manifests: its series are gone
    assert "cls-01" not in after
    frozen = _samples(after)
    res02 = frozenset({"agent": "res-02", "fleet": "research", "team": "research", "role": "worker"}.items())
    assert frozen[("finops_agent_hold_active", res02 | {("kind", "freeze")})] == 1.0
    assert frozen[("finops_agent_hold_active", res02 | {("kind", "auto")})] == 0.0
