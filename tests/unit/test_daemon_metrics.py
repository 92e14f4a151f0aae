"""Metric families: one registry per daemon, every documented name present."""

from __future__ import annotations

from decimal import Decimal

from controller.daemon.metrics import DaemonMetrics

NAMES = [
    "finops_reconcile_duration_seconds",
    "finops_reconcile_total",
    "finops_drift_changes",
    "finops_changes_applied_total",
    "finops_gateway_errors_total",
    "finops_last_applied_revision_info",
    "finops_agents_held",
    "finops_agents_backoff",
    "finops_rebalanced_amount",
    "finops_keys_due_rotation",
    "finops_manifest_valid",
    "finops_last_reconcile_success_timestamp_seconds",
    "finops_job_runs_total",
]


def test_many_daemons_can_coexist_in_one_process() -> None:
    first, second = DaemonMetrics(), DaemonMetrics()
    first.drift_changes.set(3)
    assert second.registry.get_sample_value("finops_drift_changes") == 0
    text = first.render().decode()
    for name in NAMES:
        assert f"# HELP {name} " in text, name


def test_only_the_newest_revision_is_exported() -> None:
    metrics = DaemonMetrics()
    metrics.set_revision("aaa")
    metrics.set_revision("bbb")
    metrics.set_revision("bbb")
    text = metrics.render().decode()
    assert 'finops_last_applied_revision_info{revision="bbb"} 1.0' in text
    assert 'revision="aaa"' not in text


def test_gauges_fed_by_other_jobs() -> None:
    metrics = DaemonMetrics()
    metrics.set_rebalanced_amount(Decimal("1250.50"))
    metrics.set_keys_due_rotation(2)
    assert metrics.registry.get_sample_value("finops_rebalanced_amount") == 1250.5
    assert metrics.registry.get_sample_value("finops_keys_due_rotation") == 2
