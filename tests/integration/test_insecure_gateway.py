"""The admin key is never sent over plain http:// to a non-loopback host unless the operator
explicitly allows it; refused before any request, with a clear error and exit code 1."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.errors import ConfigError
from controller.io.target import check_gateway_url
from tests.integration.conftest import CANONICAL
from tests.integration.hostile import HostileServer
from tests.integration.test_cli import finops

ADMIN_KEY = "a2a_admin_" + "0123456789abcdef" * 2


def _non_loopback_address() -> str | None:
    """This machine's own non-loopback IPv4 address, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def lan_server() -> Iterator[HostileServer]:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to listen on")
    with HostileServer(host=address) as server:
        yield server


@pytest.mark.parametrize(
    "command",
    [["plan"], ["apply", "--auto-approve"], ["status"], ["alerts", "check"], ["run", "--once"], ["rotate"]],
)
def test_plain_http_to_a_non_loopback_gateway_is_refused_before_any_request(
    tmp_path: Path, lan_server: HostileServer, command: list[str]
) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    env = {"GREENHELIX_URL": lan_server.url, "GREENHELIX_API_KEY": ADMIN_KEY}
    result = finops(tmp_path, *command, env=env)
    assert result.returncode == 1, result.stderr
    assert "refusing to send the admin key in clear over http://" in result.stderr
    assert "--allow-insecure-http" in result.stderr
    assert "Traceback" not in result.stderr
    assert ADMIN_KEY not in result.stdout + result.stderr
    assert lan_server.requests == []  # nothing, not even a key listing, was sent


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_explicit_opt_in_lets_the_request_through(tmp_path: Path, lan_server: HostileServer, how: str) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    env = {"GREENHELIX_URL": lan_server.url, "GREENHELIX_API_KEY": ADMIN_KEY}
    args = ["plan"]
    if how == "flag":
        args.append("--allow-insecure-http")
    else:
        env["FINOPS_ALLOW_INSECURE_HTTP"] = "1"
    result = finops(tmp_path, *args, env=env)
    assert "refusing to send the admin key" not in result.stderr
    assert lan_server.requests  # it was sent: the operator asked for it


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.3.4.5:8000/",
        "http://[::1]:8000",
        "http://localhost:8000",
        "http://LOCALHOST.:8000",
        "http://api.localhost",
        "https://api.greenhelix.net",
        "https://10.0.0.5:8443",
    ],
)
def test_loopback_http_and_any_https_are_allowed(url: str) -> None:
    check_gateway_url(url, allow_insecure_http=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://api.greenhelix.net",
        "http://10.0.0.5:8000",
        "http://192.0.2.2:8000",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",  # resolves to loopback through DNS: not provably local
        "http://%6c%6fcalhost:8000",
        "http://[::ffff:10.0.0.1]:80",
    ],
)
def test_plain_http_elsewhere_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="refusing to send the admin key in clear"):
        check_gateway_url(url, allow_insecure_http=False)
    check_gateway_url(url, allow_insecure_http=True)


def test_an_uppercase_scheme_cannot_sneak_past_the_http_check() -> None:
    for url in ["HTTP://api.greenhelix.net", "Http://10.0.0.5"]:
        with pytest.raises(ConfigError):
            check_gateway_url(url, allow_insecure_http=False)


def test_credentials_in_the_gateway_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError, match="must not embed credentials") as caught:
        check_gateway_url("https://admin:hunter2@api.greenhelix.net", allow_insecure_http=False)
    assert "hunter2" not in str(caught.value)
