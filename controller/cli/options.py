"""Options, exit codes and error handling shared by every ``finops`` command module.

Kept apart from ``controller.cli`` so command groups living next to what they drive (the
daemon, keys, alerts) can share them without importing the whole CLI.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from controller.errors import ConfigError, FinopsError, ManifestError
from controller.exitcodes import EXIT_CHANGES, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from controller.io.target import Target, open_target
from controller.manifest.loader import load_manifests
from controller.state.location import StateLocation
from controller.state.lock import WriterLock, writer_lock
from policies.display import escape_lines
from policies.spec import DesiredState

DEFAULT_PATH = "manifests"
DEFAULT_PG_LOCK_WAIT_S = 300.0
"""Two applies from two machines queue instead of failing (the second plans after the first)."""

__all__ = ["DEFAULT_PATH", "EXIT_CHANGES", "EXIT_ERROR", "EXIT_OK", "TargetOptions", "err", "load", "run_command"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TargetOptions:
    """The options every gateway command shares, as one value (``opts``) instead of five
    parameters repeated in each command's signature."""

    gateway: str | None
    api_key_file: str | None
    state_dir: Path
    secrets_dir: Path | None
    concurrency: int
    allow_insecure_http: bool = False
    """Permit a plain ``http://`` gateway URL to a non-loopback host (the admin key in clear)."""
    state_url: str | None = None
    """A shared PostgreSQL state database; ``None``: the SQLite file under ``state_dir``."""
    lock_timeout: float | None = None
    """How long a writer waits for the writer lock (``None``: PostgreSQL 300 s, SQLite 0)."""
    key_store: str | None = None
    """``directory`` or ``database`` (``controller.keys.selection``); ``None``: by the state."""

    def writer_lock(self, purpose: str) -> AbstractContextManager[WriterLock]:
        """The writer lock of the state these options name (``controller.state.lock``)."""
        location = StateLocation(self.state_dir / "finops.lock", url=self.state_url)
        wait = self.lock_timeout
        if wait is None:
            wait = DEFAULT_PG_LOCK_WAIT_S if self.state_url else 0.0
        return writer_lock(location, self.state_dir, purpose=purpose, wait=wait, on_wait=_tell_waiting)

    def open_target(self) -> AbstractContextManager[Target]:
        """The gateway these options name (or the embedded sandbox); see ``open_target``."""
        return open_target(
            self.gateway,
            api_key_file=self.api_key_file,
            state_dir=self.state_dir,
            allow_insecure_http=self.allow_insecure_http,
            state_url=self.state_url,
        )


def state_dir_option() -> Callable[[F], F]:
    """``--state-dir``, the same for every command."""
    return click.option(
        "--state-dir",
        envvar="FINOPS_STATE_DIR",
        default=".finops",
        show_default=True,
        type=click.Path(path_type=Path),
        help="Where finops keeps its state (env FINOPS_STATE_DIR).",
    )


def state_url_option() -> Callable[[F], F]:
    """``--state-url``, the same for every command."""
    return click.option(
        "--state-url",
        envvar="FINOPS_STATE_URL",
        default=None,
        metavar="URL",
        help="Keep finops' state in a shared PostgreSQL database (postgresql://HOST/DB; env "
        "FINOPS_STATE_URL) instead of the SQLite file under --state-dir. Put the password in "
        "PGPASSFILE or PGPASSWORD, not in the URL.",
    )


def target_options(fn: F) -> F:
    """Options shared by every command that talks to a gateway, passed as ``opts``."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        gateway: str | None,
        api_key_file: str | None,
        state_dir: Path,
        secrets_dir: Path | None,
        concurrency: int,
        allow_insecure_http: bool,
        state_url: str | None,
        lock_timeout: float | None,
        key_store: str | None,
        **kwargs: Any,
    ) -> Any:
        opts = TargetOptions(
            gateway,
            api_key_file,
            state_dir,
            secrets_dir,
            concurrency,
            allow_insecure_http,
            state_url or None,
            lock_timeout,
            key_store=key_store or None,
        )
        return fn(*args, opts=opts, **kwargs)

    command: Callable[..., Any] = wrapper
    options = [
        click.option(
            "--gateway",
            envvar="GREENHELIX_URL",
            default=None,
            metavar="URL",
            help="Gateway base URL (env GREENHELIX_URL). Unset: the embedded sandbox.",
        ),
        click.option(
            "--api-key-file",
            envvar="GREENHELIX_API_KEY_FILE",
            default=None,
            metavar="FILE",
            help="File holding the admin API key (env GREENHELIX_API_KEY_FILE; or GREENHELIX_API_KEY).",
        ),
        state_dir_option(),
        state_url_option(),
        click.option(
            "--lock-timeout",
            envvar="FINOPS_LOCK_TIMEOUT",
            default=None,
            type=click.FloatRange(0, 86_400),
            metavar="SECONDS",
            help="How long a writing command waits for another finops' writer lock (env FINOPS_LOCK_TIMEOUT; "
            f"default: {DEFAULT_PG_LOCK_WAIT_S:g} s with --state-url, 0 with the SQLite file). A running daemon's "
            "lock is never waited for.",
        ),
        click.option(
            "--secrets-dir",
            envvar="FINOPS_SECRETS_DIR",
            default=None,
            type=click.Path(path_type=Path),
            help="Directory for agents' keys, one 0600 file each (default STATE_DIR/secrets/TARGET); with "
            "--key-store database, where a directory sink without a path delivers copies.",
        ),
        click.option(
            "--key-store",
            envvar="FINOPS_KEY_STORE",
            default=None,
            type=click.Choice(["directory", "database"]),
            help="Where finops keeps agents' keys (env FINOPS_KEY_STORE): 'directory' (one 0600 file each "
            "under --secrets-dir) or 'database' (sealed in the state database under the key-encryption key "
            "in FINOPS_KEY_ENCRYPTION_KEY_FILE, so another machine can take over). Default: 'database' with "
            "--state-url, else 'directory'.",
        ),
        click.option(
            "--concurrency",
            default=32,
            show_default=True,
            type=click.IntRange(1, 512),
            help="Maximum gateway requests in flight.",
        ),
        click.option(
            "--allow-insecure-http",
            envvar="FINOPS_ALLOW_INSECURE_HTTP",
            is_flag=True,
            default=False,
            help="Allow a plain http:// gateway URL to a non-loopback host: the admin key then crosses "
            "the network in clear (env FINOPS_ALLOW_INSECURE_HTTP=1). Loopback hosts never need it.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return cast(F, command)


def _tell_waiting(message: str) -> None:
    click.echo(f"finops: {escape_lines(message)}", err=True)


def err(message: str) -> None:
    click.echo(click.style("Error: ", fg="red", bold=True) + escape_lines(message), err=True)


def run_command(fn: Callable[[], int]) -> None:
    """Map user-facing errors to exit code 1 with a one-line message, never a traceback."""
    try:
        code = fn()
    except ManifestError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        err(f"{len(exc.issues)} manifest error(s); nothing was planned or applied.")
        code = EXIT_ERROR
    except FinopsError as exc:
        err(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        err("interrupted")
        code = EXIT_INTERRUPTED
    sys.exit(int(code))


def load(path: str, state_dir: Path | None) -> DesiredState:
    """The manifests at ``path``; with ``state_dir`` (every command that acts on a gateway),
    relative secret files and sink directories resolved against it (``controller.manifest.paths``)."""
    if not Path(path).exists():
        raise ConfigError(f"manifest path {path!r} does not exist")
    return load_manifests(path, state_dir=state_dir)
