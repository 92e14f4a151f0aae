"""The shipped Grafana dashboard and Prometheus rules are checked against the daemon that
feeds them: every metric named in every expression is one ``DaemonMetrics`` exports (a small
PromQL tokenizer finds the names), every rule has ``for:``, a severity and a summary, the
dashboard is valid JSON whose every panel has a query on the ``$datasource`` variable, and
``promtool check rules`` / ``promtool test rules`` run when promtool is installed (Debian's
``prometheus`` package ships it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.daemon.metrics import DaemonMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "finops-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "finops-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "finops-fleet.json"

PROMETHEUS_OWN = frozenset({"up"})
"""Series Prometheus itself writes for every target."""
KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "inf", "nan", "atan2", "start", "end",
})  # fmt: skip
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not inside a
    string, a label matcher, a range or a grouping label list, not a function or aggregation
    (followed by ``(``), not a keyword, and not part of a number or duration."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _LABEL_LIST.sub(" ", text)  # `sum by (a) (x)` → `sum  (x)`: an aggregation, like `sum(x)`
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        name = match.group(1)
        if text[match.end() :].lstrip().startswith("(") or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (fleet, team) (finops_agent_cap_credits{window="daily", team=~"$t"})', {"finops_agent_cap_credits"}),
        ("histogram_quantile(0.95, sum(rate(a_bucket[$__rate_interval])) by (le))", {"a_bucket"}),
        ("time() - max(b_seconds) > 9e2 and on (instance) c == 1 offset 5m", {"b_seconds", "c"}),
        ('count(x{l="by (q)"}) or vector(0)', {"x"}),
        ("-min by (agent) (k) > 3600 unless ignoring (kind) group_left (team) m", {"k", "m"}),
        ("absent_over_time(finops_build_info[10m:1m])", {"finops_build_info"}),
    ],
)
def test_the_tokenizer_finds_exactly_the_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _exported() -> frozenset[str]:
    return DaemonMetrics().names() | PROMETHEUS_OWN


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    exprs = [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, query
            exprs.append((f"${var['name']}", inner.group(1)))
    return exprs


def test_the_checker_would_catch_a_misspelt_metric() -> None:
    unknown = metric_names("finops_agent_utilisation_ratio >= 0.9") - _exported()
    assert unknown == {"finops_agent_utilisation_ratio"}


def test_every_rule_names_only_exported_metrics() -> None:
    exported = _exported()
    rules = _rules()
    assert rules
    used: set[str] = set()
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, (rule["alert"], names - exported)
        used |= names
    agent_families = {n for n in exported if n.startswith("finops_agent_")}
    assert {"finops_agent_utilization_ratio", "finops_agent_forecast_exhaustion_seconds"} <= used <= exported
    assert used & agent_families


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    exported = _exported()
    for title, expr in _dashboard_exprs(_dashboard()):
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= exported, (title, names - exported)


REQUIRED_ALERTS = {
    "FinopsDown", "FinopsAbsent", "FinopsReconcileStale", "FinopsManifestsInvalid", "FinopsAlertReceiverFailing",
    "FinopsAlertGivenUp", "FinopsAgentNearCap", "FinopsForecastExhaustion", "FinopsAgentHeld",
}  # fmt: skip


def test_rules_cover_the_required_conditions_each_with_for_severity_and_summary() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_rule_has_a_promtool_unit_test() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    every = {rule["alert"] for rule in _rules()}
    assert tested == every, every - tested


SECTIONS = {"Fleet overview", "Top spenders", "Utilization", "Forecasts", "Holds and keys", "Alert delivery health",
            "Controller health"}  # fmt: skip


def test_dashboard_is_templated_and_every_panel_queries_the_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"fleet", "team"} <= set(variables)
    panels = _panels(dashboard)
    assert {p["title"] for p in panels if p["type"] == "row"} == SECTIONS
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and all("finops_agent_utilization_ratio" in t["expr"] for p in heatmaps for t in p["targets"])
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        for target in panel["targets"]:
            if re.search(r"finops_agent_\w+\{", target["expr"]) and "finops_agent_" in target["expr"]:
                assert 'fleet=~"$fleet"' in target["expr"] and 'team=~"$team"' in target["expr"], panel["title"]


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(_dashboard()):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in check.stdout
    tests = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
