"""``finops plan --remote URL --token-file FILE``: the plan of a running daemon's plan API
(``controller.daemon.planapi``), rendered like a local plan, exit codes included.

No gateway key, no state, no ``GREENHELIX_*`` variable is read: the manifests at PATH are
packed as the loader would read them (``manifest_files``: ``*.yaml``/``*.yml`` recursively,
hidden files skipped, links followed only inside PATH) and sent with the plan token. The
daemon validates them exactly as ``validate`` does; its errors are printed as
``PATH/file:line: field: message`` and exit 1, as locally.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import click
import httpx

from controller.errors import ConfigError, ManifestError
from controller.io.safefile import TooLarge, read_bounded
from controller.io.secretfile import check_private_file, read_secret_file
from controller.manifest.loader import MAX_FILE_BYTES, manifest_files
from policies.display import escape_lines
from policies.issues import ManifestIssue
from policies.plan_types import Plan, plan_from_dict
from policies.urls import is_loopback_host

BUNDLE_FORMAT_VERSION = 1  # controller.daemon.planapi.BUNDLE_FORMAT_VERSION (the CLI does not load the daemon)
PLAN_PATH = "/v1/plan"
MAX_BUNDLE_BYTES = 8 * 1024 * 1024
"""The client's own bound (the daemon's default limit); the daemon refuses above its own."""
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
F = TypeVar("F", bound=Callable[..., Any])
TIMEOUT_S = 180.0
TOO_LARGE = "file is larger than the 1 MiB limit for manifests; split it into several files"


def check_plan_api_url(url: str) -> str:
    """``https://``, or ``http://`` to a loopback host only (the token must not cross a network
    in clear); no credentials, query or fragment. Returns the ``/v1/plan`` URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"--remote {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"--remote must be an https:// URL (or http:// on loopback), got {url!r}")
    if "@" in parts.netloc:
        raise ConfigError("--remote must not embed credentials; the token comes from --token-file")
    if not host:
        raise ConfigError(f"--remote {url!r} has no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"--remote {url!r}: give the daemon's base URL, without query or fragment")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ConfigError(
            f"refusing to send the plan token in clear over http:// to {host}: serve the plan API "
            "with TLS (--plan-api-tls-cert) and use https://"
        )
    return url.rstrip("/") + PLAN_PATH


def pack(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """The bundle's files (name relative to PATH -> base64) and, for each name, the label a
    local run would print (PATH joined with it). Problems finding files (a link leading
    outside PATH) are the loader's ``ManifestError``, as locally."""
    if not os.path.lexists(path):
        raise ConfigError(f"manifest path {path!r} does not exist")
    files, issues = manifest_files(path)
    if issues:
        raise ManifestError(issues)
    single = not os.path.isdir(path)
    out: dict[str, str] = {}
    labels: dict[str, str] = {}
    total = 0
    for label, file in files:
        name = file.name if single else file.relative_to(path).as_posix()
        if not name.lower().endswith((".yaml", ".yml")):
            name += ".yaml"  # a single file named on the command line is read whatever its name
        try:
            content = read_bounded(file, MAX_FILE_BYTES)
        except TooLarge:
            raise ManifestError([ManifestIssue(label, None, "", TOO_LARGE)]) from None
        except OSError as exc:
            raise ManifestError([ManifestIssue(label, None, "", f"cannot read: {exc.strerror or exc}")]) from None
        total += len(content)
        if total > MAX_BUNDLE_BYTES:
            raise ConfigError(
                f"the manifests at {path} exceed {MAX_BUNDLE_BYTES // (1024 * 1024)} MiB; "
                "the plan API does not accept a bundle that large"
            )
        out[name] = base64.b64encode(content).decode("ascii")
        labels[name] = label
    return out, labels


def fetch_plan(url: str, token: str, path: str, *, prune: bool, ca_file: Path | None) -> Plan:
    """POST the bundle at ``path``; the plan, or ``ManifestError`` / ``ConfigError``."""
    endpoint = check_plan_api_url(url)
    files, labels = pack(path)
    body = json.dumps({"format_version": BUNDLE_FORMAT_VERSION, "prune": prune, "files": files}).encode()
    verify: bool | str = str(ca_file) if ca_file is not None else True
    try:
        with (
            httpx.Client(timeout=TIMEOUT_S, verify=verify, trust_env=False, follow_redirects=False) as client,
            client.stream(
                "POST",
                endpoint,
                content=body,
                params={"format": "json"},
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as response,
        ):
            raw = b""
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) > MAX_RESPONSE_BYTES:
                    raise ConfigError(f"the plan API at {url} sent more than {MAX_RESPONSE_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"cannot reach the plan API at {url}: {escape_lines(str(exc)) or type(exc).__name__}"
        ) from None
    status = response.status_code
    if status == 200:
        try:
            return plan_from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"the plan API at {url} answered something that is not a finops plan: {exc}") from None
    if status == 422:
        try:
            errors = json.loads(raw)["errors"]
            issues = [
                ManifestIssue(
                    _label(str(e["file"]), labels, path),
                    e["line"] if isinstance(e["line"], int) else None,
                    str(e["field"]),
                    str(e["message"]),
                )
                for e in errors
            ]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"the plan API at {url} refused the manifests (422) with an unreadable answer") from None
        raise ManifestError(issues)
    if status == 401:
        raise ConfigError(f"the plan API at {url} refused the token (401): check --token-file")
    reason = escape_lines(raw[:500].decode("utf-8", "replace").strip())
    raise ConfigError(f"the plan API at {url} answered {status}: {reason}")


def _label(name: str, labels: dict[str, str], path: str) -> str:
    """A file name from the daemon (relative to the bundle) as a local run prints it."""
    return labels.get(name) or os.path.join(path, name)


def read_token(token_file: Path) -> str:
    check_private_file(token_file, what="plan token file")
    try:
        return read_secret_file(token_file)
    except FileNotFoundError:
        raise ConfigError(f"the plan token file {token_file} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the plan token file {token_file}: {exc.strerror or exc}") from None


def remote_plan(url: str, token_file: Path | None, path: str, *, fmt: str, prune: bool, ca_file: Path | None) -> Plan:
    """The body of ``finops plan --remote``: the daemon's plan, after a banner where a local
    plan prints its gateway's (stdout for text, stderr otherwise); ``plan`` renders it and
    decides the exit code exactly as for a local plan."""
    if token_file is None:
        raise ConfigError("--remote needs --token-file FILE (the plan API's token, not the gateway key)")
    result = fetch_plan(url, read_token(token_file), path, prune=prune, ca_file=ca_file)
    click.echo(f"finops: plan from the daemon at {escape_lines(url)} (target {result.target})", err=fmt != "text")
    return result


@dataclass(frozen=True)
class RemoteOptions:
    """``plan --remote URL --token-file FILE [--remote-ca-file FILE]``."""

    url: str | None
    token_file: Path | None
    ca_file: Path | None

    def fetch(self, path: str, *, fmt: str, prune: bool) -> Plan:
        assert self.url is not None
        return remote_plan(self.url, self.token_file, path, fmt=fmt, prune=prune, ca_file=self.ca_file)


def remote_options(fn: F) -> F:
    """The ``--remote`` options of ``finops plan``, passed as ``remote``."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any, remote_url: str | None, token_file: Path | None, remote_ca_file: Path | None, **kw: Any
    ) -> Any:
        return fn(*args, remote=RemoteOptions(remote_url or None, token_file, remote_ca_file), **kw)

    command: Callable[..., Any] = wrapper
    options = [
        click.option(
            "--remote",
            "remote_url",
            envvar="FINOPS_PLAN_REMOTE",
            default=None,
            metavar="URL",
            help="Ask the daemon's plan API at URL (https://, or http:// on loopback) for the plan instead of "
            "the gateway: no gateway key needed (env FINOPS_PLAN_REMOTE).",
        ),
        click.option(
            "--token-file",
            envvar="FINOPS_PLAN_TOKEN_FILE",
            type=click.Path(path_type=Path),
            default=None,
            metavar="FILE",
            help="With --remote: file (0600) holding the plan API token (env FINOPS_PLAN_TOKEN_FILE).",
        ),
        click.option(
            "--remote-ca-file",
            envvar="FINOPS_PLAN_REMOTE_CA_FILE",
            type=click.Path(path_type=Path),
            default=None,
            metavar="FILE",
            help="With --remote: PEM CA bundle to trust for the plan API's certificate (default: system CAs).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return cast(F, command)


__all__ = ["RemoteOptions", "check_plan_api_url", "fetch_plan", "pack", "remote_options", "remote_plan"]
