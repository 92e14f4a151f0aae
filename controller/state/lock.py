"""One writer at a time, on every machine that shares the state: the writer lock.

Two writers against one gateway would plan from the same observation and both act on it
(two top-ups, two registrations racing for one key). ``finops run``, ``apply``,
``rebalance``, ``rotate``, ``keys import`` and ``unfreeze`` hold this lock while they
write; ``finops freeze`` deliberately never waits for it.

- **SQLite state** (one machine): an advisory ``flock`` on ``<state_dir>/finops.lock``
  (``controller.daemon.lock``); the kernel drops it when the holder dies.
- **PostgreSQL state** (many machines): a session-level PostgreSQL advisory lock
  (``pg_advisory_lock``) on a connection of its own. PostgreSQL releases it when that
  session ends: the holder exits, is SIGKILLed, or its connection dies (the lock's session
  sets the server's TCP keepalives so that a vanished holder is noticed within about 11 s).

A holder can *lose* the PostgreSQL lock while it runs (its connection dropped, an operator
terminated the session). So the lock is also a **fence**: :meth:`WriterLock.check` proves,
by a round trip on the lock's own session, that this process still holds it, and the
gateway client calls it before every write request (``GatewayClient(fence=...)``). A
replica that lost the lock makes no further gateway write; the window between the check and
the request reaching the gateway is microseconds, against the seconds PostgreSQL needs to
hand the lock to another session.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from controller.errors import FinopsError
from controller.state.db import CONNECT_TIMEOUT_S, LOCK_NAMESPACE, LOCK_WRITER, StateUnavailable, _pg_errors
from controller.state.flock import WriterLocked
from controller.state.flock import writer_lock as _flock
from controller.state.location import StateLocation

CHECK_TIMEOUT_S = 5
"""A fence check that gets no answer within this counts as the lock lost."""
POLL_S = 0.5
DAEMON_PURPOSE = "finops run"


class Fenced(FinopsError):
    """This process no longer holds the writer lock: it must make no further gateway write."""


class WriterLock:
    """A held writer lock. ``check()`` raises :class:`Fenced` once it is no longer held."""

    backend = "flock"

    def __init__(self, purpose: str, where: str) -> None:
        self.purpose = purpose
        self.where = where

    def held(self) -> bool:
        return True  # a flock is held until this process closes it or dies

    def mark_lost(self) -> None:
        """Treat the lock as lost from now on (a check that got no answer in time)."""

    def check(self) -> None:
        if not self.held():
            raise Fenced(
                f"{self.purpose}: the writer lock on {self.where} was lost (state database connection gone or "
                "session terminated); another finops may be writing now: no further gateway write from this one"
            )

    def release(self) -> None:
        """Give the lock up (idempotent)."""


class _PgWriterLock(WriterLock):
    backend = "postgresql"

    def __init__(self, purpose: str, location: StateLocation, conn: Any) -> None:
        super().__init__(purpose, str(location))
        self._conn = conn
        self._lock = threading.Lock()
        self._lost = False

    def held(self) -> bool:
        """A round trip on the lock's own session: still alive and still holding it."""
        if self._lost:  # once lost, never held again; no need to wait behind a hung check
            return False
        with self._lock:
            if self._lost or self._conn.closed:
                self._lost = True
                return False
            try:
                row = self._conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s "
                    "AND objsubid = 2 AND pid = pg_backend_pid() AND granted",
                    (LOCK_NAMESPACE, LOCK_WRITER),
                ).fetchone()
            except Exception:  # any failure on the lock's session: not provably held
                self._lost = True
                return False
            if not row or int(row[0]) < 1:
                self._lost = True
            return not self._lost

    def mark_lost(self) -> None:
        self._lost = True

    def release(self) -> None:
        with self._lock:
            self._lost = True
            with contextlib.suppress(Exception):  # already gone is released too
                self._conn.close()  # ending the session releases the advisory lock


def _application_name(purpose: str) -> str:
    """Who holds the lock, as ``pg_stat_activity`` shows it to a waiting finops."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "?"
    return f"finops-writer: {purpose} pid {os.getpid()} on {socket.gethostname()} ({user})"[:63]


def _pg_connect(location: StateLocation, purpose: str) -> Any:
    import psycopg

    assert location.url is not None
    with _pg_errors(location):
        return psycopg.connect(
            location.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=_application_name(purpose),
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            # A send that gets no TCP acknowledgement fails instead of hanging for minutes.
            tcp_user_timeout=2 * CHECK_TIMEOUT_S * 1000,
            # The server's side of the session: a vanished client (network partition) is
            # noticed within about 11 s, and its lock released for a standby to take. Safe
            # however short: a holder that cannot reach the server fails its next check.
            options=f"-c statement_timeout={CHECK_TIMEOUT_S * 1000} -c idle_session_timeout=0 "
            "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3",
        )


def _holder(conn: Any) -> str:
    row = conn.execute(
        "SELECT a.application_name, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted",
        (LOCK_NAMESPACE, LOCK_WRITER),
    ).fetchone()
    if row is None:
        return "another finops"
    name, addr = row
    return f"{name or 'another finops'}" + (f" from {addr}" if addr else "")


def try_writer_lock(location: StateLocation, *, purpose: str) -> WriterLock | None:
    """The PostgreSQL writer lock if it is free now, else ``None`` (a standby's poll)."""
    conn = _pg_connect(location, purpose)
    try:
        with _pg_errors(location):
            got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, LOCK_WRITER)).fetchone()[0]
    except BaseException:
        conn.close()
        raise
    if not got:
        conn.close()
        return None
    return _PgWriterLock(purpose, location, conn)


def holder(location: StateLocation) -> str | None:
    """Who holds the PostgreSQL writer lock now (``None``: nobody)."""
    conn = _pg_connect(location, "finops status")
    try:
        with _pg_errors(location):
            found = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s "
                "AND objsubid = 2 AND granted",
                (LOCK_NAMESPACE, LOCK_WRITER),
            ).fetchone()[0]
            return _holder(conn) if found else None
    finally:
        conn.close()


@contextmanager
def writer_lock(
    location: StateLocation,
    state_dir: Path,
    *,
    purpose: str,
    wait: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[WriterLock]:
    """Hold the writer lock for the ``with`` block.

    SQLite: the ``flock`` (fails at once when held). PostgreSQL: the advisory lock; when
    another finops holds it, wait up to ``wait`` seconds (``on_wait`` is told once who
    holds it), then raise :class:`WriterLocked` naming the holder. The caller observes and
    plans *after* this returns, so a second ``apply`` acts on what the first one left.
    """
    if location.url is None:
        with _flock(state_dir, purpose=purpose) as path:
            yield WriterLock(purpose, str(path))
        return
    deadline = clock() + max(wait, 0.0)
    told = False
    while True:
        lock = try_writer_lock(location, purpose=purpose)
        if lock is not None:
            break
        try:
            who = holder(location) or "another finops"
        except StateUnavailable:
            who = "another finops"
        if clock() >= deadline or DAEMON_PURPOSE in who:  # a daemon holds it for good: never wait
            raise WriterLocked(
                f"the writer lock on {location} is held by {who}; only one daemon or apply writes at a time. "
                + (f"Waited {wait:g} s. " if wait > 0 else "")
                + "Stop it, wait for it to finish, or pass --lock-timeout SECONDS to wait.",
                None,
            )
        if not told and on_wait is not None:
            on_wait(f"waiting for the writer lock held by {who} (up to {wait:g} s)")
            told = True
        sleep(POLL_S)
    try:
        yield lock
    finally:
        lock.release()
