"""Conventions every ``finops`` command follows, applied to the whole command tree in one
place (``LazyGroup``), so a command added later follows them without remembering to:

- Terraform's exit-code contract: any error exits 1 (click's usage errors included, which
  click itself exits 2 for: 2 is reserved for "changes present" with ``--detailed-exitcode``);
  an unexpected exception is one line on stderr, its traceback only with ``FINOPS_DEBUG=1``;
- ``NO_COLOR`` (https://no-color.org) and ``--no-color``, accepted before or after the
  command name;
- an "Examples" section in every command's ``--help`` (``EXAMPLES``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from controller.errors import FinopsError
from controller.exitcodes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from policies.display import escape_lines

DEBUG_ENV = "FINOPS_DEBUG"
"""Set (to anything but empty or ``0``) to see the traceback of an unexpected error."""

NO_COLOR_ENV = "NO_COLOR"

EXAMPLES: dict[str, tuple[str, ...]] = {
    "finops": (
        "finops validate manifests",
        "finops plan --detailed-exitcode",
        "finops apply",
    ),
    "finops validate": (
        "finops validate                      # the ./manifests directory",
        "finops validate manifests/prod.yaml  # one file",
    ),
    "finops schema": (
        "finops schema > manifests/finops.schema.json",
        "# then, first line of a manifest: # yaml-language-server: $schema=./finops.schema.json",
    ),
    "finops plan": (
        "finops plan",
        "finops plan --detailed-exitcode      # 0 converged, 2 changes pending, 1 error",
        "finops plan --out plan.json          # review it, then: finops apply plan.json",
        "finops plan --format markdown > plan.md",
    ),
    "finops apply": (
        "finops apply                         # shows the plan, asks for 'yes'",
        "finops apply plan.json               # a saved plan: no prompt; refused if the gateway moved",
        "finops apply --auto-approve --format json manifests",
    ),
    "finops rebalance": (
        "finops rebalance --dry-run",
        "finops rebalance --format json",
    ),
    "finops report": (
        "finops report --period 2026-11                 # a calendar month (UTC), one row per fleet",
        "finops report --since 30d --by label:team      # the last 30 days, one row per team",
        "finops report --period 2026-11 --by agent --format csv --out 2026-11.csv  # FOCUS columns",
        "finops report --since 7d --format markdown > report.md",
    ),
    "finops sandbox": (
        "finops sandbox --port 8000",
        "finops sandbox --faults 'seed=7,rate=0.2,kinds=500+reset'",
    ),
    "finops run": (
        "finops run manifests --interval 60 --metrics-port 9108",
        "finops run --git https://example.com/fleet.git --branch main --path manifests",
        "finops run --once                    # one pass, for cron and CI",
    ),
    "finops status": (
        "finops status                        # flagged agents first, then counts",
        "finops status --all                  # every agent",
        "finops status --strict --format json # exit 1 when anything needs attention",
    ),
    "finops alerts": ("finops alerts check",),
    "finops alerts check": (
        "finops alerts check",
        "finops alerts check --format json",
    ),
    "finops rotate": (
        "finops rotate                        # the keys that are due",
        "finops rotate --agent agent-7 --now",
    ),
    "finops keys": ("finops keys import agent-7 < agent-7.key",),
    "finops keys import": ("finops keys import agent-7 < agent-7.key",),
    "finops keys generate-kek": ("finops keys generate-kek /etc/finops/kek",),
    "finops keys rewrap": ("finops keys rewrap --new-key-file /etc/finops/kek.new",),
    "finops keys import-dir": ("finops keys import-dir --key-store database --state-url postgresql://db/finops",),
    "finops keys export-dir": ("finops keys export-dir --key-store database --state-url postgresql://db/finops",),
    "finops freeze": ("finops freeze agent-7 --reason 'runaway spend'",),
    "finops unfreeze": ("finops unfreeze agent-7",),
    "finops approve": (
        "finops approve --show",
        "finops approve 3f2c1ab manifests",
    ),
    "finops state": ("finops state show",),
    "finops state show": (
        "finops state show",
        "finops state show --format json",
    ),
    "finops state migrate": (
        "finops state migrate --to postgresql://db.internal/finops",
        "finops state migrate --to backup.db",
    ),
    "finops completion": (
        "finops completion bash > ~/.local/share/bash-completion/completions/finops",
        'finops completion zsh > "${fpath[1]}/_finops"',
        "finops completion fish > ~/.config/fish/completions/finops.fish",
    ),
}
"""Examples shown under "Examples" in each command's ``--help``, by command path."""


def color_disabled() -> bool:
    """``NO_COLOR`` set to anything non-empty disables colour (no-color.org)."""
    return bool(os.environ.get(NO_COLOR_ENV))


def _no_color(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value or color_disabled():
        ctx.color = False


def no_color_option() -> click.Option:
    return click.Option(
        ["--no-color"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_no_color,
        help="No ANSI colours or styles (also: NO_COLOR set to anything).",
    )


def _examples_epilog(path: str) -> str | None:
    examples = EXAMPLES.get(path)
    if not examples:
        return None
    # \b keeps click from rewrapping the lines.
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples)


def follow_conventions(command: click.Command, path: str) -> click.Command:
    """Give ``command`` (and its subcommands) ``--no-color`` and its examples; idempotent."""
    if not any(isinstance(p, click.Option) and "--no-color" in p.opts for p in command.params):
        command.params.append(no_color_option())
    if command.epilog is None:
        command.epilog = _examples_epilog(path)
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            follow_conventions(sub, f"{path} {name}")
    return command


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _error(message: str) -> None:
    click.echo(click.style("Error: ", fg="red", bold=True) + escape_lines(message), err=True, color=_err_color())


def _err_color() -> bool | None:
    return False if color_disabled() else None


def run_main(
    main: Callable[..., Any],
    args: Sequence[str] | None,
    prog_name: str | None,
    complete_var: str | None,
    extra: dict[str, Any],
) -> None:
    """Run click's ``main`` in non-standalone mode and exit with finops' codes: 0 success
    (``--help``, ``--version``), the command's own code (``run_command``: 0, 1, 2 only for
    changes present, 130 interrupted), 1 for every error click raises (usage errors exit 2
    in click, which ``--detailed-exitcode`` means "changes present") and for any
    unexpected exception (one line; ``FINOPS_DEBUG=1`` shows the traceback)."""
    try:
        rv = main(args, prog_name, complete_var, standalone_mode=False, **extra)
    except click.ClickException as exc:
        if color_disabled() and isinstance(exc, click.UsageError) and exc.ctx is not None:
            exc.ctx.color = False
        exc.show()
        sys.exit(EXIT_ERROR)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except FinopsError as exc:  # a command that does not go through ``run_command``
        _error(str(exc))
        sys.exit(EXIT_ERROR)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader went away (`finops plan | head`)
            _silence_stdout()
            sys.exit(EXIT_ERROR)
        if _debug():
            raise
        _error(_one_line(exc))
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if _debug():
            raise
        _error(_one_line(exc))
        sys.exit(EXIT_ERROR)
    # Non-standalone: --help/--version return 0; a command's run_command exits by itself.
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK)


def _silence_stdout() -> None:
    """Python's advice for a closed pipe: point stdout at /dev/null so the flush at exit
    does not raise again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _one_line(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0][:300]
    what = type(exc).__name__ + (f": {first}" if first else "")
    return f"unexpected error ({what}); nothing more is shown: set {DEBUG_ENV}=1 for the traceback"
