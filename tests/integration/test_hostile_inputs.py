"""Hostile inputs through the real command line, as separate processes with timeouts: no file
can hang validate, plan or the daemon; the daemon still stops on SIGTERM; every check that
can be made before the first write is made before it; a skipped job is not a failure.

FIFOs and symlinks to /dev/zero are created at run time (see tests/data/bad_manifests/README.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from controller.sandbox.server import ADMIN_AGENT_ID, SandboxServer
from tests.integration.conftest import CANONICAL
from tests.integration.test_daemon import LogReader, clean_env, commit, daemon_cmd, git, run_once

TIMEOUT = 60  # a hang fails the test instead of the suite; each command takes a few seconds


def finops(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def hostile_manifests(tmp_path: Path) -> Path:
    manifests = tmp_path / "manifests"
    shutil.copytree(CANONICAL, manifests)
    os.mkfifo(manifests / "fifo.yaml")
    (manifests / "zero.yaml").symlink_to("/dev/zero")
    return manifests


def gateway_env(sandbox: SandboxServer, tmp_path: Path) -> dict[str, str]:
    assert sandbox.admin_key_file is not None
    return {
        **clean_env(),
        "GREENHELIX_URL": sandbox.url,
        "GREENHELIX_API_KEY_FILE": str(sandbox.admin_key_file),
        "FINOPS_STATE_DIR": str(tmp_path / "state"),
    }


def requests(sandbox: SandboxServer) -> tuple[int, int]:
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as http:
        body = http.get("/_sandbox/stats").json()
    return int(body["requests"]), int(body["writes"])


def test_validate_and_plan_refuse_fifos_and_devices_at_once(tmp_path: Path, sandbox: SandboxServer) -> None:
    hostile_manifests(tmp_path)
    before = requests(sandbox)
    for args in (["validate", "manifests"], ["plan", "manifests"], ["apply", "--auto-approve", "manifests"]):
        started = time.monotonic()
        result = finops(tmp_path, *args, env=gateway_env(sandbox, tmp_path))
        assert time.monotonic() - started < 30, args
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        fifo = "manifests/fifo.yaml: is a FIFO (named pipe), not a regular file"
        assert f"{fifo}; manifests are read only from regular files" in lines
        assert any(
            line.startswith("manifests/zero.yaml: symbolic link leads outside") and "/dev/zero" in line
            for line in lines
        )
    assert requests(sandbox) == before  # refused before the first request


def test_run_once_refuses_them_and_the_daemon_still_stops_on_sigterm(tmp_path: Path) -> None:
    hostile_manifests(tmp_path)
    once = run_once(tmp_path, "manifests", "--once", "--log-format", "json")
    assert once.returncode == 1
    refused = next(json.loads(line) for line in once.stderr.splitlines() if "manifest revision refused" in line)
    assert any("fifo.yaml: is a FIFO" in e for e in refused["errors"])

    proc = subprocess.Popen(
        daemon_cmd("manifests", "--interval", "3600", "--log-format", "json"),
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        logs = LogReader(proc.stderr)
        logs.wait_for(lambda d: d["msg"].startswith("reconcile finished") and d["result"] == "invalid")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert logs.rest()[-1]["msg"] == "shutdown complete"


def test_git_source_follows_links_inside_the_repository_and_refuses_the_rest(tmp_path: Path) -> None:
    repo = tmp_path / "upstream"
    shutil.copytree(CANONICAL, repo / "manifests")
    workers = repo / "manifests" / "research-workers.yaml"
    (repo / "shared").mkdir()
    workers.rename(repo / "shared" / "research-workers.yaml")
    (repo / "manifests" / "workers").symlink_to("../shared")  # inside the repository: followed
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "fleet with a shared directory")
    ok = run_once(tmp_path, "--git", str(repo), "--path", "manifests", "--once", "--log-format", "json")
    assert ok.returncode == 0, ok.stderr
    docs = [json.loads(line) for line in ok.stderr.splitlines() if line.startswith("{")]
    finished = next(d for d in docs if d["msg"].startswith("reconcile finished"))
    assert finished["result"] == "ok" and finished["applied"] > 0  # the linked workers were applied too

    (repo / "manifests" / "zero.yaml").symlink_to("/dev/zero")  # committed: the attack on the daemon
    commit(repo, "link to /dev/zero")
    started = time.monotonic()
    bad = run_once(tmp_path, "--git", str(repo), "--path", "manifests", "--once", "--log-format", "json")
    assert time.monotonic() - started < 60
    assert bad.returncode == 1  # the last good revision is still enforced, but the new one is refused
    refused = next(json.loads(line) for line in bad.stderr.splitlines() if "manifest revision refused" in line)
    (error,) = refused["errors"]
    assert re.match(r"manifests/zero\.yaml: symbolic link leads outside .* \(to /dev/zero\)", error), error


def without_rebalancing(tmp_path: Path) -> Path:
    manifests = tmp_path / "manifests"
    shutil.copytree(CANONICAL, manifests)
    fleet = manifests / "research-fleet.yaml"
    text, count = re.subn(r"\n  rebalancing:\n(?:    .*\n)+", "\n", fleet.read_text())
    assert count == 1
    fleet.write_text(text)
    return manifests


def test_run_once_exits_0_when_no_fleet_declares_rebalancing(tmp_path: Path) -> None:
    """The real ``finops run`` (with the alerts, rotation and rebalance jobs plugged in)."""
    without_rebalancing(tmp_path)
    result = finops(tmp_path, "run", "manifests", "--once", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    docs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    skipped = next(d for d in docs if d.get("job") == "rebalance" and d.get("result") == "skipped")
    assert "no fleet declares rebalancing" in skipped["msg"]
    assert any(d.get("job") == "reconcile" and d.get("result") == "ok" for d in docs)


def test_unusable_webhook_secrets_and_the_admin_agent_are_refused_at_plan_time(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    env = gateway_env(sandbox, tmp_path)
    manifests = tmp_path / "manifests"
    shutil.copytree(CANONICAL, manifests)
    fleet = manifests / "research-fleet.yaml"
    original = fleet.read_text()
    opt_in = "      events: [billing.usage_recorded, billing.deposit]\n      allowReferencedSecret: true\n"
    assert opt_in.split("\n")[0] in original
    for secret in ("/dev/zero", str(tmp_path)):  # a device and a directory: refused whole, before any write
        fleet.write_text(
            original.replace(opt_in.split("\n")[0] + "\n", opt_in + f"      signingSecret: {{file: {secret}}}\n")
        )
        before = requests(sandbox)
        plan = finops(tmp_path, "plan", "manifests", env=env)
        assert plan.returncode == 1 and "Traceback" not in plan.stderr + plan.stdout
        assert f"signing secret: {secret} is not a regular file on disk" in plan.stderr, plan.stderr
        assert requests(sandbox)[1] == before[1]  # plan only reads
    # A secret that is merely unavailable (an unset variable) fails only the webhooks that use it.
    unset = opt_in + "      signingSecret: {env: FINOPS_TEST_UNSET_SECRET}\n"
    fleet.write_text(original.replace(opt_in.split("\n")[0] + "\n", unset))
    plan = finops(tmp_path, "plan", "manifests", env=env)
    assert plan.returncode == 1 and "Traceback" not in plan.stderr + plan.stdout
    assert plan.stdout.count("gateway webhook not planned: signing secret: environment variable") == 5, plan.stdout

    applied = finops(tmp_path, "apply", "--auto-approve", "manifests", env=env)
    assert applied.returncode == 1  # five agents' webhooks refused, and said so
    assert "Traceback" not in applied.stderr + applied.stdout
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as http:
        budget = http.get("/v1/billing/wallets/res-01/budget").json()
        hooks = http.get("/v1/infra/webhooks").json()["webhooks"]
    assert budget["daily_cap"] == 3000  # every agent was still capped: nothing failed half-way
    assert hooks == []

    admin_entry = f'    - id: {ADMIN_AGENT_ID}\n      tier: orchestrator\n      dailyCap: "1.00"\n    - id: orch-01'
    fleet.write_text(original.replace("    - id: orch-01", admin_entry))
    before = requests(sandbox)
    admin = finops(tmp_path, "apply", "--auto-approve", "manifests", env=env)
    assert admin.returncode == 1
    assert f"[admin-agent] fleet research: {ADMIN_AGENT_ID} holds an admin-scoped key" in admin.stderr
    assert requests(sandbox)[1] == before[1]  # refused whole: not a single write


def test_keys_import_reads_a_bounded_line_from_stdin(tmp_path: Path) -> None:
    """``finops keys import AGENT < /dev/zero`` used to grow without bound looking for a newline."""
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run(
            [sys.executable, "-m", "controller.cli", "keys", "import", "res-01"],
            cwd=tmp_path,
            env=clean_env(),
            stdin=zero,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 1
    assert "longer than 4096 characters: not an API key" in result.stderr
    assert not (tmp_path / ".finops").exists()  # refused before anything was opened


def test_no_agent_is_registered_when_its_key_could_not_be_stored(tmp_path: Path, sandbox: SandboxServer) -> None:
    """The gateway shows a new agent's key once; with an unwritable key store, registering
    would lose it. Checked before the first write (as root too: the path is under a file)."""
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    (tmp_path / "not-a-directory").write_text("")
    env = {**gateway_env(sandbox, tmp_path), "FINOPS_SECRETS_DIR": str(tmp_path / "not-a-directory" / "keys")}
    before = requests(sandbox)
    result = finops(tmp_path, "apply", "--auto-approve", "manifests", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("not registered: finops' key store") == 5, result.stderr
    assert requests(sandbox)[1] == before[1]  # all five were new: not a single write
