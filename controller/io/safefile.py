"""Reading files that users point finops at, without ever hanging or exhausting memory.

Manifests, signing secrets, the admin key file and saved plans all name a path that someone
else controls. Any of them can be a FIFO (``open`` blocks until a writer appears), a device
(``/dev/zero`` never ends), a directory, or a symlink to one of those. So every such read goes
through :func:`read_bounded`:

- the path is ``stat``-ed first and only a **regular file** is opened (a FIFO, device, socket
  or directory is refused without opening it: opening some devices has side effects);
- it is opened with ``O_NONBLOCK`` (a FIFO swapped in after the ``stat`` cannot block the
  ``open``) and ``O_NOFOLLOW`` on the resolved path, and ``fstat`` must again say regular file;
- at most ``limit + 1`` bytes are read, in chunks: the size limit is enforced while reading,
  never by reading to the end first;
- with ``root``, the path's real location (every symlink resolved) must stay inside ``root``.

Errors are :class:`UnsafeFile` (an ``OSError``, so existing ``except OSError`` handlers keep
working) with a message that names the file and says what to do.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

CHUNK = 64 * 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnsafeFile(OSError):
    """A file finops refuses to read: not a regular file, too large, or outside its root.

    ``reason`` is the message without the file name (callers that print ``file:line`` add
    the name themselves); ``str()`` includes it."""

    def __init__(self, path: str | os.PathLike[str], reason: str, *, code: int = errno.EINVAL) -> None:
        super().__init__(code, reason, os.fspath(path))
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.filename}: {self.reason}"


class TooLarge(UnsafeFile):
    """The file has more than ``limit`` bytes; ``head`` holds the first ``limit + 1``."""

    def __init__(self, path: str | os.PathLike[str], limit: int, head: bytes) -> None:
        super().__init__(path, f"file is larger than {describe_size(limit)}", code=errno.EFBIG)
        self.limit = limit
        self.head = head


def describe_size(limit: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if limit >= size and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def kind_of_mode(mode: int) -> str:
    """What a non-regular file is, in words (``a FIFO (named pipe)``)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s real location (symlinks resolved) is ``root`` or under it."""
    real = os.path.realpath(path)
    base = os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def check_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsafeFile` when ``path`` resolves outside ``root``."""
    if not inside(path, root):
        raise UnsafeFile(
            path,
            f"symbolic link leads outside {os.fspath(root)} (to {os.path.realpath(path)}); "
            "only links that stay inside it are followed",
        )


def open_regular(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (inside ``root``)."""
    if root is not None:
        check_inside(path, root)
    real = os.path.realpath(path)
    try:
        before = os.stat(real)
    except OSError as exc:
        raise _reworded(path, exc) from None
    if not stat.S_ISREG(before.st_mode):
        raise UnsafeFile(path, f"is {kind_of_mode(before.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise _reworded(path, exc) from None
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode):
            raise UnsafeFile(path, f"is {kind_of_mode(after.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reworded(path: str | os.PathLike[str], exc: OSError) -> OSError:
    if exc.errno == errno.ELOOP:
        return UnsafeFile(path, "too many levels of symbolic links", code=errno.ELOOP)
    return UnsafeFile(path, exc.strerror or str(exc), code=exc.errno or errno.EIO)


def read_bounded(path: str | os.PathLike[str], limit: int, *, root: str | os.PathLike[str] | None = None) -> bytes:
    """Every byte of regular file ``path``, or :class:`UnsafeFile` / :class:`TooLarge`.

    Reads at most ``limit + 1`` bytes whatever the file claims to be, so a file that grows
    while it is read, or lies about its size, still costs at most ``limit + 1`` bytes."""
    fd = open_regular(path, root=root)
    try:
        data = _read_upto(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise TooLarge(path, limit, data)
    return data


def iter_chunks(
    path: str | os.PathLike[str], budget: int, *, root: str | os.PathLike[str] | None = None
) -> Iterator[bytes]:
    """The first ``budget`` bytes of regular file ``path``, in chunks (for scanning files too
    large to parse: memory stays one chunk, time stays bounded by ``budget``)."""
    fd = open_regular(path, root=root)
    try:
        left = budget
        while left > 0:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


def _read_upto(fd: int, size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left > 0:
        try:
            chunk = os.read(fd, min(CHUNK, left))
        except BlockingIOError:  # pragma: no cover - regular files never block
            raise UnsafeFile(f"fd {fd}", "read would block") from None
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_text_bounded(path: str | os.PathLike[str], limit: int, *, root: str | os.PathLike[str] | None = None) -> str:
    """:func:`read_bounded` decoded as UTF-8 (a decoding problem is an :class:`UnsafeFile`)."""
    data = read_bounded(path, limit, root=root)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeFile(path, "is not valid UTF-8 text") from None


def is_regular(path: Path) -> bool:
    """``stat`` (following links) says regular file; never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
