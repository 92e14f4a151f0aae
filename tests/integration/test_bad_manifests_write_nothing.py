"""A bad manifest never reaches the gateway.

Every case of the bad-manifest corpus (tests/data/bad_manifests/) goes through the real CLI,
``finops plan`` and ``finops apply --auto-approve``, pointed at one shared sandbox gateway. Each
run must exit 1, print exactly the case's error lines and no traceback, make no request to the
gateway (not even a read: validation comes before the first connection), and leave no file
behind (no state database, no generated alert secret). The commands run in-process through
click's CliRunner, so the whole corpus takes seconds rather than a process start per case.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _pytest.mark.structures import ParameterSet
from click.testing import CliRunner, Result

from controller.cli.app import cli
from controller.sandbox.server import SandboxServer
from tests.unit.test_manifest_loader import CASES, case_header, expected_lines, materialize_case

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {"plan": ["plan"], "apply": ["apply", "--auto-approve"]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    root = tmp_path_factory.mktemp("gateway")
    with SandboxServer(db_path=root / "gateway.db", admin_key_file=root / "admin.key") as server:
        yield server


@pytest.fixture(scope="module")
def counters(gateway: SandboxServer) -> Iterator[httpx.Client]:
    """Reads ``GET /_sandbox/stats`` (admin only; not itself counted) over real HTTP."""
    headers = {"Authorization": f"Bearer {gateway.admin_key}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=10) as http:
        yield http


def _stats(http: httpx.Client) -> tuple[int, int]:
    response = http.get("/_sandbox/stats")
    response.raise_for_status()
    body = response.json()
    return int(body["requests"]), int(body["writes"])


def _finops(gateway: SandboxServer, state_dir: Path, args: list[str]) -> Result:
    """The ``finops`` command as an operator runs it against a real gateway, in-process."""
    assert gateway.admin_key_file is not None
    env: dict[str, str | None] = {
        "GREENHELIX_URL": gateway.url,
        "GREENHELIX_API_KEY_FILE": str(gateway.admin_key_file),
        "FINOPS_STATE_DIR": str(state_dir),
        "GREENHELIX_API_KEY": None,
        "FINOPS_SECRETS_DIR": None,
    }
    return CliRunner(env=env).invoke(cli, args, catch_exceptions=True)


def _files(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def _cases() -> list[ParameterSet]:
    """Every case, except those documenting a known gap (``# xfail:``): the CLI accepts them
    today, and would really write to the shared gateway."""
    params = []
    for case in CASES:
        reason = case_header(case, "xfail")
        marks = [pytest.mark.skip(reason=f"known gap: {reason}")] if reason else []
        params.append(pytest.param(case, marks=marks, id=case))
    return params


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", _cases())
def test_bad_manifests_exit_1_and_never_reach_the_gateway(
    case: str,
    command: str,
    gateway: SandboxServer,
    counters: httpx.Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = materialize_case(case, tmp_path)
    monkeypatch.chdir(workdir)
    files_before = _files(tmp_path)
    requests_before, writes_before = _stats(counters)

    result = _finops(gateway, tmp_path / "state", [*COMMANDS[command], "."])

    requests_after, writes_after = _stats(counters)
    expected = expected_lines(case)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not a crash
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        *expected,
        f"Error: {len(expected)} manifest error(s); nothing was planned or applied.",
    ]
    assert writes_after - writes_before == 0
    assert requests_after - requests_before == 0  # not even a read: validation comes first
    assert _files(tmp_path) == files_before  # no state database, no generated secret


def test_the_same_wiring_reaches_the_gateway_when_the_manifests_are_valid(
    gateway: SandboxServer, counters: httpx.Client, tmp_path: Path
) -> None:
    """The control for the test above: with the canonical fleet, the very same environment
    makes plan read from this sandbox and apply write to it, so zero counts mean something."""
    manifests = str(REPO / "manifests")
    requests_before, writes_before = _stats(counters)
    planned = _finops(gateway, tmp_path / "state", ["plan", manifests])
    requests_planned, writes_planned = _stats(counters)
    applied = _finops(gateway, tmp_path / "state", ["apply", "--auto-approve", manifests])
    requests_applied, writes_applied = _stats(counters)

    assert planned.exit_code == 0, planned.output
    assert f"finops: using gateway {gateway.url}" in planned.output
    assert requests_planned > requests_before
    assert writes_planned == writes_before  # plan only reads
    assert applied.exit_code == 0, applied.output
    assert writes_applied > writes_planned
    assert requests_applied > requests_planned
