"""The CLI's conventions over the whole command tree, introspected from click so a command
added later is covered without editing this file: every error exits 1 (2 is only "changes
present"), --help has examples, --no-color / NO_COLOR, shell completion."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import controller.cli.app as app
from controller.cli.app import cli
from controller.cli.conventions import EXAMPLES
from controller.errors import ConfigError
from controller.exitcodes import EXIT_ERROR

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def command_tree() -> Iterator[tuple[list[str], click.Command]]:
    """Every command and group under ``finops``, lazy ones included, with its path."""

    def walk(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
        yield path, command
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=path[-1] if path else "finops")
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, name
                yield from walk(sub, [*path, name])

    yield from walk(cli, [])


COMMANDS = list(command_tree())
IDS = [" ".join(["finops", *path]) for path, _ in COMMANDS]


def invoke(args: list[str], *, env: dict[str, str] | None = None, color: bool = False) -> Result:
    return CliRunner().invoke(cli, args, env=env, color=color, prog_name="finops")


def valid_arguments(command: click.Command) -> list[str]:
    """Values for the command's required arguments and options that parse, so that the one
    wrong thing a test adds is what fails."""
    out: list[str] = []
    for param in command.params:
        if not param.required:
            continue
        value = param.type.choices[0] if isinstance(param.type, click.Choice) else "x"
        if isinstance(param, click.Option):
            out += [param.opts[0], str(value)]
        elif param.nargs != -1:
            out.append(str(value))
    return out


def bad_values(command: click.Command) -> list[tuple[str, str]]:
    """(option, a value it rejects) for each option whose type checks its value."""
    out = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.is_flag or param.expose_value is False:
            continue
        if isinstance(param.type, click.Choice):
            out.append((param.opts[0], "no-such-choice"))
        elif isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
            out.append((param.opts[0], "not-a-number"))
        elif isinstance(param.type, click.Path) and param.type.exists:
            out.append((param.opts[0], "/no/such/file/anywhere"))
    return out


def assert_usage_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == EXIT_ERROR, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout  # errors never land in what a script parses
    assert any(f in result.stderr for f in fragments), result.stderr


def test_the_tree_is_the_whole_cli() -> None:
    # The introspection reaches lazy commands and subgroups: the tests below are not vacuous.
    names = set(IDS)
    assert {"finops plan", "finops apply", "finops run", "finops keys import", "finops state migrate"} <= names
    assert "finops completion" in names and len(names) >= 20


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_an_unknown_flag_exits_1_not_2(path: list[str], command: click.Command) -> None:
    assert_usage_error(invoke([*path, "--no-such-flag"]), "No such option")


WITH_CHECKED_VALUES = [(p, c) for p, c in COMMANDS if bad_values(c)]
WITH_REQUIREMENTS = [(p, c) for p, c in COMMANDS if isinstance(c, click.Group) or any(x.required for x in c.params)]


def test_the_parametrised_subsets_are_not_empty() -> None:
    assert len(WITH_CHECKED_VALUES) >= 10 and len(WITH_REQUIREMENTS) >= 5


@pytest.mark.parametrize(
    ("path", "command"), WITH_CHECKED_VALUES, ids=[" ".join(["finops", *p]) for p, _ in WITH_CHECKED_VALUES]
)
def test_a_bad_value_exits_1(path: list[str], command: click.Command) -> None:
    cases = bad_values(command)
    for option, value in cases:
        result = invoke([*path, option, value, *valid_arguments(command)])
        assert_usage_error(result, "Invalid value")


@pytest.mark.parametrize(
    ("path", "command"), WITH_REQUIREMENTS, ids=[" ".join(["finops", *p]) for p, _ in WITH_REQUIREMENTS]
)
def test_a_missing_argument_exits_1(path: list[str], command: click.Command) -> None:
    if isinstance(command, click.Group):
        assert_usage_error(invoke(path), "Usage:")  # a group without its command
        return
    assert_usage_error(invoke(path), "Missing argument", "Missing option")


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_has_examples_and_exits_0(path: list[str], command: click.Command) -> None:
    result = invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout
    for line in EXAMPLES[" ".join(["finops", *path])]:
        assert line in result.stdout
    assert "--no-color" in result.stdout


def test_every_example_names_a_real_command() -> None:
    assert set(EXAMPLES) == set(IDS)  # no stale entries either


def test_extra_positional_arguments_exit_1() -> None:
    assert_usage_error(invoke(["schema", "unexpected"]), "unexpected extra argument")


def test_an_unexpected_exception_is_one_line_unless_debugging(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("the schema generator broke\nsecond line")

    monkeypatch.setattr(app, "manifest_json_schema", broken)
    quiet = invoke(["schema"])
    assert quiet.exit_code == EXIT_ERROR
    assert quiet.stderr.count("\n") == 1, quiet.stderr
    assert "RuntimeError: the schema generator broke" in quiet.stderr and "FINOPS_DEBUG=1" in quiet.stderr
    assert "Traceback" not in quiet.output and "second line" not in quiet.output

    debug = CliRunner().invoke(cli, ["schema"], env={"FINOPS_DEBUG": "1"})
    assert isinstance(debug.exception, RuntimeError)  # re-raised: click's runner holds the traceback


def test_the_console_script_exits_1_on_a_usage_error(tmp_path: Path) -> None:
    # The real entry point (python -m controller.cli), not only click's test runner.
    for args in (["--bogus"], ["plan", "--bogus"], ["status", "--format", "yaml"], ["freeze"]):
        done = subprocess.run(
            [sys.executable, "-m", "controller.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, (args, done.returncode, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""


STYLED = ["apply", "/no/such/manifests"]
"""A failing command whose error is styled (red "Error:")."""


def test_errors_are_coloured_on_a_colour_terminal() -> None:
    # The control for the tests below: with colour allowed, the error is styled.
    result = invoke(STYLED, color=True)
    assert result.exit_code == EXIT_ERROR
    assert ANSI.search(result.stderr), result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--no-color", *STYLED], None),
        ([*STYLED, "--no-color"], None),
        (STYLED, {"NO_COLOR": "1"}),
        (["--no-color", "plan", "--no-such-flag"], None),
        (["plan", "--no-such-flag"], {"NO_COLOR": "1"}),
    ],
)
def test_no_color_and_NO_COLOR_leave_no_ansi(args: list[str], env: dict[str, str] | None) -> None:
    result = invoke(args, env=env, color=True)
    assert result.exit_code == EXIT_ERROR
    assert "Error" in result.stderr
    assert not ANSI.search(result.output), result.output


def test_an_empty_NO_COLOR_does_not_disable_colour() -> None:
    # no-color.org: "when present and not an empty string".
    assert ANSI.search(invoke(STYLED, env={"NO_COLOR": ""}, color=True).stderr)


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _finops_completion finops"),
        ("zsh", "#compdef finops"),
        ("fish", "complete --no-files --command finops"),
    ],
)
def test_completion_prints_each_shells_script(shell: str, marker: str) -> None:
    result = invoke(["completion", shell])
    assert result.exit_code == 0, result.output
    assert marker in result.stdout and "_FINOPS_COMPLETE" in result.stdout


def test_completion_completes_commands_and_options() -> None:
    # What the printed script asks finops at each <TAB>: the completion itself works.
    commands = invoke([], env={"_FINOPS_COMPLETE": "bash_complete", "COMP_WORDS": "finops pl", "COMP_CWORD": "1"})
    assert commands.exit_code == 0
    assert "plain,plan" in commands.stdout.splitlines()
    options = invoke(
        [], env={"_FINOPS_COMPLETE": "bash_complete", "COMP_WORDS": "finops status --a", "COMP_CWORD": "2"}
    )
    assert "plain,--all" in options.stdout.splitlines() and "plain,--api-key-file" in options.stdout.splitlines()


def test_completion_refuses_an_unknown_shell() -> None:
    assert_usage_error(invoke(["completion", "tcsh"]), "Invalid value")


JSON_OUTPUTS = {
    "finops plan",
    "finops apply",
    "finops status",
    "finops alerts check",
    "finops rotate",
    "finops rebalance",
    "finops report",
    "finops approve",
    "finops state show",
    "finops state migrate",
}
"""Commands with ``--format json``: each is checked for ``format_version`` in
tests/integration/test_cli_conventions.py."""


def test_every_json_output_is_known_to_the_format_version_test() -> None:
    with_json = {
        name
        for name, (_, command) in zip(IDS, COMMANDS, strict=True)
        for p in command.params
        if isinstance(p, click.Option)
        and "--format" in p.opts  # not `run --log-format json` (logs)
        and isinstance(p.type, click.Choice)
        and "json" in p.type.choices
    }
    assert with_json == JSON_OUTPUTS


def test_a_saved_plan_is_told_apart_from_manifests(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"format_version": 1, "target": "sandbox", "basis": "ab", "changes": []}')
    json_manifest = tmp_path / "fleet.json"
    json_manifest.write_text('{"apiVersion": "finops.greenhelix.net/v1", "kind": "Fleet", "changes": []}')
    yaml_manifest = tmp_path / "fleet.yaml"
    yaml_manifest.write_text("apiVersion: finops.greenhelix.net/v1\nkind: Fleet\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would hang
    assert app.is_saved_plan(plan)
    for not_a_plan in (tmp_path, json_manifest, yaml_manifest, fifo, tmp_path / "missing.json"):
        assert not app.is_saved_plan(not_a_plan), not_a_plan


def test_a_finops_error_outside_run_command_is_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> dict[str, object]:
        raise ConfigError("the schema is not available here")

    monkeypatch.setattr(app, "manifest_json_schema", refused)
    result = invoke(["schema"])
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == "Error: the schema is not available here\n"
