"""Atomic, private secret files.

A key file that is half-written, world-readable, or lost in a crash is a leaked or lost
credential, so every write goes to a 0600 temp file in the same directory, is fsynced, then
renamed over the target, and the directory is fsynced too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_secret_file(path: Path, content: str) -> None:
    """Atomically replace ``path`` with ``content``, mode 0600, durable on return."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    directory or a huge file is an ``OSError`` (``controller.safefile.UnsafeFile``) naming
    the file, never a hang or a memory blow-up."""
    from controller.safefile import read_text_bounded

    return read_text_bounded(path, MAX_SECRET_BYTES).strip()
