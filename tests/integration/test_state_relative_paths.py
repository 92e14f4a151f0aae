"""Relative secret paths in manifests, as the CLI resolves them: against the state directory
whatever the working directory (systemd starts services in ``/``, a container anywhere), and
an old working-directory secret refused before any gateway write."""

from __future__ import annotations

import hashlib
import hmac
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.io.secretfile import write_secret_file
from controller.sandbox.server import SandboxServer
from tests.integration.conftest import CANONICAL
from tests.integration.test_alerts import Receiver
from tests.integration.test_cli import finops

CANONICAL_LINE = "signingSecret: {file: alert-signing.secret, generate: true}"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[SandboxServer, dict[str, str]]]:
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        yield server, {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}


def _requests(server: SandboxServer) -> tuple[int, int]:
    """Every request and write the gateway received (``/_sandbox/stats`` is not counted)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
        body = http.get("/_sandbox/stats").json()
    return int(body["requests"]), int(body["writes"])


def test_alerts_are_signed_with_the_state_directorys_secret_not_the_working_directorys(
    gateway: tuple[SandboxServer, dict[str, str]], tmp_path: Path
) -> None:
    server, env = gateway
    checkout = tmp_path / "checkout"
    shutil.copytree(CANONICAL, checkout / "manifests")
    state = tmp_path / "var-lib-finops"
    elsewhere = tmp_path / "root"  # where the process runs (systemd: /)
    elsewhere.mkdir()
    write_secret_file(state / "alert-signing.secret", "state-directory-secret\n")
    write_secret_file(elsewhere / "alert-signing.secret", "working-directory-decoy\n")
    receiver = Receiver()
    try:
        fleet = checkout / "manifests" / "research-fleet.yaml"
        text = fleet.read_text()
        assert CANONICAL_LINE in text
        text = text.replace(CANONICAL_LINE, "signingSecret: {file: alert-signing.secret}\n    allowInsecure: true")
        text = text.replace(
            "https://alerts.example.com/research/{agent}/{threshold}", receiver.url + "/{agent}/{threshold}"
        )
        text = text.replace(
            "https://pager.example.com/finops/{fleet}?agent={agent}&window={window}", receiver.url + "/page"
        )
        fleet.write_text(text)
        common = ("--state-dir", str(state))
        applied = finops(elsewhere, "apply", str(checkout / "manifests"), "--auto-approve", *common, env=env)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        key = next((state / "secrets").iterdir()).joinpath("cls-01.key").read_text().strip()
        with httpx.Client(base_url=server.url) as http:
            http.put(  # a small cap so a few paid calls cross 75 %
                "/v1/billing/wallets/cls-01/budget",
                json={"daily_cap": "1.00", "monthly_cap": "300.00"},
                headers={"Authorization": f"Bearer {server.admin_key}"},
            )
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
            for _ in range(8):
                assert http.get("/v1/marketplace/match", params={"query": "x"}).status_code == 200
        checked = finops(elsewhere, "alerts", "check", str(checkout / "manifests"), *common, env=env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert [r.path for r in receiver.delivered] == ["/cls-01/75"]
        delivered = receiver.delivered[0]
        expected = hmac.new(b"state-directory-secret", delivered.body, hashlib.sha256).hexdigest()
        assert delivered.headers["X-A2A-Signature"] == expected
    finally:
        receiver.close()
    assert not (checkout / ".finops").exists()  # nothing of finops' lands beside the manifests


def test_an_old_working_directory_secret_stops_apply_before_any_write(
    gateway: tuple[SandboxServer, dict[str, str]], tmp_path: Path
) -> None:
    """A checkout set up by an older finops: its manifest names .finops/alert-signing.secret,
    which now means .finops/.finops/...; generating that anew would silently change the
    secret every receiver verifies with."""
    server, env = gateway
    work = tmp_path / "work"
    shutil.copytree(CANONICAL, work / "manifests")
    fleet = work / "manifests" / "research-fleet.yaml"
    fleet.write_text(
        fleet.read_text().replace(
            CANONICAL_LINE, "signingSecret: {file: .finops/alert-signing.secret, generate: true}"
        )
    )
    write_secret_file(work / ".finops" / "alert-signing.secret", "the receivers' secret\n")
    before = _requests(server)
    for command in (("plan",), ("apply", "--auto-approve")):
        result = finops(work, *command, env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "research-fleet.yaml" in result.stderr and "mv " in result.stderr
        assert "Traceback" not in result.stderr
    assert _requests(server) == before  # refused before the first request, let alone a write
    assert not (work / ".finops" / ".finops").exists()
    # The fix the message names: move it into the state directory and drop the prefix.
    (work / ".finops" / "alert-signing.secret").rename(work / ".finops" / "moved.secret")
    fleet.write_text(fleet.read_text().replace(".finops/alert-signing.secret", "moved.secret"))
    assert finops(work, "apply", "--auto-approve", env=env).returncode == 0
