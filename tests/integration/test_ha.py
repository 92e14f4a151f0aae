"""High availability: several ``finops run`` replicas on one PostgreSQL state (a real
server, ``pg_url``), against a real sandbox, as real subprocesses.

- exactly one replica is active, the others stand by (``/readyz`` and ``finops_leader``);
- the active one SIGKILLed mid-pass (a sandbox tripwire fires on its N-th write): the
  standby takes over within 30 s and converges the fleet with exact balances, one deposit
  per agent, no duplicate webhook and no pending intent left;
- the active one's lock session terminated (``pg_terminate_backend``, what a lost database
  connection amounts to): it is fenced (no gateway write arrives from it afterwards, the
  writes it still had queued are refused by the fence), exits 1, and the standby takes over;
- a client whose lock is lost sends nothing (the fence, in-process).

Replicas share a secrets directory (as a shared volume would); each has its own state
directory. ``FINOPS_SETTLE_SECONDS=2``: an outcome the dead leader left unknown is resolved
by the new one from the ledger, 2 s after it was sent (the sandbox answers in milliseconds).
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from controller.alerting import alert_state
from controller.daemon.replicas import Role, replica_statuses
from controller.gateway.client import GatewayClient
from controller.gateway.errors import Fenced
from controller.keys.envelope import generate_kek_text, load_kek
from controller.keys.sealed import SealedVault
from controller.keys.store import KeyLedger
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.sandbox.app import exchange_rate
from controller.sandbox.faults import Tripwire
from controller.sandbox.server import SandboxServer
from controller.sandbox.store import to_atomic
from controller.state import PENDING, StateStore
from controller.state.location import StateLocation
from controller.state.lock import try_writer_lock
from policies.alerts import ALERT_ID_HEADER
from policies.keyprint import contains_key_material, key_prefix
from tests.integration.conftest import CANONICAL, run_cli
from tests.integration.haproc import (
    LeaderKiller,
    ReplicaProcess,
    WriteProxy,
    lock_holder_pid,
    terminate_lock_session,
    wait_until,
)
from tests.integration.test_crash import at_most_once
from tests.integration.test_faults import assert_converged, fresh_fleet_deposits, write_generated_fleet

AGENTS = 24
KILL_AT_WRITE = 17
FAILOVER_LIMIT_S = 30.0
ENV = {"FINOPS_SETTLE_SECONDS": "2"}


def _pair(tmp_path: Path, sandbox: SandboxServer, pg_url: str, manifests: Path, **kw: object) -> list[ReplicaProcess]:
    assert sandbox.admin_key_file is not None
    gateways = kw.pop("gateways", [sandbox.url, sandbox.url])
    assert isinstance(gateways, list)
    extra_env = kw.pop("env", {})
    assert isinstance(extra_env, dict)
    return [
        ReplicaProcess(
            name,
            tmp_path / name,
            gateway,
            sandbox.admin_key_file,
            pg_url,
            manifests,
            tmp_path / "secrets",
            env={**ENV, **extra_env},
            **kw,  # type: ignore[arg-type]
        )
        for name, gateway in zip(("a", "b"), gateways, strict=True)
    ]


def _standing_by(replica: ReplicaProcess) -> bool:
    ready = replica.readyz()
    return ready is not None and ready[0] == 200 and "standby" in ready[1] and replica.leader() == 0


def _converged_since(replica: ReplicaProcess, since: float) -> bool:
    """A pass completed after ``since`` and planned nothing: the fleet is converged."""
    m = replica.metrics()
    return (
        m.get("finops_leader") == 1
        and m.get("finops_last_reconcile_success_timestamp_seconds", 0.0) > since
        and m.get("finops_drift_changes") == 0
    )


def _no_key_material(*replicas: ReplicaProcess) -> None:
    for replica in replicas:
        assert not contains_key_material(replica.text()), f"{replica.name}'s log shows key material"


def test_sigkill_of_the_active_replica_mid_pass_the_standby_takes_over_and_converges_exactly(
    tmp_path: Path, pg_url: str
) -> None:
    desired = load_manifests(write_generated_fleet(tmp_path / "manifests", AGENTS))
    due = fresh_fleet_deposits(desired, {"swarm": exchange_rate("USD", "CREDITS")})
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    # The production configuration: agents' keys sealed in the shared state, one KEK file.
    kek_file = tmp_path / "kek"
    kek_file.write_text(generate_kek_text())
    kek_file.chmod(0o600)
    sealed = {"FINOPS_KEY_STORE": "database", "FINOPS_KEY_ENCRYPTION_KEY_FILE": str(kek_file)}
    with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as sandbox:
        replicas = _pair(tmp_path, sandbox, pg_url, tmp_path / "manifests", interval=3.0, env=sealed)
        gate = try_writer_lock(location, purpose="test: keeps every replica standing by")
        assert gate is not None
        try:
            for replica in replicas:
                replica.start()
            # Both stand by while someone else holds the lock: ready, not leader, no write.
            for replica in replicas:
                wait_until(lambda r=replica: _standing_by(r), 60, f"{replica.name} standing by")
            assert sandbox.stats["writes"] == 0
            killer = LeaderKiller(pg_url, replicas)
            sandbox.faults.arm(Tripwire(KILL_AT_WRITE, killer, commit=True))
            gate.release()  # one of them takes the lock and starts a full pass ...
            assert killer.fired.wait(60), "the tripwire never fired"
            assert killer.killed is not None and killer.at is not None, "the lock holder was not a replica"
            sandbox.faults.disarm()
            dead, kill_at = killer.killed, killer.at
            survivor = next(r for r in replicas if r is not dead)
            assert dead.proc is not None and dead.proc.wait(30) == -signal.SIGKILL

            # ... the standby takes over and completes a pass within the limit.
            wait_until(
                lambda: survivor.metrics().get("finops_last_reconcile_success_timestamp_seconds", 0.0) > kill_at,
                FAILOVER_LIMIT_S + 5,
                "the standby's first completed pass",
            )
            first_pass = survivor.metrics()["finops_last_reconcile_success_timestamp_seconds"]
            assert first_pass - kill_at < FAILOVER_LIMIT_S, f"failover took {first_pass - kill_at:.1f} s"
            assert survivor.leader() == 1
            ready = survivor.readyz()
            assert ready is not None and "active" in ready[1]
            # Never more than the due deposits, even mid-way; then converged.
            assert not at_most_once(sandbox, desired, exchange_rate("USD", "CREDITS"), due)
            wait_until(lambda: _converged_since(survivor, kill_at), 60, "a pass that planned nothing")
            assert survivor.stop() == 0
        finally:
            gate.release()
            for replica in replicas:
                replica.kill()
        sandbox.wait_idle()
        state = StateStore(location)
        vault = SealedVault(location, load_kek(kek_file), sink_directory=tmp_path / "secrets")
        try:
            convergence = asyncio.run(
                assert_converged(sandbox, desired, state=state, sink=vault, expected_deposits=due)
            )
            on_record = {i.agent_id for i in state.intents(kind="register", status="failed")}
            assert convergence.lost_keys <= on_record, "a key lost to the kill is not on record"
            assert state.intents(status=PENDING) == []
        finally:
            state.close()
            vault.close()
        rows = {r.pid: r for r in replica_statuses(location)}
        assert rows[survivor.pid].role is Role.STOPPED and rows[survivor.pid].last_pass_result in ("ok", "partial")
        assert rows[dead.pid].role is Role.ACTIVE  # SIGKILL left its last word; the lock said otherwise
        takeover = [d for d in survivor.logs() if d["msg"].startswith("took the writer lock")]
        assert len(takeover) == 1
        _no_key_material(*replicas)
    print(f"failover (kill -> first completed pass): {first_pass - kill_at:.2f} s")


def test_a_replica_that_loses_its_lock_session_is_fenced_and_the_standby_takes_over(
    tmp_path: Path, pg_url: str
) -> None:
    desired = load_manifests(CANONICAL)
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    with (
        SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as sandbox,
        WriteProxy(sandbox.url) as proxy_a,
        WriteProxy(sandbox.url) as proxy_b,
    ):
        proxies = [proxy_a, proxy_b]
        replicas = _pair(
            tmp_path,
            sandbox,
            pg_url,
            CANONICAL,
            gateways=[proxy_a.url, proxy_b.url],
            interval=3.0,
            extra=("--concurrency", "2"),
        )
        gate = try_writer_lock(location, purpose="test: keeps every replica standing by")
        assert gate is not None
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:
                wait_until(lambda r=replica: _standing_by(r), 60, f"{replica.name} standing by")
            for proxy in proxies:
                proxy.holding = True
            gate.release()
            # The leader's first writes are held at its proxy (both lanes busy, more queued).
            held = wait_until(lambda: next((p for p in proxies if p.held >= 2), None), 60, "two held writes")
            leader = replicas[proxies.index(held)]
            standby = next(r for r in replicas if r is not leader)
            other = proxies[1 - proxies.index(held)]
            other.release()  # the standby's proxy forwards everything
            assert leader.leader() == 1 and standby.leader() == 0
            status = standby.readyz()
            assert status is not None and status[0] == 200 and "standby" in status[1]

            cut_at = time.time()
            assert terminate_lock_session(pg_url) == 1
            wait_until(lambda: "fenced" in (leader.readyz() or (0, ""))[1], 30, "the leader to notice")
            assert leader.leader() == 0
            held.release()  # the held writes fail (503, never forwarded): the queued ones now try
            assert leader.proc is not None and leader.proc.wait(60) == 1
            late = [w for w in held.writes if w[0] > cut_at]
            assert late == [], f"the fenced replica still wrote: {late}"
            text = leader.text()
            assert "lost the writer lock" in text
            assert "no further gateway write" in text  # a queued write was refused by the fence

            wait_until(lambda: standby.leader() == 1, FAILOVER_LIMIT_S, "the standby to take over")
            wait_until(lambda: _converged_since(standby, cut_at), 60, "the new leader's converged pass")
            assert standby.stop() == 0
        finally:
            gate.release()
            for replica in replicas:
                replica.kill()
        sandbox.wait_idle()
        state = StateStore(location)
        try:
            asyncio.run(assert_converged(sandbox, desired, state=state, sink=KeyVault(tmp_path / "secrets")))
            assert state.intents(status=PENDING) == []
        finally:
            state.close()
        rows = {r.pid: r for r in replica_statuses(location)}
        assert rows[leader.pid].role is Role.FENCED and "lost the writer lock" in rows[leader.pid].detail
        _no_key_material(*replicas)


async def test_a_client_whose_writer_lock_is_lost_sends_no_write(
    tmp_path: Path, pg_url: str, sandbox: SandboxServer
) -> None:
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    lock = try_writer_lock(location, purpose="finops run")
    assert lock is not None
    try:
        async with GatewayClient(sandbox.url, sandbox.admin_key, fence=lock.check) as client:
            assert lock.held()
            sandbox.reset_stats()
            assert terminate_lock_session(pg_url) == 1
            with pytest.raises(Fenced, match="writer lock"):
                await client.register("fenced-agent")
            assert sandbox.stats["writes"] == 0 and sandbox.store.get_wallet("fenced-agent") is None
            assert not lock.held()
            # A second finops takes the lock; the first stays fenced for good.
            again = try_writer_lock(location, purpose="finops run")
            assert again is not None
            again.release()
            with pytest.raises(Fenced):
                await client.deposit("fenced-agent", Decimal("1.00"), "k1")
            assert sandbox.stats["writes"] == 0
    finally:
        lock.release()


def test_once_with_shared_state_refuses_to_run_beside_an_active_daemon(tmp_path: Path, pg_url: str) -> None:
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    lock = try_writer_lock(location, purpose="finops run")
    assert lock is not None
    try:
        result = run_cli(
            tmp_path, "run", str(CANONICAL), "--once", "--state-url", pg_url,
            env={"FINOPS_LOCK_TIMEOUT": "30", "FINOPS_KEY_STORE": "directory"},
        )
        assert result.returncode == 1
        assert "finops run" in result.stderr and f"pid {os.getpid()}" in result.stderr
        with psycopg.connect(pg_url) as conn:  # refused before the state was even opened
            assert conn.execute("SELECT to_regclass('intents')").fetchone() == (None,)
    finally:
        lock.release()


def test_a_single_daemon_on_its_own_state_reports_itself_the_leader(tmp_path: Path, sandbox: SandboxServer) -> None:
    """Without shared state the daemon holds the (flock) writer lock from the start, so the
    fleet-wide rule ``sum(finops_leader) != 1`` holds for it too."""
    assert sandbox.admin_key_file is not None
    single = ReplicaProcess(
        "single", tmp_path / "single", sandbox.url, sandbox.admin_key_file, "", CANONICAL, tmp_path / "secrets", env=ENV
    ).start()
    try:
        wait_until(lambda: single.leader() == 1, 60, "finops_leader 1 on the single daemon")
    finally:
        assert single.stop() == 0, single.text()


def test_a_rotation_cut_by_the_kill_is_resumed_by_the_new_leader(tmp_path: Path, pg_url: str) -> None:
    desired = load_manifests(CANONICAL)
    agents = sorted(a.agent_id for a in desired.agents())
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    vault = KeyVault(tmp_path / "secrets")
    with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as sandbox:
        env = {
            "GREENHELIX_URL": sandbox.url,
            "GREENHELIX_API_KEY_FILE": str(sandbox.admin_key_file),
            "FINOPS_STATE_URL": pg_url,
            "FINOPS_KEY_STORE": "directory",
            "FINOPS_STATE_DIR": str(tmp_path / "operator"),
        }
        applied = run_cli(
            tmp_path, "apply", "--auto-approve", str(CANONICAL), "--secrets-dir", str(vault.directory), env=env
        )
        assert applied.returncode == 0, applied.stderr
        with psycopg.connect(pg_url, autocommit=True) as conn:  # the keys are 8 days old: due (weekly)
            conn.execute("UPDATE keys_held SET since = since - 8 * 86400, last_rotated_at = NULL")
        before = {a: vault.read(a) for a in agents}
        started = time.time()
        replicas = _pair(tmp_path, sandbox, pg_url, CANONICAL)
        for replica in replicas:
            # The rotation job runs once an hour: a rotation left unknown within the settle time
            # would wait for the next run. The dead leader's requests finish in the sandbox within
            # milliseconds, long before the survivor's rotation run (after its reconcile pass),
            # so its look at the gateway is final at once.
            replica.env["FINOPS_SETTLE_SECONDS"] = "0"
        gate = try_writer_lock(location, purpose="test: keeps every replica standing by")
        assert gate is not None
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:
                wait_until(lambda r=replica: _standing_by(r), 60, f"{replica.name} standing by")
            killer = LeaderKiller(pg_url, replicas)
            # The fleet is converged: the first gateway writes of the pass are the rotations.
            tripwire = Tripwire(2, killer, commit=True)
            sandbox.faults.arm(tripwire)
            gate.release()
            assert killer.fired.wait(60) and killer.killed is not None, "the tripwire never fired"
            sandbox.faults.disarm()
            survivor = next(r for r in replicas if r is not killer.killed)
            assert tripwire.fired_on == "POST /v1/infra/keys/rotate", tripwire.fired_on
            done = wait_until(
                lambda: next((d for d in survivor.logs() if d["msg"].startswith("rotation finished")), None),
                60,
                "the new leader's rotation run",
            )
            assert survivor.stop() == 0
        finally:
            gate.release()
            for replica in replicas:
                replica.kill()
        sandbox.wait_idle()
        assert done["result"] == "ok", done
        ledger = KeyLedger(location)
        state = StateStore(location)
        try:
            held = ledger.held()
            for agent in agents:
                key = vault.read(agent)
                rotated = key is not None and key != before[agent]  # never a key in an assertion message
                assert rotated, f"{agent}: not rotated; the new leader's run: {done['msg']}"
                assert key is not None and held[agent].key_prefix == key_prefix(key)
                assert held[agent].last_rotated_at is not None and held[agent].last_rotated_at >= started
                assert asyncio.run(_authenticates(sandbox, agent, key)), f"{agent}: the held key does not work"
            assert state.intents(kind="rotate", status=PENDING) == []
            # Rotations run in parallel: those the kill cut after the gateway ran them left new
            # keys that never reached the vault, reported by prefix (the gateway gives admin no
            # way to revoke them) and rotated past from the still-valid old key.
            orphans = ledger.orphans()
            assert orphans and set(orphans) <= set(agents), orphans
            assert all(held[a].key_prefix not in {o.key_prefix for o in orphans[a]} for a in orphans)
        finally:
            ledger.close()
            state.close()
        _no_key_material(*replicas)


async def _authenticates(sandbox: SandboxServer, agent: str, key: str) -> bool:
    async with GatewayClient(sandbox.url, key) as client:
        return await client.get_balance(agent) is not None


class HoldingReceiver:
    """A loopback alert receiver that holds the first delivery until ``release`` is set, then
    answers 204 to it and to every later one, recording each request's alert id and body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append((self.path, self.headers.get(ALERT_ID_HEADER, ""), body))
                if not outer.arrived.is_set():
                    outer.arrived.set()
                    outer.release.wait(60)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_an_alert_crossing_is_decided_once_and_redelivered_identically_after_a_failover(
    tmp_path: Path, pg_url: str
) -> None:
    """The leader dies while its delivery of a crossing is at the receiver (the POST arrived,
    the answer never reaches it). The new leader decides no second crossing (the slot is in
    the shared state) and finishes the delivery from the shared outbox: the same alert id, the
    same signed bytes, so the receiver deduplicates it (delivery is at-least-once: a request
    whose answer was lost cannot be known to have arrived)."""
    receiver = HoldingReceiver()
    manifests = tmp_path / "manifests"
    shutil.copytree(CANONICAL, manifests)
    fleet = manifests / "research-fleet.yaml"
    text = fleet.read_text()
    for old in (
        "signingSecret: {file: alert-signing.secret, generate: true}",
        "https://alerts.example.com/research/{agent}/{threshold}",
        "https://pager.example.com/finops/{fleet}?agent={agent}&window={window}",
    ):
        assert old in text, f"the canonical fleet changed: {old!r} is gone (the edits below would be no-ops)"
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
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    try:
        with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as sandbox:
            env = {
                "GREENHELIX_URL": sandbox.url,
                "GREENHELIX_API_KEY_FILE": str(sandbox.admin_key_file),
                "FINOPS_STATE_URL": pg_url,
            "FINOPS_KEY_STORE": "directory",
                "FINOPS_STATE_DIR": str(tmp_path / "operator"),
                "ALERT_SECRET": "s3cret-for-tests",
            }
            applied = run_cli(
                tmp_path, "apply", "--auto-approve", str(manifests), "--secrets-dir", str(tmp_path / "secrets"), env=env
            )
            assert applied.returncode == 0, applied.stderr
            cap = Decimal("15.00") * exchange_rate("USD", "CREDITS")  # cls-01: 15.00 USD a day
            sandbox.store.record_usage_and_charge(
                "cls-01", "best_match", to_atomic(cap * Decimal("0.8")), None, now=sandbox.clock()
            )  # 80 % of the daily cap: the 75 % threshold is crossed
            replicas = _pair(tmp_path, sandbox, pg_url, manifests)
            for replica in replicas:
                replica.env["ALERT_SECRET"] = "s3cret-for-tests"
            gate = try_writer_lock(location, purpose="test: keeps every replica standing by")
            assert gate is not None
            try:
                for replica in replicas:
                    replica.start()
                for replica in replicas:
                    wait_until(lambda r=replica: _standing_by(r), 60, f"{replica.name} standing by")
                gate.release()
                assert receiver.arrived.wait(60), "the leader never delivered the crossing"
                leader_pid = lock_holder_pid(pg_url)
                leader = next(r for r in replicas if r.pid == leader_pid)
                survivor = next(r for r in replicas if r is not leader)
                os.kill(leader.pid, signal.SIGKILL)  # its delivery is at the receiver, unanswered
                assert leader.proc is not None and leader.proc.wait(30) == -signal.SIGKILL
                receiver.release.set()
                done = wait_until(
                    lambda: next((d for d in survivor.logs() if d["msg"].startswith("alerts finished")), None),
                    60,
                    "the new leader's alert check",
                )
                assert survivor.stop() == 0
            finally:
                gate.release()
                for replica in replicas:
                    replica.kill()
    finally:
        receiver.close()
    assert done["result"] == "ok" and done["fired"] == 0 and done["delivered"] == 1, done  # no second crossing decided
    assert [path for path, _, _ in receiver.requests] == ["/cls-01/75", "/cls-01/75"]
    (_, first_id, first_body), (_, again_id, again_body) = receiver.requests
    assert first_id and first_id == again_id and first_body == again_body
    fired = alert_state(location)
    assert [f.alert_id for f in fired["cls-01"]] == [first_id]


class HeldReads(httpx.AsyncBaseTransport):
    """Forwards to the sandbox; a balance read waits until ``release`` is set."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/balance"):
            self.reading.set()
            await self.release.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_write_queued_behind_a_busy_slot_is_fenced_when_its_turn_comes(sandbox: SandboxServer) -> None:
    """The fence is checked when the write's slot is free, right before it leaves: a write
    that waited behind a slow request never goes out on a check made before the lock was lost."""
    lost = threading.Event()
    checks: list[bool] = []

    def fence() -> None:
        checks.append(lost.is_set())
        if lost.is_set():
            raise Fenced("the writer lock was lost: no further gateway write")

    transport = HeldReads()
    async with GatewayClient(sandbox.url, sandbox.admin_key, transport=transport, concurrency=1, fence=fence) as client:
        read = asyncio.create_task(client.get_balance("finops-admin"))
        await transport.reading.wait()  # the only slot is busy
        write = asyncio.create_task(client.register("queued-agent"))
        await asyncio.sleep(0.05)  # the write is queued for the slot (nothing to observe but time)
        assert checks == []  # not checked while it waits: a check now would be stale when it leaves
        sandbox.reset_stats()
        lost.set()  # the lock is lost while the write waits
        transport.release.set()
        await read
        with pytest.raises(Fenced):
            await write
    assert checks == [True]
    assert sandbox.stats["writes"] == 0 and sandbox.store.get_wallet("queued-agent") is None


def test_a_standby_stops_at_once_on_sigterm_and_writes_nothing(tmp_path: Path, pg_url: str) -> None:
    location = StateLocation(tmp_path / "anchor.db", url=pg_url)
    with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as sandbox:
        replica = _pair(tmp_path, sandbox, pg_url, CANONICAL)[0]
        gate = try_writer_lock(location, purpose="finops run")  # another daemon is active
        assert gate is not None
        try:
            replica.start()
            wait_until(lambda: _standing_by(replica), 60, "the replica standing by")
            ready = replica.readyz()
            assert ready is not None and ready[0] == 200
            assert replica.stop(timeout=30) == 0
        finally:
            gate.release()
            replica.kill()
        assert sandbox.stats["writes"] == 0
    (row,) = replica_statuses(location)
    assert (row.pid, row.role, row.active_since, row.last_pass_at) == (replica.pid, Role.STOPPED, None, None)
    assert any(d["msg"] == "shutdown complete" and d.get("role") == "standby" for d in replica.logs())
