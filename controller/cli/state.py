"""``finops state show`` and ``finops state migrate``: what finops remembers, and moving it
between backends. Offline: neither needs the gateway or an admin key. Registered on the main
group by ``controller.cli``."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from controller.cli.options import EXIT_ERROR, EXIT_OK, err, run_command, state_dir_option, state_url_option
from controller.errors import ConfigError
from controller.io.target import target_name
from controller.state.db import Database, connect
from controller.state.inventory import DEFAULT_LIMIT, SECTIONS, Scalar, StateSummary, safe_text, summarize
from controller.state.location import POSTGRESQL, SQLITE, StateLocation, check_state_url
from controller.state.lock import writer_lock
from controller.state.transfer import CopyMismatch, MigrationReport, copy_state, stored_version
from policies.display import escape_controls

F = TypeVar("F", bound=Callable[..., Any])

_PG_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite://"
_SQLITE_HEADER = b"SQLite format 3\x00"


STATE_FORMAT_VERSION = 1
"""``state show`` and ``state migrate`` ``--format json``'s schema version."""


def _json(doc: dict[str, Any]) -> str:
    return json.dumps({"format_version": STATE_FORMAT_VERSION, **doc}, indent=2)


def state_options(fn: F) -> F:
    """Which state: the same options and environment as every other command (no API key)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, gateway: str | None, state_dir: Path, state_url: str | None, **kwargs: Any) -> Any:
        name = target_name(gateway)
        file = state_dir / f"state-{name}.db"
        location = StateLocation(file, url=check_state_url(state_url) if state_url else None)
        return fn(*args, location=location, **kwargs)

    command: Callable[..., Any] = wrapper
    for option in reversed(
        [
            click.option(
                "--gateway",
                envvar="GREENHELIX_URL",
                default=None,
                metavar="URL",
                help="Which gateway's state (env GREENHELIX_URL; names the file STATE_DIR/state-<host>.db). "
                "Unset: the embedded sandbox's. Nothing is sent to it.",
            ),
            state_dir_option(),
            state_url_option(),
        ]
    ):
        command = option(command)
    return cast(F, command)


def parse_location(text: str, anchor: Path) -> StateLocation:
    """``postgresql://…`` / ``postgres://…``, ``sqlite:///PATH`` or a plain file path."""
    if text.startswith(_PG_SCHEMES):
        return StateLocation(anchor, url=check_state_url(text))
    if text.startswith(_SQLITE_SCHEME):
        text = text[len(_SQLITE_SCHEME) :]
    elif "://" in text:
        raise ConfigError(
            f"{text.split('://', 1)[0]}:// is not a state location: use postgresql://HOST/DB, sqlite:///PATH or a "
            "file path"
        )
    if not text:
        raise ConfigError("a sqlite:// location needs a file path (sqlite:///PATH)")
    return StateLocation(Path(text))


def _missing(location: StateLocation) -> ConfigError:
    present = sorted(p.name for p in location.file.parent.glob("state-*.db")) if location.file.parent.is_dir() else []
    hint = f" State files in {location.file.parent}: {', '.join(present)}." if present else ""
    return ConfigError(
        f"no finops state at {location.file} (nothing has been applied for this target from here).{hint} "
        "--gateway (or GREENHELIX_URL) names the target; --state-url the shared PostgreSQL database"
    )


def _check_file(location: StateLocation) -> None:
    """A SQLite location the user named must be a regular file (or not exist yet): never a
    device, a FIFO (opening it would hang) or a directory."""
    if location.backend != SQLITE:
        return
    try:
        mode = os.stat(location.file).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot use {location.file} as a state file: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{location.file} is not a regular file; a SQLite state location must be one")
    try:
        with open(location.file, "rb") as fh:  # before connect() tightens its mode or writes to it
            header = fh.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"cannot read the state file {location.file}: {exc.strerror}") from None
    if header and header != _SQLITE_HEADER:
        raise ConfigError(f"{location.file} is not a SQLite database (a finops state file); refusing to touch it")


@contextmanager
def _open(location: StateLocation) -> Iterator[Database]:
    _check_file(location)
    try:
        db = connect(location)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{location.file} is not a finops state database: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot open the state file {location.file}: {exc.strerror or exc}") from None
    try:
        yield db
    finally:
        db.close()


@contextmanager
def _database_errors(what: str) -> Iterator[None]:
    """A database's refusal (no privilege, a value it cannot hold, a constraint) as one
    line, redacted, instead of a traceback; the transaction it happened in was rolled back."""
    import psycopg

    try:
        yield
    except (psycopg.Error, sqlite3.Error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{what}: {type(exc).__name__}: {safe_text(first)}") from None


@click.group()
def state() -> None:
    """What finops remembers (intents, holds, webhooks, keys' fingerprints, …): show it, move it."""


# -- show -----------------------------------------------------------------------------------


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172_800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86_400}d"


def _cell(key: str, value: Scalar) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_s") and isinstance(value, int):
        return _duration(value)
    return escape_controls(str(value))


def _table(items: Sequence[Mapping[str, Scalar]]) -> list[str]:
    keys: list[str] = []
    for item in items:
        keys += [k for k in item if k not in keys]
    heads = [k.removesuffix("_s").replace("_", " ").upper() for k in keys]
    rows = [[_cell(k, item.get(k)) for k in keys] for item in items]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    return [_line(cells, widths) for cells in [heads, *rows]]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def render_summary(summary: StateSummary) -> str:
    out = [
        f"finops state: {escape_controls(summary.location)} ({summary.backend}, schema version "
        f"{summary.schema_version})"
    ]
    for section in summary.sections:
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in section.counts.items()) or "empty"
        out += ["", click.style(section.title, bold=True) + f": {counts}"]
        out += [click.style(f"  ! {escape_controls(n)}", fg="yellow") for n in section.notes]
        if section.items:
            out += _table(section.items)
        if section.more:
            out.append(f"  … and {section.more} more (--limit)")
    return "\n".join(out)


@state.command("show")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--section",
    "sections",
    multiple=True,
    type=click.Choice(SECTIONS),
    help="Only these sections (repeatable). Default: all.",
)
@click.option(
    "--limit",
    default=DEFAULT_LIMIT,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most items listed per section (counts are always complete).",
)
@state_options
def show(fmt: str, sections: tuple[str, ...], limit: int, location: StateLocation) -> None:
    """Show what finops remembers, offline. Keys appear only as fingerprints, URLs without
    credentials or query values."""

    def run() -> int:
        if not location.exists():
            raise _missing(location)
        with _database_errors(f"reading {location} failed"), _open(location) as db:
            summary = summarize(
                location, db, now=time.time(), sections=sections or SECTIONS, limit=limit, version=stored_version(db)
            )
        click.echo(_json(summary.to_dict()) if fmt == "json" else render_summary(summary))
        return EXIT_OK

    run_command(run)


# -- migrate --------------------------------------------------------------------------------


def render_report(report: MigrationReport) -> str:
    heads = ("TABLE", "SOURCE ROWS", "COPIED ROWS", "REPLACED", "DIGEST", "CHECK")
    rows = [
        (
            t.table,
            str(t.source_rows),
            str(t.target_rows),
            str(t.replaced_rows),
            t.target_digest,
            "ok" if t.ok else "MISMATCH",
        )
        for t in report.tables
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = [_line(r, widths) for r in [heads, *rows]]
    verdict = "copied and verified" if report.committed else "NOT committed"
    return "\n".join(
        [
            f"finops state migrate: {escape_controls(report.source)} -> {escape_controls(report.target)} "
            f"(schema version {report.schema_version})",
            *lines,
            f"{report.rows} row(s) in {len(report.tables)} table(s) {verdict}"
            + (f"; sequences moved past the copied ids: {', '.join(report.sequences)}" if report.sequences else ""),
        ]
    )


def _next_steps(source: StateLocation, target: StateLocation) -> list[str]:
    steps = [f"The source {source} was left unchanged."]
    if target.backend == POSTGRESQL:
        steps += [
            "Next: run every finops of this fleet with --state-url (env FINOPS_STATE_URL) naming the target, and "
            "stop using the source, or the two states diverge.",
            "Agents' keys in the directory store (STATE_DIR/secrets/TARGET) and generated webhook secrets are files "
            "on this machine, not rows: keep this --state-dir here (or move those files with it).",
        ]
    else:
        where = target.file.parent
        if target.file.name.startswith("state-") and target.file.suffix == ".db":
            steps.append(f"finops uses it with --state-dir {where} (and no --state-url).")
        else:
            steps.append(f"Kept as a backup; to run finops on it, name it {where}/state-<target>.db.")
    return steps


def _same(a: StateLocation, b: StateLocation) -> bool:
    if a.backend != b.backend:
        return False
    if a.backend == POSTGRESQL:
        return a.url == b.url
    if a.file.exists() and b.file.exists():
        return os.path.samefile(a.file, b.file)
    return a.file.resolve() == b.file.resolve()


@state.command("migrate")
@click.option(
    "--to",
    "to",
    required=True,
    metavar="URL|FILE",
    help="Where to copy the state: postgresql://HOST/DB, or sqlite:///PATH or a file path (a backup, or back "
    "from PostgreSQL). Put a password in PGPASSFILE or PGPASSWORD, not in the URL.",
)
@click.option(
    "--from",
    "source_text",
    default=None,
    metavar="URL|FILE",
    help="Copy from here instead of the state the other options name (STATE_DIR/state-<target>.db, or --state-url).",
)
@click.option("--force", is_flag=True, help="Replace the state a non-empty target holds (in the same transaction).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@state_options
def migrate(to: str, source_text: str | None, force: bool, fmt: str, location: StateLocation) -> None:
    """Copy every table of finops' state to another database in one transaction, verify
    each table's row count and row digest, refuse a non-empty target without --force."""

    def run() -> int:
        source = parse_location(source_text, location.file) if source_text else location
        target = parse_location(to, location.file)
        if _same(source, target):
            raise ConfigError(f"source and target are the same state ({source}); nothing to copy")
        for where in (source, target):
            _check_file(where)
        if not source.exists():
            raise _missing(source)
        with (
            _database_errors(f"copying {source} to {target} failed (rolled back: nothing was copied)"),
            contextlib.ExitStack() as stack,
        ):
            # The writer lock of both sides (flock or PostgreSQL advisory lock; fails at once
            # when a daemon or an apply holds it): nobody writes while the copy reads, nor into
            # the target. Two SQLite files in one directory share that directory's lock.
            locked: set[str] = set()
            for where in (source, target):
                key = where.url or str(where.file.parent.resolve())
                if key not in locked:
                    locked.add(key)
                    stack.enter_context(writer_lock(where, where.file.parent, purpose="finops state migrate"))
            src = stack.enter_context(_open(source))
            dst = stack.enter_context(_open(target))
            try:
                report = copy_state(src, dst, force=force)
            except CopyMismatch as exc:
                click.echo(_json(exc.report.to_dict()) if fmt == "json" else render_report(exc.report))
                err(str(exc))
                return EXIT_ERROR
        if fmt == "json":
            click.echo(_json(report.to_dict()))
        else:
            click.echo(render_report(report))
            for line in _next_steps(source, target):
                click.echo(escape_controls(line))
        return EXIT_OK

    run_command(run)
