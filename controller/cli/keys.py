"""Operator commands for keys and emergency stops: ``rotate``, ``keys import``, ``freeze``,
``unfreeze``. Registered on the main group by ``controller.cli``."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TypeVar

import click

from controller.cli.options import DEFAULT_PATH, EXIT_ERROR, EXIT_OK, TargetOptions, load, run_command, target_options
from controller.errors import ConfigError
from controller.gateway.client import GatewayClient
from controller.io.target import Target
from controller.keys.rotate import KeyManager
from controller.reconcile.holds import RESIDUAL_EXPOSURE, HoldResult, freeze, unfreeze
from controller.services import Services
from controller.state import StateStore
from policies.currency import CREDITS
from policies.spec import AgentSpec, DesiredState

T = TypeVar("T")

MAX_KEY_LINE = 4096
"""Longest stdin line ``keys import`` reads (a GreenHelix key is about 40 characters)."""


@dataclass
class Session:
    """What every key/hold command needs, opened together and closed together."""

    target: Target
    client: GatewayClient
    store: StateStore
    keys: KeyManager


def with_session(
    opts: TargetOptions,
    fn: Callable[[Session], Awaitable[T]],
    *,
    quiet_banner: bool = False,
    writer: str | None = None,
) -> T:
    """``writer`` names a command that writes: it then takes the one-writer lock (a running
    daemon or another apply makes it fail fast, naming the holder)."""
    with contextlib.ExitStack() as guard:
        fence = None
        if writer is not None:
            fence = guard.enter_context(opts.writer_lock(writer)).check
        return _with_target(opts, fn, quiet_banner, fence)


def _with_target(
    opts: TargetOptions,
    fn: Callable[[Session], Awaitable[T]],
    quiet_banner: bool,
    fence: Callable[[], None] | None = None,
) -> T:
    with opts.open_target() as target:
        click.echo(target.banner(), err=quiet_banner)

        async def go() -> T:
            async with AsyncExitStack() as stack:
                services = Services.build(target, opts, fence=fence)
                stack.callback(services.close)
                client = await stack.enter_async_context(services.client())
                keys = services.key_manager(client)
                stack.callback(keys.close)
                return await fn(Session(target, client, services.state, keys))

        return asyncio.run(go())


def _spec(desired: DesiredState, agent_id: str) -> AgentSpec:
    for spec in desired.agents():
        if spec.agent_id == agent_id:
            return spec
    raise ConfigError(f"agent {agent_id!r} is not declared in the manifests; finops acts only on declared agents")


@click.command()
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option("--agent", "agents", multiple=True, metavar="ID", help="Only these agents (repeatable).")
@click.option("--now", "force", is_flag=True, help="Rotate even if the schedule says it is not due.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@target_options
def rotate(
    path: str,
    agents: tuple[str, ...],
    force: bool,
    fmt: str,
    opts: TargetOptions,
) -> None:
    """Rotate agents' keys that are due (or all selected ones with --now), zero-downtime."""

    def run() -> int:
        desired = load(path, opts.state_dir)

        async def go(s: Session) -> int:
            result = await s.keys.rotate_due(desired, agents=list(agents) or None, force=force)
            if fmt == "json":
                click.echo(json.dumps(result.to_dict(), indent=2))
            else:
                for note in result.recovered:
                    click.echo(click.style(f"recovered: {note}", fg="cyan"))
                for outcome in result.rotated:
                    click.echo(click.style("rotated  ", fg="green") + outcome.describe())
                for agent, why in sorted(result.failed.items()):
                    click.echo(click.style("FAILED   ", fg="red", bold=True) + f"{agent}: {why}")
                for agent, why in sorted(result.skipped.items()):
                    click.echo(f"skipped  {agent}: {why}")
                click.echo(
                    f"Rotation: {len(result.rotated)} rotated, {len(result.failed)} failed, "
                    f"{len(result.skipped)} skipped. Old keys stay valid for the gateway's 300 s grace."
                )
            return EXIT_OK if result.ok else EXIT_ERROR

        return with_session(
            opts,
            go,
            quiet_banner=fmt == "json",
            writer="finops rotate",
        )

    run_command(run)


@click.group()
def keys() -> None:
    """Agents' API keys held by finops."""


@keys.command("import")
@click.argument("agent_id")
@target_options
def import_key(
    agent_id: str,
    opts: TargetOptions,
) -> None:
    """Adopt an agent created before finops: its current key is read from stdin (never an
    argument), checked against the gateway, and stored in finops' key store."""

    def run() -> int:
        # Bounded: stdin may be /dev/zero or an endless pipe; no key is anywhere near this long.
        raw = getpass.getpass(f"{agent_id}'s API key: ") if sys.stdin.isatty() else sys.stdin.readline(MAX_KEY_LINE + 1)
        if len(raw) > MAX_KEY_LINE:
            raise ConfigError(f"the first line on stdin is longer than {MAX_KEY_LINE} characters: not an API key")
        raw = raw.strip()
        if not raw:
            raise ConfigError("no key on stdin")

        async def go(s: Session) -> int:
            click.echo(await s.keys.import_key(agent_id, raw))
            return EXIT_OK

        return with_session(opts, go, writer="finops keys import")

    run_command(run)


def _print_hold(result: HoldResult) -> None:
    for step in result.steps:
        click.echo(click.style("done     ", fg="green") + step)
    for problem in result.problems:
        click.echo(click.style("PROBLEM  ", fg="red", bold=True) + problem)


@click.command("freeze")
@click.argument("agent_id")
@click.option("--reason", required=True, help="Why (recorded with the hold and shown in every plan).")
@click.option("--path", "path", default=DEFAULT_PATH, show_default=True, help="Manifest path.")
@target_options
def freeze_command(
    agent_id: str,
    reason: str,
    path: str,
    opts: TargetOptions,
) -> None:
    """Emergency stop: caps to 0, wallet frozen, key rotated into quarantine, operator hold."""

    def run() -> int:
        spec = _spec(load(path, opts.state_dir), agent_id)

        async def go(s: Session) -> int:
            result = await freeze(s.client, s.store, s.keys, spec, reason)
            _print_hold(result)
            click.echo(click.style(RESIDUAL_EXPOSURE, fg="yellow"))
            click.echo(f"{agent_id} is held: reconcile will not undo this. Lift it with `finops unfreeze {agent_id}`.")
            return EXIT_OK if result.ok else EXIT_ERROR

        return with_session(opts, go)

    run_command(run)


@click.command("unfreeze")
@click.argument("agent_id")
@click.option("--path", "path", default=DEFAULT_PATH, show_default=True, help="Manifest path.")
@target_options
def unfreeze_command(
    agent_id: str,
    path: str,
    opts: TargetOptions,
) -> None:
    """Lift an operator hold: fresh key to the sink, wallet unfrozen, manifest caps restored."""

    def run() -> int:
        desired = load(path, opts.state_dir)
        spec = _spec(desired, agent_id)
        currency = desired.fleet(spec.fleet).currency

        async def go(s: Session) -> int:
            rate = await s.client.exchange_rate(currency, CREDITS)
            result = await unfreeze(s.client, s.store, s.keys, spec, rate)
            _print_hold(result)
            return EXIT_OK if result.ok else EXIT_ERROR

        return with_session(opts, go, writer="finops unfreeze")

    run_command(run)
