"""Read-mostly operator commands: ``status`` and ``alerts check``. Registered on the main
group by ``controller.cli``."""

from __future__ import annotations

import contextlib
import json
import time

import click

from controller.alerting.engine import AlertCheckResult, check_alerts
from controller.alerting.ladder import Ladder
from controller.cli.keys import Session, _with_target, with_session
from controller.cli.options import DEFAULT_PATH, EXIT_ERROR, EXIT_OK, TargetOptions, load, run_command, target_options
from controller.cli.where import state_status
from controller.reconcile.approval import approval_status
from controller.reconcile.status import fleet_status, render_status, render_summary
from controller.state.flock import WriterLocked


@click.command()
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 when anything is flagged or detected: drift, unexplained balances or deposits, duplicate "
    "finops webhooks, unresolved intents (for monitoring checks).",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Every agent with every detail (alert endpoints, keys, flags). Default: a one-screen summary, "
    "flagged agents first. JSON always has every agent.",
)
@target_options
def status(
    path: str,
    fmt: str,
    strict: bool,
    show_all: bool,
    opts: TargetOptions,
) -> None:
    """Per agent: balance, 24 h spend, cap, % used, alerts and their endpoints, key; flags drift.

    Without --all, one screen whatever the fleet's size: the counts, then the agents that
    need a look (not observed, flagged, at or over their daily cap, alerts fired; most used
    first), then a pointer to --all for the rest. "all clear" only when nothing is flagged
    and no agent is at its cap."""

    def run() -> int:
        desired = load(path, opts.state_dir)

        async def go(s: Session) -> int:
            result = await fleet_status(s.client, desired, s.store, s.keys, target=s.target.name)
            approvals = approval_status(s.store, desired, path)
            where = state_status(s.target.state_location, now=time.time())
            if fmt == "json":
                click.echo(
                    json.dumps(
                        {**result.to_dict(), "approval": approvals.to_dict(), "state": where.to_dict()}, indent=2
                    )
                )
            else:
                click.echo(render_status(result) if show_all else render_summary(result))
                for line in approvals.lines():
                    click.echo(line)
                for line in where.lines():
                    click.echo(line)
            flagged = result.needs_attention or approvals.flagged or bool(where.flags)
            return EXIT_ERROR if strict and flagged else EXIT_OK

        return with_session(opts, go, quiet_banner=fmt == "json")

    run_command(run)


ALERTS_FORMAT_VERSION = 1
"""``alerts check --format json``'s schema version."""


@click.group()
def alerts() -> None:
    """Budget alerts: finops evaluates thresholds and delivers signed alerts itself."""


@alerts.command("check")
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@target_options
def check(
    path: str,
    fmt: str,
    opts: TargetOptions,
) -> None:
    """Evaluate every agent's thresholds once and deliver due alerts (and earlier undelivered ones).

    Escalations (pause/freeze) are executed only with the writer lock; while a daemon or an
    apply holds it, they are decided and recorded here and executed by that writer."""

    def run() -> int:
        desired = load(path, opts.state_dir)
        writes = True

        async def go(s: Session) -> int:
            ladder = Ladder(s.client, s.store, s.keys, desired, now=time.time, execute=writes)
            result = await check_alerts(
                s.client, desired, s.store.location, now=time.time, held=frozenset(s.store.holds()), ladder=ladder
            )
            if fmt == "json":
                click.echo(json.dumps({"format_version": ALERTS_FORMAT_VERSION, **result.to_dict()}, indent=2))
            else:
                for event in result.events:
                    click.echo(f"{event.type:<17} {event.agent_id:<12} {event.window} {event.threshold}% ({event.id})")
                for signal in result.signal_events:
                    click.echo(f"{signal.type:<17} {signal.agent_id:<12} {signal.window} ({signal.id})")
                for agent, error in sorted(result.agent_errors.items()):
                    click.echo(click.style("error    ", fg="red") + f"{agent}: {error}")
                for error in result.delivery_errors:
                    click.echo(click.style("FAILED   ", fg="red", bold=True) + error)
                _echo_ladder(result)
                click.echo(
                    f"Alerts: {result.evaluated} agent(s) evaluated, {result.fired} crossing(s), "
                    f"{result.recovered} recovery(ies), {result.forecasts_fired} forecast(s), "
                    f"{result.anomalies_fired} anomaly(ies), {result.delivered} delivered, {result.failed} failed, "
                    f"{result.pending} pending retry."
                )
            return EXIT_OK if result.ok else EXIT_ERROR

        with contextlib.ExitStack() as guard:
            fence = None
            try:
                fence = guard.enter_context(opts.writer_lock("finops alerts check")).check
            except WriterLocked:
                writes = False  # a daemon (or an apply) is the writer: it executes what is decided here
            return _with_target(opts, go, fmt == "json", fence)

    run_command(run)


def _echo_ladder(result: AlertCheckResult) -> None:
    ladder = result.ladder
    if ladder is None:
        return
    for event in result.events:
        if event.action:
            click.echo(
                click.style("ESCALATE ", fg="yellow", bold=True)
                + f"{event.agent_id}: {event.action} ({event.window} {event.threshold} %)"
            )
    for problem in ladder.problems:
        click.echo(click.style("PROBLEM  ", fg="red", bold=True) + problem)
    if ladder.waiting:
        click.echo(
            f"{ladder.waiting} escalation(s) recorded but not executed here: another finops holds the writer lock "
            "and executes them on its next alert check."
        )
