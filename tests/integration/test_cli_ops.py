"""Operator commands as a user runs them: the CLI in a subprocess against a sandbox whose
clock the test controls (so the 300 s key grace is observed, not slept through)."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.sandbox.server import SandboxServer
from policies.keyprint import contains_key_material
from tests.integration.conftest import CANONICAL
from tests.integration.test_cli import finops


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[SandboxServer, Path, dict[str, str]]]:
    work = tmp_path / "work"
    shutil.copytree(CANONICAL, work / "manifests")
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        env = {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}
        yield server, work, env


def _key(work: Path, agent: str) -> str:
    host = next((work / ".finops" / "secrets").iterdir())
    return (host / f"{agent}.key").read_text().strip()


def _paid_call(server: SandboxServer, key: str) -> int:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
        return http.get("/v1/marketplace/match", params={"query": "x"}).status_code


def _balance_status(server: SandboxServer, key: str, agent: str) -> int:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
        return http.get(f"/v1/billing/wallets/{agent}/balance").status_code


def test_rotate_now_replaces_the_key_old_one_lives_through_the_grace_only(
    gateway: tuple[SandboxServer, Path, dict[str, str]],
) -> None:
    server, work, env = gateway
    outputs: list[str] = []
    applied = finops(work, "apply", "--auto-approve", env=env)
    outputs += [applied.stdout, applied.stderr]
    assert applied.returncode == 0, applied.stdout + applied.stderr
    old = _key(work, "res-01")
    others = {a: _key(work, a) for a in ("orch-01", "res-02", "sum-01", "cls-01")}

    rotated = finops(work, "rotate", "--agent", "res-01", "--now", env=env)
    outputs += [rotated.stdout, rotated.stderr]
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "1 rotated, 0 failed" in rotated.stdout
    new = _key(work, "res-01")
    assert new != old
    assert {a: _key(work, a) for a in others} == others  # only res-01 was touched
    key_file = next((work / ".finops" / "secrets").iterdir()) / "res-01.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    assert _balance_status(server, old, "res-01") == 200  # grace: the agent has time to pick up the new key
    assert _balance_status(server, new, "res-01") == 200
    server.clock.advance(301)
    assert _balance_status(server, old, "res-01") == 401
    assert _balance_status(server, new, "res-01") == 200

    converged = finops(work, "plan", "--detailed-exitcode", env=env)
    outputs += [converged.stdout, converged.stderr]
    assert converged.returncode == 0, converged.stdout
    for text in outputs:
        assert not contains_key_material(text), text
        assert old not in text and new not in text


def test_freeze_stops_paid_calls_survives_apply_and_unfreeze_restores(
    gateway: tuple[SandboxServer, Path, dict[str, str]],
) -> None:
    server, work, env = gateway
    assert finops(work, "apply", "--auto-approve", env=env).returncode == 0
    key = _key(work, "cls-01")
    assert _paid_call(server, key) == 200

    frozen = finops(work, "freeze", "cls-01", "--reason", "runaway loop", env=env)
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr
    assert "300 s" in frozen.stdout and "/v1/batch" in frozen.stdout  # residual exposure is stated
    assert _paid_call(server, key) == 402  # caps at 0 stop paid REST calls at once

    reapplied = finops(work, "apply", "--auto-approve", env=env)
    assert reapplied.returncode == 0, reapplied.stdout
    assert "No changes" in reapplied.stdout  # the hold is respected, not "fixed"
    plan = finops(work, "plan", env=env)
    assert "HELD" in plan.stdout and "cls-01" in plan.stdout and "runaway loop" in plan.stdout
    assert _paid_call(server, key) == 402
    server.clock.advance(301)
    assert _paid_call(server, key) == 401  # the quarantined rotation killed the delivered key

    thawed = finops(work, "unfreeze", "cls-01", env=env)
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    fresh = _key(work, "cls-01")
    assert fresh != key
    assert _paid_call(server, fresh) == 200
    after = finops(work, "plan", "--detailed-exitcode", env=env)
    assert after.returncode == 0, after.stdout
    for text in (frozen.stdout, frozen.stderr, thawed.stdout, thawed.stderr, plan.stdout):
        assert not contains_key_material(text)


def test_keys_import_adopts_an_agent_created_outside_finops(
    gateway: tuple[SandboxServer, Path, dict[str, str]],
) -> None:
    server, work, env = gateway
    with httpx.Client(base_url=server.url) as http:
        raw = http.post("/v1/register", json={"agent_id": "res-02"}).json()["api_key"]
    plan = finops(work, "plan", env=env)
    assert "finops keys import res-02" in plan.stdout
    wrong = finops(work, "keys", "import", "res-01", env=env, stdin=raw + "\n")
    assert wrong.returncode == 1 and raw not in wrong.stdout + wrong.stderr
    ok = finops(work, "keys", "import", "res-02", env=env, stdin=raw + "\n")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert raw not in ok.stdout + ok.stderr
    assert _key(work, "res-02") == raw
    assert "keys import res-02" not in finops(work, "plan", env=env).stdout


def test_new_agents_keys_go_to_the_declared_command_sink(
    gateway: tuple[SandboxServer, Path, dict[str, str]], tmp_path: Path
) -> None:
    import sys

    _server, work, env = gateway
    receiver = tmp_path / "receiver.py"
    receiver.write_text(
        "import os, sys\n"
        "key = sys.stdin.read().strip()\n"
        "path = os.path.join(sys.argv[1], os.environ['FINOPS_AGENT_ID'])\n"
        "fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)\n"
        "os.write(fd, key.encode())\n"
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fleet = work / "manifests" / "research-fleet.yaml"
    text = fleet.read_text().replace(
        "    # sink: {directory: /run/agent-keys}",
        f"    sink: {{command: [{sys.executable}, {receiver}, {inbox}]}}",
    )
    fleet.write_text(text)
    applied = finops(work, "apply", "--auto-approve", env=env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "delivered to command" in applied.stdout
    for agent in ("orch-01", "res-01", "res-02", "sum-01", "cls-01"):
        assert (inbox / agent).read_text() == _key(work, agent)
    rotated = finops(work, "rotate", "--agent", "sum-01", "--now", env=env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert (inbox / "sum-01").read_text() == _key(work, "sum-01")
    assert not contains_key_material(applied.stdout + applied.stderr + rotated.stdout + rotated.stderr)


def test_alerts_check_delivers_a_75_percent_crossing_once_signed_and_status_flags_a_down_receiver(
    gateway: tuple[SandboxServer, Path, dict[str, str]], tmp_path: Path
) -> None:
    import hashlib
    import hmac

    from tests.integration.test_alerts import Receiver

    server, work, env = gateway
    receiver = Receiver()
    try:
        fleet = work / "manifests" / "research-fleet.yaml"
        text = fleet.read_text()
        text = text.replace(
            "signingSecret: {file: alert-signing.secret, generate: true}",
            "signingSecret: {env: ALERT_SECRET}\n    allowInsecure: true",
        )
        text = text.replace(
            "https://alerts.example.com/research/{agent}/{threshold}", receiver.url + "/{agent}/{threshold}"
        )
        text = text.replace(
            "https://pager.example.com/finops/{fleet}?agent={agent}&window={window}", receiver.url + "/page"
        )
        fleet.write_text(text)
        env = {**env, "ALERT_SECRET": "s3cret-for-tests"}
        assert finops(work, "apply", "--auto-approve", env=env).returncode == 0
        key = _key(work, "cls-01")  # daily cap 15.00 USD = 1500 credits; each paid call costs 0.10 credits
        with httpx.Client(base_url=server.url) as http:
            http.put(  # a small cap so a few paid calls cross 75 %: 8 × 0.10 of 1.00
                "/v1/billing/wallets/cls-01/budget",
                json={"daily_cap": "1.00", "monthly_cap": "300.00"},
                headers={"Authorization": f"Bearer {server.admin_key}"},
            )
        for _ in range(8):
            assert _paid_call(server, key) == 200

        first = finops(work, "alerts", "check", env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert [r.path for r in receiver.delivered] == ["/cls-01/75"]
        delivered = receiver.delivered[0]
        expected = hmac.new(b"s3cret-for-tests", delivered.body, hashlib.sha256).hexdigest()
        assert delivered.headers["X-A2A-Signature"] == expected
        alert = delivered.json()
        assert (alert["agent"], alert["window"], alert["threshold"], alert["percent"]) == (
            "cls-01",
            "daily",
            75,
            "80.00",
        )

        again = finops(work, "alerts", "check", env=env)
        assert again.returncode == 0 and len(receiver.requests) == 1  # once per crossing, not per check

        receiver.fail_next = 100
        assert _paid_call(server, key) == 200  # 90 %
        failing = finops(work, "alerts", "check", env=env)
        assert failing.returncode == 1 and "FAILED" in failing.stdout
        assert len(receiver.requests) > 2  # retried with backoff within the check
        status = finops(work, "status", "--strict", env=env)
        assert status.returncode == 1
        assert "ALERT ENDPOINT FAILING" in status.stdout and "cls-01" in status.stdout
        assert "daily 75%" in status.stdout and "daily 90%" in status.stdout

        receiver.fail_next = 0
        recovered = finops(work, "alerts", "check", env=env)
        assert recovered.returncode == 0, recovered.stdout
        assert [r.path for r in receiver.delivered] == ["/cls-01/75", "/cls-01/90"]
        assert len({r.headers["X-Finops-Alert-Id"] for r in receiver.requests if r.path == "/cls-01/90"}) == 1
    finally:
        receiver.close()


def test_an_unobservable_agent_does_not_stop_apply_for_the_others(tmp_path: Path) -> None:
    from controller.sandbox.faults import FaultConfig

    work = tmp_path / "work"
    shutil.copytree(CANONICAL, work / "manifests")
    # Every read of res-02's balance fails (503): it cannot be observed, the others can.
    faults = FaultConfig(rate=1.0, kinds=FaultConfig.parse("kinds=503").kinds, only=("/wallets/res-02/balance",))
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key", faults=faults) as server:
        env = {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}
        applied = finops(work, "apply", "--auto-approve", env=env)
        assert applied.returncode == 1
        assert "1 agent(s) could not be observed and were left unchanged" in applied.stderr
        assert "res-02" in applied.stderr and "Traceback" not in applied.stderr
        assert "Apply complete: 4 agent(s) changed" in applied.stdout
        for agent in ("orch-01", "res-01", "sum-01", "cls-01"):
            assert server.store.get_wallet(agent) is not None
        assert server.store.get_wallet("res-02") is None


def test_run_once_is_one_complete_pass_for_cron(gateway: tuple[SandboxServer, Path, dict[str, str]]) -> None:
    _server, work, env = gateway
    once = finops(work, "run", "--once", "--log-format", "json", env=env)
    assert once.returncode == 0, once.stdout + once.stderr
    import json

    events = [json.loads(line) for line in (once.stdout + once.stderr).splitlines() if line.startswith("{")]
    finished = [(e["job"], e["result"]) for e in events if " finished" in e["msg"] and "job" in e]
    assert finished == [("reconcile", "ok"), ("alerts", "ok"), ("rotation", "ok"), ("rebalance", "ok")], events
    assert not contains_key_material(once.stdout + once.stderr)
    assert finops(work, "plan", "--detailed-exitcode", env=env).returncode == 0


def test_alerts_check_pauses_at_90_only_as_the_writer_and_unfreeze_releases_the_pause(
    gateway: tuple[SandboxServer, Path, dict[str, str]], tmp_path: Path
) -> None:
    """The canonical fleet's commented ladder, enabled: `alerts check` records the pause
    while another finops holds the writer lock (that writer executes it), executes it once it
    is the writer; `status` says how it ends; `unfreeze` restores the manifest's caps."""
    from controller.state.flock import writer_lock

    server, work, env = gateway
    fleet = work / "manifests" / "research-fleet.yaml"
    lines = fleet.read_text().splitlines()
    start = lines.index("    # escalation:")
    lines[start : start + 3] = [line.replace("    # ", "    ", 1) for line in lines[start : start + 3]]
    fleet.write_text("\n".join(lines) + "\n")
    workers = work / "manifests" / "research-workers.yaml"  # cls-01: 0.01 USD = 1.00 credit a day
    classifier = "      tier: classifier          # 15.00/day, 300.00/month, funding from the fleet defaults"
    assert classifier in workers.read_text()
    workers.write_text(
        workers.read_text().replace(
            classifier, '      tier: classifier\n      dailyCap: "0.01"\n      monthlyCap: "3.00"'
        )
    )
    assert finops(work, "apply", "--auto-approve", env=env).returncode == 0
    key = _key(work, "cls-01")

    def caps() -> tuple[object, object]:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
            data = http.get("/v1/billing/wallets/cls-01/budget").json()
        return data["daily_cap"], data["monthly_cap"]

    declared = caps()
    assert declared == (1, 300)
    for _ in range(9):
        assert _paid_call(server, key) == 200

    with writer_lock(work / ".finops", purpose="finops run"):  # a daemon is the writer
        recorded = finops(work, "alerts", "check", env=env)
        assert "cls-01: pause (daily 90 %)" in recorded.stdout, recorded.stdout + recorded.stderr
        assert "1 escalation(s) recorded but not executed here" in recorded.stdout
        assert caps() == (1, 300)
    executed = finops(work, "alerts", "check", env=env)
    assert "pause" not in executed.stdout.split("Alerts:")[0]  # decided once, not again
    assert caps() == (0.9, 300) and _paid_call(server, key) == 402

    status = finops(work, "status", "--all", env=env)
    assert "PAUSED since" in status.stdout and "below 85 % of the declared daily cap" in status.stdout

    released = finops(work, "unfreeze", "cls-01", env=env)
    assert released.returncode == 0, released.stdout + released.stderr
    assert "escalation pause released" in released.stdout
    assert caps() == declared and _paid_call(server, key) == 200
