"""The CLI's contract with scripts and people, run as a user runs it (the ``finops``
executable in a subprocess, embedded sandbox): a saved plan is the approval, a JSON apply
never prompts, prompts go to stderr, every JSON output carries ``format_version``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.reconcile.apply import AgentResult
from controller.reconcile.pipeline import apply_plan
from policies.spec import DesiredState
from tests.integration.conftest import CANONICAL, Harness
from tests.integration.test_cli import finops
from tests.unit.test_cli_conventions import JSON_OUTPUTS

JSON_OUTPUTS_TESTED = {name.removeprefix("finops ") for name in JSON_OUTPUTS}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    return tmp_path


def pending(workdir: Path) -> int:
    """``plan --detailed-exitcode``: 2 while changes are pending, 0 converged."""
    done = finops(workdir, "plan", "--detailed-exitcode")
    assert done.returncode in (0, 2), done.stdout + done.stderr
    return done.returncode


def test_a_saved_plan_applies_without_a_prompt(workdir: Path) -> None:
    assert finops(workdir, "plan", "--out", "plan.json").returncode == 0
    # No terminal, no --auto-approve: the reviewed plan is the approval.
    applied = finops(workdir, "apply", "plan.json", stdin="")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "Apply complete" in applied.stdout and "Apply these changes" not in applied.stdout + applied.stderr
    assert pending(workdir) == 0


def test_apply_plan_option_needs_no_auto_approve_either(workdir: Path) -> None:
    assert finops(workdir, "plan", "--out", "plan.json").returncode == 0
    applied = finops(workdir, "apply", "--plan", "plan.json", "manifests", stdin="")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert pending(workdir) == 0


def test_a_saved_plan_is_refused_when_the_manifests_changed_since(workdir: Path) -> None:
    assert finops(workdir, "plan", "--out", "plan.json").returncode == 0
    workers = workdir / "manifests" / "research-workers.yaml"
    workers.write_text(workers.read_text().replace("tier: classifier", "tier: summarizer"))
    refused = finops(workdir, "apply", "plan.json", "manifests", stdin="")
    assert refused.returncode == 1
    assert "changed since the plan was saved" in refused.stderr and "Traceback" not in refused.stderr
    assert pending(workdir) == 2  # nothing was written


def test_a_saved_plan_is_refused_once_the_gateway_moved(workdir: Path) -> None:
    assert finops(workdir, "plan", "--out", "first.json").returncode == 0
    assert finops(workdir, "plan", "--out", "second.json").returncode == 0
    assert finops(workdir, "apply", "first.json").returncode == 0
    refused = finops(workdir, "apply", "second.json", "--format", "json")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "changed since the plan was saved" in refused.stderr


def test_json_apply_without_auto_approve_or_a_plan_is_refused_before_anything(workdir: Path) -> None:
    refused = finops(workdir, "apply", "--format", "json", stdin="yes\n")
    assert refused.returncode == 1
    assert refused.stdout == ""  # nothing a JSON reader could mistake for output
    assert "--auto-approve" in refused.stderr and "never prompts" in refused.stderr
    assert "Apply these changes" not in refused.stderr
    assert pending(workdir) == 2  # nothing was written


def test_json_apply_of_a_saved_plan_is_one_json_document(workdir: Path) -> None:
    assert finops(workdir, "plan", "--out", "plan.json").returncode == 0
    applied = finops(workdir, "apply", "plan.json", "--format", "json")
    assert applied.returncode == 0, applied.stderr
    doc = json.loads(applied.stdout)
    assert doc["format_version"] == 1 and doc["result"]["agents"]
    assert {c["agent_id"] for c in doc["plan"]["changes"]} >= {"orch-01", "res-01", "cls-01"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-a-plan.json", "manifests"], "not a saved finops plan"),
        (["plan.json", "--plan", "plan.json"], "either PLANFILE or --plan"),
        (["plan.json", "manifests", "extra"], "at most two arguments"),
    ],
)
def test_apply_arguments_that_cannot_be_told_apart_are_usage_errors(
    workdir: Path, args: list[str], message: str
) -> None:
    assert finops(workdir, "plan", "--out", "plan.json").returncode == 0
    (workdir / "not-a-plan.json").write_text('{"apiVersion": "finops.greenhelix.net/v1", "kind": "Fleet"}')
    refused = finops(workdir, "apply", *args)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert message in refused.stderr and refused.stdout == ""


def test_the_confirmation_prompt_goes_to_stderr(workdir: Path) -> None:
    # stdin is a terminal (a pty): finops asks; the plan is on stdout, the question on stderr.
    controller_fd, terminal_fd = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}
    try:
        os.write(controller_fd, b"yes\n")
        done = subprocess.run(
            [sys.executable, "-m", "controller.cli", "apply"],
            cwd=workdir,
            env=env,
            stdin=terminal_fd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(terminal_fd)
        os.close(controller_fd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Apply these changes?" in done.stderr and "Apply these changes?" not in done.stdout
    assert "register" in done.stdout and "Apply complete" in done.stdout
    assert pending(workdir) == 0


def test_every_json_output_has_a_format_version(workdir: Path) -> None:
    applied = finops(workdir, "apply", "--auto-approve", "--format", "json")
    assert applied.returncode == 0, applied.stderr
    outputs = {"apply": json.loads(applied.stdout)}
    for name, args in {
        "plan": ["plan", "--format", "json"],
        "status": ["status", "--format", "json"],
        "alerts check": ["alerts", "check", "--format", "json"],
        "rotate": ["rotate", "--format", "json"],
        "rebalance": ["rebalance", "--dry-run", "--format", "json"],
        "report": ["report", "--format", "json"],
        "approve": ["approve", "--show", "--format", "json"],
        "state show": ["state", "show", "--format", "json"],
        "state migrate": ["state", "migrate", "--to", str(workdir / "backup.db"), "--format", "json"],
    }.items():
        done = finops(workdir, *args)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        outputs[name] = json.loads(done.stdout)  # stdout is exactly one JSON document
    assert set(outputs) == JSON_OUTPUTS_TESTED
    for name, doc in outputs.items():
        assert doc.get("format_version") == 1, name
    assert {a["agent_id"] for a in outputs["status"]["agents"]} == {"orch-01", "res-01", "res-02", "sum-01", "cls-01"}
    assert all(a["at_cap"] is False for a in outputs["status"]["agents"])


def test_status_summary_and_all(workdir: Path) -> None:
    assert finops(workdir, "apply", "--auto-approve").returncode == 0
    summary = finops(workdir, "status")
    assert summary.returncode == 0, summary.stderr
    assert "5 agent(s) in 1 fleet(s)" in summary.stdout
    everything = finops(workdir, "status", "--all")
    assert everything.returncode == 0
    # --all has every agent's detail lines (keys, alert endpoints); the summary does not.
    assert everything.stdout.count("next rotation") == 5 and "next rotation" not in summary.stdout


async def test_the_pipeline_tells_progress_each_agent_as_it_is_done(harness: Harness, canonical: DesiredState) -> None:
    # What drives `apply`'s progress bar: one call per agent with changes, with its result.
    done: list[AgentResult] = []
    async with harness.client() as client:
        run = await apply_plan(
            client,
            harness.store,
            harness.sink,
            canonical,
            target="sandbox",
            clock=harness.clock,
            on_agent_done=done.append,
        )
    assert run.result is not None and run.result.ok
    assert sorted(r.agent_id for r in done) == sorted({c.agent_id for c in run.chosen.changes})
    assert len(done) == 5 and done == [r for r in done if r in run.result.agents]
