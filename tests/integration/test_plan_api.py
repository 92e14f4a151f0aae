"""The daemon's plan API and ``finops plan --remote``: a real sandbox on 127.0.0.1, the API
server wired as ``finops run --plan-api-port`` wires it (``Services`` of its own, read-only),
and the real ``finops`` CLI in subprocesses with a clean environment (no GREENHELIX_*)."""

from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.cli.options import TargetOptions
from controller.cli.views import RENDERERS
from controller.daemon.planapi import BundleLimits, PlanApi, PlanApiServer, gateway_planner, tls_context
from controller.sandbox.server import SandboxServer
from controller.services import Services
from policies.keyprint import API_KEY_PATTERN, contains_key_material
from tests.integration.conftest import CANONICAL, run_cli
from tests.integration.haproc import clean_env, free_port, wait_until

TOKEN = "plan-token-" + "k" * 32
TIMESTAMPS = {"created_at"}


@dataclass
class Api:
    server: PlanApiServer
    token_file: Path
    workdir: Path
    gateway_env: dict[str, str]
    admin_key: str

    @property
    def url(self) -> str:
        return self.server.url

    def post(self, body: bytes | dict[str, Any], *, token: str | None = TOKEN, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}/v1/plan", content=content, headers=headers, params=params, timeout=60)


def bundle(files: dict[str, str | bytes], **extra: Any) -> dict[str, Any]:
    encoded = {n: base64.b64encode(c.encode() if isinstance(c, str) else c).decode() for n, c in files.items()}
    return {"format_version": 1, "files": encoded, **extra}


def canonical_bundle() -> dict[str, Any]:
    return bundle({p.relative_to(CANONICAL).as_posix(): p.read_bytes() for p in sorted(CANONICAL.rglob("*.yaml"))})


def write_token(path: Path, token: str = TOKEN) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def api_server(
    sandbox: SandboxServer, workdir: Path, limits: BundleLimits | None = None, **kw: Any
) -> tuple[PlanApiServer, Services]:
    key_file = workdir / "admin.key"
    opts = TargetOptions(sandbox.url, str(key_file), workdir / ".finops", None, 8)
    with opts.open_target() as target:
        services = Services.build(target, opts)
    planner = gateway_planner(services.client, services.state, target.name)
    api = PlanApi(TOKEN, planner, state_dir=opts.state_dir, renderers=RENDERERS, limits=limits or BundleLimits())
    return PlanApiServer(api, **kw).start(), services


@pytest.fixture
def api(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Api]:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    key_file = tmp_path / "admin.key"
    key_file.write_text(sandbox.admin_key)
    key_file.chmod(0o600)
    server, services = api_server(sandbox, tmp_path)
    env = {"GREENHELIX_URL": sandbox.url, "GREENHELIX_API_KEY_FILE": str(key_file)}
    try:
        yield Api(server, write_token(tmp_path / "plan.token"), tmp_path, env, sandbox.admin_key)
    finally:
        server.stop()
        services.close()


def remote(api: Api, *args: str, path: str = "manifests") -> subprocess.CompletedProcess[str]:
    """``finops plan --remote`` with no gateway variable at all (``run_cli`` removes them)."""
    return run_cli(api.workdir, "plan", path, "--remote", api.url, "--token-file", str(api.token_file), *args)


def local(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(api.workdir, "plan", "manifests", *args, env=api.gateway_env)


def comparable(text: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text)
    for name in TIMESTAMPS:
        data.pop(name)
    return data


def assert_no_keys(api: Api, *texts: str) -> None:
    agent_keys = [p.read_text().strip() for p in api.workdir.glob(".finops/**/*.key")]
    for text in texts:
        assert not API_KEY_PATTERN.search(text), text
        assert not contains_key_material(text), text
        assert api.admin_key not in text
        for key in agent_keys:
            assert key not in text


def test_remote_plan_equals_local_plan_changed_then_converged(api: Api) -> None:
    # A fresh gateway: every agent must be registered and funded (changes present).
    here, there = (
        local(api, "--format", "json", "--detailed-exitcode"),
        remote(api, "--format", "json", "--detailed-exitcode"),
    )
    assert (here.returncode, there.returncode) == (2, 2), (here.stderr, there.stderr)
    assert comparable(there.stdout) == comparable(here.stdout)
    assert comparable(there.stdout)["changes"], "expected changes on a fresh gateway"
    for fmt in ("text", "markdown"):
        here_r, there_r = local(api, "--format", fmt), remote(api, "--format", fmt)
        assert there_r.returncode == here_r.returncode == 0
        if fmt == "text":  # the first line is the banner: the gateway locally, the daemon remotely
            assert there_r.stdout.startswith(f"finops: plan from the daemon at {api.url}")
            assert there_r.stdout.split("\n", 1)[1] == here_r.stdout.split("\n", 1)[1]
        else:
            assert there_r.stdout == here_r.stdout

    applied = run_cli(api.workdir, "apply", "manifests", "--auto-approve", env=api.gateway_env)
    assert applied.returncode == 0, applied.stderr
    here, there = (
        local(api, "--format", "json", "--detailed-exitcode"),
        remote(api, "--format", "json", "--detailed-exitcode"),
    )
    assert (here.returncode, there.returncode) == (0, 0), there.stderr
    assert comparable(there.stdout) == comparable(here.stdout)
    assert comparable(there.stdout)["changes"] == []

    # An edited manifest: the daemon's view plans the same change as a local plan.
    fleet = api.workdir / "manifests" / "research-fleet.yaml"
    text = fleet.read_text()
    fleet.write_text(text.replace('dailyCap: "30.00"', 'dailyCap: "31.00"', 1))
    here, there = (
        local(api, "--format", "json", "--detailed-exitcode"),
        remote(api, "--format", "json", "--detailed-exitcode"),
    )
    assert (here.returncode, there.returncode) == (2, 2), there.stderr
    assert comparable(there.stdout) == comparable(here.stdout)
    summary = api.workdir / "summary.md"
    in_ci = run_cli(
        api.workdir, "plan", "manifests", "--remote", api.url, "--token-file", str(api.token_file),
        "--format", "markdown", env={"GITHUB_STEP_SUMMARY": str(summary)},
    )  # fmt: skip
    assert in_ci.returncode == 0 and summary.read_text().startswith("<!-- finops-plan -->")
    assert in_ci.stdout.startswith("<!-- finops-plan -->"), "the banner goes to stderr, as for a local plan"
    saved = api.workdir / "remote.plan.json"
    there = remote(api, "--out", str(saved))
    assert there.returncode == 0 and (saved.stat().st_mode & 0o777) == 0o600
    assert_no_keys(api, there.stdout, there.stderr, saved.read_text(), here.stdout)


def test_remote_plan_needs_no_gateway_environment(api: Api) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(api.workdir)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "plan",
            "manifests",
            "--remote",
            api.url,
            "--token-file",
            "plan.token",
        ],
        cwd=api.workdir,
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("finops: plan from the daemon at")
    assert not (api.workdir / ".finops" / "sandbox").exists(), "a remote plan must not start the embedded sandbox"


def test_wrong_or_missing_token_is_401_without_details(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr("controller.daemon.planapi.hmac.compare_digest", spy)
    for token in ("wrong-" + TOKEN, TOKEN[:-1], "x", None, TOKEN + "x"):
        response = api.post(canonical_bundle(), token=token)
        assert response.status_code == 401
        assert response.text == "unauthorized\n"
    assert len(compared) == 5, "every request, even without a header, goes through compare_digest"
    basic = httpx.post(f"{api.url}/v1/plan", content=b"{}", headers={"Authorization": f"Basic {TOKEN}"}, timeout=30)
    assert basic.status_code == 401

    wrong = write_token(api.workdir / "wrong.token", "x" * 40)
    proc = run_cli(api.workdir, "plan", "manifests", "--remote", api.url, "--token-file", str(wrong))
    assert proc.returncode == 1
    assert "refused the token (401)" in proc.stderr
    missing = run_cli(api.workdir, "plan", "manifests", "--remote", api.url)
    assert missing.returncode == 1 and "--token-file" in missing.stderr
    loose = api.workdir / "loose.token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    proc = run_cli(api.workdir, "plan", "manifests", "--remote", api.url, "--token-file", str(loose))
    assert proc.returncode == 1 and "readable or writable by group or others" in proc.stderr
    assert TOKEN not in proc.stderr


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("../escape.yaml", 400),
        ("a/../../escape.yaml", 400),
        ("/tmp/escape.yaml", 400),
        (".hidden.yaml", 400),
        ("dir/.git/x.yaml", 400),
        ("notes.txt", 400),
        ("a\\b.yaml", 400),
        ("", 400),
    ],
)
def test_bad_names_are_refused_before_anything_is_written(api: Api, name: str, status: int) -> None:
    before = set(api.workdir.parent.rglob("escape.yaml"))
    response = api.post(bundle({name: "x: 1\n"}))
    assert response.status_code == status, response.text
    assert set(api.workdir.parent.rglob("escape.yaml")) == before


def test_bundle_limits(sandbox: SandboxServer, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(sandbox.admin_key)
    key_file.chmod(0o600)
    server, services = api_server(sandbox, tmp_path, BundleLimits(max_bytes=64 * 1024, max_files=3))
    try:
        url = f"{server.url}/v1/plan"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        too_many = bundle({f"f{i}.yaml": "a: 1\n" for i in range(4)})
        assert httpx.post(url, json=too_many, headers=auth).status_code == 413
        big = bundle({"big.yaml": "#" * 100_000})
        response = httpx.post(url, json=big, headers=auth)
        assert response.status_code == 413 and "at most 65536" in response.text
        # A lying Content-Length is refused from the header, before a byte of body is read.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(
                f"POST /v1/plan HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Length: {10**12}\r\n\r\n{{}}".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        assert httpx.post(url, content=b"not json", headers=auth).status_code == 400
        assert httpx.post(url, json={"format_version": 1, "files": {}}, headers=auth).status_code == 400
        assert httpx.post(url, json=bundle({"a.yaml": "x"}, apply=True), headers=auth).status_code == 400
        assert httpx.post(url, json=bundle({"a.yaml": "x"}), headers=auth, params={"format": "html"}).status_code == 400
        # Only POST /v1/plan and GET /healthz exist; there is no way to apply.
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.post(f"{server.url}/v1/apply", json={}, headers=auth).status_code == 404
        assert httpx.put(url, json={}, headers=auth).status_code == 501
    finally:
        server.stop()
        services.close()


def test_symlink_leaving_the_manifests_is_refused_by_the_client(api: Api) -> None:
    outside = api.workdir / "outside.yaml"
    outside.write_text("secret: data\n")
    (api.workdir / "manifests" / "linked.yaml").symlink_to(outside)
    proc = remote(api)
    assert proc.returncode == 1
    assert "symbolic link leads outside" in proc.stderr
    assert "finops: plan from the daemon" not in proc.stderr


def test_invalid_manifests_report_exactly_what_validate_reports(api: Api) -> None:
    fleet = api.workdir / "manifests" / "research-fleet.yaml"
    fleet.write_text(fleet.read_text().replace("dailyCap:", "dailyCapp:", 1) + "\nextra: [\n")
    (api.workdir / "manifests" / "sub").mkdir()
    (api.workdir / "manifests" / "sub" / "broken.yml").write_text("kind: Nope\n")
    validate = run_cli(api.workdir, "validate", "manifests")
    there = remote(api, "--detailed-exitcode")
    assert validate.returncode == there.returncode == 1
    issues = [line for line in validate.stderr.splitlines() if line.startswith("manifests/")]
    assert issues, validate.stderr
    assert [line for line in there.stderr.splitlines() if line.startswith("manifests/")] == issues
    assert "tmp" not in "".join(line for line in there.stderr.splitlines() if "finops-plan-api" in line)
    assert "finops-plan-api" not in there.stderr


def test_no_key_material_in_any_response(api: Api) -> None:
    applied = run_cli(api.workdir, "apply", "manifests", "--auto-approve", env=api.gateway_env)
    assert applied.returncode == 0, applied.stderr
    bodies = [api.post(canonical_bundle(), format=fmt).text for fmt in ("json", "text", "markdown")]
    # A manifest with a pasted key is refused by the loader without echoing the key.
    pasted = bundle({"fleet.yaml": f"apiKey: {api.admin_key}\n"})
    response = api.post(pasted)
    assert response.status_code == 422
    bodies.append(response.text)
    # A refusal that would echo a key-shaped file name withholds it.
    named = api.post(bundle({f"{api.admin_key}.txt": "x"}))
    assert named.status_code == 500 and "withheld" in named.text
    bodies.append(named.text)
    assert_no_keys(api, *bodies)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def test_tls(sandbox: SandboxServer, tmp_path: Path) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    key_file = tmp_path / "admin.key"
    key_file.write_text(sandbox.admin_key)
    key_file.chmod(0o600)
    cert, key = _self_signed(tmp_path)
    server, services = api_server(sandbox, tmp_path, tls=tls_context(cert, key))
    token = write_token(tmp_path / "plan.token")
    try:
        assert server.url.startswith("https://")
        ok = run_cli(
            tmp_path, "plan", "manifests", "--remote", server.url, "--token-file", str(token), "--remote-ca-file",
            str(cert), "--detailed-exitcode",
        )  # fmt: skip
        assert ok.returncode == 2, ok.stderr
        untrusted = run_cli(tmp_path, "plan", "manifests", "--remote", server.url, "--token-file", str(token))
        assert untrusted.returncode == 1 and "cannot reach the plan API" in untrusted.stderr
        # Plain HTTP to a TLS listener gets nothing back.
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{server.port}/v1/plan", json={}, timeout=5)
    finally:
        server.stop()
        services.close()


def test_daemon_serves_the_plan_api(sandbox: SandboxServer, tmp_path: Path) -> None:
    """``finops run --plan-api-port``: a real daemon process; refused without a token file."""
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    key_file = tmp_path / "admin.key"
    key_file.write_text(sandbox.admin_key)
    key_file.chmod(0o600)
    env = {**clean_env(), "GREENHELIX_URL": sandbox.url, "GREENHELIX_API_KEY_FILE": str(key_file)}
    port = free_port()
    no_token = run_cli(tmp_path, "run", "manifests", "--plan-api-port", str(port), env=env)
    assert no_token.returncode == 1 and "--plan-api-token-file" in no_token.stderr
    open_host = run_cli(
        tmp_path, "run", "manifests", "--plan-api-port", str(port), "--plan-api-host", "0.0.0.0",
        "--plan-api-token-file", str(write_token(tmp_path / "plan.token")), env=env,
    )  # fmt: skip
    assert open_host.returncode == 1 and "needs TLS" in open_host.stderr
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "run", "manifests", "--interval", "3600",
         "--plan-api-port", str(port), "--plan-api-token-file", "plan.token", "--log-format", "json"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(url), 60, "the plan API to listen")
        there = run_cli(
            tmp_path, "plan", "manifests", "--remote", url, "--token-file", "plan.token", "--format", "json"
        )
        assert there.returncode == 0, there.stderr
        plan = json.loads(there.stdout)
        assert plan["target"] and isinstance(plan["changes"], list)
        assert not contains_key_material(there.stdout)
        assert "plan API listening" in (tmp_path / "daemon.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-2000:]
    assert sandbox.admin_key not in (tmp_path / "daemon.log").read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_slow_body_gets_408_within_the_deadline(sandbox: SandboxServer, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(sandbox.admin_key)
    key_file.chmod(0o600)
    server, services = api_server(sandbox, tmp_path, BundleLimits(deadline_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(
                f"POST /v1/plan HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Length: 1000\r\n\r\n{".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 408 ")  # the server stops waiting, not the test
    finally:
        server.stop()
        services.close()


def test_a_bundle_cannot_make_the_daemon_read_a_secret_it_names(api: Api) -> None:
    """A referenced gateway-webhook secret ({env}/{file}, allowReferencedSecret) would be read
    on the daemon's host and its fingerprint returned: a token holder could probe the daemon's
    environment (PGPASSWORD, …) and files. The plan API refuses such bundles before planning."""
    files = {p.relative_to(CANONICAL).as_posix(): p.read_text() for p in sorted(CANONICAL.rglob("*.yaml"))}
    fleet = files["research-fleet.yaml"]
    for probe in ("{env: PGPASSWORD}", "{file: /etc/hostname}"):
        edited = fleet.replace(
            "      events: [billing.usage_recorded, billing.deposit]\n",
            "      events: [billing.usage_recorded, billing.deposit]\n      allowReferencedSecret: true\n",
            1,
        ).replace("signingSecret: {file: alert-signing.secret, generate: true}", f"signingSecret: {probe}", 1)
        assert edited.count("allowReferencedSecret: true") == 1 and probe in edited, "the canonical fleet changed"
        response = api.post(bundle({**files, "research-fleet.yaml": edited}))
        assert response.status_code == 422, response.text
        assert "does not read secrets a bundle names" in response.text
        assert "sha256:" not in response.text  # no fingerprint of anything on the daemon's host
