"""The pure parts of ``finops state``: row digests (what proves a copy equal), state URL
redaction, location parsing and the redaction of free text shown by ``state show``; and a
SQLite-to-SQLite copy (no server needed) with its refusals."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.cli.state import parse_location
from controller.errors import ConfigError
from controller.state import StateStore
from controller.state.db import connect
from controller.state.inventory import fingerprint, safe_text
from controller.state.location import StateLocation, redact_url
from controller.state.transfer import TableDigest, TargetNotEmpty, canonical_value, copy_state

values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
rows = st.lists(st.tuples(values, values, values), max_size=30, unique_by=lambda r: repr(r[0]))
COLUMNS = ("a", "b", "c")


def digest(table: list[tuple[object, ...]]) -> tuple[int, str]:
    d = TableDigest(COLUMNS)
    for row in table:
        d.add(row)
    return d.rows, d.hexdigest


@given(rows, st.randoms())
def test_digest_does_not_depend_on_row_order(table: list[tuple[object, ...]], rnd: object) -> None:
    shuffled = list(table)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert digest(shuffled) == digest(table)


@given(rows.filter(bool), st.data())
def test_digest_sees_a_changed_a_missing_and_a_duplicated_row(
    table: list[tuple[object, ...]], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(table) - 1))
    changed = list(table)
    cell = table[i][2]
    changed[i] = (table[i][0], table[i][1], cell + "x" if isinstance(cell, str) else "x")  # another value
    assert digest(changed)[1] != digest(table)[1]
    assert digest(table[:i] + table[i + 1 :]) != digest(table)
    assert digest([*table, table[i]]) != digest(table)


def test_values_are_canonical_across_backends_but_types_are_not_confused() -> None:
    assert (
        canonical_value(b"\x00\xff")
        == canonical_value(memoryview(b"\x00\xff"))
        == canonical_value(bytearray(b"\x00\xff"))
    )
    spellings = {canonical_value(v) for v in (2, 2.0, "2", b"2", None, "")}
    assert len(spellings) == 6  # 1.5 -> 2 in an integer column, or "2" -> 2, is a difference
    assert canonical_value(0.1 + 0.2) != canonical_value(0.3)  # floats exactly, no rounding


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~", min_size=8, max_size=30))
def test_a_state_url_never_shows_its_password(password: str) -> None:
    for url in (
        f"postgresql://finops:{password}@db.internal:5432/finops",
        f"postgresql://finops@db.internal/finops?sslmode=require&password={password}",
        f"postgres://db.internal/finops?sslpassword={password}&application_name=x",
        f"postgresql://db.internal/finops?pass%77ord={password}",
        f"postgresql://db.internal/finops#{password}",
    ):
        shown = redact_url(url)
        assert password not in shown, shown
        assert "db.internal" in shown  # still says where


def test_state_url_redaction_keeps_what_is_not_secret() -> None:
    url = "postgresql://finops@db.internal:5432/finops?sslmode=require&connect_timeout=5"
    assert redact_url(url) == url
    assert redact_url("postgresql://u:p@h/db?password=x&sslmode=verify-full") == (
        "postgresql://u:***@h/db?password=***&sslmode=verify-full"
    )


def test_locations_are_parsed_or_refused(tmp_path: Path) -> None:
    anchor = tmp_path / "state-sandbox.db"
    pg = parse_location("postgresql://h/finops", anchor)
    assert pg.url == "postgresql://h/finops" and pg.file == anchor
    assert parse_location("sqlite:///var/backups/s.db", anchor) == StateLocation(Path("/var/backups/s.db"))
    assert parse_location("backup.db", anchor) == StateLocation(Path("backup.db"))
    for bad in ("mysql://h/db", "sqlite://", "postgresql://h/"):
        with pytest.raises(ConfigError):
            parse_location(bad, anchor)


def test_free_text_is_shown_without_credentials_or_keys() -> None:
    key = "a2a_free_000000000000000000000000"
    text = safe_text(f"POST https://u:pw@hooks.example.com/a?token=abc&x=1 failed; key {key}")
    assert "pw" not in text and "abc" not in text and key not in text
    assert "https://hooks.example.com/a?token=…&x=…" in text and "<redacted API key>" in text
    assert len(safe_text("x" * 10_000)) == 200
    assert fingerprint("705a7926") == "sha3:705a7926" and fingerprint("sha3:705a7926") == "sha3:705a7926"


def test_sqlite_copy_refuses_a_non_empty_target_then_replaces_it_with_force(tmp_path: Path) -> None:
    source, target = StateLocation(tmp_path / "a.db"), StateLocation(tmp_path / "b.db")
    for where, agents in ((source, ("a", "b")), (target, ("stray",))):
        store = StateStore(where)
        for agent in agents:
            store.set_hold(agent, "why")
        store.close()
    src, dst = connect(source), connect(target)
    try:
        with pytest.raises(TargetNotEmpty) as refused:
            copy_state(src, dst)
        assert refused.value.rows == {"holds": 1}
        report = copy_state(src, dst, force=True, batch=1)  # batches of one row: the streaming path
        holds = next(t for t in report.tables if t.table == "holds")
        assert (holds.source_rows, holds.target_rows, holds.replaced_rows, holds.ok) == (2, 2, 1, True)
        assert report.committed and report.sequences == ()
    finally:
        src.close()
        dst.close()
    with sqlite3.connect(target.file) as conn:
        assert sorted(conn.execute("SELECT agent_id FROM holds").fetchall()) == [("a",), ("b",)]
