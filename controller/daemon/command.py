"""``finops run``: the long-lived reconcile daemon (or one pass with ``--once``).

Wiring only: take the writer lock, open the target, build the source, reconciler, metrics
and daemon, add the scheduled jobs (``job_factories``), serve. Exit codes follow ``controller.cli.options``:
0 after a graceful stop (or a clean ``--once`` pass, where a job with nothing to do counts as
clean), 1 on errors, a failed or partial ``--once`` pass, a refused newest revision, a stop
that had to cancel jobs after ``--stop-timeout``, or when another writer holds the state
directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from controller.cli.options import DEFAULT_PATH, TargetOptions, run_command, target_options
from controller.daemon.lock import writer_lock
from controller.daemon.logs import configure_logging, log_event
from controller.daemon.metrics import DaemonMetrics, GatewayErrorCounter, MetricsServer
from controller.daemon.passes import Reconciler
from controller.daemon.revisions import RevisionLog
from controller.daemon.scheduler import DEFAULT_STOP_TIMEOUT_S, Daemon
from controller.daemon.source import DirectorySource, GitSource, ManifestSource
from controller.errors import ConfigError
from controller.gateway.client import GatewayClient
from controller.io.target import Target
from controller.keys.vault import KeyStore
from controller.services import Services
from controller.state import StateStore
from policies.spec import DesiredState

STATUS_FILE = "daemon-status.json"


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
    log_format: str,
    prune: bool,
    stop_timeout: float,
    once: bool,
    opts: TargetOptions,
) -> None:
    """Keep the fleet converged: reconcile every INTERVAL seconds, and on every new commit."""

    def main() -> int:
        if git_url and path:
            raise ConfigError("give either a manifest PATH or --git URL, not both")
        log = configure_logging(log_format)
        with writer_lock(opts.state_dir, purpose="finops run"):
            source: ManifestSource
            if git_url:
                source = GitSource(git_url, branch, git_path, git_workdir(opts.state_dir, git_url, branch))
            else:
                source = DirectorySource(Path(path or DEFAULT_PATH))
            with opts.open_target() as target:
                log = configure_logging(log_format, secrets=[target.api_key])
                log_event(log, logging.INFO, target.banner())
                return _serve(target, source, log)

    def _serve(target: Target, source: ManifestSource, log: logging.Logger) -> int:
        metrics = DaemonMetrics()
        services = Services.build(target, opts, observer=GatewayErrorCounter(metrics.gateway_errors))
        store = services.state
        revisions = RevisionLog(target.state_location)
        server: MetricsServer | None = None
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
            )
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
            context = DaemonContext(
                daemon, target, store, services.vault, metrics, client_factory, services.clock, services.agent_client
            )
            for factory in job_factories():
                factory(context)
            if metrics_port and not once:
                try:
                    server = MetricsServer(
                        metrics, daemon.ready, liveness=daemon.healthy, host=metrics_host, port=metrics_port
                    ).start()
                except OSError as exc:
                    raise ConfigError(
                        f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror}"
                    ) from None
                log_event(
                    log,
                    logging.INFO,
                    "metrics endpoint listening",
                    url=server.url,
                    paths=["/metrics", "/healthz", "/readyz"],
                )
            return asyncio.run(daemon.serve(once=once))
        finally:
            if server is not None:
                server.stop()
            revisions.close()
            services.close()

    run_command(main)


__all__ = ["DaemonContext", "JobFactory", "job_factories", "run"]
