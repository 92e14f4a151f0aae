"""Where finops' state lives: an embedded SQLite file (the default) or a shared PostgreSQL
database (``--state-url postgresql://…`` / ``FINOPS_STATE_URL``).

A ``StateLocation`` is a value: it names the backend and how to reach it, never holds a
connection. ``file`` is always set: with SQLite it is the database; with PostgreSQL it is
the machine-local anchor for what stays on this machine (generated secret files beside it).
``str()`` never shows a password from the URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from controller.errors import ConfigError

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
_SCHEMES = ("postgresql", "postgres")


_SECRET_PARAM = re.compile(r"pass|secret|token|key$", re.IGNORECASE)
"""Query parameters whose value is hidden: libpq's ``password`` and ``sslpassword`` (a
``postgresql://h/db?password=…`` URL is valid), and anything named like a credential."""


def redact_url(url: str) -> str:
    """The URL with any password replaced, in the user-info or in the query string (safe for
    logs, errors and ``status``)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable state URL>"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAM.search(unquote(name)) else f"{name}{sep}{value}"
        for name, sep, value in (p.partition("=") for p in parts.query.split("&") if p)
    )
    fragment = "***" if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


@dataclass(frozen=True)
class StateLocation:
    file: Path
    url: str | None = field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return POSTGRESQL if self.url else SQLITE

    @property
    def shared(self) -> bool:
        """Several machines can use it (PostgreSQL)."""
        return self.url is not None

    def exists(self) -> bool:
        """Whether there may be state to read (a missing SQLite file has none)."""
        return self.url is not None or self.file.exists()

    def __str__(self) -> str:
        return redact_url(self.url) if self.url else str(self.file)

    def __repr__(self) -> str:
        return f"StateLocation({self})"


def check_state_url(url: str) -> str:
    """A usable PostgreSQL URL, or a clear error naming what is wrong (password redacted)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError("--state-url / FINOPS_STATE_URL is not a URL") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"state URL {redact_url(url)!r}: only postgresql://… is supported (leave it unset for the "
            "embedded SQLite file under --state-dir)"
        )
    if not parts.path.strip("/"):
        raise ConfigError(f"state URL {redact_url(url)!r} names no database (postgresql://HOST/DATABASE)")
    return url


def as_location(where: Path | str | StateLocation) -> StateLocation:
    """A location from what older callers pass (a SQLite path)."""
    if isinstance(where, StateLocation):
        return where
    return StateLocation(file=Path(where))
