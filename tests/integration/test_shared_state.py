"""Several machines, one PostgreSQL state (issue 11): what a CI runner plans from its own
empty state directory, what two operators' applies do at once, and the fence.

Each "machine" is a working directory with its own ``--state-dir`` (secrets, generated
files) and the real ``finops`` CLI in a subprocess; they share the gateway (the sandbox, a
real HTTP server) and the state database (a real PostgreSQL server, ``pg_url``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from controller.gateway.client import GatewayClient
from controller.gateway.errors import Fenced
from controller.sandbox.server import SandboxServer
from controller.sandbox.store import to_atomic
from controller.state.flock import WriterLocked
from controller.state.location import StateLocation
from controller.state.lock import try_writer_lock, writer_lock
from tests.integration.conftest import run_cli

CANONICAL = Path(__file__).resolve().parents[2] / "manifests"
TRIALS = 200 if os.environ.get("FINOPS_STRESS") else 20
RATE = Decimal(100)


def _kek(where: Path) -> str:
    """The key-encryption key every machine shares (agents' keys are sealed in the state)."""
    path = where / "kek"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
    return str(path)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[SandboxServer, dict[str, str]]]:
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        yield server, {
            "GREENHELIX_URL": server.url,
            "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key"),
            "FINOPS_KEY_ENCRYPTION_KEY_FILE": _kek(tmp_path),
        }


def _machine(root: Path, name: str) -> Path:
    work = root / name
    shutil.copytree(CANONICAL, work / "manifests")
    return work


def _deposits(server: SandboxServer, agent: str) -> list[int]:
    return [t.amount for t in server.store.list_transactions(agent, limit=1000, offset=0) if t.tx_type == "deposit"]


def test_a_ci_runner_sharing_the_state_plans_nothing_for_a_rebalanced_and_a_frozen_agent(
    gateway: tuple[SandboxServer, dict[str, str]], pg_url: str, tmp_path: Path
) -> None:
    server, env = gateway
    env = {**env, "FINOPS_STATE_URL": pg_url}
    ops = _machine(tmp_path, "operator")
    applied = run_cli(ops, "apply", "--auto-approve", env=env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    # Spend so that rebalancing moves cap from an idle agent to a busy one...
    for agent, usd in (("res-01", "28.50"), ("sum-01", "1.00")):
        cost = to_atomic(Decimal(usd) * RATE)
        server.store.record_usage_and_charge(agent, "best_match", cost, None, now=server.clock())
    moved = run_cli(ops, "rebalance", env=env)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "res-01" in moved.stdout
    # ...and an operator freezes another.
    frozen = run_cli(ops, "freeze", "cls-01", "--reason", "runaway loop", env=env)
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr

    ci = _machine(tmp_path, "ci-runner")  # its own, empty state directory
    plan = run_cli(ci, "plan", "--detailed-exitcode", env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "HELD" in plan.stdout and "cls-01" in plan.stdout  # the hold is known from the shared state
    # The canonical fleet generates its alert signing secret: on shared state that is said plainly.
    assert "alert signing secrets are generated per machine" in plan.stdout
    assert not (ci / ".finops" / "secrets").exists() or not any((ci / ".finops" / "secrets").rglob("*.key"))

    # The same runner with its own SQLite state would see the rebalanced caps as drift: the
    # shared state is what makes the plan true.
    alone_env = {**env, "FINOPS_STATE_URL": ""}
    alone = run_cli(ci, "plan", "--detailed-exitcode", "--state-dir", str(ci / "alone"), env=alone_env)
    assert alone.returncode == 2, alone.stdout + alone.stderr


def _launch(work: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}
    full.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "apply", "--auto-approve"],
        cwd=work,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_applies_from_two_machines_sharing_postgresql_never_double_fund(
    pg_server: str, tmp_path: Path
) -> None:
    base = pg_server.rpartition("/")[0]
    agents = ("orchestrator", "res-01", "res-02", "sum-01", "cls-01")
    doubles: list[tuple[int, str, list[int]]] = []
    waited = 0
    for trial in range(TRIALS):
        root = tmp_path / f"t{trial}"
        name = f"shared_{trial}_{os.getpid()}"
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            with SandboxServer(db_path=root / "gw.db", admin_key_file=root / "admin.key") as server:
                env = {
                    "GREENHELIX_URL": server.url,
                    "GREENHELIX_API_KEY_FILE": str(root / "admin.key"),
                    "FINOPS_STATE_URL": f"{base}/{name}",
                    "FINOPS_KEY_ENCRYPTION_KEY_FILE": _kek(root),
                }
                first, second = (_launch(_machine(root, m), env) for m in ("laptop", "ci"))
                outs = [p.communicate(timeout=120) for p in (first, second)]
                for proc, (out, errs) in zip((first, second), outs, strict=True):
                    assert proc.returncode == 0, out + errs
                waited += sum("waiting for the writer lock" in e for _, e in outs)
                # Exactly one of them made the changes; the other planned after it and found none.
                assert sum("No changes" in o for o, _ in outs) == 1, outs
                for agent in agents:
                    if len(found := _deposits(server, agent)) > 1:
                        doubles.append((trial, agent, found))
        finally:
            with psycopg.connect(pg_server, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert doubles == []
    assert waited >= 1  # the runs did overlap: the lock, not luck, kept them apart


def test_a_writer_that_lost_the_lock_sends_nothing(
    gateway: tuple[SandboxServer, dict[str, str]], pg_url: str, tmp_path: Path
) -> None:
    server, _ = gateway
    location = StateLocation(tmp_path / "x.db", url=pg_url)
    lock = try_writer_lock(location, purpose="finops apply")
    assert lock is not None
    lock.check()  # held: no error
    assert try_writer_lock(location, purpose="finops apply") is None  # one writer at a time
    with psycopg.connect(pg_url, autocommit=True) as admin:  # its session dies (DB restart, network)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'finops-writer:%%'"
        )
    before = server.stats["writes"]

    async def deposit() -> None:
        async with GatewayClient(server.url, server.admin_key, fence=lock.check) as client:
            await client.deposit("res-01", Decimal("5.00"), idempotency_key="k1")

    with pytest.raises(Fenced, match=r"writer lock .* was lost"):
        asyncio.run(deposit())
    assert _deposits(server, "res-01") == []
    assert server.stats["writes"] == before  # nothing reached the gateway
    successor = try_writer_lock(location, purpose="finops run")  # PostgreSQL handed it on
    assert successor is not None
    successor.release()


def test_a_waiting_writer_gives_up_at_once_behind_a_daemon_and_names_it(pg_url: str, tmp_path: Path) -> None:
    location = StateLocation(tmp_path / "x.db", url=pg_url)
    daemon = try_writer_lock(location, purpose="finops run")
    assert daemon is not None
    try:
        told: list[str] = []
        with pytest.raises(WriterLocked, match="finops run pid"), writer_lock(
            location, tmp_path, purpose="finops apply", wait=300, on_wait=told.append
        ):
            pass
        assert told == []  # no wait behind a daemon: it never lets go
    finally:
        daemon.release()
    with writer_lock(location, tmp_path, purpose="finops apply", wait=0) as lock:
        assert lock.held()


def test_freeze_never_waits_for_the_writer_lock_and_the_writer_sees_the_hold(
    gateway: tuple[SandboxServer, dict[str, str]], pg_url: str, tmp_path: Path
) -> None:
    _, env = gateway
    env = {**env, "FINOPS_STATE_URL": pg_url}
    ops = _machine(tmp_path, "operator")
    assert run_cli(ops, "apply", "--auto-approve", env=env).returncode == 0
    daemon = try_writer_lock(StateLocation(tmp_path / "x.db", url=pg_url), purpose="finops run")  # another machine
    assert daemon is not None
    try:
        # An operator's laptop, while a daemon writes: the key is in the shared (sealed) store,
        # so the laptop rotates it into quarantine although it never registered it.
        laptop = _machine(tmp_path, "laptop")
        frozen = run_cli(laptop, "freeze", "res-02", "--reason", "loop", env=env)
        assert frozen.returncode == 0, frozen.stdout + frozen.stderr
        assert "PROBLEM" not in frozen.stdout
        blocked = run_cli(laptop, "apply", "--auto-approve", env=env)
        assert blocked.returncode == 1 and "finops run" in blocked.stderr  # never queued behind a daemon
        status = run_cli(laptop, "status", "--format", "json", env=env)  # who writes, seen from any machine
        where = json.loads(status.stdout)["state"]
        assert where["backend"] == "postgresql" and "finops run pid" in where["writer"], where
    finally:
        daemon.release()
    after = run_cli(_machine(tmp_path, "ci"), "plan", "--detailed-exitcode", env=env)  # a hold is shared state
    assert after.returncode == 0 and "HELD" in after.stdout and "res-02" in after.stdout, after.stdout


def test_a_ci_runner_needs_only_a_read_only_database_role_to_plan(
    gateway: tuple[SandboxServer, dict[str, str]], pg_url: str, tmp_path: Path
) -> None:
    """`finops plan` reads the shared state and writes nothing to it: a SELECT-only role is
    enough (what a pull-request job should hold); a write attempt with it would fail."""
    _, env = gateway
    ops = _machine(tmp_path, "operator")
    assert run_cli(ops, "apply", "--auto-approve", env={**env, "FINOPS_STATE_URL": pg_url}).returncode == 0
    role = f"ci_{os.getpid()}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        read_only = pg_url.replace("://finops@", f"://{role}@")
        assert read_only != pg_url
        ci_env = {**env, "FINOPS_STATE_URL": read_only}
        plan = run_cli(_machine(tmp_path, "ci"), "plan", "--detailed-exitcode", env=ci_env)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "No changes" in plan.stdout
        refused = run_cli(_machine(tmp_path, "ci2"), "freeze", "res-01", env=ci_env)
        assert refused.returncode != 0  # the role cannot record a hold
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
