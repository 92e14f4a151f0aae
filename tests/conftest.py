"""Suite-wide guards.

- No API key may appear in anything a test run prints or logs. Every test's captured
  stdout, stderr and log records (and any failure report) are scanned for the gateway's key
  shape. Individual tests already check the outputs they produce (CLI subprocesses, state
  databases); this catches what they did not think to check.
- No test may depend on DNS (or the internet): inside the test process, a name lookup of
  anything but ``localhost`` or an address literal fails the test. Code that resolves names
  (alert delivery) takes an injectable resolver; tests inject one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from policies.keyprint import API_KEY_PATTERN

#: Deliberate fixtures (API.md's throwaway example, an all-zero key) that prove inline keys
#: are refused; they are not secrets and appear only inside the bad-manifest corpus.
ALLOWED = {"a2a_free_fa63aab628959ce3b1ec48a5", "a2a_free_000000000000000000000000"}

_leaks: list[str] = []


def _needs_dns(host: object) -> bool:
    name = host.decode() if isinstance(host, bytes) else host
    if not isinstance(name, str) or name.rstrip(".").lower() in ("", "localhost"):
        return False
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return True
    return False


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test that looks a name up (the lookup itself fails at once, as NXDOMAIN)."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if _needs_dns(host):
            looked_up.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "DNS is off in the test suite")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert not looked_up, f"the test looked up {sorted(set(looked_up))} in DNS: inject a resolver instead"


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    texts = [content for _, content in report.sections]
    if report.longrepr is not None:
        texts.append(str(report.longrepr))
    for text in texts:
        for match in API_KEY_PATTERN.finditer(text):
            if match.group(0) not in ALLOWED:
                _leaks.append(f"{report.nodeid} ({report.when}): key material {match.group(0)[:9]}…")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("KEY MATERIAL IN TEST OUTPUT OR LOGS:", red=True, bold=True)
            for leak in sorted(set(_leaks)):
                reporter.write_line(f"  {leak}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- a real PostgreSQL server --------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for the whole session: ``FINOPS_TEST_PG_URL`` when set
    (``.ci/run`` starts one), else a throwaway cluster started here. Without server binaries
    the PostgreSQL tests are skipped on a developer machine and fail in CI (``CI`` set)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from tests import pgserver

    url = os.environ.get("FINOPS_TEST_PG_URL")
    if url:
        yield url
        return
    # Not under pytest's tmp dir: its 0700 parents are closed to the unprivileged server user.
    directory = Path(tempfile.mkdtemp(prefix="finops-pg-"))
    try:
        url = pgserver.start(directory)
    except pgserver.PostgresUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield url
    finally:
        pgserver.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server for this test (dropped afterwards)."""
    import uuid

    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = pg_server.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
