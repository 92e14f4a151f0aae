"""Operator commands for keys and emergency stops: ``rotate``, ``keys import``,
``keys generate-kek``, ``keys rewrap``, ``keys import-dir``, ``keys export-dir``, ``freeze``,
``unfreeze``.
Registered on the main group by ``controller.cli``."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
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
ROTATE_FORMAT_VERSION = 1
"""``rotate --format json``'s schema version."""
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
                click.echo(json.dumps({"format_version": ROTATE_FORMAT_VERSION, **result.to_dict()}, indent=2))
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


@keys.command("generate-kek")
@click.argument("file", type=click.Path(path_type=Path))
def generate_kek(file: Path) -> None:
    """Write a new key-encryption key (32 random bytes, base64) to FILE, 0600, never
    overwriting an existing file; prints only its id."""

    def run() -> int:
        from controller.io.secretfile import make_private_dirs
        from controller.keys.envelope import generate_kek_text, load_kek

        make_private_dirs(file.parent)
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ConfigError(f"{file} already exists; finops never overwrites a key-encryption key") from None
        except OSError as exc:
            raise ConfigError(f"cannot create {file}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (generate_kek_text() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        click.echo(
            f"wrote key-encryption key {load_kek(file).id} to {file} (0600); keep a copy offline: sealed keys "
            "cannot be opened without it"
        )
        return EXIT_OK

    run_command(run)


@keys.command("rewrap")
@click.option(
    "--new-key-file",
    "new_key_file",
    required=True,
    type=click.Path(path_type=Path),
    help="The new key-encryption key (the current one is read from FINOPS_KEY_ENCRYPTION_KEY_FILE).",
)
@target_options
def rewrap_command(new_key_file: Path, opts: TargetOptions) -> None:
    """Re-wrap every sealed key under a new key-encryption key, in one transaction."""

    def run() -> int:
        from controller.keys.envelope import kek_from_env, load_kek
        from controller.keys.sealed import rewrap_all

        old = kek_from_env()
        new = load_kek(new_key_file)
        with opts.writer_lock("finops keys rewrap"), opts.open_target() as target:
            click.echo(target.banner(), err=True)
            result = rewrap_all(target.state_location, old, new)
        click.echo(
            f"Re-wrapped {result.rewrapped} sealed key(s) from {result.old_id} to {result.new_id}; "
            f"{result.already} already under {result.new_id} (verified); {result.total} in all."
        )
        click.echo(
            f"Now point FINOPS_KEY_ENCRYPTION_KEY_FILE at {new_key_file} on every machine, then destroy the old key "
            "(backups of the state database taken before this still need the old key)."
        )
        return EXIT_OK

    run_command(run)


def _copy_between_stores(opts: TargetOptions, directory: Path | None, *, into_database: bool) -> int:
    """``keys import-dir`` / ``keys export-dir``: one copy between the directory store and
    the database store, under the writer lock (see ``controller.keys.sealed.copy_keys``)."""
    from controller.keys.envelope import kek_from_env
    from controller.keys.sealed import SealedVault, copy_keys
    from controller.keys.vault import KeyVault

    kek = kek_from_env()
    verb = "import-dir" if into_database else "export-dir"
    with opts.writer_lock(f"finops keys {verb}"), opts.open_target() as target:
        click.echo(target.banner(), err=True)
        secrets_dir = target.secrets_dir(opts.secrets_dir)
        folder = directory if directory is not None else secrets_dir
        if into_database and not folder.is_dir():
            raise ConfigError(f"{folder} is not a directory; name the directory store with --from DIR")
        files = KeyVault(folder)
        store = StateStore(target.state_location)
        sealed = SealedVault(target.state_location, kek, sink_directory=secrets_dir)
        try:
            held = store.key_prefixes()
            result = copy_keys(files, sealed, held) if into_database else copy_keys(sealed, files, held)
        finally:
            sealed.close()
            store.close()
    replaced = {(agent, slot): old for agent, slot, old in result.replaced}
    for agent, slot, prefix in result.copied:
        old = replaced.get((agent, slot))
        note = f" (replaced sha3:{old}: finops' state holds sha3:{prefix})" if old else ""
        click.echo(click.style("copied   ", fg="green") + f"{agent} ({slot}) sha3:{prefix}{note}")
    if into_database:
        click.echo(
            f"Imported {len(result.copied)} key(s) from {folder} into the database key store under {kek.id}; "
            f"{len(result.same)} were already there. The files were left in place: once every machine runs with "
            "--key-store database, remove them (they are plaintext keys)."
        )
    else:
        click.echo(
            f"Exported {len(result.copied)} key(s) from the database key store into {folder}; {len(result.same)} "
            "were already there. The sealed rows were left in place; run with --key-store directory from now on."
        )
    return EXIT_OK


@keys.command("import-dir")
@click.option(
    "--from",
    "source",
    default=None,
    type=click.Path(path_type=Path),
    help="The directory store to copy from (default: --secrets-dir, i.e. STATE_DIR/secrets/TARGET).",
)
@target_options
def import_dir(source: Path | None, opts: TargetOptions) -> None:
    """Copy every key of a directory store into the database store (one transaction); the
    files are left in place."""
    run_command(lambda: _copy_between_stores(opts, source, into_database=True))


@keys.command("export-dir")
@click.option(
    "--to",
    "dest",
    default=None,
    type=click.Path(path_type=Path),
    help="The directory store to copy into (default: --secrets-dir, i.e. STATE_DIR/secrets/TARGET).",
)
@target_options
def export_dir(dest: Path | None, opts: TargetOptions) -> None:
    """Copy every key of the database store into a directory store (one 0600 file each), to
    go back to --key-store directory; the sealed rows are left in place."""
    run_command(lambda: _copy_between_stores(opts, dest, into_database=False))


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
