"""The shipped GitHub Actions examples (examples/github-actions/) are parsed, and every
``finops`` invocation in their ``run:`` scripts is parsed by the real CLI (click's command
tree, introspected at test time) and its flags checked against the command's ``--help``.
The PR workflow is checked to hold nothing that can move money."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from controller.cli.app import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "github-actions"
WORKFLOWS = sorted(EXAMPLES.glob("*.yml"))
PLAN_WORKFLOW = EXAMPLES / "finops-plan.yml"

_OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "2>", "(", ")", "!"}


def workflow(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def run_scripts(data: dict[Any, Any]) -> list[str]:
    return [step["run"] for job in data["jobs"].values() for step in job.get("steps", []) if "run" in step]


def finops_invocations(script: str, placeholder: str) -> list[list[str]]:
    """Each ``finops ...`` command in a shell script, as argv after ``finops``: line
    continuations joined, ``${{ }}`` and ``$VAR`` words replaced by ``placeholder`` (an
    existing file, so a path that must exist is accepted), stopped at the first operator."""
    text = re.sub(r"\\\n\s*", " ", script)
    found: list[list[str]] = []
    for line in text.splitlines():
        line = re.sub(r"\$\{\{[^}]*\}\}", "X", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()!")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token != "finops" or (i > 0 and tokens[i - 1] not in _OPERATORS | {"then", "do", "else"}):
                continue
            argv: list[str] = []
            for word in tokens[i + 1 :]:
                if word in _OPERATORS or re.fullmatch(r"\d?[<>]+.*", word):
                    break
                argv.append(placeholder if "$" in word else word)
            found.append(argv)
    return found


def check_invocation(argv: list[str]) -> click.Command:
    """Parse ``argv`` as the CLI would (an unknown command, flag or refused value raises) and
    check that the command's ``--help`` lists every flag used."""
    ctx = click.Context(cli, info_name="finops")
    name, *args = argv
    command = cli.get_command(ctx, name)
    assert command is not None, f"finops has no command {name!r}"
    sub = command.make_context(name, list(args), parent=ctx)
    help_text = command.get_help(sub)
    for word in args:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in help_text, f"`finops {name} --help` does not list {word}"
    return command


@pytest.fixture
def placeholder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An existing file, in a working directory holding the files the workflows' steps make
    before finops reads them (the downloaded plan artifact)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.json").write_text("{}")
    path = tmp_path / "placeholder"
    path.write_text("{}")
    return str(path)


def test_the_examples_exist_and_parse() -> None:
    assert {p.name for p in WORKFLOWS} == {"finops-plan.yml", "finops-apply.yml"}
    for path in WORKFLOWS:
        data = workflow(path)
        assert data["jobs"] and (data.get("on") or data.get(True)), path  # YAML 1.1 reads `on:` as True
        for job in data["jobs"].values():
            assert "runs-on" in job and job.get("timeout-minutes"), f"{path.name}: every job has a timeout"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_finops_invocation_is_accepted_by_the_cli(path: Path, placeholder: str) -> None:
    invocations = [argv for script in run_scripts(workflow(path)) for argv in finops_invocations(script, placeholder)]
    assert invocations, f"{path.name} runs no finops command"
    for argv in invocations:
        check_invocation(argv)


def test_the_checker_refuses_what_the_cli_refuses(placeholder: str) -> None:
    """Not a no-op: a misspelt flag, a refused value, an unknown command, and parsing of
    continuations, redirections and substitutions."""
    check_invocation(["plan", "manifests", "--remote", "https://x", "--token-file", placeholder, "--format", "json"])
    for argv in (["plan", "--remot", "https://x"], ["plan", "--format", "html"], ["plann"], ["apply", "--pla", "x"]):
        with pytest.raises((click.UsageError, AssertionError)):
            check_invocation(argv)
    script = 'set +e\nfinops plan m --remote "$URL" \\\n  --format markdown > "$RUNNER_TEMP/x.md"\ncode=$?\n'
    assert finops_invocations(script, "P") == [["plan", "m", "--remote", "P", "--format", "markdown"]]
    assert finops_invocations("echo finops plan; true && finops validate m", "P") == [["validate", "m"]]


def test_the_plan_workflow_validates_plans_remotely_comments_and_gates(placeholder: str) -> None:
    data = workflow(PLAN_WORKFLOW)
    on = data.get("on") or data.get(True)
    assert isinstance(on, dict)
    assert "pull_request" in on and "pull_request_target" not in on, "a PR's code must never run with secrets"
    argvs = [a for s in run_scripts(data) for a in finops_invocations(s, placeholder)]
    commands = {a[0]: a for a in argvs}
    assert set(commands) == {"validate", "plan"}
    assert commands["validate"][-2:] == ["--format", "github"]
    plan = commands["plan"]
    for flag in ("--remote", "--token-file", "--detailed-exitcode", "--out"):
        assert flag in plan
    assert plan[plan.index("--format") + 1] == "markdown"
    text = PLAN_WORKFLOW.read_text()
    marker = plan[plan.index("--marker") + 1]
    assert f'const marker = "<!-- {marker} -->";' in text, "the script looks for the marker the plan carries"
    assert "updateComment" in text, "one sticky comment, updated"
    assert "--max-chars" in plan and "upload-artifact" in text, "capped comment, full plan as an artifact"
    gate = [s for s in run_scripts(data) if "EXIT_CODE" in s][-1]
    assert "2)" in gate and "exit 1" in gate, "exit 2 (changes) passes for review, anything else fails"


def test_the_plan_workflow_holds_nothing_that_can_move_money() -> None:
    text = PLAN_WORKFLOW.read_text()
    data = workflow(PLAN_WORKFLOW)
    assert "GREENHELIX_" not in text, "no gateway URL or key in a pull_request job"
    assert set(re.findall(r"secrets\.([A-Z_]+)", text)) == {"FINOPS_PLAN_TOKEN"}
    assert data["permissions"] == {"contents": "read", "pull-requests": "write"}
    for job in data["jobs"].values():
        assert "environment" not in job


def test_the_merge_workflow_applies_only_the_reviewed_plan_behind_an_environment(placeholder: str) -> None:
    data = workflow(EXAMPLES / "finops-apply.yml")
    jobs = data["jobs"]
    apply_jobs = [
        (name, job)
        for name, job in jobs.items()
        if any(a[0] == "apply" for s in run_scripts({"jobs": {name: job}}) for a in finops_invocations(s, placeholder))
    ]
    assert len(apply_jobs) == 1
    name, job = apply_jobs[0]
    assert job["environment"] == "finops-production" and job["needs"] == "plan"
    (argv,) = [a for s in run_scripts({"jobs": {name: job}}) for a in finops_invocations(s, placeholder)]
    assert "--plan" in argv, "apply exactly the saved plan (stale ones are refused)"
    assert data["concurrency"]["cancel-in-progress"] is False
    assert jobs["plan"]["if"] == "vars.FINOPS_APPLY_MODE == 'ci'"
    assert jobs["daemon-preview"]["if"] == "vars.FINOPS_APPLY_MODE != 'ci'"
    assert "GREENHELIX_" not in str(jobs["daemon-preview"]) and "GREENHELIX_" not in str(jobs["validate"])
