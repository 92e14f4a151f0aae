"""Resolving secrets named by reference in manifests (``{env: NAME}`` / ``{file: PATH}``).

Manifests live in git, so a signing secret is never written in one; this is the single
place that turns a reference into bytes. Values never appear in messages.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from controller.errors import ConfigError
from controller.secretfile import read_secret_file, write_secret_file
from policies.spec import SecretRef


class SecretUnavailable(ConfigError):
    """A referenced secret is not set (env) or not readable (file)."""


def resolve_secret(ref: SecretRef, *, create: bool = True) -> str:
    """The secret's value. With ``ref.generate`` and ``create``, a missing file is created
    with 32 random bytes (hex), atomically and 0600, so receivers can be given the file."""
    if ref.env:
        value = os.environ.get(ref.env, "")
        if not value:
            raise SecretUnavailable(f"signing secret: environment variable {ref.env} is not set or empty")
        return value
    assert ref.file is not None
    path = Path(ref.file)
    if not path.exists():
        if ref.generate and create:
            # Link into place so that of two processes generating at once, the first wins and
            # both sign with the same secret (a rename would let the second overwrite it).
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
            write_secret_file(tmp, secrets.token_hex(32) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        else:
            hint = " (set generate: true to have finops create it)" if not ref.generate else ""
            raise SecretUnavailable(f"signing secret: file {path} does not exist{hint}")
    try:
        value = read_secret_file(path)
    except OSError as exc:
        raise SecretUnavailable(f"signing secret: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise SecretUnavailable(f"signing secret: file {path} is empty")
    return value


def secret_fingerprint(value: str) -> str:
    """A short, non-reversible label for a secret, for plans and status (never the value)."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]
