"""Atomic, private secret files, and directories that are safe to keep them in.

A key file that is half-written, world-readable, or lost in a crash is a leaked or lost
credential, so every write goes to a 0600 temp file in the same directory, is fsynced, then
renamed over the target, and the directory is fsynced too.

Modes never depend on the umask: directories finops creates are ``os.mkdir(..., 0o700)``
then ``chmod 0700`` (every missing parent too, where ``Path.mkdir(parents=True)`` would
use 0777 minus the umask), files are created 0600 by ``mkstemp``/``os.open`` and
``fchmod``-ed. A directory that holds finops' own key material is also *checked*: one
owned by another user, writable by group or others, or that is a symlink is refused with an
error naming it, since whoever can write there can replace a key file (and rotation would
then present, and lose, a key that is not the agent's).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from controller.errors import ConfigError


class UnsafeSecretPath(ConfigError):
    """A directory or file that holds secrets could be read or replaced by someone else."""


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700, whatever the umask.
    Existing directories are left as they are (``check_private_dir`` judges them)."""
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # created meanwhile by another process: judged by the caller's check
        os.chmod(directory, 0o700)


def _uid_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_private_dir(path: Path, *, what: str = "secrets directory") -> None:
    """Refuse a directory that someone other than finops' user could write to."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet (creating it will say what is in the way)
    fix = f"use a directory owned by the user finops runs as, mode 0700 (`chmod 700 {path}`)"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSecretPath(
            f"the {what} {path} is a symlink; point finops at the real directory ({fix}); nothing was done"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSecretPath(f"the {what} {path} is not a directory; nothing was done")
    if st.st_uid != os.geteuid():
        raise UnsafeSecretPath(
            f"the {what} {path} is owned by {_uid_name(st.st_uid)}, not by the user finops runs as "
            f"({_uid_name(os.geteuid())}): its owner could replace a key file; {fix}; nothing was done"
        )
    if st.st_mode & 0o022:
        raise UnsafeSecretPath(
            f"the {what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): another "
            f"user could replace a key file; {fix}; nothing was done"
        )


def check_private_file(path: Path, *, what: str = "key file") -> None:
    """Refuse a secret file that is not a regular file of finops' user, mode 0600 or less."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise UnsafeSecretPath(
            f"the {what} {path} is not a regular file (a symlink or a special file); finops keeps key files "
            "only as its own regular files; nothing was done"
        )
    if st.st_uid != os.geteuid():
        raise UnsafeSecretPath(
            f"the {what} {path} is owned by {_uid_name(st.st_uid)}, not by the user finops runs as "
            f"({_uid_name(os.geteuid())}); it may have been replaced; nothing was done"
        )
    if st.st_mode & 0o077:
        raise UnsafeSecretPath(
            f"the {what} {path} is readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"treat the key as exposed and rotate it after `chmod 600 {path}`; nothing was done"
        )


def private_file(path: Path) -> None:
    """Make sure ``path`` exists as a 0600 file, whatever the umask: an SQLite database
    before it is opened (SQLite gives its -wal/-shm files the database file's mode). An
    existing file of finops' user (and its -wal/-shm) is tightened to 0600."""
    path = Path(path)
    make_private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            try:
                st = os.lstat(existing)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(existing, 0o600)
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def why_not_writable(directory: Path) -> str | None:
    """Why a secret file could not be written in ``directory`` (created 0700 if missing);
    ``None`` when a probe file could be created and removed there."""
    try:
        make_private_dirs(Path(directory))
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".finops-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    return None


def write_secret_file(path: Path, content: str) -> None:
    """Atomically replace ``path`` with ``content``, mode 0600, durable on return."""
    path = Path(path)
    make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


#: Far above any key or signing secret; bounds what a wrong path (``/dev/zero``) can cost.
MAX_SECRET_BYTES = 64 * 1024


def read_secret_file(path: Path) -> str:
    """Read a secret file, stripping the trailing newline editors and ``echo`` add.

    Only a regular file is read, at most ``MAX_SECRET_BYTES``: a FIFO, a device, a
    directory or a huge file is an ``OSError`` (``controller.io.safefile.UnsafeFile``) naming
    the file, never a hang or a memory blow-up."""
    from controller.io.safefile import read_text_bounded

    return read_text_bounded(path, MAX_SECRET_BYTES).strip()
