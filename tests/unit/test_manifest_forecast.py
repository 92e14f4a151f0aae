"""``alerts.forecastHorizon`` and ``alerts.anomaly`` in manifests: resolution and errors."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from controller.errors import ManifestError
from controller.manifest import load_manifests
from policies.spec import AnomalySpec

FLEET = """\
apiVersion: finops.greenhelix.net/v1
kind: Fleet
metadata: {{name: research}}
spec:
  currency: CREDITS
  dailyBudgetTotal: "100.00"
  funding: {{perRunCeiling: "10.00"}}
  alerts:
{alerts}
  defaults: {{funding: {{floor: "0.00", target: "0.00"}}}}
  tiers: {{t: {{dailyCap: "10.00", monthlyCap: "100.00"}}}}
  agents:
    - {{id: a1, tier: t}}
    - {{id: a2, tier: t, alerts: {agent}}}
"""


def _load(tmp_path: Path, alerts: str, agent: str = "{thresholds: [80]}") -> dict[str, tuple[object, object]]:
    (tmp_path / "fleet.yaml").write_text(FLEET.format(alerts=alerts, agent=agent))
    return {a.agent_id: (a.forecast_horizon, a.anomaly) for a in load_manifests(tmp_path).agents()}


def _errors(tmp_path: Path, alerts: str, agent: str = "{thresholds: [80]}") -> list[str]:
    with pytest.raises(ManifestError) as info:
        _load(tmp_path, alerts, agent)
    return [f"{i.line}: {i.field}: {i.message}" for i in info.value.issues]


def test_fleet_settings_are_inherited_and_an_agent_overrides_them(tmp_path: Path) -> None:
    got = _load(
        tmp_path,
        '    forecastHorizon: 2h\n    anomaly: {window: 24h, baseline: 21d, multiple: 2.5, minSpend: "5.00"}',
        '{forecastHorizon: 30m, anomaly: {minSpend: "1.00"}}',
    )
    assert got["a1"] == (7200, AnomalySpec(86_400, 21 * 86_400, Decimal("2.5"), Decimal("5.00")))
    assert got["a2"] == (1800, AnomalySpec(86_400, 21 * 86_400, Decimal(2), Decimal("1.00")))


def test_not_declared_means_not_evaluated(tmp_path: Path) -> None:
    assert _load(tmp_path, "    thresholds: [75, 90, 100]") == {"a1": (None, None), "a2": (None, None)}


@pytest.mark.parametrize(
    ("alerts", "expected"),
    [
        ("    forecastHorizon: 2w", 'must be a duration such as "90m", "2h" or "21d"'),
        ("    forecastHorizon: 30s", "must be between 1m and 30d"),
        ("    forecastHorizon: 31d", "must be between 1m and 30d"),
        ('    anomaly: {minSpend: "5.00", multiple: 1}', "must be above 1"),
        ('    anomaly: {minSpend: "5.00", multiple: 2.555}', "at most 2 decimals"),
        ('    anomaly: {minSpend: "5.00", window: 8d}', "anomaly window '8d' must be between 1h and 7d"),
        ('    anomaly: {minSpend: "5.00", window: 7d, baseline: 3d}', "shorter than window"),
        ('    anomaly: {minSpend: "5.001"}', "spec.alerts.anomaly.minSpend"),
        ("    anomaly: {window: 24h}", "spec.alerts.anomaly.minSpend"),
    ],
)
def test_bad_values_name_the_line_and_field(tmp_path: Path, alerts: str, expected: str) -> None:
    (error,) = _errors(tmp_path, alerts)
    assert expected in error
    assert error.startswith("9: spec.alerts.")  # the line the value is written on
