"""The README's user journey, run as a user runs it: the `finops` executable in a fresh
directory, embedded sandbox, real processes, exit codes checked."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from policies.keyprint import contains_key_material
from tests.integration.conftest import CANONICAL, run_cli


def finops(
    cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(cwd, *args, env=env, stdin=stdin)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    return tmp_path


def assert_no_key_material(outputs: list[str], workdir: Path) -> None:
    secrets = [p.read_text().strip() for p in workdir.glob(".finops/**/*.key")]
    assert secrets, "expected key files to exist"
    for text in outputs:
        assert not contains_key_material(text), text
        for secret in secrets:
            assert secret not in text


def test_quick_start_journey(workdir: Path) -> None:
    outputs: list[str] = []

    first = finops(workdir, "plan", "--detailed-exitcode")
    outputs += [first.stdout, first.stderr]
    assert first.returncode == 2, first.stderr
    assert first.stdout.splitlines()[0].startswith("finops: using the embedded sandbox at http://127.0.0.1:")
    assert "register" in first.stdout and "orch-01" in first.stdout
    assert "1 USD = 100 CREDITS" in first.stdout

    applied = finops(workdir, "apply", "--auto-approve")
    outputs += [applied.stdout, applied.stderr]
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "Apply complete" in applied.stdout

    converged = finops(workdir, "plan", "--detailed-exitcode")
    outputs += [converged.stdout, converged.stderr]
    assert converged.returncode == 0, converged.stdout + converged.stderr
    assert "No changes" in converged.stdout

    as_json = finops(workdir, "plan", "--format", "json", "--detailed-exitcode")
    outputs += [as_json.stdout, as_json.stderr]
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["changes"] == []
    assert document["summary"]["changes"] == 0
    assert "embedded sandbox" in as_json.stderr

    again = finops(workdir, "apply", "--auto-approve")
    outputs += [again.stdout, again.stderr]
    assert again.returncode == 0 and "No changes" in again.stdout

    for fmt in ("markdown", "json", "text"):
        rendered = finops(workdir, "plan", "--format", fmt)
        outputs += [rendered.stdout, rendered.stderr]
    applied_json = finops(workdir, "apply", "--auto-approve", "--format", "json")
    outputs += [applied_json.stdout, applied_json.stderr]
    state_db = (workdir / ".finops" / "state-sandbox.db").read_bytes().decode("latin-1")
    outputs.append(state_db)  # finops' own state holds fingerprints, never keys

    for key_file in (workdir / ".finops").glob("**/*.key"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert_no_key_material(outputs, workdir)


def test_markdown_plan_is_a_pr_comment(workdir: Path) -> None:
    result = finops(workdir, "plan", "--format", "markdown")
    assert result.returncode == 0, result.stderr
    # The marker comment first (a workflow updates one sticky comment by it), then the title.
    assert result.stdout.startswith("<!-- finops-plan -->\n### finops plan")
    assert "| + | orch-01 | register |" in result.stdout


def test_saved_plan_applies_and_is_refused_once_stale(workdir: Path) -> None:
    saved = workdir / "plan.json"
    assert finops(workdir, "plan", "--out", str(saved)).returncode == 0
    stale = workdir / "stale.json"
    assert finops(workdir, "plan", "--out", str(stale)).returncode == 0
    ok = finops(workdir, "apply", "--auto-approve", "--plan", str(saved))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = finops(workdir, "apply", "--auto-approve", "--plan", str(stale))
    assert refused.returncode == 1
    assert "changed since the plan was saved" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_apply_without_confirmation_in_a_script_is_refused(workdir: Path) -> None:
    result = finops(workdir, "apply", stdin="")
    assert result.returncode == 1
    assert "--auto-approve" in result.stderr
    status = finops(workdir, "plan", "--detailed-exitcode")
    assert status.returncode == 2  # nothing was applied


def test_guardrail_refuses_apply_and_writes_nothing(workdir: Path) -> None:
    fleet_file = next(p for p in (workdir / "manifests").glob("*.yaml") if "kind: Fleet" in p.read_text())
    text = fleet_file.read_text()
    # A daily limit above the plan, so that the per-run ceiling is what refuses it.
    text = re.sub(r"perRunCeiling: .*", 'perRunCeiling: "100.00"\n    dailyLimit: "1000.00"', text)
    fleet_file.write_text(text)
    plan = finops(workdir, "plan")
    assert plan.returncode == 1
    assert "funding-ceiling" in plan.stdout and "over the per-run ceiling" in plan.stdout
    result = finops(workdir, "apply", "--auto-approve")
    assert result.returncode == 1
    # 415.00 USD of top-ups plus five 5.00 USD signup bonuses: 440.00, 340.00 over.
    assert "guardrail" in result.stderr and "340.00 USD over" in result.stderr


def test_validate_and_schema(workdir: Path) -> None:
    ok = finops(workdir, "validate")
    assert ok.returncode == 0 and "5 agent(s)" in ok.stdout
    schema = finops(workdir, "schema")
    assert schema.returncode == 0
    assert "Fleet" in json.dumps(json.loads(schema.stdout))


def test_real_gateway_without_a_key_is_a_clear_error(workdir: Path) -> None:
    result = finops(workdir, "plan", env={"GREENHELIX_URL": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "GREENHELIX_API_KEY" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_gateway_is_a_clear_error(workdir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("a2a_enterprise_000000000000000000000000\n")
    result = finops(
        workdir, "plan", env={"GREENHELIX_URL": "http://127.0.0.1:9", "GREENHELIX_API_KEY_FILE": str(key_file)}
    )
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr
    assert "a2a_enterprise" not in result.stderr + result.stdout


def test_standalone_sandbox_prints_only_the_admin_key_fingerprint(tmp_path: Path) -> None:
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "sb" / "gateway.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "sandbox", "--port", str(port), "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "sandbox did not start"
            time.sleep(0.05)
        key_file = db.parent / "admin.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        admin = httpx.get(f"http://127.0.0.1:{port}/v1/infra/keys", headers={"Authorization": f"Bearer {key}"})
        assert admin.status_code == 200
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert "admin key sha3:" in output
    assert key not in output and not contains_key_material(output)
