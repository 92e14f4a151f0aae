"""Which gateway a command talks to: a real one, or the embedded sandbox.

With no gateway configured every command starts the embedded sandbox (state under the
state directory) so the quick start needs no account. A real gateway needs a URL and an
admin key from the environment or a key file: never from a manifest or a command-line
argument (arguments leak into shell history and ``ps``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from controller.errors import ConfigError
from controller.secretfile import make_private_dirs, read_secret_file
from controller.secretref import protect_secret_path

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

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"state-{self.name}.db"

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


@contextmanager
def open_target(
    gateway: str | None, *, api_key_file: str | None = None, state_dir: Path | None = None
) -> Iterator[Target]:
    state = Path(state_dir or os.environ.get("FINOPS_STATE_DIR") or DEFAULT_STATE_DIR)
    url = gateway or os.environ.get("GREENHELIX_URL")
    # finops' own key material: no secret reference may name it (controller.secretref)
    for protected in (state / "secrets", state / "sandbox", *([Path(api_key_file)] if api_key_file else [])):
        protect_secret_path(protected)
    if url:
        if not re.match(r"^https?://", url):
            raise ConfigError(f"gateway URL must start with http:// or https://, got {url!r}")
        target = Target(
            name=_slug(url), url=url.rstrip("/"), api_key=_api_key(api_key_file), embedded=False, state_dir=state
        )
        protect_secret_path(target.state_file)
        yield target
        return
    from controller.sandbox.server import SandboxServer  # only needed without a real gateway

    sandbox_dir = state / "sandbox"
    make_private_dirs(sandbox_dir)
    with SandboxServer(db_path=sandbox_dir / "gateway.db", admin_key_file=sandbox_dir / "admin.key") as server:
        target = Target(name="sandbox", url=server.url, api_key=server.admin_key, embedded=True, state_dir=state)
        protect_secret_path(target.state_file)
        yield target
