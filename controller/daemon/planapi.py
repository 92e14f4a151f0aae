"""The daemon's plan API: ``POST /v1/plan`` a bundle of manifests, get back the plan a local
``finops plan`` would print against the daemon's live view. CI then needs no gateway key.

The API can never apply: the only thing it calls is a ``PlanFn`` (observe + plan, read-only,
as ``finops plan`` does). It runs on a listener of its own (stdlib ``ThreadingHTTPServer`` in
a thread, like the metrics endpoint), loopback by default, TLS optional (required off
loopback: the token would cross the network in clear).

Request: ``POST /v1/plan[?format=json|text|markdown]`` with ``Authorization: Bearer TOKEN``
and a JSON body (``BUNDLE_FORMAT_VERSION``)::

    {"format_version": 1, "prune": false, "files": {"fleet.yaml": "<base64 of the file>"}}

Names are relative POSIX paths ending in ``.yaml``/``.yml``, no hidden parts, no ``..``, no
absolute names; the bundle cannot express a link. The files are written to a private
temporary directory and loaded by ``load_manifests`` with the daemon's state directory, the
same rules as a local plan (relative secret paths resolve against the state directory).

Answers: 200 a plan (JSON ``plan_to_dict`` by default, or the text/markdown rendering);
422 ``{"errors": [{file, line, field, message}]}`` for invalid manifests (the same issues
``validate`` reports, file names relative to the bundle); 400 a malformed bundle; 401 (no
details) without the right token, checked with ``hmac.compare_digest`` before the body is
read; 411/413 a body without a length or above ``max_bytes`` (refused before it is read);
408 a request slower than the deadline; 503 while ``max_concurrent`` plans run; 502 when
planning failed (the gateway, the state). No answer ever carries key material: a plan has
fingerprints only, and every body is checked for key-shaped text before it is sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

from controller.daemon.serving import ThreadedServer
from controller.errors import ConfigError, FinopsError, ManifestError
from controller.gateway.client import GatewayClient
from controller.io.secretfile import check_private_file, make_private_dirs, read_secret_file
from controller.manifest.loader import SUFFIXES, load_manifests
from controller.reconcile.decide import observe_and_plan
from controller.state import StateStore
from policies.display import escape_lines
from policies.issues import ManifestIssue
from policies.keyprint import contains_key_material
from policies.plan_types import Plan, plan_to_dict
from policies.spec import DesiredState
from policies.urls import is_loopback_host

PlanFn = Callable[[DesiredState, bool], Plan]
"""``plan(desired, prune)``: observe and plan, read-only (called from a server thread)."""
Renderer = Callable[[Plan], str]

BUNDLE_FORMAT_VERSION = 1
PLAN_PATH = "/v1/plan"
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_FILES = 1000
DEFAULT_DEADLINE_S = 120.0
DEFAULT_MAX_CONCURRENT = 2
MIN_TOKEN_CHARS = 16
MAX_NAME_CHARS = 255
_CHUNK = 64 * 1024

log = logging.getLogger("finops.planapi")


class BundleRefused(Exception):
    """A request the API refuses, with its HTTP status and a short, inert reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class BundleLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    """Largest request body (base64 included); refused from its Content-Length, unread."""
    max_files: int = DEFAULT_MAX_FILES
    deadline_s: float = DEFAULT_DEADLINE_S
    """Wall time for reading one request's body and for planning it."""
    max_concurrent: int = DEFAULT_MAX_CONCURRENT


def read_plan_token(path: Path) -> str:
    """The plan token from its file (0600, finops' user, a regular file), at least
    ``MIN_TOKEN_CHARS`` characters; never the admin key's file."""
    check_private_file(path, what="plan token file")
    try:
        token = read_secret_file(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the plan token file {path}: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"the plan token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if contains_key_material(token):
        raise ConfigError(f"{path} holds a gateway API key: the plan token must be a separate secret")
    return token


def bundle_name(name: object) -> str:
    """A bundle's file name, checked: relative, POSIX, a manifest suffix, no hidden or ``..``
    part (the loader would skip hidden files; refusing keeps both sides identical)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise BundleRefused(400, "a file name is empty, too long or not a string")
    shown = escape_lines(name)
    if "\\" in name or "\x00" in name or any(ord(c) < 0x20 for c in name):
        raise BundleRefused(400, f"file name {shown!r}: backslashes and control characters are refused")
    pure = PurePosixPath(name)
    if pure.is_absolute():
        raise BundleRefused(400, f"file name {shown!r} is absolute; names are relative to the bundle")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BundleRefused(400, f"file name {shown!r} has an empty, '.' or '..' part")
    if any(part.startswith(".") for part in parts):
        raise BundleRefused(400, f"file name {shown!r} has a hidden part (the loader skips those)")
    if not name.lower().endswith(SUFFIXES):
        raise BundleRefused(400, f"file name {shown!r} is not a .yaml or .yml file")
    return name


def parse_bundle(body: bytes, limits: BundleLimits) -> tuple[dict[str, bytes], bool]:
    """The files (name -> content) and the prune flag of a bundle, or ``BundleRefused``."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BundleRefused(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise BundleRefused(400, "the body must be a JSON object")
    if data.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleRefused(400, f"format_version must be {BUNDLE_FORMAT_VERSION}")
    unknown = sorted(set(data) - {"format_version", "files", "prune"})
    if unknown:
        raise BundleRefused(400, f"unknown field(s): {', '.join(escape_lines(str(u))[:40] for u in unknown[:5])}")
    prune = data.get("prune", False)
    if not isinstance(prune, bool):
        raise BundleRefused(400, "prune must be true or false")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleRefused(400, "files must be a non-empty object {name: base64 content}")
    if len(files) > limits.max_files:
        raise BundleRefused(413, f"the bundle has {len(files)} files; at most {limits.max_files} are accepted")
    out: dict[str, bytes] = {}
    folded: set[str] = set()
    for name, encoded in files.items():
        checked = bundle_name(name)
        if not isinstance(encoded, str):
            raise BundleRefused(400, f"file {escape_lines(checked)!r}: content must be a base64 string")
        try:
            content = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BundleRefused(400, f"file {escape_lines(checked)!r}: content is not valid base64") from None
        key = checked.lower()
        if key in folded:
            raise BundleRefused(400, f"file {escape_lines(checked)!r} is named twice (names differing in case)")
        folded.add(key)
        out[checked] = content
    names = set(out)
    for name in names:
        # "a.yaml" and "a.yaml/b.yaml" cannot both exist in a directory.
        for parent in PurePosixPath(name).parents:
            if str(parent) != "." and str(parent) in names:
                raise BundleRefused(400, f"{escape_lines(str(parent))!r} is both a file and a directory")
    return out, prune


def write_bundle(files: Mapping[str, bytes], directory: Path) -> None:
    """Write the (checked) files under ``directory``: directories 0700, files 0600, never
    following a link (there are none: the directory is new and private)."""
    for name, content in files.items():
        target = directory.joinpath(*name.split("/"))
        make_private_dirs(target.parent)  # 0700 whatever the umask
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)


def _relabel(issue: ManifestIssue, root: str) -> dict[str, Any]:
    """An issue as JSON, with the private directory's path taken out of names and messages."""

    def strip(text: str) -> str:
        return text.replace(root + os.sep, "").replace(root, ".")

    return {"file": strip(issue.file), "line": issue.line, "field": issue.field, "message": strip(issue.message)}


class PlanApi:
    """The request handling, without HTTP: check the token, load a bundle, plan, render."""

    def __init__(
        self,
        token: str,
        plan: PlanFn,
        *,
        state_dir: Path,
        renderers: Mapping[str, Renderer],
        limits: BundleLimits = BundleLimits(),
    ) -> None:
        self._token = token.encode()
        self._plan = plan
        self._state_dir = Path(state_dir)
        self._renderers = dict(renderers)
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)

    def authorized(self, header: str | None) -> bool:
        """``Authorization: Bearer TOKEN``, compared in constant time."""
        scheme, _, given = (header or "").partition(" ")
        candidate = given.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare even when the scheme is wrong, so timing says nothing about the header.
        return hmac.compare_digest(candidate, self._token) and bool(candidate)

    def fmt(self, query: str) -> str:
        values = parse_qs(query).get("format", ["json"])
        fmt = values[-1]
        if fmt not in self._renderers:
            raise BundleRefused(400, f"format must be one of {', '.join(sorted(self._renderers))}")
        return fmt

    def handle(self, body: bytes, fmt: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for an authorized request's body."""
        files, prune = parse_bundle(body, self.limits)
        if not self._slots.acquire(blocking=False):
            raise BundleRefused(503, "busy: other plans are running; retry shortly")
        try:
            with tempfile.TemporaryDirectory(prefix="finops-plan-api-") as tmp:
                root = os.path.realpath(tmp)
                os.chmod(root, 0o700)
                write_bundle(files, Path(root))
                try:
                    desired = load_manifests(root, state_dir=self._state_dir)
                except ManifestError as exc:
                    payload = {"format_version": 1, "errors": [_relabel(i, root) for i in exc.issues]}
                    return 422, "application/json", _json(payload)
            if probes := referenced_secrets(desired):
                raise BundleRefused(
                    422,
                    "the plan API does not read secrets a bundle names ("
                    + ", ".join(probes[:5])
                    + "): their fingerprints would let a token holder probe the daemon's environment and files; "
                    "plan fleets with allowReferencedSecret locally",
                )
            try:
                result = self._plan(desired, prune)
            except FinopsError as exc:
                return 502, "text/plain; charset=utf-8", f"plan failed: {escape_lines(str(exc))}\n".encode()
        finally:
            self._slots.release()
        if fmt == "json":
            return 200, "application/json", _json(plan_to_dict(result))
        return (
            200,
            f"text/{'markdown' if fmt == 'markdown' else 'plain'}; charset=utf-8",
            (self._renderers[fmt](result) + "\n").encode(),
        )


def referenced_secrets(desired: DesiredState) -> list[str]:
    """Secrets a plan would read because the manifests name them (gateway webhooks with
    ``allowReferencedSecret``: an environment variable or a file of the daemon's host),
    described by agent; finops' own generated secrets are not among them."""
    return sorted(
        f"{agent.agent_id}: {hook.secret.describe()}"
        for agent in desired.agents()
        for hook in agent.gateway_webhooks
        if hook.secret.managed is None
    )


def _json(payload: object) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "finops-plan-api"
    sys_version = ""

    def setup(self) -> None:
        self.request.settimeout(self.server.api.limits.deadline_s)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # in this request's thread, bounded by the timeout
        super().setup()

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/healthz":
            self._send(200, b"ok\n")
        else:
            self._send(404, b"not found: POST /v1/plan\n")

    def do_POST(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        if url.path != PLAN_PATH:
            self._send(404, b"not found: POST /v1/plan\n")
            return
        if not api.authorized(self.headers.get("Authorization")):
            self._send(401, b"unauthorized\n", extra={"WWW-Authenticate": 'Bearer realm="finops plan API"'})
            return
        try:
            fmt = api.fmt(url.query)
            body = self._body(api.limits)
            status, ctype, payload = api.handle(body, fmt)
        except BundleRefused as exc:
            self._send(exc.status, f"{exc.reason}\n".encode())
            return
        except TimeoutError:
            self._send(408, b"request too slow\n")
            return
        except Exception:  # a bug must not kill the thread silently nor leak a traceback
            log.exception("plan API request failed")
            self._send(500, b"internal error; see the daemon's log\n")
            return
        self._send(status, payload, ctype)

    def _body(self, limits: BundleLimits) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise BundleRefused(411, "send the bundle with a Content-Length, not chunked")
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.isdigit():
            raise BundleRefused(411, "a Content-Length is required")
        length = int(raw)
        if length > limits.max_bytes:
            self.close_connection = True
            raise BundleRefused(413, f"the bundle is {length} bytes; at most {limits.max_bytes} are accepted")
        deadline = time.monotonic() + limits.deadline_s
        chunks: list[bytes] = []
        left = length
        while left:
            if time.monotonic() > deadline:
                self.close_connection = True
                raise TimeoutError
            chunk = self.rfile.read1(min(left, _CHUNK))
            if not chunk:
                self.close_connection = True
                raise BundleRefused(400, "the body ended before its Content-Length")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        if contains_key_material(body.decode("utf-8", "replace")):
            # Every answer, refusals echoing a file name included: never key-shaped text.
            log.error("plan API withheld a response holding key-shaped text")
            status, content_type = 500, "text/plain; charset=utf-8"
            body = b"internal error: the response held key-shaped text and was withheld\n"
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            if status >= 400 and status != 422:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        log.debug("plan API: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: PlanApi, tls: ssl.SSLContext | None) -> None:
        self.api = api
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        if tls is not None:
            # The handshake runs in the request's thread (first read), not in the accept loop.
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed TLS handshake or a dropped client: logged quietly, never a traceback on stderr."""
        log.debug("plan API: connection from %s failed", client_address, exc_info=True)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``cert``/``key`` (PEM), TLS 1.2 or later."""
    check_private_file(key, what="plan API TLS key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the plan API certificate {cert} / key {key}: {exc}") from None
    return context


class PlanApiServer(ThreadedServer):
    """``POST /v1/plan`` and ``GET /healthz`` on ``host:port`` (``port=0``: a free port)."""

    def __init__(self, api: PlanApi, *, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        if tls is None and not is_loopback_host(host):
            raise ConfigError(
                f"the plan API on {host} needs TLS (--plan-api-tls-cert/--plan-api-tls-key): "
                "its token would otherwise cross the network in clear"
            )
        try:
            server = _Server((host, port), api, tls)
        except OSError as exc:
            raise ConfigError(f"cannot serve the plan API on {host}:{port}: {exc.strerror or exc}") from None
        self.scheme = "https" if tls is not None else "http"
        super().__init__(server, host, name="finops-plan-api")


__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "PLAN_PATH",
    "BundleLimits",
    "BundleRefused",
    "PlanApi",
    "PlanApiServer",
    "PlanFn",
    "bundle_name",
    "gateway_planner",
    "parse_bundle",
    "read_plan_token",
    "tls_context",
]


def gateway_planner(
    client: Callable[[], GatewayClient], store: StateStore, target: str, *, deadline_s: float = DEFAULT_DEADLINE_S
) -> PlanFn:
    """The ``PlanFn`` of a daemon: ``observe_and_plan`` (read-only, exactly as ``finops plan``)
    with a fresh client per request, in the request's thread, within ``deadline_s``."""

    def plan(desired: DesiredState, prune: bool) -> Plan:
        async def go() -> Plan:
            async with client() as gateway:
                return await observe_and_plan(gateway, desired, target, store, prune=prune)

        try:
            return asyncio.run(asyncio.wait_for(go(), deadline_s))
        except TimeoutError:
            raise ConfigError(f"planning took longer than {deadline_s:g} s; nothing was returned") from None

    return plan
