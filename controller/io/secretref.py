"""Resolving secrets named by reference in manifests (``{env: NAME}`` / ``{file: PATH}``),
and secrets finops generates itself (``SecretRef(managed=NAME)``).

Manifests live in git, so a signing secret is never written in one; this is the single
place that turns a reference into bytes. Values never appear in messages.

A reference may never name finops' own key material: the admin key's variables
(``GREENHELIX_API_KEY``, ``GREENHELIX_API_KEY_FILE``), the admin key file, the
key-encryption key's file (``FINOPS_KEY_ENCRYPTION_KEY_FILE``), the key store
(secrets directory), the embedded sandbox's files or the state database, nor any value that
is shaped like a GreenHelix API key (an agent's key file copied anywhere, a sink directory).
A referenced file must be a regular file readable by its owner only (0600/0400): a file
that group or others can read (``/etc/shadow`` is 0640) is not a secret of finops'.
The same checks run at plan time (``reconcile.secret_fingerprints``, before any write) and
again at every resolve.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from controller.errors import ConfigError
from controller.io.secretfile import read_secret_file, write_secret_file
from policies.keyprint import looks_like_key_material
from policies.keyprint import secret_fingerprint as secret_fingerprint
from policies.spec import SecretRef

ADMIN_KEY_ENV = "GREENHELIX_API_KEY"
ADMIN_KEY_FILE_ENV = "GREENHELIX_API_KEY_FILE"
KEK_FILE_ENV = "FINOPS_KEY_ENCRYPTION_KEY_FILE"
"""Names the key-encryption key of the database key store (``controller.keys.envelope``)."""
PROTECTED_ENV = frozenset({ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, KEK_FILE_ENV})
"""Environment variables a secret reference may never name."""

MAX_SECRET_BYTES = 4096
_PSEUDO_FS = ("/proc", "/sys", "/dev")
"""Kernel pseudo-files (``/proc/self/environ`` holds the admin key) are never secrets."""
_MANAGED_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,127}$")
_protected: set[Path] = set()
_protected_lock = threading.Lock()


class SecretUnavailable(ConfigError):
    """A referenced secret is not set (env) or not readable (file)."""


class SecretRefused(SecretUnavailable):
    """A reference names finops' own key material, or a file that is not private."""


def protect_secret_path(path: Path) -> None:
    """Register a file or directory holding finops' key material (the composition root and
    the key store call this); no secret reference may resolve inside it."""
    with _protected_lock:
        _protected.add(Path(os.path.realpath(path)))


def protected_paths(extra: Iterable[Path] = ()) -> frozenset[Path]:
    paths = {Path(os.path.realpath(p)) for p in extra}
    for name in (ADMIN_KEY_FILE_ENV, KEK_FILE_ENV):
        key_file = os.environ.get(name)
        if key_file:
            paths.add(Path(os.path.realpath(key_file)))
    with _protected_lock:
        return frozenset(paths | _protected)


def managed_secret_dir(state_path: Path) -> Path:
    """Where finops keeps the secrets it generates for a state database (one per target)."""
    state_path = Path(state_path)
    return state_path.parent / "generated-secrets" / state_path.stem


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_secret_ref(ref: SecretRef, *, protected: Iterable[Path] = ()) -> str | None:
    """Why ``ref`` may not be used (``None``: it may). Looks at names and paths only."""
    if ref.env is not None and ref.env in PROTECTED_ENV:
        return (
            f"signing secret: environment variable {ref.env} holds finops' admin key; a secret reference may "
            "never name finops' own key material"
        )
    if ref.file is not None:
        real = Path(os.path.realpath(ref.file))
        for root in protected_paths(protected):
            if _inside(real, root):
                return (
                    f"signing secret: file {ref.file} is finops' own key material ({root} holds API keys or "
                    "finops' state); a secret reference may never name it"
                )
    return None


def _checked_value(value: str, where: str) -> str:
    if looks_like_key_material(value):
        raise SecretRefused(
            f"signing secret: {where} holds a GreenHelix API key; a secret reference may never name key material"
        )
    return value


def _check_private(path: Path) -> None:
    try:
        st = os.stat(path)  # follows symlinks: mounted secrets are often symlinks
    except FileNotFoundError:
        return
    real = Path(os.path.realpath(path))
    if not stat.S_ISREG(st.st_mode) or any(_inside(real, Path(root)) for root in _PSEUDO_FS):
        raise SecretRefused(f"signing secret: {path} is not a regular file on disk")
    if st.st_size > MAX_SECRET_BYTES:
        raise SecretRefused(
            f"signing secret: file {path} is {st.st_size} bytes; a signing secret is at most {MAX_SECRET_BYTES} bytes"
        )
    if st.st_mode & 0o077:
        raise SecretRefused(
            f"signing secret: file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"a signing secret must be private to finops' user (`chmod 600 {path}`; in Kubernetes "
            "`defaultMode: 0400`)"
        )


def _link_new_secret(path: Path, value: str) -> bool:
    """Create ``path`` holding ``value`` (0600, atomic) unless it exists. Linked into place
    so that of two processes creating it at once, the first wins and both sign with the
    same secret (a rename would let the second overwrite it). True if this call created it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    write_secret_file(tmp, value + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def managed_secret_missing(ref: SecretRef, managed_dir: Path) -> bool:
    """A finops-generated secret whose file does not exist (yet)."""
    return (
        ref.managed is not None
        and _MANAGED_NAME.match(ref.managed) is not None
        and not os.path.lexists(Path(managed_dir) / f"{ref.managed}.secret")
    )


def adopt_managed_secret(ref: SecretRef, value: str, managed_dir: Path) -> bool:
    """Store ``value`` as the finops-generated secret ``ref`` when its file is missing (the
    gateway lists webhook secrets in clear, so a lost one is re-derived from finops' own
    live webhooks rather than replaced). Never overwrites an existing file; refuses a value
    shaped like an API key. True if the file was created by this call."""
    if not managed_secret_missing(ref, managed_dir) or not value or len(value) > MAX_SECRET_BYTES:
        return False
    _checked_value(value, f"the live webhooks' secret for {ref.describe()}")
    assert ref.managed is not None
    return _link_new_secret(Path(managed_dir) / f"{ref.managed}.secret", value)


def resolve_secret(
    ref: SecretRef, *, create: bool = True, managed_dir: Path | None = None, protected: Iterable[Path] = ()
) -> str:
    """The secret's value. With ``ref.generate`` (or a managed secret) and ``create``, a
    missing file is created with 32 random bytes (hex), atomically and 0600."""
    if ref.managed is not None:
        if managed_dir is None or not _MANAGED_NAME.match(ref.managed):
            raise SecretUnavailable(f"signing secret: finops-generated secret {ref.managed!r} has no place to live")
        path = Path(managed_dir) / f"{ref.managed}.secret"
        generate = True
    else:
        problem = check_secret_ref(ref, protected=protected)
        if problem is not None:
            raise SecretRefused(problem)
        if ref.env:
            value = os.environ.get(ref.env, "")
            if not value:
                raise SecretUnavailable(f"signing secret: environment variable {ref.env} is not set or empty")
            return _checked_value(value, f"environment variable {ref.env}")
        assert ref.file is not None
        path = Path(ref.file)
        generate = ref.generate
    if not path.exists():
        if generate and create:
            _link_new_secret(path, secrets.token_hex(32))
        elif ref.managed is not None:
            raise SecretUnavailable(f"signing secret: finops generates {path} on the first apply")
        else:
            hint = " (set generate: true to have finops create it)" if not ref.generate else ""
            raise SecretUnavailable(f"signing secret: file {path} does not exist{hint}")
    _check_private(path)
    try:
        value = read_secret_file(path)
    except OSError as exc:
        raise SecretUnavailable(f"signing secret: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise SecretUnavailable(f"signing secret: file {path} is empty")
    return _checked_value(value, f"file {path}")
