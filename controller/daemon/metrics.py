"""Prometheus metrics and the daemon's small HTTP endpoint (/metrics, /healthz, /readyz).

Each ``DaemonMetrics`` has a registry of its own rather than prometheus-client's global one,
so a test (or a process) can build many daemons without "duplicated timeseries" errors.

The endpoint is a stdlib ``ThreadingHTTPServer`` in a background thread: it needs no event
loop, so it keeps answering while a pass is busy, and it binds 127.0.0.1 unless told
otherwise (metrics reveal fleet names and revisions; expose them deliberately).
Amounts are exported as floats: metrics are for graphs and alerts, never for money logic.

Per-agent gauges (``finops_agent_*``) come from typed snapshots (``policies.fleet_metrics.
AgentGauges``) handed to ``update_agent_metrics``: each call replaces the whole table, so an
agent removed from the manifests loses its series at the next update. They live in a registry
of their own whose exposition is rendered once per update (lazily, at the first scrape after
it) and then served from a cache: at 10,000 agents a scrape copies bytes instead of formatting
~130,000 samples again
(``tests/unit/test_agent_metrics.py`` measures and prints the figures).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, ClassVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.daemon.serving import ThreadedServer
from controller.gateway.client import Exchange

if TYPE_CHECKING:
    from controller.alerting.ladder import LadderReport
from policies.exposure import AGENTS, MONEY_DIMENSIONS, ExposureReview
from policies.fleet_metrics import HOLD_KINDS, AgentGauges

Readiness = Callable[[], tuple[bool, str]]

# The *_created series would double the output, and nothing here graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

RECONCILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

WINDOWS = ("daily", "monthly")
"""``window`` label values of the per-agent window gauges: rolling 24 h and 30 days."""
ALERT_DELIVERY_RESULTS = ("delivered", "failed", "gave_up", "refused")
ALERT_EVENT_TYPES = ("budget.threshold", "budget.recovered")


def finops_version() -> str:
    try:
        return package_version("finops")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class AgentCollector(Collector):
    """The per-agent families, from the latest snapshots (see the module doc).

    Label names: ``agent``, ``fleet``, then every label name any fleet declares in
    ``spec.metrics.labels`` (in first-declared order; an agent of a fleet that does not
    declare one exports it empty, which Prometheus reads as absent), then ``window`` or
    ``kind`` where the family has one. Every agent gets its ``hold_active`` series for every
    kind (0 or 1), so the first hold is a change, not a new series."""

    FAMILIES: tuple[tuple[str, str], ...] = (
        ("finops_agent_balance_credits", "Wallet balance, in gateway credits."),
        ("finops_agent_spend_credits", "Spend in the rolling window (daily: 24 h, monthly: 30 d), in credits."),
        ("finops_agent_cap_credits", "The cap the gateway enforces on the window, in credits (no series: no cap)."),
        ("finops_agent_utilization_ratio", "Spend / cap of the window (1 = at the cap; no series: no cap or cap 0)."),
        (
            "finops_agent_forecast_exhaustion_seconds",
            "Projected seconds until spend reaches the window's cap (no series: no estimate).",
        ),
        ("finops_agent_hold_active", "1 while a hold or action of this kind is on the agent, else 0."),
        ("finops_agent_key_age_seconds", "Age of the key finops holds for the agent (managed keys only)."),
        (
            "finops_agent_key_next_rotation_seconds",
            "Seconds until the agent's key is due for rotation (negative: overdue).",
        ),
        ("finops_agent_observed_timestamp_seconds", "Clock time the agent's figures were read from the gateway."),
    )
    NAMES = tuple(name for name, _ in FAMILIES)

    def __init__(self) -> None:
        self._snapshots: tuple[AgentGauges, ...] = ()
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        self._cache: bytes | None = b""
        self.updates = 0

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def replace(self, snapshots: Iterable[AgentGauges]) -> None:
        table = tuple(snapshots)
        with self._lock:
            self._snapshots = table
            self._cache = None
            self.updates += 1

    def snapshots(self) -> tuple[AgentGauges, ...]:
        with self._lock:
            return self._snapshots

    def render(self) -> bytes:
        """The exposition of the per-agent families (Prometheus text format 0.0.4), formatted
        once per update by ``_format``: the same series as ``collect`` (a test holds them
        equal), without building ~150,000 sample objects at 10,000 agents."""
        with self._lock:
            if self._cache is None:
                self._cache = self._format(self._snapshots)
            return self._cache

    @staticmethod
    def _label_names(snapshots: tuple[AgentGauges, ...]) -> list[str]:
        extra: dict[str, None] = {}
        for snap in snapshots:
            for name, _ in snap.labels:
                extra.setdefault(name)
        return ["agent", "fleet", *extra]

    @staticmethod
    def _label_values(snap: AgentGauges, names: list[str]) -> list[str]:
        own = dict(snap.labels)
        return [snap.agent_id, snap.fleet, *(own.get(name, "") for name in names[2:])]

    @staticmethod
    def _rows(snapshots: tuple[AgentGauges, ...]) -> Iterator[tuple[str, str | None, list[tuple[int, str, float]]]]:
        """Per family: its name, its own label (``window``/``kind``) and its rows of
        (snapshot index, that label's value, sample value). The one place that decides which
        series exist; ``collect`` and ``_format`` only spell them."""
        balance, key_age, key_next, observed, hold = [], [], [], [], []
        spend: list[tuple[int, str, float]] = []
        cap: list[tuple[int, str, float]] = []
        ratio: list[tuple[int, str, float]] = []
        forecast: list[tuple[int, str, float]] = []
        for i, snap in enumerate(snapshots):
            if snap.balance is not None:
                balance.append((i, "", float(snap.balance)))
            for window in WINDOWS:
                reading = snap.window(window)
                if reading is None:
                    continue
                spend.append((i, window, float(reading.spend)))
                if reading.cap is not None:
                    cap.append((i, window, float(reading.cap)))
                utilization = reading.utilization
                if utilization is not None:
                    ratio.append((i, window, float(utilization)))
                if reading.forecast_exhaustion_s is not None:
                    forecast.append((i, window, float(reading.forecast_exhaustion_s)))
            for kind in HOLD_KINDS:
                hold.append((i, kind, 1.0 if kind in snap.holds else 0.0))
            if snap.key is not None:
                key_age.append((i, "", snap.key.age_s))
                key_next.append((i, "", snap.key.next_rotation_s))
            if snap.observed_at is not None:
                observed.append((i, "", snap.observed_at))
        yield "finops_agent_balance_credits", None, balance
        yield "finops_agent_spend_credits", "window", spend
        yield "finops_agent_cap_credits", "window", cap
        yield "finops_agent_utilization_ratio", "window", ratio
        yield "finops_agent_forecast_exhaustion_seconds", "window", forecast
        yield "finops_agent_hold_active", "kind", hold
        yield "finops_agent_key_age_seconds", None, key_age
        yield "finops_agent_key_next_rotation_seconds", None, key_next
        yield "finops_agent_observed_timestamp_seconds", None, observed

    def collect(self) -> Iterator[Metric]:
        snapshots = self._snapshots
        names = self._label_names(snapshots)
        values = [self._label_values(snap, names) for snap in snapshots]
        docs = dict(self.FAMILIES)
        for name, own, rows in self._rows(snapshots):
            family = GaugeMetricFamily(name, docs[name], labels=[*names, *([own] if own else [])])
            for i, label, value in rows:
                family.add_metric([*values[i], *([label] if own else [])], value)
            yield family

    @classmethod
    def _format(cls, snapshots: tuple[AgentGauges, ...]) -> bytes:
        names = cls._label_names(snapshots)
        prefixes = [
            ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, cls._label_values(snap, names), strict=True))
            for snap in snapshots
        ]
        docs = dict(cls.FAMILIES)
        out: list[str] = []
        for name, own, rows in cls._rows(snapshots):
            out.append(f"# HELP {name} {_escape_help(docs[name])}\n# TYPE {name} gauge\n")
            if own:
                out.extend(f'{name}{{{prefixes[i]},{own}="{label}"}} {_number(value)}\n' for i, label, value in rows)
            else:
                out.extend(f"{name}{{{prefixes[i]}}} {_number(value)}\n" for i, _, value in rows)
        return "".join(out).encode("utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class DaemonMetrics:
    """Every metric the daemon exports. Other modules' jobs update the gauges they own
    (``set_rebalanced_amount``, ``set_keys_due_rotation``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.forecasts: dict[str, tuple[float | None, float | None]] = {}
        """The alerts job's latest forecasts (``set_forecasts``), exported with the per-agent gauges."""
        r = self.registry
        self.reconcile_duration = Histogram(
            "finops_reconcile_duration_seconds",
            "Wall time of one reconcile pass.",
            registry=r,
            buckets=RECONCILE_BUCKETS,
        )
        self.reconcile_total = Counter(
            "finops_reconcile_total",
            "Reconcile passes by result (ok, partial, refused, invalid, error).",
            ["result"],
            registry=r,
        )
        self.drift_changes = Gauge(
            "finops_drift_changes", "Changes planned in the last pass (the drift found).", registry=r
        )
        self.changes_applied = Counter(
            "finops_changes_applied_total",
            "Changes applied, by kind (register, top_up, set_budget).",
            ["kind"],
            registry=r,
        )
        self.gateway_errors = Counter(
            "finops_gateway_errors_total",
            "Gateway error responses by HTTP status ('transport' for no response); 404s are not counted.",
            ["status"],
            registry=r,
        )
        self.last_applied_revision = Gauge(
            "finops_last_applied_revision_info",
            "The manifest revision the last pass applied (value 1).",
            ["revision"],
            registry=r,
        )
        self.agents_held = Gauge("finops_agents_held", "Agents under an operator hold (never reconciled).", registry=r)
        self.agents_backoff = Gauge(
            "finops_agents_backoff", "Agents whose changes are skipped while their failure backoff runs.", registry=r
        )
        self.rebalanced_amount = Gauge(
            "finops_rebalanced_amount", "Credits moved by the last rebalance run.", registry=r
        )
        self.keys_due_rotation = Gauge("finops_keys_due_rotation", "Agent keys due for rotation.", registry=r)
        self.manifest_valid = Gauge(
            "finops_manifest_valid", "1 when the newest manifest revision is valid, 0 when it was refused.", registry=r
        )
        self.last_success = Gauge(
            "finops_last_reconcile_success_timestamp_seconds",
            "Clock time of the last reconcile pass that completed (ok or partial).",
            registry=r,
        )
        self.job_runs = Counter(
            "finops_job_runs_total", "Scheduled job runs by job and result.", ["job", "result"], registry=r
        )
        self.revision_awaiting_approval = Gauge(
            "finops_revision_awaiting_approval",
            "1 while the newest manifest revision is held back: its exposure increase needs `finops approve`.",
            registry=r,
        )
        self.exposure_increase = Gauge(
            "finops_exposure_increase",
            "Increase of spending authority the held-back revision asks for over the last approved exposure, "
            "per fleet and dimension (fleet currency; agents: count); no series when nothing waits.",
            ["fleet", "dimension"],
            registry=r,
        )
        self.leader = Gauge(
            "finops_leader",
            "1 while this replica holds the writer lock and runs the jobs (active), 0 while it stands by.",
            registry=r,
        )
        self.leader_transitions = Counter(
            "finops_leader_transitions_total",
            "Role changes of this replica, by the role entered (active, fenced: lost the writer lock).",
            ["to"],
            registry=r,
        )
        self.alert_deliveries = Counter(
            "finops_alert_deliveries_total",
            "Alert deliveries by result (delivered, failed: will retry, gave_up, refused).",
            ["result"],
            registry=r,
        )
        self.alerts_fired = Counter(
            "finops_alerts_total", "Alerts decided, by type (budget.threshold, budget.recovered).", ["type"], registry=r
        )
        self.alerts_pending = Gauge(
            "finops_alerts_pending", "Alert deliveries still queued after the last alert check.", registry=r
        )
        self.alert_read_errors = Gauge(
            "finops_alert_agents_unread", "Agents whose budget the last alert check could not read.", registry=r
        )
        for result in ALERT_DELIVERY_RESULTS:
            self.alert_deliveries.labels(result=result)
        for kind in ALERT_EVENT_TYPES:
            self.alerts_fired.labels(type=kind)
        self.build_info = Gauge(
            "finops_build_info", "The running finops (value 1), by version.", ["version"], registry=r
        )
        self.build_info.labels(version=finops_version()).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.agents = AgentCollector()
        self._revision: str | None = None
        self._revision_lock = threading.Lock()
        self._exposure_series: set[tuple[str, str]] = set()

        self.escalations_total = Counter(
            "finops_escalations_total",
            "Escalation-ladder actions by action (pause, freeze, release) and outcome (decided, executed).",
            ["action", "outcome"],
            registry=r,
        )
        self.escalations_active = Gauge(
            "finops_escalations_active",
            "Escalations in force (pending or active), by action (pause, freeze).",
            ["action"],
            registry=r,
        )
        for action in ("pause", "freeze"):
            self.escalations_active.labels(action=action).set(0)
            for outcome in ("decided", "executed"):
                self.escalations_total.labels(action=action, outcome=outcome)
        self.escalations_total.labels(action="release", outcome="executed")

    def set_revision(self, revision: str) -> None:
        """Keep exactly one ``finops_last_applied_revision_info`` series: the newest."""
        with self._revision_lock:
            if self._revision is not None and self._revision != revision:
                self.last_applied_revision.remove(self._revision)
            self._revision = revision
            self.last_applied_revision.labels(revision=revision).set(1)

    def set_awaiting(self, review: ExposureReview | None) -> None:
        """Export the held-back revision's exposure increase (``None``: nothing waits)."""
        with self._revision_lock:
            series: dict[tuple[str, str], float] = {}
            if review is not None:
                for delta in review.deltas:
                    for dim in MONEY_DIMENSIONS:
                        if delta.delta(dim) > 0:
                            series[(delta.fleet, dim)] = float(delta.delta(dim))
                    if delta.agents_added:
                        series[(delta.fleet, AGENTS)] = float(len(delta.agents_added))
            for stale in self._exposure_series - set(series):
                self.exposure_increase.remove(*stale)
            for (fleet, dim), value in series.items():
                self.exposure_increase.labels(fleet=fleet, dimension=dim).set(value)
            self._exposure_series = set(series)
            self.revision_awaiting_approval.set(1 if review is not None else 0)

    def set_rebalanced_amount(self, credits: Decimal) -> None:
        self.rebalanced_amount.set(float(credits))

    def set_keys_due_rotation(self, count: int) -> None:
        self.keys_due_rotation.set(count)

    def record_alert_check(
        self, *, fired: int, recovered: int, delivered: int, failed: int, gave_up: int, refused: int, pending: int,
        unread: int,
    ) -> None:  # fmt: skip
        """One alert check's counts (``controller.alerting.engine.AlertCheckResult``)."""
        self.alerts_fired.labels(type="budget.threshold").inc(fired)
        self.alerts_fired.labels(type="budget.recovered").inc(recovered)
        for result, count in (("delivered", delivered), ("failed", failed), ("gave_up", gave_up), ("refused", refused)):
            self.alert_deliveries.labels(result=result).inc(count)
        self.alerts_pending.set(pending)
        self.alert_read_errors.set(unread)

    def set_forecasts(self, forecasts: Mapping[str, tuple[float | None, float | None]]) -> None:
        """The alerts job's latest (daily, monthly) seconds to exhaustion per agent; the
        next per-agent update (each reconcile pass) exports them."""
        self.forecasts = dict(forecasts)

    def record_escalations(self, report: LadderReport, active: Mapping[str, int]) -> None:
        """One alert check's escalation-ladder counts, and the escalations now in force."""
        for action, n in report.started.items():
            self.escalations_total.labels(action=action, outcome="decided").inc(n)
        for action, n in report.executed.items():
            self.escalations_total.labels(action=action, outcome="executed").inc(n)
        if report.released:
            self.escalations_total.labels(action="release", outcome="executed").inc(report.released)
        for action, n in active.items():
            self.escalations_active.labels(action=action).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry) + self.agents.render()

    def names(self) -> frozenset[str]:
        """Every sample name this daemon can export (rules and dashboards are checked
        against it): each family's samples (``_total``, ``_bucket``, ``_sum``, ``_count``…)."""
        names: set[str] = set()
        for registry in (self.registry, self.agents.registry):
            for family in registry.collect():
                names.update(sample.name for sample in family.samples)
                if family.type == "counter":
                    names.add(family.name + "_total")
                elif family.type == "histogram":
                    names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
                else:
                    names.add(family.name)
        return frozenset(names | set(AgentCollector.NAMES))


def update_agent_metrics(metrics: DaemonMetrics, snapshots: Iterable[AgentGauges]) -> None:
    """Export ``snapshots`` as the per-agent gauges, replacing every previous series: pass a
    snapshot for every declared agent (``policies.fleet_metrics.fleet_gauges`` does), and an
    agent no longer declared disappears from ``/metrics``."""
    metrics.agents.replace(snapshots)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    routes: ClassVar[tuple[str, ...]] = ("/metrics", "/healthz", "/readyz")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive, reason = self.server.liveness()
            self._send(200 if alive else 503, f"{'ok' if alive else 'unhealthy'}: {reason}\n".encode())
        elif path == "/readyz":
            ready, reason = self.server.readiness()
            self._send(200 if ready else 503, f"{'ready' if ready else 'not ready'}: {reason}\n".encode())
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would drown the daemon's own log; stay quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: DaemonMetrics, readiness: Readiness, liveness: Readiness
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.liveness = liveness
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class MetricsServer(ThreadedServer):
    """``/metrics``, ``/healthz`` (``liveness()``: no job stuck past its deadline) and
    ``/readyz`` (``readiness()``).

    ``port=0`` binds a free port (tests); the CLI treats 0 as "off" before getting here."""

    def __init__(
        self,
        metrics: DaemonMetrics,
        readiness: Readiness,
        *,
        liveness: Readiness | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        server = _Server((host, port), metrics, readiness, liveness or (lambda: (True, "alive")))
        super().__init__(server, host, name="finops-metrics")


class GatewayErrorCounter:
    """Counts the gateway's error answers (a ``gateway.client.ClientObserver``): the client
    calls it from an httpx response event hook on each of its lanes, so every request it
    sends is seen, retries included, and the client keeps its own connection lanes.

    404 is left out: finops asks for wallets that do not exist yet on purpose (that is how
    it learns an agent must be registered), and counting those would make the metric useless
    for alerting."""

    def __init__(self, errors: Counter) -> None:
        self._errors = errors

    def on_exchange(self, exchange: Exchange) -> None:
        if exchange.status is None:
            self._errors.labels(status="transport").inc()
        elif exchange.status >= 400 and exchange.status != 404:
            self._errors.labels(status=str(exchange.status)).inc()
