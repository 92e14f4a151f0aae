"""Per-agent gauges: the pure snapshot builder (``policies.fleet_metrics``), the exporter
(``controller.daemon.metrics``: series per declared agent, removal, no series for unknowns,
escaping, the cached exposition at 10,000 agents) and the bounded ``spec.metrics.labels``."""

from __future__ import annotations

import re
import shutil
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.daemon.metrics import AgentCollector, DaemonMetrics, update_agent_metrics
from controller.errors import ManifestError
from controller.manifest import load_manifests
from policies.fleet_metrics import (
    HOLD_KINDS,
    MAX_LABEL_VALUE,
    MAX_METRIC_LABELS,
    AgentGauges,
    KeyAge,
    WindowGauges,
    agent_gauges,
    fleet_gauges,
    metric_label_name,
    metric_label_problem,
)
from policies.spec import AgentSpec, DesiredState, FleetSpec, KeyPolicy

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _spec(agent: str, labels: dict[str, str] | None = None, **kw: object) -> AgentSpec:
    return AgentSpec(
        agent_id=agent, fleet="research", tier="researcher", daily_cap=Decimal("30.00"),
        monthly_cap=Decimal("600.00"), funding_floor=Decimal("0"), funding_target=Decimal("0"),
        alert_thresholds=(75, 90, 100), labels=labels or {}, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _desired(*agents: AgentSpec, labels: tuple[str, ...] = ("team",)) -> DesiredState:
    fleet = FleetSpec("research", "USD", Decimal("200"), Decimal("0"), agents, metric_labels=labels)
    return DesiredState((fleet,))


def _samples(metrics: DaemonMetrics) -> list[tuple[str, dict[str, str], float]]:
    text = metrics.agents.render().decode()
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


# -- the pure builder ---------------------------------------------------------------------------


def test_every_declared_agent_gets_a_snapshot_with_only_declared_labels() -> None:
    desired = _desired(
        _spec("a1", {"team": "search", "secret-project": "x"}),
        _spec("a2", {"role": "worker"}),
    )
    snaps = fleet_gauges(
        desired,
        now=NOW,
        windows={"a1": (WindowGauges(Decimal("12.00"), Decimal("40.00")), WindowGauges(Decimal("1"), None))},
        balances={"a1": Decimal("75.50")},
        holds={"a2": frozenset({"freeze"})},
        observed_at={"a1": NOW - 5},
    )
    a1, a2 = snaps
    assert (a1.agent_id, a1.labels, a1.balance, a1.observed_at) == (
        "a1",
        (("team", "search"),),
        Decimal("75.50"),
        NOW - 5,
    )
    assert a1.daily is not None and a1.daily.utilization == Decimal("0.3")
    assert a1.monthly is not None and a1.monthly.utilization is None  # no cap: no ratio
    assert (a2.labels, a2.balance, a2.daily, a2.holds) == ((("team", ""),), None, None, frozenset({"freeze"}))


def test_forecasts_are_a_typed_input_per_window() -> None:
    window = WindowGauges(Decimal("1.00"), Decimal("30.00"))
    (snap,) = fleet_gauges(
        _desired(_spec("a1")), now=NOW, windows={"a1": (window, window)}, forecasts={"a1": (1800.0, None)}
    )
    assert snap.daily is not None and snap.daily.forecast_exhaustion_s == 1800.0
    assert snap.monthly is not None and snap.monthly.forecast_exhaustion_s is None


def test_key_age_and_next_rotation_follow_the_declared_schedule() -> None:
    since = NOW - 86400
    weekly = agent_gauges(_spec("k"), key_since=since, now=NOW)
    assert weekly.key == KeyAge(age_s=86400.0, next_rotation_s=6 * 86400.0)
    daily = agent_gauges(_spec("k", keys=KeyPolicy(rotation="daily")), key_since=NOW - 2 * 86400, now=NOW)
    assert daily.key is not None and daily.key.next_rotation_s == -86400.0  # overdue: negative
    cron = agent_gauges(_spec("k", keys=KeyPolicy(rotation="0 3 * * *")), key_since=NOW - 60, now=NOW)
    fire = datetime.fromtimestamp(NOW - 60, UTC).replace(hour=3, minute=0, second=0)
    expected = fire.timestamp() if fire.timestamp() > NOW - 60 else fire.timestamp() + 86400
    assert cron.key is not None and cron.key.next_rotation_s == expected - NOW
    unmanaged = agent_gauges(_spec("k", keys=KeyPolicy(manage=False)), key_since=since, now=NOW)
    assert unmanaged.key is None


@given(
    spend=st.decimals(min_value=0, max_value=10**9, places=2), cap=st.decimals(min_value=0, max_value=10**9, places=2)
)
def test_utilization_is_spend_over_a_positive_cap_else_none(spend: Decimal, cap: Decimal) -> None:
    ratio = WindowGauges(spend, cap).utilization
    assert ratio == (spend / cap if cap > 0 else None)


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,62}", fullmatch=True))
def test_an_accepted_label_key_becomes_a_valid_prometheus_label_name(key: str) -> None:
    name = metric_label_name(key)
    assert LABEL_NAME.match(name)
    if metric_label_problem((key,)) is None:
        assert name not in {"agent", "fleet", "window", "kind"} and not name.startswith("__")


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        (tuple(f"l{i}" for i in range(MAX_METRIC_LABELS + 1)), "at most"),
        (("agent",), "already uses"),
        (("Fleet",), None),
        (("__name",), "must start with a letter"),
        (("cost-center", "cost_center"), "both be exported as 'cost_center'"),
        (("9lives",), "must start with a letter"),
        (("team", "cost-center"), None),
    ],
)
def test_declared_label_keys_are_bounded_and_unambiguous(keys: tuple[str, ...], problem: str | None) -> None:
    found = metric_label_problem(keys)
    assert (found is None) if problem is None else (found is not None and problem in found), found


# -- the exporter -------------------------------------------------------------------------------


def test_hold_series_exist_for_every_agent_and_kind_and_unknown_figures_have_none() -> None:
    metrics = DaemonMetrics()
    update_agent_metrics(
        metrics, fleet_gauges(_desired(_spec("a1"), _spec("a2")), now=NOW, holds={"a1": frozenset({"auto"})})
    )
    samples = _samples(metrics)
    holds = {(s[1]["agent"], s[1]["kind"]): s[2] for s in samples if s[0] == "finops_agent_hold_active"}
    expected = {(agent, kind): int(agent == "a1" and kind == "auto") for agent in ("a1", "a2") for kind in HOLD_KINDS}
    assert holds == expected
    assert set(HOLD_KINDS) == {"freeze", "auto", "pause"}
    assert {s[0] for s in samples} == {"finops_agent_hold_active"}  # nothing else was observed


def test_an_update_replaces_the_table_so_removed_agents_lose_their_series() -> None:
    metrics = DaemonMetrics()
    window = WindowGauges(Decimal("3.00"), Decimal("30.00"), forecast_exhaustion_s=5400.0)
    both = [AgentGauges("a1", "f", balance=Decimal("1"), daily=window), AgentGauges("a2", "f", balance=Decimal("2"))]
    update_agent_metrics(metrics, both)
    assert metrics.agents.registry.get_sample_value("finops_agent_balance_credits", {"agent": "a2", "fleet": "f"}) == 2
    assert (
        metrics.agents.registry.get_sample_value(
            "finops_agent_forecast_exhaustion_seconds", {"agent": "a1", "fleet": "f", "window": "daily"}
        )
        == 5400.0
    )
    assert metrics.agents.registry.get_sample_value(
        "finops_agent_utilization_ratio", {"agent": "a1", "fleet": "f", "window": "daily"}
    ) == pytest.approx(0.1)
    update_agent_metrics(metrics, both[:1])
    assert 'agent="a2"' not in metrics.render().decode()
    assert 'agent="a1"' in metrics.render().decode()


def test_label_values_are_escaped_and_fleets_with_different_labels_share_a_family() -> None:
    metrics = DaemonMetrics()
    nasty = 'q"uo\\te\nnl'
    update_agent_metrics(
        metrics,
        [
            AgentGauges("a1", "f1", labels=(("team", nasty),), balance=Decimal("1")),
            AgentGauges("a2", "f2", labels=(("cost_center", "cc"),), balance=Decimal("2")),
        ],
    )
    balances = {s[1]["agent"]: s[1] for s in _samples(metrics) if s[0] == "finops_agent_balance_credits"}
    assert balances["a1"] == {"agent": "a1", "fleet": "f1", "team": nasty, "cost_center": ""}
    assert balances["a2"] == {"agent": "a2", "fleet": "f2", "team": "", "cost_center": "cc"}


@given(
    st.lists(
        st.builds(
            AgentGauges,
            agent_id=st.text(min_size=1, max_size=12),
            fleet=st.sampled_from(["f1", "f2"]),
            labels=st.sampled_from([(), (("team", "a\\b\"c\nd"),), (("team", ""), ("cost_center", "x"))]),
            balance=st.none() | st.decimals(min_value=0, max_value=10**9, places=2),
            daily=st.none()
            | st.builds(
                WindowGauges,
                spend=st.decimals(min_value=0, max_value=10**6, places=2),
                cap=st.none() | st.decimals(min_value=0, max_value=10**6, places=2),
                forecast_exhaustion_s=st.none() | st.floats(min_value=0, max_value=1e9),
            ),
            holds=st.frozensets(st.sampled_from(HOLD_KINDS)),
            key=st.none() | st.builds(KeyAge, st.floats(0, 1e8), st.floats(-1e8, 1e8)),
            observed_at=st.none() | st.floats(0, 2e9),
        ),
        max_size=6,
        unique_by=lambda g: g.agent_id,
    )
)
def test_the_fast_exposition_says_exactly_what_the_collector_says(snaps: list[AgentGauges]) -> None:
    metrics = DaemonMetrics()
    update_agent_metrics(metrics, snaps)

    def parsed(text: str) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
        return {
            (s.name, frozenset(s.labels.items()), s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    fast = metrics.agents.render().decode()
    reference = generate_latest(metrics.agents.registry).decode()
    assert parsed(fast) == parsed(reference)
    assert fast.count("# TYPE") == reference.count("# TYPE") == len(AgentCollector.NAMES)


def test_controller_collectors_and_build_info_are_on() -> None:
    text = DaemonMetrics().render().decode()
    assert re.search(r'^finops_build_info\{version="[^"]+"\} 1\.0$', text, re.M)
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "python_info",
        "python_gc_collections_total",
    ):
        assert f"\n{name}" in text, name
    assert 'finops_alert_deliveries_total{result="gave_up"} 0.0' in text  # initialised: the first is not lost


def test_alert_check_counts_accumulate() -> None:
    metrics = DaemonMetrics()
    for _ in range(2):
        metrics.record_alert_check(
            fired=2, recovered=1, delivered=2, failed=1, gave_up=0, refused=0, pending=1, unread=3
        )
    get = metrics.registry.get_sample_value
    assert get("finops_alerts_total", {"type": "budget.threshold"}) == 4
    assert get("finops_alert_deliveries_total", {"result": "failed"}) == 2
    assert (get("finops_alerts_pending"), get("finops_alert_agents_unread")) == (1, 3)


def test_exposition_at_ten_thousand_agents_is_rendered_once_per_update(capsys: pytest.CaptureFixture[str]) -> None:
    n = 10_000
    snaps = [
        AgentGauges(
            f"agent-{i:05d}", "research", (("team", f"team-{i % 20}"),), Decimal("123.45"),
            WindowGauges(Decimal("10.00"), Decimal("30.00"), 3600.0),
            WindowGauges(Decimal("100.00"), Decimal("600.00")),
            frozenset(), KeyAge(1000.0, 5000.0), NOW,
        )
        for i in range(n)
    ]  # fmt: skip
    metrics = DaemonMetrics()
    started = time.perf_counter()
    update_agent_metrics(metrics, snaps)
    updated = time.perf_counter()
    first = metrics.render()
    rendered = time.perf_counter()
    calls = 0
    real = AgentCollector.collect

    def counting(self: AgentCollector):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(self)

    AgentCollector.collect = counting  # type: ignore[method-assign]
    try:
        scrapes = [metrics.render() for _ in range(5)]
    finally:
        AgentCollector.collect = real  # type: ignore[method-assign]
    cached = (time.perf_counter() - rendered) / 5
    assert calls == 0  # cached: no agent sample formatted again
    assert all(s.endswith(first[-200:]) for s in scrapes)
    series = sum(1 for line in first.splitlines() if line.startswith(b"finops_agent_"))
    # balance; daily spend, cap, ratio, forecast; monthly spend, cap, ratio; the hold kinds; key x2; observed
    per_agent = 1 + 4 + 3 + len(HOLD_KINDS) + 2 + 1
    assert series == n * per_agent
    with capsys.disabled():
        print(
            f"\n[metrics at {n} agents] update {updated - started:.4f} s, first render {rendered - updated:.2f} s, "
            f"cached scrape {cached * 1000:.1f} ms, {len(first) / 1e6:.1f} MB, {series} agent series"
        )
    assert rendered - updated < 30  # a generous bound for a shared CI machine; the figure is printed


# -- the manifest field -------------------------------------------------------------------------


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "manifests"
    shutil.copytree(ROOT / "manifests", target)
    return target


def _set_metrics(manifests: Path, line: str) -> None:
    fleet = manifests / "research-fleet.yaml"
    fleet.write_text(fleet.read_text().replace("  approval:\n", f"  metrics: {line}\n  approval:\n", 1))


def test_declared_metric_labels_reach_the_desired_state(tmp_path: Path) -> None:
    manifests = _copy(tmp_path)
    _set_metrics(manifests, "{labels: [team, role]}")
    (fleet,) = load_manifests(manifests).fleets
    assert fleet.metric_labels == ("team", "role")
    snaps = fleet_gauges(load_manifests(manifests), now=NOW)
    assert {s.labels for s in snaps} == {
        (("team", "research"), ("role", "lead")),
        (("team", "research"), ("role", "worker")),
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{labels: [a, b, c, d, e, f]}", "at most 5"),
        ("{labels: [fleet]}", "already uses"),
        ("{labels: [team], extra: 1}", "extra"),
    ],
)
def test_bad_metric_labels_are_refused_at_their_line(tmp_path: Path, line: str, message: str) -> None:
    manifests = _copy(tmp_path)
    _set_metrics(manifests, line)
    with pytest.raises(ManifestError) as info:
        load_manifests(manifests)
    text = str(info.value)
    assert "research-fleet.yaml:" in text and "metrics" in text and message in text, text


def test_a_declared_label_value_longer_than_the_bound_is_refused_naming_the_agent(tmp_path: Path) -> None:
    manifests = _copy(tmp_path)
    _set_metrics(manifests, "{labels: [role]}")
    workers = manifests / "research-workers.yaml"
    long_value = "w" * (MAX_LABEL_VALUE + 1)
    workers.write_text(workers.read_text().replace("labels: {role: worker}", f"labels: {{role: {long_value}}}", 1))
    with pytest.raises(ManifestError) as info:
        load_manifests(manifests)
    text = str(info.value)
    assert "research-workers.yaml:" in text and "'role'" in text and f"at most {MAX_LABEL_VALUE}" in text, text
    _set_metrics(manifests, "{labels: []}")  # not exported: any length is fine again
    fleet = manifests / "research-fleet.yaml"
    fleet.write_text(fleet.read_text().replace("  metrics: {labels: [role]}\n", "", 1))
    assert load_manifests(manifests).fleets[0].metric_labels == ()


def test_the_alerts_jobs_forecasts_reach_the_window_gauges_and_never_is_infinite() -> None:
    from policies.fleet_metrics import forecast_seconds, with_forecasts
    from policies.forecast import Basis, Exhaustion, InsufficientData

    def exhaustion(eta: int | None) -> Exhaustion:
        return Exhaustion(86_400, Decimal("1.00"), Decimal("2.00"), Decimal("0.001"), eta, Basis.READINGS)

    assert forecast_seconds({"daily": exhaustion(600), "monthly": exhaustion(None)}) == (600.0, float("inf"))
    assert forecast_seconds({"daily": InsufficientData("no readings yet")}) == (None, None)

    windows = {"a1": (WindowGauges(Decimal("1.00"), Decimal("2.00")), WindowGauges(Decimal("1.00"), None))}
    snaps = fleet_gauges(_desired(_spec("a1"), _spec("a2")), now=NOW, windows=windows)
    metrics = DaemonMetrics()
    metrics.set_forecasts({"a1": (600.0, float("inf")), "a2": (60.0, None)})
    update_agent_metrics(metrics, with_forecasts(snaps, metrics.forecasts))
    name = "finops_agent_forecast_exhaustion_seconds"
    forecast = {(s[1]["agent"], s[1]["window"]): s[2] for s in _samples(metrics) if s[0] == name}
    assert forecast == {("a1", "daily"): 600.0, ("a1", "monthly"): float("inf")}  # a2 was never read: no windows
