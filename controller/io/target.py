"""Which gateway a command talks to: a real one, or the embedded sandbox.

With no gateway configured every command starts the embedded sandbox (state under the
state directory) so the quick start needs no account. A real gateway needs a URL and an
admin key from the environment or a key file: never from a manifest or a command-line
argument (arguments leak into shell history and ``ps``).

The admin key moves money, so it is never sent in clear over a network: a plain
``http://`` gateway URL is accepted only for a loopback host (``127.0.0.0/8``, ``::1``,
``localhost``: the embedded sandbox, a local port-forward or TLS-terminating sidecar), unless
the operator opts in with ``--allow-insecure-http`` (env ``FINOPS_ALLOW_INSECURE_HTTP=1``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from controller.errors import ConfigError
from controller.io.secretfile import make_private_dirs, read_secret_file
from controller.io.secretref import protect_secret_path
from controller.manifest.schema import port_problem
from controller.state.location import StateLocation, check_state_url
from policies.urls import is_loopback_host

DEFAULT_STATE_DIR = Path(".finops")


@dataclass(frozen=True)
class Target:
    """A resolved gateway connection. ``name`` is stable across runs (the embedded
    sandbox's port is not) and names the state file and the secrets sub-directory."""

    name: str
    url: str
    api_key: str = field(repr=False)
    embedded: bool
    state_dir: Path
    state_url: str | None = field(default=None, repr=False)
    """A shared PostgreSQL database (``--state-url``); ``None``: the SQLite file."""

    @property
    def state_file(self) -> Path:
        """The SQLite database; with ``state_url``, the local anchor of machine-local files."""
        return self.state_dir / f"state-{self.name}.db"

    @property
    def state_location(self) -> StateLocation:
        return StateLocation(self.state_file, url=self.state_url)

    def secrets_dir(self, override: Path | None) -> Path:
        return override if override is not None else self.state_dir / "secrets" / self.name

    def banner(self) -> str:
        if self.embedded:
            return (
                f"finops: using the embedded sandbox at {self.url} (state in {self.state_dir}/; "
                "no account, no real money). Set GREENHELIX_URL to use a real gateway."
            )
        return f"finops: using gateway {self.url}"


def _slug(url: str) -> str:
    host = re.sub(r"^[a-z]+://", "", url).split("/", 1)[0]
    return re.sub(r"[^A-Za-z0-9.-]+", "_", host) or "gateway"


def target_name(gateway: str | None) -> str:
    """The name the target's state goes by (``state-<name>.db``), as ``open_target`` names it,
    without an API key or a sandbox: for commands that read or copy state offline."""
    url = gateway or os.environ.get("GREENHELIX_URL")
    return _slug(url) if url else "sandbox"


def _api_key(key_file: str | None) -> str:
    path = key_file or os.environ.get("GREENHELIX_API_KEY_FILE")
    if path:
        try:
            key = read_secret_file(Path(path))
        except OSError as exc:
            raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"the API key file {path} is empty")
        return key
    key = os.environ.get("GREENHELIX_API_KEY", "").strip()
    if not key:
        raise ConfigError(
            "a gateway URL is set but no API key: set GREENHELIX_API_KEY or GREENHELIX_API_KEY_FILE "
            "(an admin-scoped key; see README 'Pointing finops at a real gateway')"
        )
    return key


def check_gateway_url(url: str, *, allow_insecure_http: bool) -> None:
    """Refuse a gateway URL the admin key must not be sent to (module doc), before any
    request: not http(s), credentials in the URL, or plain http to a non-loopback host."""
    if not re.match(r"^https?://", url):
        raise ConfigError(f"gateway URL must start with http:// or https://, got {url!r}")
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        host = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
    except ValueError as exc:
        raise ConfigError(f"gateway URL is not a valid URL: {exc}") from None
    if "@" in parts.netloc:
        raise ConfigError(
            "gateway URL must not embed credentials (user:password@); the admin key comes from "
            "GREENHELIX_API_KEY_FILE or GREENHELIX_API_KEY"
        )
    if not host:
        raise ConfigError("gateway URL has no host")
    if problem := port_problem(url):
        raise ConfigError(f"gateway URL {url!r}: {problem}")
    if url.lower().startswith("http://") and not allow_insecure_http and not is_loopback_host(host):
        raise ConfigError(
            f"refusing to send the admin key in clear over http:// to {host}: use https://, or pass "
            "--allow-insecure-http (env FINOPS_ALLOW_INSECURE_HTTP=1) only on a network you trust"
        )


@contextmanager
def open_target(
    gateway: str | None,
    *,
    api_key_file: str | None = None,
    state_dir: Path | None = None,
    allow_insecure_http: bool = False,
    state_url: str | None = None,
) -> Iterator[Target]:
    state = Path(state_dir or os.environ.get("FINOPS_STATE_DIR") or DEFAULT_STATE_DIR)
    state_url = check_state_url(state_url) if state_url else None
    url = gateway or os.environ.get("GREENHELIX_URL")
    # finops' own key material: no secret reference may name it (controller.io.secretref)
    for protected in (state / "secrets", state / "sandbox", *([Path(api_key_file)] if api_key_file else [])):
        protect_secret_path(protected)
    if url:
        check_gateway_url(url, allow_insecure_http=allow_insecure_http)
        target = Target(
            name=_slug(url), url=url.rstrip("/"), api_key=_api_key(api_key_file), embedded=False, state_dir=state,
            state_url=state_url,
        )
        protect_secret_path(target.state_file)
        yield target
        return
    from controller.sandbox.server import SandboxServer  # only needed without a real gateway

    sandbox_dir = state / "sandbox"
    make_private_dirs(sandbox_dir)
    with SandboxServer(db_path=sandbox_dir / "gateway.db", admin_key_file=sandbox_dir / "admin.key") as server:
        target = Target(
            name="sandbox",
            url=server.url,
            api_key=server.admin_key,
            embedded=True,
            state_dir=state,
            state_url=state_url,
        )
        protect_secret_path(target.state_file)
        yield target
