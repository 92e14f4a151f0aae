"""``finops run``: the long-lived reconcile daemon (or one pass with ``--once``).

Wiring only: take the writer lock, open the target, build the source, reconciler, metrics
and daemon, add the scheduled jobs (``job_factories``), serve. Exit codes follow ``controller.cli.options``:
0 after a graceful stop (or a clean ``--once`` pass, where a job with nothing to do counts as
clean), 1 on errors, a failed or partial ``--once`` pass, a refused newest revision, a stop
that had to cancel jobs after ``--stop-timeout``, when another writer holds the state
directory, or when a replica lost the writer lock (fenced).

With shared PostgreSQL state (``--state-url``) and no ``--once``, the process is one of
several replicas (``controller.daemon.leader``): it stands by until it holds the writer
lock, then runs the daemon with every gateway write fenced by the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from controller.cli.options import DEFAULT_PATH, TargetOptions, run_command, target_options
from controller.daemon.leader import DEFAULT_POLL_S, Replica
from controller.daemon.logs import configure_logging, log_event
from controller.daemon.metrics import DaemonMetrics, GatewayErrorCounter, MetricsServer, Readiness
from controller.daemon.passes import Reconciler
from controller.daemon.planapi import PlanApi, PlanApiServer, gateway_planner, read_plan_token, tls_context
from controller.daemon.replicas import ReplicaIdentity, ReplicaRegistry, Role
from controller.daemon.revisions import RevisionLog
from controller.daemon.scheduler import DEFAULT_STOP_TIMEOUT_S, Daemon
from controller.daemon.source import DirectorySource, GitSource, ManifestSource
from controller.errors import ConfigError
from controller.exitcodes import EXIT_ERROR, EXIT_OK
from controller.gateway.client import GatewayClient
from controller.io.target import Target
from controller.keys.vault import KeyStore
from controller.observation.feed import DEFAULT_RESYNC_PERIOD_S, FeedSync
from controller.observation.store import ObservationStore
from controller.observation.watch import WriteWatch
from controller.services import Services
from controller.state import PENDING, StateStore
from controller.state.lock import DAEMON_PURPOSE
from policies.spec import DesiredState

STATUS_FILE = "daemon-status.json"
ONCE_PURPOSE = "finops single pass (run --once)"
"""The writer lock's purpose for ``run --once``: unlike a daemon's (``DAEMON_PURPOSE``), an
apply may queue behind it, as behind another apply."""


@dataclass(frozen=True)
class PlanApiSettings:
    """The plan API's listener, checked at start-up (``--plan-api-*``)."""

    token: str = field(repr=False)
    host: str
    port: int
    tls: ssl.SSLContext | None


@dataclass(frozen=True)
class DaemonContext:
    """What a job factory gets to build its jobs from, all owned by the running daemon."""

    daemon: Daemon
    target: Target
    store: StateStore
    sink: KeyStore
    metrics: DaemonMetrics
    client_factory: Callable[[], GatewayClient]
    """A new ``GatewayClient`` (use as ``async with``) counting errors into the metrics."""
    clock: Callable[[], float] = time.time
    """finops' clock for the jobs (tests step it instead of sleeping)."""
    agent_client: Callable[[str], GatewayClient] | None = None
    """A client with an agent's own key (``Services.agent_client``), for key rotation."""
    fence: Callable[[], None] | None = None
    """The writer lock's check (raises once the lock is lost): every gateway client above
    runs it before each write; jobs with other side effects (alert delivery) call it too."""
    observation: FeedSync | None = None
    """The shared observation store and its change feed (``controller.observation``): jobs
    read agents through it (``None``: every job reads every agent itself)."""

    def desired(self) -> DesiredState | None:
        """The last valid desired state (``None`` until a valid revision was loaded)."""
        return self.daemon.reconciler.desired


JobFactory = Callable[[DaemonContext], None]
"""Adds a group of jobs to a daemon: ``factory(ctx)`` calls ``ctx.daemon.add_job(...)``."""


def job_factories() -> tuple[JobFactory, ...]:
    """The jobs every daemon ``finops run`` starts runs besides the reconcile pass, listed
    explicitly (nothing registers itself on import)."""
    from controller.daemon.scheduled import scheduled_jobs  # alerting, keys, rebalancing: loaded by `run` only

    return (scheduled_jobs,)


def _status_recorder(registry: ReplicaRegistry, daemon: Daemon) -> Callable[[dict[str, Any]], None]:
    """Records each pass in this replica's row of the state database."""

    def record(status: dict[str, Any]) -> None:
        last = daemon.last_pass
        registry.record_pass(
            result=last.result if last is not None else "none",
            at=daemon.clock(),
            last_success_at=daemon.last_success_at,
            status=status,
        )

    return record


def git_workdir(state_dir: Path, url: str, branch: str) -> Path:
    """One clone per (URL, branch), so pointing the daemon elsewhere never reuses a clone."""
    digest = hashlib.sha256(f"{url}\0{branch}".encode()).hexdigest()[:12]
    return Path(state_dir) / "git" / digest


@click.command("run")
@click.argument("path", required=False)
@click.option(
    "--git",
    "git_url",
    envvar="FINOPS_GIT_URL",
    default=None,
    metavar="URL",
    help="Read manifests from this git repository instead of PATH (env FINOPS_GIT_URL).",
)
@click.option("--branch", default="main", show_default=True, envvar="FINOPS_GIT_BRANCH", help="Branch to follow.")
@click.option(
    "--path", "git_path", default=DEFAULT_PATH, show_default=True, help="Manifest directory inside the git repository."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds between reconcile passes.",
)
@click.option(
    "--jitter",
    type=click.FloatRange(min=0),
    default=None,
    help="Random extra delay, up to this many seconds, per pass (default: 10% of the interval, max 60).",
)
@click.option(
    "--git-poll-interval",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds between git fetches; a new commit triggers a pass at once.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    envvar="FINOPS_METRICS_PORT",
    help="Serve /metrics, /healthz and /readyz on this port (0 or unset: off).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    envvar="FINOPS_METRICS_HOST",
    help="Address for the metrics endpoint (0.0.0.0 in a container).",
)
@click.option(
    "--plan-api-port",
    type=click.IntRange(0, 65535),
    default=0,
    envvar="FINOPS_PLAN_API_PORT",
    help="Serve the plan API (POST /v1/plan: a bundle of manifests in, the plan out; never applies) on "
    "this port, for `finops plan --remote` in CI without the gateway key (0 or unset: off).",
)
@click.option(
    "--plan-api-host",
    default="127.0.0.1",
    show_default=True,
    envvar="FINOPS_PLAN_API_HOST",
    help="Address for the plan API; any non-loopback address requires --plan-api-tls-cert/--plan-api-tls-key.",
)
@click.option(
    "--plan-api-token-file",
    type=click.Path(path_type=Path),
    default=None,
    envvar="FINOPS_PLAN_API_TOKEN_FILE",
    help="File (0600) holding the plan API's bearer token, a secret of its own (not the admin key); required "
    "with --plan-api-port.",
)
@click.option(
    "--plan-api-tls-cert",
    type=click.Path(path_type=Path),
    default=None,
    envvar="FINOPS_PLAN_API_TLS_CERT",
    help="PEM certificate (chain) for serving the plan API over HTTPS.",
)
@click.option(
    "--plan-api-tls-key",
    type=click.Path(path_type=Path),
    default=None,
    envvar="FINOPS_PLAN_API_TLS_KEY",
    help="PEM private key (0600) of --plan-api-tls-cert.",
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True, envvar="FINOPS_LOG_FORMAT"
)
@click.option(
    "--prune/--no-prune",
    default=True,
    show_default=True,
    help="Delete gateway webhooks finops created (both ownership keys) for agents no longer declared. On by "
    "default here, as in GitOps controllers: the daemon's job is to make the gateway equal git.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_STOP_TIMEOUT_S,
    show_default=True,
    help="Seconds SIGTERM/SIGINT waits for in-flight jobs before cancelling them.",
)
@click.option(
    "--standby-poll",
    type=click.FloatRange(min=0.1, max=60),
    default=DEFAULT_POLL_S,
    show_default=True,
    envvar="FINOPS_STANDBY_POLL",
    help="With --state-url (several replicas): seconds between a standby's attempts to take the writer lock, "
    "and between the active replica's proofs that it still holds it.",
)
@click.option(
    "--resync-period",
    type=click.FloatRange(min=1),
    default=DEFAULT_RESYNC_PERIOD_S,
    show_default=True,
    envvar="FINOPS_RESYNC_PERIOD",
    help="Seconds within which every agent is re-read in full, a share each interval (the change feed "
    "cannot see an admin's cap change, money moved by others, or the rolling window's decay).",
)
@click.option(
    "--change-feed/--no-change-feed",
    default=True,
    show_default=True,
    help="Re-read only agents whose call count moved on the gateway's leaderboard (plus the resync's "
    "share); --no-change-feed reads every agent in every pass and alerts run.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Run one complete pass and exit: 0 when every job succeeded or had nothing to do; for cron and CI.",
)
@target_options
def run(
    path: str | None,
    git_url: str | None,
    branch: str,
    git_path: str,
    interval: float,
    jitter: float | None,
    git_poll_interval: float,
    metrics_port: int,
    metrics_host: str,
    plan_api_port: int,
    plan_api_host: str,
    plan_api_token_file: Path | None,
    plan_api_tls_cert: Path | None,
    plan_api_tls_key: Path | None,
    log_format: str,
    prune: bool,
    stop_timeout: float,
    standby_poll: float,
    resync_period: float,
    change_feed: bool,
    once: bool,
    opts: TargetOptions,
) -> None:
    """Keep the fleet converged: reconcile every INTERVAL seconds, and on every new commit."""

    def main() -> int:
        if git_url and path:
            raise ConfigError("give either a manifest PATH or --git URL, not both")
        plan_api = _plan_api_settings()  # a bad token or certificate fails before anything starts
        log = configure_logging(log_format)
        if opts.state_url and not once:
            return _replicated(log, plan_api)  # one of several replicas: stand by until it holds the lock
        # SQLite: the flock, failing fast as ever. PostgreSQL --once: like apply, it waits
        # for another apply (--lock-timeout) but never queues behind an active daemon.
        with opts.writer_lock(ONCE_PURPOSE if opts.state_url else DAEMON_PURPOSE) as lock:
            fence = lock.check if lock.backend != "flock" else None
            with opts.open_target() as target:
                log = configure_logging(log_format, secrets=[target.api_key])
                log_event(log, logging.INFO, target.banner())
                source = _source()
                metrics = DaemonMetrics()
                metrics.leader.set(1)  # it holds the writer lock: `sum(finops_leader) != 1` holds here too
                # A --once pass (cron) is not a replica: it leaves no row behind.
                registry = None if once else ReplicaRegistry(target.state_location, ReplicaIdentity.current())
                try:
                    with _assemble(target, source, log, metrics, fence=fence, registry=registry) as daemon:
                        if registry is not None:
                            registry.forget_stale()
                            registry.heartbeat(Role.ACTIVE)
                        server = _metrics_server(metrics, daemon.ready, daemon.healthy, log) if not once else None
                        try:
                            with _plan_api(plan_api if not once else None, target, log):
                                return asyncio.run(daemon.serve(once=once))
                        finally:
                            if server is not None:
                                server.stop()
                            if registry is not None:
                                registry.heartbeat(Role.STOPPED)
                finally:
                    if registry is not None:
                        registry.close()

    def _source() -> ManifestSource:
        if git_url:
            return GitSource(git_url, branch, git_path, git_workdir(opts.state_dir, git_url, branch))
        return DirectorySource(Path(path or DEFAULT_PATH))

    def _plan_api_settings() -> PlanApiSettings | None:
        if not plan_api_port:
            return None
        if plan_api_token_file is None:
            raise ConfigError("--plan-api-port needs --plan-api-token-file (env FINOPS_PLAN_API_TOKEN_FILE)")
        if (plan_api_tls_cert is None) != (plan_api_tls_key is None):
            raise ConfigError("give both --plan-api-tls-cert and --plan-api-tls-key, or neither")
        tls = tls_context(plan_api_tls_cert, plan_api_tls_key) if plan_api_tls_cert and plan_api_tls_key else None
        return PlanApiSettings(read_plan_token(plan_api_token_file), plan_api_host, plan_api_port, tls)

    @contextmanager
    def _plan_api(settings: PlanApiSettings | None, target: Target, log: logging.Logger) -> Iterator[None]:
        """The plan API for the daemon's lifetime, on services of its own: it only reads (no
        fence, no key store), so it answers on an active replica and on a standby alike."""
        if settings is None:
            yield
            return
        from controller.cli.views import RENDERERS

        services = Services.build(target, opts)
        try:
            planner = gateway_planner(services.client, services.state, target.name)
            api = PlanApi(settings.token, planner, state_dir=opts.state_dir, renderers=RENDERERS)
            with PlanApiServer(api, host=settings.host, port=settings.port, tls=settings.tls) as server:
                log_event(log, logging.INFO, "plan API listening", url=server.url, paths=["/v1/plan", "/healthz"])
                yield
        finally:
            services.close()

    def _replicated(log: logging.Logger, plan_api: PlanApiSettings | None) -> int:
        """Shared PostgreSQL state: stand by, take over when the lock is free, exit when it is lost."""
        with opts.open_target() as target:
            log = configure_logging(log_format, secrets=[target.api_key])
            log_event(log, logging.INFO, target.banner())
            source = _source()
            metrics = DaemonMetrics()
            identity = ReplicaIdentity.current()
            with ReplicaRegistry(target.state_location, identity) as registry:
                registry.forget_stale()
                replica = Replica(
                    target.state_location, metrics=metrics, registry=registry, poll_s=standby_poll, log=log
                )
                server = _metrics_server(metrics, replica.readiness, replica.liveness, log)
                log_event(log, logging.INFO, "replica started as a standby", replica=identity.replica_id)
                try:
                    # A standby plans too: a plan needs only reads and the shared state.
                    with _plan_api(plan_api, target, log):
                        return asyncio.run(_lead(target, source, log, metrics, registry, replica))
                finally:
                    if server is not None:
                        server.stop()

    async def _lead(
        target: Target,
        source: ManifestSource,
        log: logging.Logger,
        metrics: DaemonMetrics,
        registry: ReplicaRegistry,
        replica: Replica,
    ) -> int:
        lock = await replica.wait_for_lock()
        if lock is None:
            log_event(log, logging.INFO, "shutdown complete", exit_code=int(EXIT_OK), role="standby")
            return EXIT_OK
        try:
            with _assemble(target, source, log, metrics, fence=lock.check, registry=registry) as daemon:
                replica.activate(daemon)
                watchdog = asyncio.create_task(replica.watch(lock))
                try:
                    code = await daemon.serve()
                finally:
                    watchdog.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watchdog
            if replica.fenced_reason is not None:
                log_event(log, logging.ERROR, "exiting: this replica was fenced", reason=replica.fenced_reason)
                return EXIT_ERROR
            replica.stopped()
            return code
        finally:
            lock.release()

    @contextmanager
    def _assemble(
        target: Target,
        source: ManifestSource,
        log: logging.Logger,
        metrics: DaemonMetrics,
        *,
        fence: Callable[[], None] | None,
        registry: ReplicaRegistry | None,
    ) -> Iterator[Daemon]:
        """The daemon with its jobs, every gateway client of it fenced by ``fence``, every
        write it makes invalidating the shared observation of the agent written to."""
        observations = ObservationStore(time.time)
        watch = WriteWatch(observations, [GatewayErrorCounter(metrics.gateway_errors)])
        services = Services.build(target, opts, observer=watch, fence=fence)
        observations.clock = services.clock
        feed = FeedSync(observations, interval_s=interval, resync_period_s=resync_period, enabled=change_feed)
        store = services.state
        revisions = RevisionLog(target.state_location)
        try:
            client_factory = services.client
            reconciler = Reconciler(
                target=target.name,
                source=source,
                store=store,
                sink=services.vault,
                revisions=revisions,
                client_factory=client_factory,
                prune=prune,
                log=log,
                approver=target.api_key,
                observation=feed,
            )

            def authoritative() -> frozenset[str]:
                pending = (i.agent_id for i in store.intents(status=PENDING))
                return frozenset([*store.holds(), *pending, *reconciler.failing()])

            feed.authoritative = authoritative
            daemon = Daemon(
                reconciler,
                metrics=metrics,
                interval_s=interval,
                jitter_s=jitter,
                git_poll_s=git_poll_interval,
                log=log,
                status_file=opts.state_dir / STATUS_FILE,
                stop_timeout_s=stop_timeout,
            )
            if registry is not None:
                daemon.status_hooks.append(_status_recorder(registry, daemon))
            context = DaemonContext(
                daemon,
                target,
                store,
                services.vault,
                metrics,
                client_factory,
                services.clock,
                services.agent_client,
                fence,
                feed,
            )
            for factory in job_factories():
                factory(context)
            yield daemon
        finally:
            revisions.close()
            services.close()

    def _metrics_server(
        metrics: DaemonMetrics, readiness: Readiness, liveness: Readiness, log: logging.Logger
    ) -> MetricsServer | None:
        if not metrics_port:
            return None
        try:
            server = MetricsServer(metrics, readiness, liveness=liveness, host=metrics_host, port=metrics_port).start()
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror}") from None
        log_event(
            log, logging.INFO, "metrics endpoint listening", url=server.url, paths=["/metrics", "/healthz", "/readyz"]
        )
        return server

    run_command(main)


__all__ = ["DaemonContext", "JobFactory", "job_factories", "run"]
