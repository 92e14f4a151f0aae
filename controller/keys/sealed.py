"""The database key store: agents' raw keys sealed in finops' state database, so that any
machine sharing the state (a standby daemon, an operator's laptop) and holding the
key-encryption key can take over managed keys.

One row per agent and slot in ``sealed_keys`` (``controller.state.db`` migration 3): the
key encrypted under its own random data key, the data key wrapped under the KEK, the KEK's
id (never the KEK), the key's gateway prefix and when it was written
(``controller.keys.envelope`` has the cryptography). Only ciphertext leaves the process:
the raw key never reaches the database, its logs (statements carry ciphertext parameters
only) or finops' logs.

Every write is one transaction, committed before the caller moves on (the same contract as
the directory store's fsync). A store opened with rows under another KEK is refused at once
(``KekMismatch``, naming both ids), so a machine with the wrong KEK file stops before its
first gateway write instead of believing keys lost.

``rewrap_all`` re-wraps every data key under a new KEK in one transaction (``finops keys
rewrap``); ``copy_keys`` moves keys between a directory store and this one (``finops keys
import-dir`` / ``export-dir``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.errors import ConfigError
from controller.keys.envelope import (
    KEK_FILE_ENV,
    KekMismatch,
    KeyEncryptionKey,
    SealedRecord,
    rewrap,
    seal,
    unseal,
)
from controller.keys.vault import MAIN, SLOTS, KeyStore, SlotAccess, key_path
from controller.state.db import Database, connect
from controller.state.location import POSTGRESQL, StateLocation, as_location
from policies.keyprint import key_prefix

_COLUMNS = "agent_id, slot, ciphertext, nonce, wrapped_key, wrap_nonce, kek_id, key_prefix, format"
_UPSERT = (
    f"INSERT INTO sealed_keys ({_COLUMNS}, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(agent_id, slot) DO UPDATE SET ciphertext=excluded.ciphertext, nonce=excluded.nonce, "
    "wrapped_key=excluded.wrapped_key, wrap_nonce=excluded.wrap_nonce, kek_id=excluded.kek_id, "
    "key_prefix=excluded.key_prefix, format=excluded.format, updated_at=excluded.updated_at"
)


def _record(row: Any) -> SealedRecord:
    return SealedRecord(
        agent_id=row[0],
        slot=row[1],
        ciphertext=bytes(row[2]),
        nonce=bytes(row[3]),
        wrapped_key=bytes(row[4]),
        wrap_nonce=bytes(row[5]),
        kek_id=row[6],
        key_prefix=row[7],
        format=int(row[8]),
    )


def _params(record: SealedRecord, now: float) -> tuple[Any, ...]:
    return (
        record.agent_id,
        record.slot,
        record.ciphertext,
        record.nonce,
        record.wrapped_key,
        record.wrap_nonce,
        record.kek_id,
        record.key_prefix,
        record.format,
        now,
    )


def _durable(db: Database) -> None:
    """Inside a transaction: its commit waits for the WAL flush even where the server runs
    with ``synchronous_commit=off`` (a key the gateway showed once must not be lost to a
    database crash after finops moved on)."""
    if db.dialect == POSTGRESQL:
        db.execute("SET LOCAL synchronous_commit TO on")


def _checked(agent_id: str, slot: str) -> None:
    key_path(Path("."), agent_id, slot)  # the same agent-id and slot rules as the directory store


def _kek_counts(db: Database) -> dict[str, int]:
    rows = db.execute("SELECT kek_id, COUNT(*) FROM sealed_keys GROUP BY kek_id").fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def _mismatch(kek: KeyEncryptionKey, others: dict[str, int], where: object) -> KekMismatch:
    listed = ", ".join(f"{n} under {kek_id}" for kek_id, n in sorted(others.items()))
    return KekMismatch(
        f"the database key store in {where} holds keys sealed under another key-encryption key ({listed}); "
        f"{KEK_FILE_ENV} ({kek.source or 'configured'}) holds {kek.id}. Point {KEK_FILE_ENV} at the key they were "
        "sealed with, or re-wrap them with `finops keys rewrap` run with it; nothing was done"
    )


class SealedVault(SlotAccess):
    """The database key store (``KeyStore``). Thread-safe."""

    kind = "database"

    def __init__(
        self,
        location: Path | StateLocation,
        kek: KeyEncryptionKey,
        *,
        sink_directory: Path,
        clock: Callable[[], float] = time.time,
        check: bool = True,
    ) -> None:
        self.location = as_location(location)
        self._kek = kek
        self._sink_directory = Path(sink_directory)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.location)
        if check:
            try:
                self.check()
            except BaseException:
                self._db.close()
                raise

    def __repr__(self) -> str:
        return f"SealedVault({self.location}, {self._kek.id})"

    @property
    def kek_id(self) -> str:
        return self._kek.id

    def check(self) -> None:
        """Refuse a store holding keys sealed under another KEK (wrong KEK file, or a
        re-wrap this machine has not caught up with)."""
        with self._lock:
            others = {k: n for k, n in _kek_counts(self._db).items() if k != self._kek.id}
        if others:
            raise _mismatch(self._kek, others, self.location)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- KeyStore ------------------------------------------------------------------------

    def _row(self, agent_id: str, slot: str) -> SealedRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM sealed_keys WHERE agent_id=? AND slot=?", (agent_id, slot)
        ).fetchone()
        return _record(row) if row is not None else None

    def write(self, agent_id: str, raw_key: str, slot: str = MAIN) -> str:
        _checked(agent_id, slot)
        record = seal(self._kek, agent_id, slot, raw_key)
        if unseal(self._kek, record) != raw_key:  # pragma: no cover - checked, not assumed
            raise ConfigError(f"sealing {agent_id}'s key did not round-trip; nothing was stored")
        with self._lock, self._db.transaction():
            _durable(self._db)
            self._db.execute(_UPSERT, _params(record, self._clock()))
        return record.key_prefix

    def read(self, agent_id: str, slot: str = MAIN) -> str | None:
        _checked(agent_id, slot)
        with self._lock:
            record = self._row(agent_id, slot)
        return unseal(self._kek, record) if record is not None else None

    def clear(self, agent_id: str, slot: str) -> bool:
        _checked(agent_id, slot)
        with self._lock, self._db.transaction():
            cur = self._db.execute("DELETE FROM sealed_keys WHERE agent_id=? AND slot=?", (agent_id, slot))
            return cur.rowcount > 0

    def entries(self) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT agent_id, slot FROM sealed_keys ORDER BY agent_id, slot").fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def prefixes(self) -> dict[tuple[str, str], str]:
        """The gateway prefix of every key held, by ``(agent, slot)`` (no decryption)."""
        with self._lock:
            rows = self._db.execute("SELECT agent_id, slot, key_prefix FROM sealed_keys").fetchall()
        return {(str(r[0]), str(r[1])): str(r[2]) for r in rows}

    def describe(self, agent_id: str, slot: str = MAIN) -> str:
        return f"the database key store ({self.location}, {slot} slot)"

    def key_file(self, agent_id: str) -> Path | None:
        return None

    @property
    def sink_directory(self) -> Path:
        return self._sink_directory

    def unwritable(self) -> str | None:
        """A write probe (rolled back) and the KEK check: a registration's key must be
        storable before the gateway mints it."""

        class _Probe(Exception):
            pass

        try:
            self.check()
            with self._lock:
                try:
                    with self._db.transaction():
                        self._db.execute(
                            _UPSERT,
                            (".finops-probe", MAIN, b"", b"", b"", b"", self._kek.id, "", 0, self._clock()),
                        )
                        raise _Probe
                except _Probe:
                    pass
        except KekMismatch as exc:
            return str(exc)
        except Exception as exc:  # the database refused or is gone: say so, hold registrations back
            return f"finops' database key store ({self.location}) is not writable: {type(exc).__name__}: {exc}"
        return None

    # -- batches -------------------------------------------------------------------------

    def write_many(self, keys: Iterable[tuple[str, str, str]]) -> list[str]:
        """``(agent, slot, raw_key)`` items in one transaction; their prefixes."""
        records = []
        for agent_id, slot, raw in keys:
            _checked(agent_id, slot)
            record = seal(self._kek, agent_id, slot, raw)
            if unseal(self._kek, record) != raw:  # pragma: no cover
                raise ConfigError(f"sealing {agent_id}'s key did not round-trip; nothing was stored")
            records.append(record)
        now = self._clock()
        with self._lock, self._db.transaction():
            _durable(self._db)
            for record in records:
                self._db.execute(_UPSERT, _params(record, now))
        return [r.key_prefix for r in records]


@dataclass(frozen=True)
class RewrapResult:
    rewrapped: int
    already: int
    """Rows that were already under the new KEK (verified, left as they were)."""
    old_id: str
    new_id: str

    @property
    def total(self) -> int:
        return self.rewrapped + self.already


def rewrap_all(
    location: Path | StateLocation,
    old: KeyEncryptionKey,
    new: KeyEncryptionKey,
    *,
    clock: Callable[[], float] = time.time,
) -> RewrapResult:
    """Every sealed key's data key re-wrapped from ``old`` to ``new``, in one transaction,
    each record proven to decrypt under ``new`` before the commit. Rows already under
    ``new`` are verified and skipped (running it twice is harmless); a row under any other
    KEK refuses the whole run (nothing changes). Concurrent key writes wait for it."""
    if old.id == new.id:
        raise ConfigError(
            f"the new key-encryption key is the one in use ({new.id}); generate a new one with "
            "`finops keys generate-kek FILE`"
        )
    db = connect(as_location(location))
    try:
        with db.transaction():
            if db.dialect == POSTGRESQL:
                db.execute("LOCK TABLE sealed_keys IN SHARE ROW EXCLUSIVE MODE")
            _durable(db)
            rows = [_record(r) for r in db.execute(f"SELECT {_COLUMNS} FROM sealed_keys").fetchall()]
            unknown: dict[str, int] = {}
            for r in rows:
                if r.kek_id not in (old.id, new.id):
                    unknown[r.kek_id] = unknown.get(r.kek_id, 0) + 1
            if unknown:
                listed = ", ".join(f"{n} under {k}" for k, n in sorted(unknown.items()))
                raise KekMismatch(
                    f"{location}: some sealed keys are under a key-encryption key that is neither {old.id} "
                    f"({KEK_FILE_ENV}) nor the new {new.id} ({listed}); nothing was re-wrapped"
                )
            rewrapped = already = 0
            now = clock()
            for r in rows:
                if r.kek_id == new.id:
                    unseal(new, r)  # verified, not assumed
                    already += 1
                    continue
                out = rewrap(old, new, r)
                cur = db.execute(
                    "UPDATE sealed_keys SET wrapped_key=?, wrap_nonce=?, kek_id=?, updated_at=? "
                    "WHERE agent_id=? AND slot=? AND kek_id=?",
                    (out.wrapped_key, out.wrap_nonce, out.kek_id, now, r.agent_id, r.slot, old.id),
                )
                if cur.rowcount != 1:  # pragma: no cover - the table lock excludes writers
                    raise ConfigError(f"the sealed key of {r.label} changed during the re-wrap; nothing was re-wrapped")
                rewrapped += 1
    finally:
        db.close()
    return RewrapResult(rewrapped, already, old.id, new.id)


@dataclass(frozen=True)
class CopyResult:
    copied: list[tuple[str, str, str]]
    """``(agent, slot, prefix)`` written to the destination."""
    same: list[tuple[str, str, str]]
    """Already in the destination with the same key."""
    replaced: list[tuple[str, str, str]]
    """``(agent, slot, old prefix)``: the destination held another key, and finops' state
    says the source's key is the one it holds (included in ``copied`` too)."""


def copy_keys(source: KeyStore, dest: KeyStore, held: dict[str, str] | None = None) -> CopyResult:
    """Copy every key of ``source`` into ``dest`` (``finops keys import-dir`` / ``export-dir``).

    A key ``dest`` already holds is skipped. Where ``dest`` holds a *different* key for the
    same agent and slot, the source's key replaces it only when it is the key finops' state
    records as held (``held``: agent -> prefix, ``keys_held``); otherwise the whole copy is
    refused before anything is written, naming the fingerprints. Into the database store
    the copy is one transaction; into a directory, one atomic file per key."""
    todo: list[tuple[str, str, str]] = []
    same: list[tuple[str, str, str]] = []
    replaced: list[tuple[str, str, str]] = []
    conflicts: list[str] = []
    recorded = held or {}
    for agent, slot in source.entries():
        raw = source.read(agent, slot)
        if raw is None:
            continue
        prefix = key_prefix(raw)
        current = dest.read(agent, slot)
        if current is None:
            todo.append((agent, slot, raw))
        elif key_prefix(current) == prefix:
            same.append((agent, slot, prefix))
        elif recorded.get(agent) == prefix:
            todo.append((agent, slot, raw))
            replaced.append((agent, slot, key_prefix(current)))
        else:
            note = f"; finops' state records sha3:{recorded[agent]} as held" if agent in recorded else ""
            conflicts.append(f"{agent} ({slot}): copying sha3:{prefix} over sha3:{key_prefix(current)}{note}")
    if conflicts:
        raise ConfigError(
            "the two key stores hold different keys, and finops' state does not say the copied one is held, for: "
            + "; ".join(conflicts)
            + ". Nothing was copied; find the key that is live on the gateway and import it with "
            "`finops keys import AGENT` (which checks it) into the store you keep"
        )
    if isinstance(dest, SealedVault):
        prefixes = dest.write_many(todo)
    else:
        prefixes = [dest.write(agent, raw, slot) for agent, slot, raw in todo]
    return CopyResult([(a, s, p) for (a, s, _), p in zip(todo, prefixes, strict=True)], same, replaced)


__all__ = ["SLOTS", "CopyResult", "RewrapResult", "SealedVault", "copy_keys", "rewrap_all"]
