"""The database key store (``SealedVault``) on both state backends (SQLite and a real
PostgreSQL server): the key-store contract, a wrong or missing key-encryption key refused
before anything happens (never read as "no key held"), tampered and copied rows refused,
re-wrapping, moving keys from the directory store, selection, key rotation by a second
"machine" that holds only the shared state and the KEK, and no plaintext key in any row,
in a database dump or in PostgreSQL's server log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from controller.errors import ConfigError
from controller.gateway.client import GatewayClient
from controller.keys.envelope import KekMismatch, KeyEncryptionKey, SealedKeyCorrupt, generate_kek_text, load_kek
from controller.keys.rotate import KeyManager
from controller.keys.sealed import SealedVault, copy_keys, rewrap_all
from controller.keys.selection import DATABASE, DIRECTORY, chosen_kind, open_key_store
from controller.keys.vault import MAIN, QUARANTINE, KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.decide import preflight
from controller.sandbox.server import SandboxServer
from controller.state import PENDING, StateStore
from controller.state.db import connect
from controller.state.location import StateLocation
from policies.keyprint import API_KEY_PATTERN, contains_key_material, key_prefix, secret_part
from policies.plan_types import Change, ChangeKind, Plan, RegisterArgs
from policies.spec import AgentSpec, DesiredState, FleetSpec, KeyPolicy, KeySinkSpec
from tests.integration.conftest import CANONICAL, run_cli

KEYS = {
    "agent-a": "a2a_free_" + "a1" * 12,
    "agent-b": "a2a_pro_" + "b2" * 12,
    "agent-c": "a2a_free_" + "c3" * 12,
}
QUARANTINED = "a2a_free_" + "d4" * 12


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateLocation]:
    if request.param == "sqlite":
        yield StateLocation(tmp_path / "state.db")
    else:
        yield StateLocation(tmp_path / "state.db", url=request.getfixturevalue("pg_url"))


def kek_file(path: Path) -> Path:
    path.write_text(generate_kek_text() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def kek(tmp_path: Path) -> KeyEncryptionKey:
    return load_kek(kek_file(tmp_path / "kek"))


def vault(location: StateLocation, kek: KeyEncryptionKey, sink: Path, *, check: bool = True) -> SealedVault:
    return SealedVault(location, kek, sink_directory=sink, check=check)


def all_rows(location: StateLocation) -> list[str]:
    """Every row of every table, as text (what a database dump would show)."""
    db = connect(location)
    try:
        if location.url:
            tables = [r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'").fetchall()]
        else:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
        out = []
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}").fetchall():  # names from the catalogue
                out.append(
                    f"{table}: {row!r} " + " ".join(bytes(v).hex() for v in row if isinstance(v, bytes | memoryview))
                )
        return out
    finally:
        db.close()


def assert_no_plaintext(texts: list[str], keys: list[str]) -> None:
    """No key in ``texts``: not whole, not its secret part, not as hex bytes, nothing shaped
    like a key. (Binary columns are scanned as hex too: a bare 24-hex run is a nonce there,
    so the looser ``contains_key_material`` is for text outputs only.)"""
    assert texts, "nothing to scan: the check would prove nothing"
    for text in texts:
        assert not API_KEY_PATTERN.search(text), text[:200]
        for raw in keys:
            assert raw not in text and secret_part(raw) not in text.lower()
            assert raw.encode().hex() not in text.lower()


def fill(v: SealedVault) -> None:
    for agent, raw in KEYS.items():
        assert v.store(agent, raw) == key_prefix(raw)
    v.write("agent-a", QUARANTINED, QUARANTINE)


# ------------------------------------------------------------------------ the contract


def test_sealed_store_contract_and_no_plaintext_in_any_row(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    v = vault(location, kek, tmp_path / "secrets")
    try:
        assert v.read("agent-a") is None and v.held("agent-a") is None and v.entries() == []
        fill(v)
        assert v.load("agent-b") == KEYS["agent-b"]
        assert v.held("agent-a") == (QUARANTINED, QUARANTINE)  # quarantine wins, as in the directory store
        assert v.is_quarantined("agent-a") and not v.is_quarantined("agent-b")
        assert v.entries() == [("agent-a", MAIN), ("agent-a", QUARANTINE), ("agent-b", MAIN), ("agent-c", MAIN)]
        assert v.key_file("agent-a") is None and v.sink_directory == tmp_path / "secrets"
        assert "agent" not in v.describe("agent-a") or "database key store" in v.describe("agent-a")
        assert v.unwritable() is None
        assert v.clear("agent-a", QUARANTINE) is True and v.clear("agent-a", QUARANTINE) is False
        assert v.held("agent-a") == (KEYS["agent-a"], MAIN)
        v.store("agent-c", QUARANTINED)  # replaced in place
        assert v.load("agent-c") == QUARANTINED
        with pytest.raises(ValueError, match="not a GreenHelix API key"):
            v.store("agent-b", "not a key")
        with pytest.raises(ValueError):
            v.store("../etc", KEYS["agent-a"])
        assert v.load("agent-b") == KEYS["agent-b"]
    finally:
        v.close()
    # Durable and shared: another process (another machine: another sink directory) reads it.
    other = vault(location, kek, tmp_path / "elsewhere")
    try:
        assert other.load("agent-a") == KEYS["agent-a"] and other.load("agent-c") == QUARANTINED
    finally:
        other.close()
    rows = all_rows(location)
    assert any(r.startswith("sealed_keys:") for r in rows)
    assert all(".finops-probe" not in r for r in rows)  # the write probe was rolled back
    assert_no_plaintext(rows, [*KEYS.values(), QUARANTINED])
    assert all(kek.material.hex() not in r for r in rows)


def test_a_wrong_kek_is_refused_at_open_and_on_read_never_read_as_no_key(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    v = vault(location, kek, tmp_path / "s")
    fill(v)
    v.close()
    wrong = load_kek(kek_file(tmp_path / "wrong"))
    with pytest.raises(KekMismatch) as info:
        vault(location, wrong, tmp_path / "s")
    assert kek.id in str(info.value) and wrong.id in str(info.value) and "4 under" in str(info.value)
    unchecked = vault(location, wrong, tmp_path / "s", check=False)
    try:
        for call in (lambda: unchecked.load("agent-a"), lambda: unchecked.held("agent-b")):
            with pytest.raises(KekMismatch):
                call()
        problem = unchecked.unwritable()  # registrations are held back too
        assert problem is not None and wrong.id in problem
    finally:
        unchecked.close()


def test_a_tampered_or_copied_row_is_an_error_not_a_missing_key(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    v = vault(location, kek, tmp_path / "s")
    try:
        fill(v)
        db = connect(location)
        try:
            # An attacker with database access copies agent-b's sealed key over agent-c's.
            row = db.execute(
                "SELECT ciphertext, nonce, wrapped_key, wrap_nonce, key_prefix FROM sealed_keys WHERE agent_id=?",
                ("agent-b",),
            ).fetchone()
            db.execute(
                "UPDATE sealed_keys SET ciphertext=?, nonce=?, wrapped_key=?, wrap_nonce=?, key_prefix=? "
                "WHERE agent_id=? AND slot=?",
                (*row, "agent-c", MAIN),
            )
            flipped = bytearray(bytes(row[0]))
            flipped[0] ^= 1
            db.execute(
                "UPDATE sealed_keys SET ciphertext=? WHERE agent_id=? AND slot=?", (bytes(flipped), "agent-a", MAIN)
            )
        finally:
            db.close()
        for agent in ("agent-a", "agent-c"):
            with pytest.raises(SealedKeyCorrupt) as info:
                v.load(agent)
            assert agent in str(info.value) and not contains_key_material(str(info.value))
        assert v.load("agent-b") == KEYS["agent-b"]
    finally:
        v.close()


# ------------------------------------------------------------------------------ rewrap


def test_rewrap_moves_every_key_and_is_idempotent(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    v = vault(location, kek, tmp_path / "s")
    fill(v)
    v.close()
    new = load_kek(kek_file(tmp_path / "new"))
    result = rewrap_all(location, kek, new)
    assert (result.rewrapped, result.already, result.old_id, result.new_id) == (4, 0, kek.id, new.id)
    with pytest.raises(KekMismatch):
        vault(location, kek, tmp_path / "s")  # the old KEK no longer opens the store
    after = vault(location, new, tmp_path / "s")
    try:
        assert {a: after.load(a) for a in KEYS} == KEYS and after.read("agent-a", QUARANTINE) == QUARANTINED
    finally:
        after.close()
    again = rewrap_all(location, kek, new)
    assert (again.rewrapped, again.already) == (0, 4)
    with pytest.raises(ConfigError, match="the one in use"):
        rewrap_all(location, new, new)
    assert_no_plaintext(all_rows(location), [*KEYS.values(), QUARANTINED])


def test_rewrap_refuses_a_row_under_an_unknown_kek_and_changes_nothing(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    v = vault(location, kek, tmp_path / "s")
    fill(v)
    v.close()
    stranger = load_kek(kek_file(tmp_path / "stranger"))
    odd = vault(location, stranger, tmp_path / "s", check=False)
    odd.store("agent-z", KEYS["agent-a"])  # e.g. a machine that ran with the wrong KEK file
    odd.close()
    new = load_kek(kek_file(tmp_path / "new"))
    with pytest.raises(KekMismatch, match=stranger.id):
        rewrap_all(location, kek, new)
    ids = {r.split("'kek:")[1][:16] for r in all_rows(location) if r.startswith("sealed_keys:")}
    assert ids == {kek.id[4:], stranger.id[4:]}  # nothing moved to the new KEK


def test_rewrap_is_one_transaction(location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path) -> None:
    v = vault(location, kek, tmp_path / "s")
    fill(v)
    v.close()
    db = connect(location)
    db.execute("UPDATE sealed_keys SET wrap_nonce=? WHERE agent_id=? AND slot=?", (b"\0" * 12, "agent-c", MAIN))
    db.close()
    with pytest.raises(SealedKeyCorrupt, match="agent-c"):
        rewrap_all(location, kek, load_kek(kek_file(tmp_path / "new")))
    still = vault(location, kek, tmp_path / "s")  # every row is still under the old KEK
    try:
        assert still.load("agent-b") == KEYS["agent-b"]
    finally:
        still.close()


# --------------------------------------------------------------- moving and selecting


def test_copying_between_stores_once_with_conflicts_settled_by_the_state(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    files = KeyVault(tmp_path / "dir-store")
    for agent, raw in KEYS.items():
        files.store(agent, raw)
    files.write("agent-b", QUARANTINED, QUARANTINE)
    v = vault(location, kek, tmp_path / "dir-store")
    try:
        result = copy_keys(files, v)
        assert sorted((a, s) for a, s, _ in result.copied) == files.entries() and result.same == []
        assert v.entries() == files.entries() and v.read("agent-b", QUARANTINE) == QUARANTINED
        again = copy_keys(files, v)
        assert again.copied == [] and len(again.same) == 4
        newer = "a2a_free_" + "e5" * 12
        files.store("agent-c", newer)
        # The state says the database's key is held: the directory's differing key is refused.
        with pytest.raises(ConfigError, match="agent-c") as info:
            copy_keys(files, v, {"agent-c": key_prefix(KEYS["agent-c"])})
        assert f"sha3:{key_prefix(KEYS['agent-c'])} as held" in str(info.value)
        assert v.load("agent-c") == KEYS["agent-c"]  # nothing written
        # The state says the directory's key is held: it replaces the stale one.
        replaced = copy_keys(files, v, {"agent-c": key_prefix(newer)})
        assert replaced.replaced == [("agent-c", MAIN, key_prefix(KEYS["agent-c"]))]
        assert v.load("agent-c") == newer
        # And back: the database store into an empty directory store, quarantine included.
        out = KeyVault(tmp_path / "exported")
        exported = copy_keys(v, out)
        assert out.entries() == v.entries() and out.read("agent-b", QUARANTINE) == QUARANTINED
        assert len(exported.copied) == 4 and out.load("agent-c") == newer
    finally:
        v.close()


def test_selection_defaults_and_refusals(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = DATABASE if location.shared else DIRECTORY
    assert chosen_kind(None, location) == expected
    assert chosen_kind(DIRECTORY, location) == DIRECTORY and chosen_kind(DATABASE, location) == DATABASE
    with pytest.raises(ConfigError, match="must be one of"):
        chosen_kind("s3", location)
    secrets = tmp_path / "secrets"
    assert isinstance(open_key_store(DIRECTORY, location, secrets), KeyVault)
    monkeypatch.delenv("FINOPS_KEY_ENCRYPTION_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="FINOPS_KEY_ENCRYPTION_KEY_FILE"):
        open_key_store(DATABASE, location, secrets)
    monkeypatch.setenv("FINOPS_KEY_ENCRYPTION_KEY_FILE", kek.source)
    store = open_key_store(DATABASE, location, secrets)
    assert isinstance(store, SealedVault) and store.kek_id == kek.id
    store.close()
    # Keys in the directory store that the database store lacks: never silently keyless.
    KeyVault(secrets).store("agent-a", KEYS["agent-a"])
    with pytest.raises(ConfigError, match="import-dir"):
        open_key_store(DATABASE, location, secrets)


def _spec(agent: str, sink: KeySinkSpec) -> AgentSpec:
    return AgentSpec(
        agent_id=agent,
        fleet="keys",
        tier="worker",
        daily_cap=Decimal("10"),
        monthly_cap=Decimal("100"),
        funding_floor=Decimal("0"),
        funding_target=Decimal("0"),
        alert_thresholds=(100,),
        keys=KeyPolicy(manage=True, rotation="weekly", sink=sink),
    )


def test_preflight_checks_the_default_sink_directory_of_the_database_store(
    location: StateLocation, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    v = vault(location, kek, blocked / "secrets")
    try:
        desired = DesiredState(
            (
                FleetSpec(
                    "keys",
                    "CREDITS",
                    Decimal("1000"),
                    Decimal("1000"),
                    (_spec("new-a", KeySinkSpec()), _spec("new-b", KeySinkSpec(kind="command", command=("true",)))),
                ),
            )
        )
        plan = Plan(
            target="sandbox",
            created_at="now",
            basis="x",
            fleets=(),
            changes=tuple(
                Change(ChangeKind.REGISTER, "keys", a, "new agent", (), RegisterArgs(Decimal("500.00")))
                for a in ("new-a", "new-b")
            ),
        )
        checked = preflight(plan, desired, v)
        assert [c.agent_id for c in checked.changes] == ["new-b"]
        [error] = checked.errors
        assert error.agent_id == "new-a" and str(blocked) in error.detail
    finally:
        v.close()


# ------------------------------------------------------------- rotation by a standby


async def test_a_second_machine_finishes_a_rotation_the_first_was_killed_in(
    location: StateLocation, kek: KeyEncryptionKey, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Machine A registers and is killed right after the new key was sealed; machine B
    (its own process, sink directory and nothing in memory, the same state and KEK)
    recovers the rotation and then rotates on its own."""

    class Killed(BaseException):
        pass

    def kill_after_vault(point: str, agent: str) -> None:
        if point == "after_vault":
            raise Killed(point)

    s = _spec("standby-a", KeySinkSpec())
    desired = DesiredState((FleetSpec("keys", "CREDITS", Decimal("1000"), Decimal("1000"), (s,)),))
    async with GatewayClient(sandbox.url, sandbox.admin_key) as admin:
        store_a = StateStore(location)
        vault_a = vault(location, kek, tmp_path / "a-secrets")
        first = (await admin.register("standby-a")).api_key
        store_a.record_key("standby-a", vault_a.store("standby-a", first), "register")
        km_a = KeyManager(
            admin, store_a, vault_a, state_path=location, clock=sandbox.clock, fault_hook=kill_after_vault
        )
        with pytest.raises(Killed):
            await km_a.rotate(s, reason="scheduled")
        km_a.close()
        vault_a.close()
        store_a.close()

        store_b = StateStore(location)
        vault_b = vault(location, kek, tmp_path / "b-secrets")
        assert [i.agent_id for i in store_b.intents(status=PENDING, kind="rotate")] == ["standby-a"]
        km_b = KeyManager(admin, store_b, vault_b, state_path=location, clock=sandbox.clock)
        try:
            [note] = await km_b.recover()
            assert "finished an interrupted rotation" in note and not contains_key_material(note)
            second = vault_b.load("standby-a")
            assert second is not None and second != first
            assert (tmp_path / "b-secrets" / "standby-a.key").read_text() == second + "\n"  # B delivered it
            outcome = await km_b.rotate(s, reason="standby's own")
            third = vault_b.load("standby-a")
            assert third not in (None, first, second)
            assert outcome.new_fingerprint == f"sha3:{key_prefix(third or '')}"
            sandbox.clock.advance(301)
            assert store_b.key_prefixes()["standby-a"] == key_prefix(third or "")
            live = {k.key_hash_prefix for k in sandbox.store.list_keys("standby-a") if not k.revoked}
            assert live == {key_prefix(third or "")}
            [status] = km_b.key_status(desired)
            assert status.fingerprint == f"sha3:{key_prefix(third or '')}" and status.orphans == ()
        finally:
            km_b.close()
            vault_b.close()
            store_b.close()
    assert_no_plaintext(all_rows(location), [first, second or "", third or ""])


# ------------------------------------------------- PostgreSQL: dump and server log


def _server_log(pg_server: str) -> Path:
    with psycopg.connect(pg_server, autocommit=True) as admin:
        data = admin.execute("SHOW data_directory").fetchone()
    assert data is not None
    return Path(str(data[0])).parent / "server.log"


def test_plaintext_never_reaches_postgresql_its_dump_or_its_log(
    pg_server: str, pg_url: str, kek: KeyEncryptionKey, tmp_path: Path
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        # Log every statement with its parameters, for this database only.
        admin.execute(f"ALTER DATABASE \"{database}\" SET log_statement = 'all'")
    log = _server_log(pg_server)
    start = log.stat().st_size if log.exists() else 0
    location = StateLocation(tmp_path / "state.db", url=pg_url)
    v = vault(location, kek, tmp_path / "s")
    try:
        fill(v)
        assert v.load("agent-a") == KEYS["agent-a"]
        v.clear("agent-a", QUARANTINE)
    finally:
        v.close()
    rewrap_all(location, kek, load_kek(kek_file(tmp_path / "new")))
    keys = [*KEYS.values(), QUARANTINED]
    assert_no_plaintext(all_rows(location), keys)
    if (log.parent / "url").exists():  # a server started by tests.pgserver: its log must be there
        assert log.exists() and os.access(log, os.R_OK), log
    if log.exists() and os.access(log, os.R_OK):
        with log.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
        assert "sealed_keys" in text, "statement logging was not on: the scan would prove nothing"
        assert "SET LOCAL synchronous_commit TO on" in text  # each key write waits for its WAL flush
        assert_no_plaintext([text], keys)
    pg_dump = shutil.which("pg_dump") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))), None)
    if pg_dump is not None:
        dump = subprocess.run([str(pg_dump), pg_url], capture_output=True, text=True, timeout=60, check=True).stdout
        assert "sealed_keys" in dump
        assert_no_plaintext([dump], keys)


# ------------------------------------------------------------ end to end: the CLI


def _cli_env(sandbox: SandboxServer, kek_path: Path | None) -> dict[str, str]:
    env = {"GREENHELIX_URL": sandbox.url, "GREENHELIX_API_KEY_FILE": str(sandbox.admin_key_file)}
    if kek_path is not None:
        env["FINOPS_KEY_ENCRYPTION_KEY_FILE"] = str(kek_path)
    return env


def _writes(sandbox: SandboxServer) -> int:
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as http:
        return int(http.get("/_sandbox/stats").json()["writes"])


def test_apply_seals_keys_and_a_second_machine_rotates_them(
    pg_url: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    machines = {}
    for name in ("a", "b"):
        machines[name] = tmp_path / name
        shutil.copytree(CANONICAL, machines[name] / "manifests")
    kek_path = kek_file(tmp_path / "kek")
    shared = ("--state-url", pg_url)
    outputs: list[str] = []

    def finops(machine: str, *args: str, kek: bool = True) -> subprocess.CompletedProcess[str]:
        result = run_cli(machines[machine], *args, *shared, env=_cli_env(sandbox, kek_path if kek else None))
        outputs.extend([result.stdout, result.stderr])
        return result

    # No key-encryption key: refused before the first gateway write (nothing registered).
    refused = finops("a", "apply", "--auto-approve", kek=False)
    assert refused.returncode == 1 and "FINOPS_KEY_ENCRYPTION_KEY_FILE" in refused.stderr
    assert "Traceback" not in refused.stderr and _writes(sandbox) == 0

    applied = finops("a", "apply", "--auto-approve", "--format", "json")
    assert applied.returncode == 0, applied.stderr[-2000:]
    location = StateLocation(tmp_path / "unused.db", url=pg_url)
    kek = load_kek(kek_path)
    sealed = vault(location, kek, tmp_path / "probe")
    try:
        agents = [agent for agent, slot in sealed.entries() if slot == MAIN]
        declared = sorted(a.agent_id for a in load_manifests(CANONICAL).agents() if a.keys.manage)
        assert agents == declared and "res-01" in agents
        keys = {agent: sealed.load(agent) or "" for agent in agents}
    finally:
        sealed.close()
    target_dir = next((machines["a"] / ".finops" / "secrets").iterdir())  # the default sink's copies
    assert (target_dir / "res-01.key").read_text() == keys["res-01"] + "\n"

    # A CI runner's plan needs no key-encryption key.
    plan = finops("b", "plan", "--detailed-exitcode", kek=False)
    assert plan.returncode in (0, 2) and "FINOPS_KEY_ENCRYPTION_KEY_FILE" not in plan.stderr, plan.stderr[-2000:]

    # Machine B, with only the shared state and the KEK, rotates a key machine A registered.
    rotated = finops("b", "rotate", "--now", "--agent", "res-01", "--format", "json")
    assert rotated.returncode == 0, rotated.stderr[-2000:]
    [outcome] = json.loads(rotated.stdout)["rotated"]
    sealed = vault(location, kek, tmp_path / "probe")
    try:
        new = sealed.load("res-01") or ""
    finally:
        sealed.close()
    assert new and new != keys["res-01"] and f"sha3:{key_prefix(new)}" in json.dumps(outcome)
    b_dir = machines["b"] / ".finops" / "secrets" / target_dir.name
    assert (b_dir / "res-01.key").read_text() == new + "\n"
    status = httpx.get(
        f"{sandbox.url}/v1/billing/wallets/res-01/balance", headers={"Authorization": f"Bearer {new}"}
    ).status_code
    assert status == 200

    # And machine A takes it back: it holds nothing in memory or on disk that B changed.
    back = finops("a", "rotate", "--now", "--agent", "res-01")
    assert back.returncode == 0, back.stderr[-2000:]
    report = finops("a", "status", "--format", "json")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "NO WORKING KEY" not in report.stdout

    # A wrong key-encryption key on a third machine: a clear error naming both ids.
    wrong = kek_file(tmp_path / "wrong")
    mistaken = run_cli(machines["b"], "rotate", "--now", *shared, env=_cli_env(sandbox, wrong))
    outputs.extend([mistaken.stdout, mistaken.stderr])
    assert mistaken.returncode == 1 and kek.id in mistaken.stderr and load_kek(wrong).id in mistaken.stderr

    for text in outputs:
        assert not contains_key_material(text), text[-500:]
    assert_no_plaintext(all_rows(location), [*keys.values(), new])


def test_cli_generate_kek_import_dir_and_rewrap(sandbox: SandboxServer, tmp_path: Path) -> None:
    """On SQLite: keys registered in the directory store are moved into the database store,
    used there, and re-wrapped under a new key-encryption key, all through the CLI."""
    work = tmp_path / "w"
    shutil.copytree(CANONICAL, work / "manifests")
    outputs: list[str] = []

    def finops(*args: str, kek: Path | None = None, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
        result = run_cli(work, *args, env=_cli_env(sandbox, kek), umask=umask)
        outputs.extend([result.stdout, result.stderr])
        return result

    made = finops("keys", "generate-kek", "keks/old", umask=0o000)
    old_path = work / "keks" / "old"
    assert made.returncode == 0, made.stderr
    assert oct(old_path.stat().st_mode & 0o777) == oct(0o600) and oct(old_path.parent.stat().st_mode & 0o777) == oct(
        0o700
    )
    old = load_kek(old_path)
    assert old.id in made.stdout and old_path.read_text().strip() not in made.stdout + made.stderr
    again = finops("keys", "generate-kek", "keks/old")
    assert again.returncode == 1 and "already exists" in again.stderr and load_kek(old_path).id == old.id

    assert finops("apply", "--auto-approve").returncode == 0  # the directory store (SQLite's default)
    [secrets] = list((work / ".finops" / "secrets").iterdir())
    before = (secrets / "res-01.key").read_text().strip()

    unmoved = finops("rotate", "--now", "--agent", "res-01", "--key-store", "database", kek=old_path)
    assert unmoved.returncode == 1 and "import-dir" in unmoved.stderr

    moved = finops("keys", "import-dir", kek=old_path)
    assert moved.returncode == 0, moved.stderr
    declared = [a.agent_id for a in load_manifests(CANONICAL).agents() if a.keys.manage]
    assert f"Imported {len(declared)} key(s)" in moved.stdout
    assert "Imported 0 key(s)" in finops("keys", "import-dir", kek=old_path).stdout  # idempotent

    rotated = finops("rotate", "--now", "--agent", "res-01", "--key-store", "database", kek=old_path)
    assert rotated.returncode == 0, rotated.stderr
    after = (secrets / "res-01.key").read_text().strip()  # the default sink's copy
    assert after != before
    location = StateLocation(next((work / ".finops").glob("state-*.db")))
    sealed = vault(location, old, secrets)
    assert sealed.load("res-01") == after
    sealed.close()

    assert finops("keys", "generate-kek", "keks/new").returncode == 0
    new_path = work / "keks" / "new"
    rewrapped = finops("keys", "rewrap", "--new-key-file", str(new_path), kek=old_path)
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert f"Re-wrapped {len(declared)} sealed key(s) from {old.id} to {load_kek(new_path).id}" in rewrapped.stdout
    rerun = finops("keys", "rewrap", "--new-key-file", str(new_path), kek=old_path)
    assert rerun.returncode == 0 and "Re-wrapped 0 sealed key(s)" in rerun.stdout

    stale = finops("rotate", "--now", "--agent", "res-01", "--key-store", "database", kek=old_path)
    assert stale.returncode == 1 and old.id in stale.stderr and load_kek(new_path).id in stale.stderr
    fresh = finops("rotate", "--now", "--agent", "res-01", "--key-store", "database", kek=new_path)
    assert fresh.returncode == 0, fresh.stderr

    # Back to the directory store (a new directory): every key comes back and is usable there.
    exported = finops("keys", "export-dir", "--to", str(work / "back"), kek=new_path)
    assert exported.returncode == 0, exported.stderr
    assert f"Exported {len(declared)} key(s)" in exported.stdout
    latest = (work / "back" / "res-01.key").read_text().strip()
    back = finops("rotate", "--now", "--agent", "res-01", "--key-store", "directory", "--secrets-dir", "back")
    assert back.returncode == 0, back.stderr
    assert (work / "back" / "res-01.key").read_text().strip() != latest

    for text in outputs:
        assert not contains_key_material(text), text[-500:]
    assert_no_plaintext(all_rows(location), [before, after])


def test_the_daemon_registers_into_the_database_store(pg_url: str, sandbox: SandboxServer, tmp_path: Path) -> None:
    """``finops run --once`` with shared state: the reconcile pass seals each new agent's key
    and the rotation job (which reuses the daemon's key store) runs on it."""
    work = tmp_path / "w"
    shutil.copytree(CANONICAL, work / "manifests")
    kek_path = kek_file(tmp_path / "kek")
    ran = run_cli(work, "run", "--once", "manifests", "--state-url", pg_url, env=_cli_env(sandbox, kek_path))
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "rotation finished: 0 rotated, 0 failed" in ran.stdout + ran.stderr
    assert not contains_key_material(ran.stdout + ran.stderr)
    sealed = vault(StateLocation(tmp_path / "unused.db", url=pg_url), load_kek(kek_path), tmp_path / "probe")
    try:
        declared = sorted(a.agent_id for a in load_manifests(CANONICAL).agents() if a.keys.manage)
        assert [agent for agent, slot in sealed.entries() if slot == MAIN] == declared
        for agent in declared:
            raw = sealed.load(agent) or ""
            answer = httpx.get(
                f"{sandbox.url}/v1/billing/wallets/{agent}/balance", headers={"Authorization": f"Bearer {raw}"}
            )
            assert answer.status_code == 200
    finally:
        sealed.close()
