"""One writer per state directory (SQLite state): an advisory ``flock`` on
``<state_dir>/finops.lock``. With PostgreSQL state the writer lock is PostgreSQL's own
advisory lock instead (``controller.state.lock``).

Two writers against one gateway would plan from the same observation and both act on it
(two top-ups, two registrations racing for one key). The daemon and ``finops apply`` both
take this lock; a second one fails at once, naming the holder's pid, instead of queueing
behind it (a queued apply would act on a plan made before the first writer's changes).

Why ``fcntl.flock`` rather than a lock library: the kernel drops the lock when the holder
dies (even on SIGKILL or OOM), so there is no stale-lock cleanup to get wrong, and it needs
nothing beyond the standard library. Its limits are the ones any local lock has: it is per
host and per volume (NFS and some network filesystems do not honour it), and it is not
available on Windows. Across hosts, use PostgreSQL state (``controller.state.lock``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.errors import ConfigError

LOCK_NAME = "finops.lock"


class WriterLocked(ConfigError):
    """Another finops writer holds the state directory; ``holder_pid`` when it is known."""

    def __init__(self, message: str, holder_pid: int | None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


def lock_path(state_dir: Path) -> Path:
    return Path(state_dir) / LOCK_NAME


def _holder_pid(fd: int) -> int | None:
    """The pid the holder wrote; best effort (it may be mid-write or from an old holder)."""
    try:
        raw = os.pread(fd, 64, 0).decode("ascii", "replace")
    except OSError:
        return None
    first = raw.split("\n", 1)[0].strip()
    return int(first) if first.isdigit() else None


@contextmanager
def writer_lock(state_dir: Path, *, purpose: str = "finops") -> Iterator[Path]:
    """Hold the state directory's writer lock for the ``with`` block, or raise at once.

    Raises :class:`WriterLocked` (a ``ConfigError``: exit code 1, one-line message) when
    another process holds it. The lock file is left in place on release: deleting it would
    let a third process lock a fresh inode while a second still waits on the old one.
    """
    path = lock_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            holder = f"pid {pid}" if pid is not None else "an unknown process"
            raise WriterLocked(
                f"another finops writer holds {path} ({holder}); only one daemon or apply may write "
                f"to a state directory at a time. Stop it first, or use another --state-dir for another gateway.",
                pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{purpose}\n".encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
