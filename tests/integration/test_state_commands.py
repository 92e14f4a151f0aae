"""``finops state show`` and ``finops state migrate``, as a user runs them: the real CLI in a
subprocess, the embedded sandbox, a real PostgreSQL server (``pg_url``: a fresh database per
test)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from controller.alerting.store import AlertStore
from controller.daemon.lock import writer_lock
from controller.daemon.replicas import ReplicaIdentity, ReplicaRegistry, Role
from controller.daemon.revisions import RevisionLog
from controller.keys.envelope import KeyEncryptionKey
from controller.keys.sealed import SealedVault
from controller.keys.store import KeyLedger
from controller.state import SCHEMA_VERSION, Adjustment, ManagedWebhook, StateStore
from controller.state.db import LOCK_NAMESPACE, LOCK_WRITER, connect
from controller.state.location import StateLocation
from controller.state.transfer import finops_tables, row_counts
from policies.alerts import SlotKey, SlotState
from policies.escalation import Escalation, LadderDecision
from policies.exposure import Exposure, review
from policies.keyprint import API_KEY_PATTERN
from policies.spec import SecretRef
from tests.integration.conftest import CANONICAL, run_cli

FAKE_KEY = "a2a_free_000000000000000000000000"
"""Shaped like a key (the suite-wide scan allows this one): never printed, wherever it hides."""
TOKEN = "tok3n-SECRET-value"
PASSWORD = "pw-s3cret-Zq9"


def finops(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(cwd, *args)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    return tmp_path


def sqlite_state(workdir: Path) -> StateLocation:
    return StateLocation(workdir / ".finops" / "state-sandbox.db")


def pg_state(workdir: Path, url: str) -> StateLocation:
    return StateLocation(workdir / ".finops" / "state-sandbox.db", url=url)


def with_password(url: str) -> str:
    """The same database, with a password in the URL (the test server trusts local users, so
    libpq never sends it: it exists only to be leaked)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{host}"


def fill_every_table(location: StateLocation) -> None:
    """Rows in the tables an apply leaves empty (alerts, revisions, bundles, orphans, …),
    some carrying secrets in the places secrets end up."""
    store = StateStore(location)
    ledger = KeyLedger(location)
    alerts = AlertStore(location)
    revisions = RevisionLog(location)
    try:
        store.record_webhook(
            ManagedWebhook("whk-extra", "cls-01", "research", f"https://u:{TOKEN}@hooks.example.com/x?token={TOKEN}")
        )
        store.begin_intent("deposit:cls-01:manual", "deposit", "cls-01", {"amount": "5.00", "fleet": "research"})
        store.replace_adjustments(
            "research", [Adjustment("res-01", "research", Decimal("-1.25"), f"idle; {FAKE_KEY}", 1.0)]
        )
        nothing = Exposure.from_dict({"fleets": []})
        store.record_pending("deadbeefcafe", "git", nothing, review(None, nothing))
        for n in range(3):
            store.store_bundle(f"rev{n}", {"fleet.yaml": b"kind: Fleet\n\x00\xff"})
        ledger.record_orphans("res-01", ["0badc0de"], f"late rotate {FAKE_KEY}")
        ledger.record_rotation_sent("res-01", "1f40a323")
        ledger.watch_late("res-01", "rotate:res-01:1", {"1f40a323"}, until=2e9)
        revisions.record_applied("r1", "git", ok=True, changes=3)
        revisions.record_invalid("r2", "git", [f"bad url https://x.example.com/?token={TOKEN}"])
        with ReplicaRegistry(location, ReplicaIdentity("host/1/abcd", "host", 1)) as replicas:
            replicas.heartbeat(Role.STANDBY, detail="waiting")
        sealed = SealedVault(
            location, KeyEncryptionKey(bytes(range(32)), "test"), sink_directory=location.file.parent, check=False
        )
        try:
            sealed.write("res-01", FAKE_KEY)  # ciphertext only: never shown, copied as it is
        finally:
            sealed.close()
        with alerts.decide(1_000.0) as tx:
            tx.save_slots({SlotKey("res-01", "daily", 80): SlotState(True, 1, "al-1", 1_000.0)}, [])
            row = tx.enqueue(
                alert_id="al-1",
                agent_id="res-01",
                event_type="budget.threshold",
                route="https://pager.example.com/finops/research?agent=…",
                url=f"https://pager.example.com/finops/research?agent=res-01&token={TOKEN}",
                allow_insecure=False,
                secret=SecretRef(env="FINOPS_ALERT_SECRET"),
                body=b'{"alert": 1}',
            )
            tx.record_escalations(
                LadderDecision(
                    started=(
                        Escalation(
                            "al-1", "res-01", "daily", 80, "pause", "auto", "released", "auto: 80 % of daily cap",
                            1_000.0, Decimal("24.00"), executed_at=1_000.5, released_at=1_001.0,
                        ),
                    )
                )
            )  # fmt: skip
        assert row is not None
        pending = alerts.pending()[0]
        alerts.record_attempt(pending, "https://pager.example.com/…", 1_001.0, ok=False, code=503, error="503")
    finally:
        for repo in (store, ledger, alerts, revisions):
            repo.close()


def remembered(location: StateLocation) -> dict[str, Any]:
    """Everything finops reads back through its repositories, as comparable values."""
    store = StateStore(location)
    ledger = KeyLedger(location)
    alerts = AlertStore(location)
    revisions = RevisionLog(location)
    db = connect(location)
    try:
        return {
            "intents": store.intents(),
            "budget_writes": store.budget_writes(),
            "holds": store.holds(),
            "webhooks": store.managed_webhooks(),
            "adjustments": store.adjustments(),
            "funding": store.funding_events(),
            "approvals": store.approvals(100),
            "waiting": store.pending_revisions(),
            "bundles": [store.bundle(f"rev{n}") for n in range(3)],
            "keys": store.key_prefixes(),
            "held": ledger.held(),
            "orphans": ledger.orphans(),
            "late": ledger.late_watches(),
            "slots": alerts.slots(),
            "escalations": store.escalations(),
            "pending_alerts": alerts.pending(),
            "delivery_log": alerts.log(),
            "revisions": revisions.history(100),
            "counts": row_counts(db, finops_tables(db)),
        }
    finally:
        for repo in (store, ledger, alerts, revisions, db):
            repo.close()


@pytest.fixture
def applied(workdir: Path) -> Path:
    """A converged fleet on the embedded sandbox, one agent frozen, SQLite state with rows in
    every table."""
    assert (r := finops(workdir, "apply", "--auto-approve")).returncode == 0, r.stdout + r.stderr
    assert (r := finops(workdir, "freeze", "res-02", "--reason", "incident 7")).returncode == 0, r.stdout + r.stderr
    assert (r := finops(workdir, "plan", "--detailed-exitcode")).returncode == 0, r.stdout + r.stderr
    fill_every_table(sqlite_state(workdir))
    return workdir


def assert_clean(text: str, *secrets: str) -> None:
    assert not [m.group(0) for m in API_KEY_PATTERN.finditer(text)], text
    for secret in (FAKE_KEY, TOKEN, PASSWORD, *secrets):
        assert secret not in text


def test_migrate_to_postgresql_loses_nothing(applied: Path, pg_url: str) -> None:
    workdir = applied
    # The negative control: the same gateway with an empty shared state is not converged
    # (finops would not know res-02 is frozen).
    empty = finops(workdir, "plan", "--state-url", pg_url, "--detailed-exitcode")
    assert empty.returncode == 2, empty.stdout + empty.stderr
    with psycopg.connect(pg_url, autocommit=True) as conn:  # that plan created the schema, wrote nothing
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")

    before = remembered(sqlite_state(workdir))
    assert all(before["counts"].values()), before["counts"]  # every table has rows to lose

    done = finops(workdir, "state", "migrate", "--to", with_password(pg_url))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_clean(done.stdout + done.stderr)
    for table, rows in before["counts"].items():
        assert re.search(rf"^\s+{table}\s+{rows}\s+{rows}\s+0\s+[0-9a-f]{{16}}\s+ok$", done.stdout, re.M), table
    assert "copied and verified" in done.stdout

    after = remembered(pg_state(workdir, pg_url))
    assert after == before
    converged = finops(workdir, "plan", "--state-url", pg_url, "--detailed-exitcode")
    assert converged.returncode == 0, converged.stdout + converged.stderr
    assert "No changes" in converged.stdout

    # Sequences were moved past the copied ids: new rows get fresh ones.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        top = conn.execute("SELECT MAX(id) FROM alert_delivery_log").fetchone()
        new = conn.execute(
            "INSERT INTO alert_delivery_log (outbox_id, alert_id, agent_id, route, url, attempted_at, ok) "
            "VALUES (1, 'x', 'a', 'r', 'u', 1.0, 1) RETURNING id"
        ).fetchone()
        assert top is not None and new is not None and new[0] == top[0] + 1
        conn.execute("INSERT INTO revisions (revision, source, status, first_seen, last_seen) VALUES ('n','g','a',1,1)")
        assert conn.execute("SELECT COUNT(DISTINCT rowid) FROM revisions").fetchone() == (3,)


def test_non_empty_target_is_refused_without_force(applied: Path, pg_url: str) -> None:
    workdir = applied
    assert finops(workdir, "state", "migrate", "--to", pg_url).returncode == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO holds (agent_id, reason, held_at) VALUES ('stray', 'only in the target', 1)")
    before = remembered(pg_state(workdir, pg_url))

    refused = finops(workdir, "state", "migrate", "--to", pg_url)
    assert refused.returncode == 1
    assert "already holds finops state" in refused.stderr and "--force" in refused.stderr
    assert remembered(pg_state(workdir, pg_url)) == before  # nothing written

    forced = finops(workdir, "state", "migrate", "--to", pg_url, "--force", "--format", "json")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    report = json.loads(forced.stdout)
    holds = next(t for t in report["tables"] if t["table"] == "holds")
    assert holds["replaced_rows"] == 2 and holds["target_rows"] == 1 and holds["ok"]
    assert report["committed"] and report["ok"]
    assert remembered(pg_state(workdir, pg_url)) == remembered(sqlite_state(workdir))


def test_round_trip_back_to_sqlite_keeps_rows_and_rowid_order(applied: Path, pg_url: str) -> None:
    workdir = applied
    assert finops(workdir, "state", "migrate", "--to", pg_url).returncode == 0
    backup = workdir / "backup" / "state-sandbox.db"
    back = finops(workdir, "state", "migrate", "--state-url", pg_url, "--to", f"sqlite://{backup}")
    assert back.returncode == 0, back.stdout + back.stderr
    assert remembered(StateLocation(backup)) == remembered(sqlite_state(workdir))
    assert oct(backup.stat().st_mode & 0o777) == "0o600"

    def rowids(path: Path) -> list[tuple[str, int]]:
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT revision, rowid FROM revision_bundles ORDER BY revision").fetchall()

    assert rowids(backup) == rowids(sqlite_state(workdir).file)
    # A plain path works as well, and a second copy into the now non-empty backup is refused.
    again = finops(workdir, "state", "migrate", "--from", str(backup), "--to", str(backup.with_name("b2.db")))
    assert again.returncode == 0, again.stderr
    assert finops(workdir, "state", "migrate", "--from", pg_url, "--to", str(backup)).returncode == 1


def test_a_copy_that_changes_a_value_is_rolled_back(applied: Path, pg_url: str) -> None:
    """SQLite keeps 1.5 in an INTEGER column; PostgreSQL would round it to 2. The digest
    sees it and nothing is committed."""
    workdir = applied
    with sqlite3.connect(sqlite_state(workdir).file) as conn:
        conn.execute("UPDATE apply_log SET ok = 1.5")
    bad = finops(workdir, "state", "migrate", "--to", pg_url)
    assert bad.returncode == 1
    assert "apply_log" in bad.stderr and "rolled back" in bad.stderr
    assert re.search(r"^\s+apply_log\s+1\s+1\s+0\s+[0-9a-f]{16}\s+MISMATCH$", bad.stdout, re.M), bad.stdout
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM intents").fetchone() == (0,)


def test_refusals_before_anything_is_copied(applied: Path, pg_url: str, tmp_path: Path) -> None:
    workdir = applied
    with writer_lock(workdir / ".finops", purpose="a test daemon"):
        locked = finops(workdir, "state", "migrate", "--to", pg_url)
    assert locked.returncode == 1 and "another finops writer" in locked.stderr

    with psycopg.connect(pg_url, autocommit=True) as holder:  # a daemon on the target database
        connect(StateLocation(tmp_path / "x.db", url=pg_url)).close()
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, LOCK_WRITER))
        busy = finops(workdir, "state", "migrate", "--to", pg_url)
    assert busy.returncode == 1 and "is held by" in busy.stderr and "only one daemon or apply" in busy.stderr

    missing = finops(workdir, "state", "migrate", "--gateway", "https://gw.example.com", "--to", pg_url)
    assert missing.returncode == 1
    assert "no finops state at .finops/state-gw.example.com.db" in missing.stderr
    assert "state-sandbox.db" in missing.stderr  # the files that are there

    same = finops(workdir, "state", "migrate", "--to", str(sqlite_state(workdir).file))
    assert same.returncode == 1 and "the same state" in same.stderr

    other = finops(workdir, "state", "migrate", "--to", "mysql://h/db")
    assert other.returncode == 1 and "not a state location" in other.stderr

    device = finops(workdir, "state", "migrate", "--to", "/dev/null")
    assert device.returncode == 1 and "not a regular file" in device.stderr
    manifest = workdir / "manifests" / "research-fleet.yaml"
    manifest.chmod(0o644)
    text = manifest.read_bytes()
    wrong = finops(workdir, "state", "migrate", "--to", str(manifest))
    assert wrong.returncode == 1 and "not a SQLite database" in wrong.stderr
    assert manifest.read_bytes() == text and manifest.stat().st_mode & 0o777 == 0o644  # untouched

    with sqlite3.connect(sqlite_state(workdir).file) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    newer = finops(workdir, "state", "migrate", "--to", pg_url)
    assert newer.returncode == 1 and "newer finops" in newer.stderr
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM intents").fetchone() == (0,)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, applied: Path) -> Iterator[tuple[Path, list[str]]]:
    """The applied workdir and the options that name its state on each backend."""
    if request.param == "sqlite":
        yield applied, []
        return
    url = request.getfixturevalue("pg_url")
    assert finops(applied, "state", "migrate", "--to", url).returncode == 0
    yield applied, ["--state-url", with_password(url)]


def test_show_lists_what_is_remembered_and_no_secret(backend: tuple[Path, list[str]]) -> None:
    workdir, options = backend
    shown = finops(workdir, "state", "show", *options)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    assert_clean(out + shown.stderr)
    assert f"schema version {SCHEMA_VERSION}" in out and ("postgresql" in out if options else "sqlite" in out)
    if options:
        assert ":***@" in out  # the URL is shown, its password is not
    held = remembered(sqlite_state(workdir))["held"]
    for agent, key in held.items():  # fingerprints of the keys held
        assert re.search(rf"^\s+{agent}\s+held\s+sha3:{key.key_prefix}\s", out, re.M), agent
    assert re.search(r"^\s+pending\s+deposit\s+cls-01\s", out, re.M)  # the unresolved intent, first
    assert "1 unresolved intent(s)" in out
    assert re.search(r"^\s+res-02\s+operator\s+\S+\s+incident 7$", out, re.M)
    assert "https://hooks.example.com/x?token=…" in out  # the webhook, its token elided
    assert "<redacted API key>" in out  # the key in an orphan's detail and an adjustment's explanation
    assert "routes failing 1" in out and "outbox pending 1" in out
    assert re.search(r"^\s+research\s+deposit\s+5\s+41500\.00$", out, re.M)

    as_json = finops(workdir, "state", "show", *options, "--format", "json", "--section", "keys", "--limit", "2")
    assert as_json.returncode == 0
    doc = json.loads(as_json.stdout)
    assert list(doc["sections"]) == ["keys"]
    keys = doc["sections"]["keys"]
    assert keys["counts"]["held"] == 5 and keys["counts"]["orphans"] == 1
    assert len(keys["items"]) == 2 and keys["more"] == 4
    assert_clean(as_json.stdout + as_json.stderr)


def test_show_needs_no_gateway_and_no_key(applied: Path) -> None:
    """Pointed at an unreachable gateway with no API key: the state is still shown (only the
    gateway's name picks the file)."""
    workdir = applied
    (workdir / ".finops" / "state-gw.invalid.db").write_bytes((workdir / ".finops" / "state-sandbox.db").read_bytes())
    shown = finops(workdir, "state", "show", "--gateway", "https://gw.invalid", "--section", "holds")
    assert shown.returncode == 0, shown.stderr
    assert "state-gw.invalid.db" in shown.stdout and "incident 7" in shown.stdout


def test_a_read_only_database_role_can_show_and_back_up_the_state(applied: Path, pg_url: str) -> None:
    """Neither command writes to the state it reads: a SELECT-only role (a CI job's, a backup
    job's) can show the shared state and copy it to a file."""
    workdir = applied
    assert finops(workdir, "state", "migrate", "--to", pg_url).returncode == 0
    role = f"ro_{os.getpid()}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        read_only = re.sub(r"://[^@/]+@", f"://{role}@", pg_url)
        assert read_only != pg_url
        shown = finops(workdir, "state", "show", "--state-url", read_only)
        assert shown.returncode == 0, shown.stderr
        assert "res-02" in shown.stdout and "incident 7" in shown.stdout
        backup = workdir / "backup.db"
        copied = finops(workdir, "state", "migrate", "--state-url", read_only, "--to", str(backup))
        assert copied.returncode == 0, copied.stdout + copied.stderr
        assert remembered(StateLocation(backup)) == remembered(sqlite_state(workdir))
        denied = finops(workdir, "state", "migrate", "--from", str(backup), "--to", read_only, "--force")
        assert denied.returncode == 1 and "Traceback" not in denied.stderr  # cannot write with that role
        assert "InsufficientPrivilege" in denied.stderr and "rolled back" in denied.stderr
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
