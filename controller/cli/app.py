"""The ``finops`` command line. Exit codes are decided here and only here.

0 success / no changes; 1 error (including usage errors, any failed agent or refused
plan); 2 changes present (``plan --detailed-exitcode``) only, as Terraform does
(``controller.exitcodes``, ``controller.cli.conventions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from controller.cli.conventions import follow_conventions, run_main
from controller.cli.github import STEP_SUMMARY_ENV, annotation, append_step_summary, plain_annotation
from controller.cli.options import (
    DEFAULT_PATH,
    EXIT_CHANGES,
    EXIT_ERROR,
    EXIT_OK,
    TargetOptions,
    err,
    load,
    run_command,
    target_options,
)
from controller.cli.progress import ApplyProgress
from controller.cli.remote import RemoteOptions, remote_options
from controller.cli.views import (
    DEFAULT_MARKER,
    DEFAULT_MAX_CHARS,
    MIN_MAX_CHARS,
    RENDERERS,
    marker_comment,
    render_apply_text,
    render_markdown,
    render_text,
)
from controller.errors import ConfigError, FinopsError, ManifestError, StalePlanError
from controller.io.safefile import iter_chunks, read_text_bounded
from controller.io.secretfile import make_private_dirs, write_secret_file
from controller.io.target import Target
from controller.manifest.schema import manifest_json_schema
from controller.reconcile import approval
from controller.reconcile.apply import ApplyResult
from controller.reconcile.decide import observe_and_plan
from controller.reconcile.pipeline import apply_plan
from controller.services import Services, open_services
from controller.state import StateStore
from policies.exposure import exposure_of
from policies.plan_types import Plan, changes_equal, plan_from_dict, plan_to_dict
from policies.spec import DesiredState

if TYPE_CHECKING:
    from controller.sandbox.faults import FaultConfig

APPLY_FORMAT_VERSION = 1
"""``apply --format json``: ``{"format_version", "plan", "result"}``."""
REBALANCE_FORMAT_VERSION = 1

MAX_PLAN_FILE_BYTES = 256 * 1024 * 1024
"""A saved plan is about 1 KB per change; this bound only stops a wrong path (a device, a
FIFO, a runaway file) from hanging ``apply --plan`` or exhausting its memory."""


async def _plan(desired: DesiredState, services: Services, prune: bool) -> Plan:
    async with services.client() as client:
        return await observe_and_plan(client, desired, services.target.name, services.state, prune=prune)


def _marker(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        marker_comment(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _max_chars(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if 0 < value < MIN_MAX_CHARS:
        raise click.BadParameter(f"0 (no limit) or at least {MIN_MAX_CHARS}")
    return value


def _banner(target: Target, fmt: str) -> None:
    click.echo(target.banner(), err=fmt != "text")


class LazyGroup(click.Group):
    """Commands defined elsewhere are imported when they run (or ``--help`` lists them):
    ``import controller.cli`` must not load the daemon's scheduler and server stack or the
    sandbox for a ``finops plan``."""

    LAZY: ClassVar[dict[str, str]] = {
        "run": "controller.daemon.command:run",
        "status": "controller.cli.status:status",
        "alerts": "controller.cli.status:alerts",
        "rotate": "controller.cli.keys:rotate",
        "keys": "controller.cli.keys:keys",
        "freeze": "controller.cli.keys:freeze_command",
        "unfreeze": "controller.cli.keys:unfreeze_command",
        "approve": "controller.cli.approve:approve",
        "state": "controller.cli.state:state",
        "report": "controller.cli.report:report",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.LAZY.get(cmd_name)
        if target is None:
            found = super().get_command(ctx, cmd_name)
            return None if found is None else follow_conventions(found, f"finops {cmd_name}")
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command) and command.name == cmd_name, target
        return follow_conventions(command, f"finops {cmd_name}")

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Exit codes of ``controller.cli.conventions.run_main`` (every error exits 1)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        run_main(super().main, args, prog_name, complete_var, extra)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finops")
def cli() -> None:
    """finops: keep an AI-agent fleet's spending equal to what is committed in git.

    Exit codes: 0 success, 1 any error (usage errors included), 2 changes present
    (only with `plan --detailed-exitcode`), 130 interrupted. NO_COLOR or --no-color: no
    colours; FINOPS_DEBUG=1: the traceback of an unexpected error."""


follow_conventions(cli, "finops")


@cli.command()
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "github"]),
    default="text",
    show_default=True,
    help="github: also print each error as a GitHub Actions annotation (::error file=…,line=…::…) on stdout.",
)
def validate(path: str, fmt: str) -> None:
    """Check manifests offline: every error with file, line and field."""

    def run() -> int:
        try:
            desired = load(path, None)  # offline: relative paths stay as written
        except ManifestError as exc:
            if fmt == "github":
                for issue in exc.issues:
                    click.echo(annotation(issue))
            raise
        except FinopsError as exc:
            if fmt == "github":
                click.echo(plain_annotation(str(exc)))
            raise
        agents = len(desired.agents())
        click.echo(f"OK: {len(desired.fleets)} fleet(s), {agents} agent(s) in {path}")
        return EXIT_OK

    run_command(run)


@cli.command()
def schema() -> None:
    """Print the manifest JSON Schema (for editors and CI linters).

    Save it next to the manifests and point editors at it with the yaml-language-server
    modeline as the first line of each manifest:

    \b
      finops schema > manifests/finops.schema.json
      # yaml-language-server: $schema=./finops.schema.json

    The schema checks each document's shape; `finops validate` remains the authority
    (cross-document rules such as tier references and budgets)."""
    click.echo(json.dumps(manifest_json_schema(), indent=2))


@cli.command()
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option("--prune", is_flag=True, help="Delete gateway webhooks finops created for agents no longer declared.")
@click.option("--format", "fmt", type=click.Choice(sorted(RENDERERS)), default="text", show_default=True)
@click.option(
    "--detailed-exitcode", is_flag=True, help="Exit 0 when converged, 2 when changes are pending, 1 on error."
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also save the plan to FILE for `finops apply --plan FILE`.",
)
@click.option(
    "--max-chars",
    type=click.IntRange(min=0),
    callback=_max_chars,
    default=DEFAULT_MAX_CHARS,
    show_default=True,
    help="Markdown (and the GITHUB_STEP_SUMMARY copy): at most N characters; fleets that do not fit are "
    "summarised and the rest points to the full plan. 0: no limit.",
)
@click.option(
    "--artifact-hint",
    default=None,
    metavar="TEXT",
    help="Markdown: where the full plan is kept (e.g. the workflow artifact's URL), shown when it is truncated.",
)
@click.option(
    "--marker",
    default=DEFAULT_MARKER,
    show_default=True,
    callback=_marker,
    help="Markdown: the name in its first line, <!-- NAME -->, by which a workflow finds and updates one "
    "sticky PR comment (one per target, e.g. finops-plan-prod).",
)
@remote_options
@target_options
def plan(
    path: str,
    prune: bool,
    fmt: str,
    detailed_exitcode: bool,
    out: Path | None,
    max_chars: int,
    artifact_hint: str | None,
    marker: str,
    remote: RemoteOptions,
    opts: TargetOptions,
) -> None:
    """Show what apply would change (reads only).

    With GITHUB_STEP_SUMMARY set (GitHub Actions), the markdown plan is also appended to
    that file, whatever --format says."""

    def run() -> int:
        if remote.url is not None:  # a daemon's plan API plans: no gateway key, shown as below
            result = remote.fetch(path, fmt=fmt, prune=prune)
        else:
            desired = load(path, opts.state_dir)
            with opts.open_target() as target:
                _banner(target, fmt)
                with open_services(target, opts) as services:
                    result = asyncio.run(_plan(desired, services, prune))

        def markdown() -> str:
            return render_markdown(result, max_chars=max_chars, artifact_hint=artifact_hint, marker=marker)

        if fmt == "text":
            click.echo(render_text(result, click.style))
        elif fmt == "markdown":
            click.echo(markdown(), nl=False)
        else:
            click.echo(RENDERERS[fmt](result))
        summary_file = os.environ.get(STEP_SUMMARY_ENV)
        if summary_file:
            try:
                append_step_summary(summary_file, markdown())
            except OSError as exc:
                err(f"could not write the job summary to {summary_file} ({STEP_SUMMARY_ENV}): {exc.strerror or exc}")
        if out is not None:
            write_secret_file(out, json.dumps(plan_to_dict(result), indent=2) + "\n")  # 0600, atomic
            click.echo(f"finops: plan saved to {out}", err=True)
        if result.errors or result.violations:
            return EXIT_ERROR
        if detailed_exitcode and not result.empty:
            return EXIT_CHANGES
        return EXIT_OK

    run_command(run)


def _exposure_gate(
    fresh: Plan, chosen: Plan, desired: DesiredState, target: Target, store: StateStore, path: str, auto_approve: bool
) -> str | None:
    """Refuse an unattended apply above the unattended bound (nothing written); say what an
    interactive confirmation approves. Returns the prompt's extra line, if any."""
    verdict = fresh.exposure
    if verdict is None:
        return None
    revision = approval.path_revision(Path(path))
    if auto_approve:
        if verdict.requires_approval and not chosen.empty:
            raise approval.ApprovalRequired(
                f"revision {revision} raises spending authority above the unattended bound "
                "(spec.approval.maxUnattendedIncrease); nothing was applied:\n  "
                + "\n  ".join([*verdict.lines(), *(str(e) for e in verdict.excesses)])
                + f"\nAn operator holding the admin key must approve it first: finops approve {revision} {path}"
                "\n(or run `finops apply` interactively and confirm)"
            )
        if verdict.bootstrap and not verdict.requires_approval:
            # Only a revision within its own bound bootstraps (as in the daemon). One above it
            # may have nothing to write *now* (its funding deferred by the funding limits),
            # but recording it would let a later unattended apply carry it out unreviewed.
            approval.record(store, revision, path, exposure_of(desired), how=approval.BOOTSTRAP, api_key=target.api_key)
        return None
    if verdict.requires_approval:
        return f"This raises spending authority above the unattended bound: answering yes approves {revision}."
    return None


async def _apply(
    desired: DesiredState,
    services: Services,
    saved: Plan | None,
    auto_approve: bool,
    fmt: str,
    prune: bool,
    path: str = DEFAULT_PATH,
    progress: ApplyProgress | None = None,
) -> tuple[Plan, ApplyResult | None]:
    target, store = services.target, services.state

    def select(fresh: Plan) -> Plan:
        if saved is None:
            return fresh
        if saved.target != target.name:
            raise StalePlanError(f"the saved plan was made for {saved.target!r}, not {target.name!r}")
        if saved.basis != fresh.basis or not changes_equal(saved.changes, fresh.changes):
            raise StalePlanError(
                "the live gateway (or the manifests) changed since the plan was saved; "
                "run `finops plan --out FILE` again and review it"
            )
        return saved

    def gate(fresh: Plan, chosen: Plan) -> None:
        if fmt == "text":
            click.echo(render_text(chosen, click.style))
        # A saved plan is the approval (as in Terraform): applied without a prompt, and as
        # unattended for the exposure gate (above the unattended bound it needs `finops approve`).
        unattended = auto_approve or saved is not None
        note = _exposure_gate(fresh, chosen, desired, target, store, path, unattended)
        if chosen.empty:
            return
        if unattended:
            if progress is not None:
                progress.start(chosen)
            return
        if fmt != "text":
            # Never reached from the CLI (`apply` refuses JSON without either up front); kept
            # so no caller can mix a prompt into machine-readable output.
            raise ConfigError("refusing to prompt with --format json: pass --auto-approve or a saved plan file")
        if not sys.stdin.isatty():
            raise ConfigError("refusing to apply without confirmation: pass --auto-approve in scripts and CI")
        if note:
            click.echo(click.style(note, bold=True), err=True)
        answer = click.prompt("Apply these changes? Only 'yes' is accepted", default="", show_default=False, err=True)
        if answer.strip() != "yes":
            raise FinopsError("apply cancelled; nothing was changed")
        if fresh.exposure is not None and (fresh.exposure.bootstrap or fresh.exposure.lines()):
            # A person saw the exposure and confirmed: that is an approval of this revision.
            approval.record(
                store,
                approval.path_revision(Path(path)),
                path,
                exposure_of(desired),
                how=approval.APPLY,
                api_key=target.api_key,
            )
        if progress is not None:
            progress.start(chosen)

    async with services.client() as client:
        run = await apply_plan(
            client,
            store,
            services.vault,
            desired,
            target=target.name,
            clock=services.clock,
            prune=prune,
            select=select,
            gate=gate,
            on_agent_done=progress.advance if progress is not None else None,
        )
    return run.chosen, run.result


def _read_plan_file(plan_file: Path) -> Plan:
    try:
        text = read_text_bounded(plan_file, MAX_PLAN_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read the plan file {plan_file}: {exc.strerror}") from None
    try:
        return plan_from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{plan_file} is not a finops plan file: {exc}") from None


def is_saved_plan(path: Path) -> bool:
    """Whether ``apply``'s positional ``path`` names a saved plan rather than manifests: a
    regular file holding a JSON object with a plan's own keys (``format_version``,
    ``target``, ``basis``, ``changes``; a manifest has ``apiVersion`` and ``kind``). A
    directory, a YAML file or a JSON manifest are manifests."""
    if not path.is_file():
        return False
    try:
        # Opened as finops opens every input (regular files only: a FIFO swapped in after
        # the check cannot hang it), the first bytes only unless it looks like JSON.
        head = b"".join(iter_chunks(path, 64)).lstrip()
        if not head.startswith(b"{"):
            return False
        doc = json.loads(read_text_bounded(path, MAX_PLAN_FILE_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.keys() >= SAVED_PLAN_KEYS


SAVED_PLAN_KEYS = frozenset({"format_version", "target", "basis", "changes"})


def _apply_arguments(args: tuple[str, ...], plan_option: Path | None) -> tuple[str, Path | None]:
    """``[PLANFILE] [PATH]`` → (manifest path, saved plan file or ``None``)."""
    if len(args) > 2:
        raise click.UsageError(f"at most two arguments, [PLANFILE] [PATH]; got {len(args)}")
    plan_arg: Path | None = None
    rest = list(args)
    if rest and (len(rest) == 2 or is_saved_plan(Path(rest[0]))):
        plan_arg = Path(rest.pop(0))
        if not is_saved_plan(plan_arg):
            raise click.BadParameter(
                f"{plan_arg} is not a saved finops plan (make one with `finops plan --out FILE`)",
                param_hint="PLANFILE",
            )
    if plan_arg is not None and plan_option is not None:
        raise click.UsageError("give the saved plan once: either PLANFILE or --plan FILE")
    return (rest[0] if rest else DEFAULT_PATH), plan_arg or plan_option


@cli.command()
@click.argument("args", nargs=-1, metavar="[PLANFILE] [PATH]")
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Apply a plan saved with `plan --out` (same as PLANFILE): no prompt; refused if the gateway moved since.",
)
@click.option("--prune", is_flag=True, help="Delete gateway webhooks finops created for agents no longer declared.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json never prompts: it needs --auto-approve or a saved plan.",
)
@target_options
def apply(
    args: tuple[str, ...],
    prune: bool,
    auto_approve: bool,
    plan_file: Path | None,
    fmt: str,
    opts: TargetOptions,
) -> None:
    """Make the live fleet match the manifests; continues past one agent's failure.

    PLANFILE, a plan saved with `finops plan --out FILE` (a file holding a finops plan's
    JSON), is applied without a prompt: the reviewed plan is the approval. It is refused,
    with nothing written, if the gateway or the manifests at PATH (default: manifests)
    changed since. Any other first argument is the manifest PATH (a directory or one file).
    Without PLANFILE, the plan is shown and only 'yes' (read from the terminal, asked on
    stderr) applies it; --auto-approve skips the question."""
    path, plan_path = _apply_arguments(args, plan_file)

    def run() -> int:
        if fmt == "json" and not auto_approve and plan_path is None:
            raise ConfigError(
                "apply --format json never prompts: pass --auto-approve, or apply a reviewed plan "
                "(`finops plan --out plan.json`, then `finops apply plan.json --format json`); nothing was applied"
            )
        desired = load(path, opts.state_dir)
        saved = _read_plan_file(plan_path) if plan_path is not None else None
        progress = ApplyProgress.on_stderr(color=click.get_current_context().color)
        with (
            opts.writer_lock("finops apply") as lock,
            opts.open_target() as target,
        ):
            # Observed and planned only now, with the lock held: a second apply acts on
            # what the first one left, never on a plan made before it.
            _banner(target, fmt)
            with open_services(target, opts, fence=lock.check) as services:
                try:
                    chosen, result = asyncio.run(
                        _apply(desired, services, saved, auto_approve, fmt, prune, path, progress)
                    )
                finally:
                    progress.close()
        if fmt == "json":
            click.echo(
                json.dumps(
                    {
                        "format_version": APPLY_FORMAT_VERSION,
                        "plan": plan_to_dict(chosen),
                        "result": result.to_dict() if result else None,
                    },
                    indent=2,
                )
            )
        elif result is not None:
            click.echo(render_apply_text(result, click.style))
        if chosen.errors:
            # One agent's failure never stops the others: the rest was applied; these were
            # not touched (their plan is unknown) and the run says so and exits 1.
            err(
                f"{len(chosen.errors)} agent(s) could not be observed and were left unchanged:\n  "
                + "\n  ".join(map(str, chosen.errors))
            )
            return EXIT_ERROR
        return EXIT_OK if result is None or result.ok else EXIT_ERROR

    run_command(run)


@cli.command()
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option("--dry-run", is_flag=True, help="Show the decision; write nothing.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@target_options
def rebalance(
    path: str,
    dry_run: bool,
    fmt: str,
    opts: TargetOptions,
) -> None:
    """Move unused daily budget from idle agents to busy ones now (fleet totals unchanged)."""
    from controller.reconcile.rebalancer import RebalanceRun, run_rebalance

    def run() -> int:
        desired = load(path, opts.state_dir)
        with (
            opts.writer_lock("finops rebalance") if not dry_run else contextlib.nullcontext() as lock,
            opts.open_target() as target,
        ):
            _banner(target, fmt)
            services = Services.build(target, opts, fence=lock.check if lock is not None else None)
            store = services.state

            async def go() -> RebalanceRun:
                verdict = approval.judge(store, desired)
                if not dry_run and verdict.requires_approval:
                    # Rebalanced caps are written on top of these manifests' baselines.
                    raise approval.ApprovalRequired(
                        f"the manifests at {path} raise spending authority above the unattended bound and are not "
                        "approved: " + "; ".join(str(e) for e in verdict.excesses) + "; run `finops approve "
                        f"{approval.path_revision(Path(path))} {path}` first (or `--dry-run`)"
                    )
                async with services.client() as client:
                    return await run_rebalance(
                        client, desired, store, services.vault, target.name, dry_run=dry_run, now=services.clock
                    )

            try:
                outcome = asyncio.run(go())
            finally:
                services.close()
        if fmt == "json":
            click.echo(
                json.dumps(
                    {
                        "format_version": REBALANCE_FORMAT_VERSION,
                        "dry_run": dry_run,
                        "moved": str(outcome.moved),
                        "decisions": outcome.lines(),
                        "result": outcome.applied.to_dict() if outcome.applied else None,
                    },
                    indent=2,
                )
            )
        else:
            for line in outcome.lines() or ["no fleet has rebalancing enabled"]:
                click.echo(line)
            if outcome.applied is not None:
                click.echo(render_apply_text(outcome.applied, click.style))
            elif not dry_run:
                click.echo("Caps already match the decision: nothing written.")
        return EXIT_OK if outcome.applied is None or outcome.applied.ok else EXIT_ERROR

    run_command(run)


COMPLETION_SHELLS = ("bash", "zsh", "fish")


@cli.command()
@click.argument("shell", type=click.Choice(COMPLETION_SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (click's, driven by _FINOPS_COMPLETE).

    Load it now with `eval "$(finops completion bash)"` (bash, zsh) or
    `finops completion fish | source` (fish), or save it where your shell looks."""
    from click.shell_completion import get_completion_class

    root = ctx.find_root()
    complete_class = get_completion_class(shell)
    if complete_class is None:  # pragma: no cover - the choice above lists click's built-in shells
        raise ConfigError(f"no completion for {shell}")
    script = complete_class(root.command, {}, root.info_name or "finops", "_FINOPS_COMPLETE").source()
    click.echo(script)


def _faults(ctx: click.Context, param: click.Parameter, value: str | None) -> FaultConfig | None:
    if value is None:
        return None
    from controller.sandbox.faults import FaultConfig  # the sandbox is loaded by `finops sandbox` only

    try:
        return FaultConfig.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--db", "db", type=click.Path(path_type=Path), default=Path(".finops/sandbox/gateway.db"), show_default=True
)
@click.option(
    "--admin-key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the admin key is written (0600). Default: next to the database.",
)
@click.option(
    "--faults",
    envvar="FINOPS_SANDBOX_FAULTS",
    default=None,
    metavar="SPEC",
    callback=_faults,
    help="Misbehave on purpose on /v1/*, seeded, e.g. 'seed=7,rate=0.2,kinds=500+503+429+hang+reset+drop' "
    "(keys: seed, rate, kinds, retry_after, hang, only). Off by default.",
)
def sandbox(host: str, port: int, db: Path, admin_key_file: Path | None, faults: FaultConfig | None) -> None:
    """Run the gateway-compatible sandbox in the foreground."""
    from controller.sandbox.server import serve

    make_private_dirs(db.parent)
    serve(host, port, db, admin_key_file or db.parent / "admin.key", faults=faults)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
