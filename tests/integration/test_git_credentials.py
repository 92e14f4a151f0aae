"""Git credentials in a --git URL never appear in any process's argv, nor in messages.

A real smart-HTTP git server on 127.0.0.1 (``git http-backend`` behind Basic auth) serves a
bare repository; the daemon's GitSource fetches it through a URL carrying a user and token.
A ``git`` wrapper first on PATH records the argv finops gives git, and a watcher reads every
process's command line (/proc) while the fetch runs.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controller.daemon.source import GitSource, SourceError, split_credentials
from tests.integration.conftest import CANONICAL

USER = "fleet-bot"
TOKEN = "ghp_Sup3rSecretT0ken_9c1f"  # a test credential
REAL_GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(REAL_GIT is None, reason="git is not installed")


class GitHttpServer:
    """``git http-backend`` (CGI) behind HTTP Basic auth, on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.auth_seen: list[str] = []
        expected = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                auth = self.headers.get("Authorization", "")
                outer.auth_seen.append("ok" if auth == expected else ("wrong" if auth else "none"))
                if auth != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="fleet"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                env = {
                    "PATH": os.environ["PATH"],
                    "GIT_PROJECT_ROOT": str(root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "REQUEST_METHOD": self.command,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_USER": USER,
                    "REMOTE_ADDR": "127.0.0.1",
                }
                assert REAL_GIT is not None
                out = subprocess.run([REAL_GIT, "http-backend"], input=body, env=env, capture_output=True).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _handle
            do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, userinfo: str) -> str:
        return f"http://{userinfo}127.0.0.1:{self._server.server_address[1]}/fleet.git"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _git(cwd: Path, *args: str) -> None:
    assert REAL_GIT is not None
    subprocess.run([REAL_GIT, *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[GitHttpServer]:
    work = tmp_path / "work"
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    shutil.copytree(CANONICAL, work / "manifests")
    _git(work, "add", "-A")
    _git(work, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "fleet")
    root = tmp_path / "srv"
    root.mkdir()
    _git(root, "clone", "-q", "--bare", str(work), "fleet.git")
    srv = GitHttpServer(root)
    yield srv
    srv.close()


@pytest.fixture
def argv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``git`` wrapper first on PATH that appends its argv to a file, then runs git."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "argv.log"
    wrapper = bindir / "git"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec "{REAL_GIT}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no operator ~/.gitconfig helpers
    return log


class ArgvWatcher:
    """Reads every visible process's command line until stopped; keeps the ones that
    contain ``needle``."""

    def __init__(self, needle: str) -> None:
        self.needle = needle.encode()
        self.hits: list[bytes] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        cmdline = (entry / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if self.needle in cmdline:
                        self.hits.append(cmdline)
            self.scans += 1

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
async def test_a_token_in_the_url_authenticates_without_ever_reaching_argv(
    server: GitHttpServer, argv_log: Path, tmp_path: Path
) -> None:
    source = GitSource(server.url(f"{USER}:{TOKEN}@"), "main", "manifests", tmp_path / "clone")
    with ArgvWatcher(TOKEN) as watcher:
        revision = await source.fetch()
        path = await source.checkout(revision)
    assert (path / "fleet.yaml").exists() or any(path.glob("*.yaml"))
    assert "ok" in server.auth_seen  # the credentials did reach the server, over HTTP
    calls = argv_log.read_text()
    assert "fetch" in calls and "127.0.0.1" in calls
    assert TOKEN not in calls and USER not in calls
    assert watcher.scans > 0 and watcher.hits == []
    assert TOKEN not in source.label
    # nothing on disk in the clone carries it either (FETCH_HEAD records the URL)
    for file in (tmp_path / "clone" / ".git").rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


async def test_wrong_credentials_fail_with_a_message_that_does_not_echo_them(
    server: GitHttpServer, argv_log: Path, tmp_path: Path
) -> None:
    wrong = "wrong-T0ken-abcdef"
    source = GitSource(server.url(f"{USER}:{wrong}@"), "main", "manifests", tmp_path / "clone")
    with pytest.raises(SourceError) as caught:
        await source.fetch()
    assert "wrong" in server.auth_seen
    assert wrong not in str(caught.value)
    assert wrong not in argv_log.read_text()


async def test_without_credentials_the_operators_setup_is_used_untouched(
    server: GitHttpServer, argv_log: Path, tmp_path: Path
) -> None:
    source = GitSource(server.url(""), "main", "manifests", tmp_path / "clone")
    with pytest.raises(SourceError, match="failed"):
        await source.fetch()
    assert server.auth_seen and set(server.auth_seen) == {"none"}
    assert "credential.helper" not in argv_log.read_text()


@pytest.mark.parametrize(
    ("url", "clean", "creds"),
    [
        ("https://bot:s3cret@git.example.com/o/fleet.git", "https://git.example.com/o/fleet.git", ("bot", "s3cret")),
        ("https://ghp_tok@git.example.com/f.git", "https://git.example.com/f.git", ("ghp_tok", "")),
        ("https://bot:p%40ss%3Aw@git.example.com:8443/f.git", "https://git.example.com:8443/f.git", ("bot", "p@ss:w")),
        ("ssh://git@github.com/acme/fleet.git", "ssh://git@github.com/acme/fleet.git", None),
        ("git@github.com:acme/fleet.git", "git@github.com:acme/fleet.git", None),
        ("/srv/git/fleet.git", "/srv/git/fleet.git", None),
    ],
)
def test_split_credentials(url: str, clean: str, creds: tuple[str, str] | None) -> None:
    assert split_credentials(url) == (clean, creds)


def test_a_password_in_an_ssh_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="embeds a password") as caught:
        GitSource("ssh://git:hunter22@github.com/acme/fleet.git", "main", "manifests", tmp_path / "c")
    assert "hunter22" not in str(caught.value)


def test_credentials_over_plain_http_to_another_host_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="in clear over http://") as caught:
        GitSource("http://bot:tok3n-xyz@git.example.com/f.git", "main", "manifests", tmp_path / "c")
    assert "tok3n-xyz" not in str(caught.value)


def test_the_command_line_never_holds_the_credentials(tmp_path: Path) -> None:
    source = GitSource("https://bot:s3cret-token@git.example.com/f.git", "main", "m", tmp_path / "c")
    argv, env = source.command("fetch", "--", source.url)
    assert not any("s3cret-token" in a or "bot" in a.split("/")[-1] for a in argv)
    assert env["FINOPS_GIT_PASSWORD"] == "s3cret-token"
    assert "credential.helper=" in argv  # the operator's helpers are switched off for this URL
