"""Prometheus metrics and the daemon's small HTTP endpoint (/metrics, /healthz, /readyz).

Each ``DaemonMetrics`` has a registry of its own rather than prometheus-client's global one,
so a test (or a process) can build many daemons without "duplicated timeseries" errors.

The endpoint is a stdlib ``ThreadingHTTPServer`` in a background thread: it needs no event
loop, so it keeps answering while a pass is busy, and it binds 127.0.0.1 unless told
otherwise (metrics reveal fleet names and revisions; expose them deliberately).
Amounts are exported as floats: metrics are for graphs and alerts, never for money logic.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, ClassVar

import httpx
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from controller.daemon.serving import ThreadedServer

if TYPE_CHECKING:
    from controller.alerting.ladder import LadderReport
from policies.exposure import AGENTS, MONEY_DIMENSIONS, ExposureReview

Readiness = Callable[[], tuple[bool, str]]

# The *_created series would double the output, and nothing here graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

RECONCILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class DaemonMetrics:
    """Every metric the daemon exports. Other modules' jobs update the gauges they own
    (``set_rebalanced_amount``, ``set_keys_due_rotation``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
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
        return generate_latest(self.registry)


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

    async def on_response(self, response: httpx.Response) -> None:
        if response.status_code >= 400 and response.status_code != 404:
            self._errors.labels(status=str(response.status_code)).inc()

    def on_transport_error(self, exc: httpx.TransportError) -> None:
        self._errors.labels(status="transport").inc()
