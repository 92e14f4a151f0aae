"""Copy finops' whole state from one database to another (``finops state migrate``): the
embedded SQLite file to a shared PostgreSQL database, or back (a backup, or leaving
PostgreSQL), or SQLite to SQLite.

Everything or nothing: every table is copied inside ONE transaction on the target, from a
consistent snapshot of the source (``BEGIN IMMEDIATE`` on SQLite: no other writer while it
is read; ``REPEATABLE READ`` on PostgreSQL). Before the commit each table is read back from
the target and compared with what was read from the source: row count and an
order-independent digest of every row (values normalised across backends). A difference
rolls the whole copy back. PostgreSQL's sequences (``BIGSERIAL`` ids and the ``rowid``
columns it gets for ``revisions`` and ``revision_bundles``) are moved past the copied
maximum, so the next insert does not collide with a copied row.

A target with rows in any finops table is refused unless ``force`` (its rows are then
replaced, in the same transaction). Both databases must be at this finops' schema version
(``connect`` brings an older one forward; a newer one is refused there).

Memory stays bounded: rows are streamed in batches, never a whole table at once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from controller.errors import ConfigError, FinopsError
from controller.state.db import SCHEMA_VERSION, Database
from controller.state.location import POSTGRESQL, SQLITE

BATCH_ROWS = 500
"""Rows read and written per batch (bounds memory for any table size)."""

NOT_COPIED = frozenset({"schema_version"})
"""Each database keeps its own: both are at :data:`SCHEMA_VERSION` before rows are copied."""

ROWID_ORDERED = frozenset({"revisions", "revision_bundles"})
"""Tables whose readers break ties by ``rowid`` (SQLite's implicit one; a ``BIGSERIAL``
column on PostgreSQL, ``controller.state.db._baseline``): it is copied with the rows."""

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_DIGEST_MOD = 1 << 256


class TargetNotEmpty(ConfigError):
    """The target already holds finops state; replacing it needs ``--force``."""

    def __init__(self, message: str, rows: dict[str, int]) -> None:
        super().__init__(message)
        self.rows = rows


class CopyMismatch(FinopsError):
    """What was read back from the target differs from the source: nothing was committed."""

    def __init__(self, message: str, report: MigrationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class TableCopy:
    table: str
    source_rows: int
    target_rows: int
    source_digest: str
    target_digest: str
    replaced_rows: int = 0
    """Rows the target had before (``force``), deleted in the same transaction."""

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_digest == self.target_digest

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "source_digest": self.source_digest,
            "target_digest": self.target_digest,
            "replaced_rows": self.replaced_rows,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class MigrationReport:
    source: str
    """Where the state was read (a path, or a URL with its password redacted)."""
    target: str
    schema_version: int
    tables: tuple[TableCopy, ...]
    sequences: tuple[str, ...] = ()
    """PostgreSQL sequences moved past the copied rows (``table.column``)."""
    committed: bool = False

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    @property
    def rows(self) -> int:
        return sum(t.source_rows for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "schema_version": self.schema_version,
            "ok": self.ok,
            "committed": self.committed,
            "rows": self.rows,
            "tables": [t.to_dict() for t in self.tables],
            "sequences": list(self.sequences),
        }


# -- row digests (pure) ---------------------------------------------------------------


def canonical_value(value: Any) -> str:
    """One spelling per value whatever the backend returned it as: SQLite and psycopg agree
    on ``int``/``float``/``str``/``None``; a blob is ``bytes`` on one and may be a
    ``memoryview`` on the other. A float keeps its exact ``repr`` (a copy that rounded it,
    or turned 1.5 into 2 in an integer column, is a difference)."""
    if value is None:
        return "n"
    if isinstance(value, bool):
        return f"i{int(value)}"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, float):
        return f"f{value!r}"
    if isinstance(value, Decimal):
        return f"d{value}"
    if isinstance(value, str):
        return f"s{value}"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"b{bytes(value).hex()}"
    raise TypeError(f"unexpected value of type {type(value).__name__} in the state database")


def row_hash(columns: Sequence[str], row: Sequence[Any]) -> int:
    body = json.dumps([[c, canonical_value(v)] for c, v in sorted(zip(columns, row, strict=True))])
    return int.from_bytes(hashlib.sha256(body.encode()).digest(), "big")


class TableDigest:
    """Row count and an order-independent digest of a table's rows (a sum of per-row
    SHA-256 values modulo 2**256): the two backends return rows in different orders (their
    text collations differ), a multiset of rows is what must be equal."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.rows = 0
        self._sum = 0

    def add(self, row: Sequence[Any]) -> None:
        self.rows += 1
        self._sum = (self._sum + row_hash(self.columns, row)) % _DIGEST_MOD

    @property
    def hexdigest(self) -> str:
        return f"{self._sum:064x}"[:16]


# -- the copy ---------------------------------------------------------------------------


def _ident(name: str, where: object) -> str:
    if not _IDENT.match(name):
        raise ConfigError(f"{where}: unexpected table or column name {name!r}; refusing to copy it")
    return name


def _columns(db: Database, table: str) -> list[str]:
    columns = set(db.columns(table))
    if table in ROWID_ORDERED and db.dialect == SQLITE:
        columns.add("rowid")  # the implicit one: selectable and insertable by name
    return sorted(_ident(c, db.location) for c in columns)


def finops_tables(db: Database) -> list[str]:
    return [_ident(t, db.location) for t in db.tables() if t not in NOT_COPIED]


def row_counts(db: Database, tables: Iterable[str]) -> dict[str, int]:
    return {t: int(db.execute(f"SELECT COUNT(*) FROM {_ident(t, db.location)}").fetchone()[0]) for t in tables}


def stored_version(db: Database) -> int:
    if not db.table_exists("schema_version"):
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


@contextmanager
def _snapshot(db: Database) -> Iterator[None]:
    """A consistent read of the whole source: SQLite's ``BEGIN IMMEDIATE`` also keeps every
    other writer out (they wait on the busy timeout); PostgreSQL reads one snapshot."""
    with db.transaction(snapshot=True):
        yield


def _reset_sequences(db: Database, tables: Iterable[str]) -> list[str]:
    moved: list[str] = []
    for table in tables:
        rows = db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ? AND column_default LIKE 'nextval(%' ORDER BY column_name",
            (table,),
        ).fetchall()
        for (column,) in rows:
            column = _ident(str(column), db.location)
            db.execute(
                f"SELECT setval(pg_get_serial_sequence(?, ?), COALESCE(MAX({column}), 0) + 1, false) FROM {table}",
                (table, column),
            )
            moved.append(f"{table}.{column}")
    return moved


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _batches(rows: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def copy_state(source: Database, target: Database, *, force: bool = False, batch: int = BATCH_ROWS) -> MigrationReport:
    """Copy every finops table of ``source`` into ``target`` (module doc). Raises
    :class:`TargetNotEmpty` (nothing written) or :class:`CopyMismatch` (rolled back)."""
    for db, role in ((source, "source"), (target, "target")):
        version = stored_version(db)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"the {role} {db.location} is at schema version {version}, this finops at {SCHEMA_VERSION}: "
                "run this finops against it once (any command brings an older one forward), or use the finops "
                "that wrote it"
            )
    tables = finops_tables(source)
    target_tables = set(finops_tables(target))
    unknown = [t for t in tables if t not in target_tables]
    if unknown:
        raise ConfigError(
            f"the source {source.location} has table(s) the target's schema lacks: {', '.join(unknown)}; "
            "nothing was copied"
        )
    columns: dict[str, list[str]] = {}
    for table in tables:
        have, want = _columns(source, table), _columns(target, table)
        if have != want:
            raise ConfigError(f"table {table}: the source has columns {have}, the target {want}; nothing was copied")
        columns[table] = have

    copies: list[TableCopy] = []
    with ExitStack() as stack:
        stack.enter_context(_snapshot(source))
        stack.enter_context(target.transaction())
        every = sorted(target_tables)
        if target.dialect == POSTGRESQL and every:
            # No other session writes to the target until the copy commits (reads go on).
            target.execute(f"LOCK TABLE {', '.join(every)} IN EXCLUSIVE MODE")
        existing = {t: n for t, n in row_counts(target, every).items() if n}
        if existing and not force:
            listed = ", ".join(f"{t} ({n})" for t, n in sorted(existing.items()))
            raise TargetNotEmpty(
                f"the target {target.location} already holds finops state: {listed}; nothing was copied. "
                "Pass --force to replace it (its rows are deleted in the same transaction as the copy)",
                existing,
            )
        for table in every:
            if existing.get(table):
                target.execute(f"DELETE FROM {table}")
        for table in tables:
            cols = columns[table]
            read = TableDigest(cols)
            rows = source.stream(f"SELECT {', '.join(cols)} FROM {table}", size=batch)
            for chunk in _batches(rows, batch):
                for row in chunk:
                    read.add(row)
                target.executemany(_insert_sql(table, cols), chunk)
            back = TableDigest(cols)
            for row in target.stream(f"SELECT {', '.join(cols)} FROM {table}", size=batch):
                back.add(row)
            copies.append(
                TableCopy(table, read.rows, back.rows, read.hexdigest, back.hexdigest, existing.get(table, 0))
            )
        report = MigrationReport(str(source.location), str(target.location), SCHEMA_VERSION, tuple(copies))
        if not report.ok:
            bad = ", ".join(
                f"{t.table} ({t.source_rows} read, {t.target_rows} written)" for t in report.tables if not t.ok
            )
            raise CopyMismatch(f"the copy differs from the source in {bad}; rolled back, nothing was changed", report)
        sequences = _reset_sequences(target, tables) if target.dialect == POSTGRESQL else []
    return MigrationReport(
        report.source, report.target, SCHEMA_VERSION, report.tables, tuple(sequences), committed=True
    )
