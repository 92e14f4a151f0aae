"""A throwaway PostgreSQL server for the tests (a real server, not a mock).

``.ci/run`` starts one before the tests and exports ``FINOPS_TEST_PG_URL``; a developer's
``python -m pytest`` without it gets one started (and stopped) by the session fixture in
``tests/conftest.py``. The server refuses to run as root, so as root it runs as ``nobody``
(``setuid`` in the child); it listens on 127.0.0.1 only, trust auth, ``fsync=off`` (test
data is thrown away). Each test gets its own database (``CREATE DATABASE``).

Command line (used by ``.ci/run``)::

    python -m tests.pgserver start DIR   # prints the server URL
    python -m tests.pgserver stop DIR
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

USER = "finops"
UNPRIVILEGED = "nobody"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    raise PostgresUnavailable(f"{name} not found (install PostgreSQL's server binaries, e.g. Debian's `postgresql`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demote() -> tuple[Callable[[], None] | None, int | None, int | None]:
    if os.geteuid() != 0:
        return None, None, None
    entry = pwd.getpwnam(UNPRIVILEGED)

    def drop() -> None:
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return drop, entry.pw_uid, entry.pw_gid


def _run(args: list[str], log: Path | None = None) -> None:
    drop, _, _ = _demote()
    out = subprocess.run(args, preexec_fn=drop, capture_output=True, text=True, timeout=120, cwd="/")
    if out.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stderr[-2000:]}\n{tail}")


def start(directory: Path) -> str:
    """Create a cluster in ``directory`` (must not exist or be empty) and start it; the URL."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, uid, gid = _demote()
    data, sock, log = directory / "data", directory / "sock", directory / "server.log"
    for path in (data, sock):
        path.mkdir(exist_ok=True, mode=0o700)
    if uid is not None and gid is not None:
        os.chmod(directory, 0o755)
        for path in (data, sock):
            os.chown(path, uid, gid)
        log.touch()
        os.chown(log, uid, gid)
    port = _free_port()
    _run([binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync", "-N"])
    options = (
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    _run([binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"], log)
    url = f"postgresql://{USER}@127.0.0.1:{port}/postgres"
    (directory / "url").write_text(url + "\n")
    return url


def stop(directory: Path) -> None:
    data = Path(directory) / "data"
    if (data / "postmaster.pid").exists():
        _run([binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in {"start", "stop"}:
        print("usage: python -m tests.pgserver start|stop DIR", file=sys.stderr)
        return 2
    if argv[0] == "start":
        print(start(Path(argv[1])))
    else:
        stop(Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
