"""Plans a reviewer reads (issue 12, items 2-4), through the real ``finops`` executable
against the embedded sandbox: amounts in the fleet currency with credits alongside,
thresholds in percent, the spending authority a manifest change authorizes, the PR comment,
the GitHub job summary and validation annotations."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import CANONICAL, run_cli

FLEET = "research-fleet.yaml"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    return tmp_path


def edit(workdir: Path, old: str, new: str) -> None:
    path = workdir / "manifests" / FLEET
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_a_cap_change_reads_in_dollars_with_credits_and_states_what_it_authorizes(workdir: Path) -> None:
    first = run_cli(workdir, "plan")
    assert first.returncode == 0, first.stderr
    # New agents: caps from nothing, thresholds as the manifest writes them (75, not 0.75).
    assert "daily_cap: none → 30.00 USD (none → 3000.00 credits)" in first.stdout
    assert "alert_threshold: none → 75 %" in first.stdout and "0.75" not in first.stdout
    assert "top up to target 75.00 USD" in first.stdout

    applied = run_cli(workdir, "apply", "--auto-approve")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    # apply speaks the same units as plan.
    assert re.search(
        r"deposited 70\.00 USD \(7000\.00 credits\) → balance 75\.00 USD \(7500\.00 credits\)", applied.stdout
    )
    assert "daily_cap none → 30.00 USD (none → 3000.00 credits)" in applied.stdout

    edit(workdir, 'dailyCap: "30.00"', 'dailyCap: "35.00"')  # researcher tier: res-01, res-02
    edit(workdir, 'monthlyCap: "600.00"', 'monthlyCap: "620.00"')
    text = run_cli(workdir, "plan")
    assert text.returncode == 0, text.stderr
    assert "daily_cap: 30.00 → 35.00 USD (3000.00 → 3500.00 credits)" in text.stdout
    assert "monthly_cap: 600.00 → 620.00 USD (60000.00 → 62000.00 credits)" in text.stdout
    # The exposure change comes first, before the fleet and the changes.
    lines = text.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Exposure: this plan raises"))
    assert head < next(i for i, line in enumerate(lines) if line.startswith("Fleet research"))
    assert (
        "fleet research: authorizes up to +10.00 USD/day (+1000.00 credits) and +40.00 USD/month "
        "(+4000.00 credits) more in caps" in text.stdout
    )

    as_json = run_cli(workdir, "plan", "--format", "json")
    document = json.loads(as_json.stdout)
    [fleet] = document["summary"]["exposure_change"]["fleets"]
    assert fleet["currency"] == "USD" and fleet["daily_caps"] == "+10.00" and fleet["daily_caps_credits"] == "+1000.00"
    assert fleet["monthly_caps"] == "+40.00" and fleet["monthly_caps_credits"] == "+4000.00"
    assert fleet["deposits"] == "0.00" and fleet["agents_registered"] == []
    assert fleet["vs_approved"]["funding_targets"] == "0.00"
    [diff] = [
        d for c in document["changes"] for d in c["diff"] if c["agent_id"] == "res-01" and d["field"] == "daily_cap"
    ]
    assert diff == {
        "field": "daily_cap",
        "before": "3000.00",
        "after": "3500.00",
        "unit": "credits",
        "currency": "USD",
        "before_in_currency": "30.00",
        "after_in_currency": "35.00",
    }

    status = run_cli(workdir, "status", "--format", "json")
    [row] = [a for a in json.loads(status.stdout)["agents"] if a["agent_id"] == "res-01"]
    assert row["daily_cap"] == "30.00" and row["credits"]["daily_cap"] == "3000.00"
    assert "CAP DRIFT: daily_cap live → desired 30.00 → 35.00 USD (3000.00 → 3500.00 credits)" in " ".join(row["flags"])


def test_the_markdown_plan_is_a_sticky_pr_comment_and_the_job_summary(workdir: Path, tmp_path: Path) -> None:
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    md = run_cli(workdir, "plan", "--format", "markdown", "--marker", "finops-plan-sandbox", env=env)
    assert md.returncode == 0, md.stderr
    out = md.stdout
    assert out.startswith("<!-- finops-plan-sandbox -->\n### finops plan for sandbox\n")
    # Summary first: the exposure change and counts come before the fleet's details.
    assert out.index("**Exposure: this plan raises spending authority") < out.index("<details><summary>Fleet research")
    assert "| + | orch-01 | register |" in out
    assert "daily\\_cap: none → 80.00 USD (none → 8000.00 credits)" in out
    assert "alert\\_threshold: none → 75 %" in out
    assert out.count("<details>") == out.count("</details>") == 2  # the fleet, then "other"
    # The job summary got the same markdown (appended after what an earlier step wrote).
    assert summary.read_text() == "earlier step\n" + out.rstrip("\n") + "\n\n"

    # Any format writes the job summary; --max-chars caps it too.
    again = run_cli(workdir, "plan", "--format", "json", "--max-chars", "3000", env=env)
    assert again.returncode == 0, again.stderr
    json.loads(again.stdout)
    appended = summary.read_text().split(out.rstrip("\n") + "\n\n", 1)[1]
    assert appended.startswith("<!-- finops-plan -->") and len(appended) <= 3000 + 2
    assert "Truncated to stay under 3000 characters" in appended


def test_a_job_summary_path_that_would_hang_is_refused_not_waited_on(workdir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "summary.fifo"
    os.mkfifo(fifo)
    result = run_cli(workdir, "plan", "--detailed-exitcode", env={"GITHUB_STEP_SUMMARY": str(fifo)})
    assert result.returncode == 2, result.stderr  # the plan itself is unaffected
    assert "could not write the job summary" in result.stderr


@pytest.mark.parametrize(
    ("old", "new", "below", "field"),
    [
        ('dailyCap: "30.00"', 'dailyCap: "30.001"', 0, "spec.tiers.researcher.dailyCap"),
        ("interval: 15m", "interval: 15m\n    bogus%,field: 1", 1, "spec.rebalancing.bogus%,field"),
    ],
)
def test_validate_for_github_prints_annotations_with_file_and_line(
    workdir: Path, old: str, new: str, below: int, field: str
) -> None:
    lines = (workdir / "manifests" / FLEET).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if old in text) + below
    good = run_cli(workdir, "validate", "--format", "github")
    assert good.returncode == 0 and "::error" not in good.stdout
    edit(workdir, old, new)
    result = run_cli(workdir, "validate", "manifests", "--format", "github")
    assert result.returncode == 1
    annotations = [row for row in result.stdout.splitlines() if row.startswith("::error ")]
    assert annotations, result.stdout + result.stderr
    head, _, message = annotations[0][len("::error ") :].partition("::")
    props = dict(p.split("=", 1) for p in head.split(","))
    assert props["file"] == "manifests/research-fleet.yaml"
    assert props["line"] == str(line)
    escaped = field.replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    assert props["title"] == f"finops%3A {escaped}"
    assert message.startswith(field.replace("%", "%25"))
    assert "\n" not in message
    # People still get the usual line on stderr.
    assert f"manifests/research-fleet.yaml:{line}: {field}:" in result.stderr
