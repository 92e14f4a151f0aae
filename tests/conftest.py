"""Suite-wide guard: no API key may appear in anything a test run prints or logs.

Every test's captured stdout, stderr and log records (and any failure report) are scanned
for the gateway's key shape. Individual tests already check the outputs they produce
(CLI subprocesses, state databases); this catches what they did not think to check.
"""

from __future__ import annotations

import pytest

from policies.keyprint import API_KEY_PATTERN

#: Deliberate fixtures (API.md's throwaway example, an all-zero key) that prove inline keys
#: are refused; they are not secrets and appear only inside the bad-manifest corpus.
ALLOWED = {"a2a_free_fa63aab628959ce3b1ec48a5", "a2a_free_000000000000000000000000"}

_leaks: list[str] = []


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
