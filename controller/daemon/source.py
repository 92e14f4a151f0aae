"""Where the daemon reads manifests from: a directory, or a branch of a git repository.

A source names each version of the manifests by a *revision* (a git commit, or a digest of
a directory's files), so a pass can tell "same manifests as last time" from "new ones",
record what it applied, and return to the last good revision when a new one is invalid.

Git is driven through the ``git`` executable: it brings every transport, credential
helper and SSH setup the operator already has, which a library would have to re-create.

Credentials never appear in any process's argv (``ps`` shows argv to every user) nor in a
message: a user name or token in an ``http(s)://`` URL is removed from the URL git is given,
and handed to git through the environment by a credential helper defined on the command
line that reads it from the environment (``FINOPS_GIT_USERNAME``/``FINOPS_GIT_PASSWORD``,
visible only to the same user). The operator's own credential helpers are switched off for
that URL, so the token is never stored by them either. Other schemes cannot take a password
this way (ssh prompts for it), so a password in them is refused: use SSH keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from controller.daemon.logs import redact
from controller.errors import FinopsError, ManifestError
from controller.io.blocking import off_loop
from controller.io.safefile import TooLarge, read_bounded
from controller.manifest.loader import MAX_FILE_BYTES, manifest_files
from policies.urls import is_loopback_host

GIT_TIMEOUT_S = 120.0

GIT_USERNAME_ENV = "FINOPS_GIT_USERNAME"
GIT_PASSWORD_ENV = "FINOPS_GIT_PASSWORD"
#: A git credential helper that answers ``get`` from the environment: its text is in argv,
#: the credentials are not.
_ENV_CREDENTIAL_HELPER = (
    "!f() { test \"$1\" = get || exit 0; "
    f'printf "username=%s\\npassword=%s\\n" "${GIT_USERNAME_ENV}" "${GIT_PASSWORD_ENV}"; }}; f'
)


class SourceError(FinopsError):
    """The manifests could not be fetched or checked out (network, auth, missing branch)."""


class ManifestSource(Protocol):
    """What a reconcile pass needs from wherever the manifests live."""

    @property
    def label(self) -> str:
        """Where the manifests come from, safe to log."""

    @property
    def remote(self) -> bool:
        """Whether ``fetch`` talks to a remote (the daemon then schedules a poll job)."""

    @property
    def versioned(self) -> bool:
        """Whether ``checkout`` can bring back an older revision (git can, a directory cannot)."""

    def shorten(self, message: str) -> str:
        """``message`` with paths shown relative to the source, as its author knows them."""

    @property
    def manifest_root(self) -> Path | None:
        """Where symbolic links in the manifests must lead (``None``: the manifest directory)."""

    async def fetch(self) -> str:
        """Bring in the newest version; return its revision."""

    async def head(self) -> str | None:
        """The newest revision known locally, without any network access."""

    async def checkout(self, revision: str) -> Path:
        """Make ``revision`` readable on disk; return the manifest path to load."""


def directory_digest(path: Path) -> str:
    """``dir:<hex>`` over the manifest files' names and bytes, as the loader would read them.

    The same listing and the same bounded, regular-files-only reads as the loader: a FIFO,
    a device or a link leading outside the directory is digested as its refusal (the load
    then reports it), never read, so no file can hang or bloat the daemon."""
    root = Path(path)
    digest = hashlib.sha256()
    try:
        files, problems = manifest_files(root)
    except ManifestError as exc:
        files, problems = [], list(exc.issues)
    for issue in problems:
        digest.update(f"problem:{issue}".encode() + b"\0")
    for _label, file in files:
        name = file.name if file == root else "/".join(file.relative_to(root).parts)
        digest.update(name.encode() + b"\0")
        try:
            digest.update(read_bounded(file, MAX_FILE_BYTES, root=root if root.is_dir() else None))
        except TooLarge as exc:
            digest.update(b"too-large:" + hashlib.sha256(exc.head).digest())
        except OSError as exc:
            digest.update(f"unreadable:{exc.errno}".encode())
        digest.update(b"\0")
    return "dir:" + digest.hexdigest()[:16]


class DirectorySource:
    """Manifests in a local directory (or one file), read as they are at each pass.

    ``checkout`` cannot bring back an older version: the last good desired state after an
    invalid edit is the one the daemon keeps in memory."""

    remote = False
    versioned = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def shorten(self, message: str) -> str:
        return message

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def manifest_root(self) -> Path | None:
        return None  # the directory itself

    async def fetch(self) -> str:
        return await off_loop(directory_digest, self.path)

    async def head(self) -> str | None:
        return await off_loop(directory_digest, self.path)

    async def checkout(self, revision: str) -> Path:
        return self.path


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without user-info, and the ``(username, password)`` it carried (percent-
    decoded, as git would use them) when it is an ``http(s)`` URL; raises ``SourceError``
    for a password in any other scheme. ``ssh://git@host`` keeps its (non-secret) user."""
    if "://" not in url:
        return url, None
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise SourceError(f"invalid git URL {redact(url)}: {exc}") from None
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if parts.scheme.lower() not in ("http", "https"):
        if ":" in userinfo:
            raise SourceError(
                f"git URL {redact(url)} embeds a password, which {parts.scheme} cannot take without exposing "
                "it: use an SSH key (GIT_SSH_COMMAND) or https with a token"
            )
        return url, None
    host = hostport[: hostport.find("]") + 1] if hostport.startswith("[") else hostport.rsplit(":", 1)[0]
    if parts.scheme.lower() == "http" and not is_loopback_host(host):
        raise SourceError(
            f"git URL {redact(url)} would send its credentials in clear over http:// to {host}: use https://"
        )
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, (unquote(user), unquote(password))


def _is_local_path(url: str) -> bool:
    """Not ``scheme://…`` and not scp-like ``host:path`` (a colon before any slash)."""
    return "://" not in url and not re.match(r"^[^/:]+:", url)


class GitSource:
    """A branch of a git repository, cloned into ``workdir`` (under the state directory).

    Fetches go to a private ref (``refs/finops/heads/<branch>``), and a revision is checked
    out detached with ``--force`` and cleaned, so nothing local (an edit, a stray file) can
    change what is applied."""

    remote = True
    versioned = True

    def __init__(self, url: str, branch: str, subpath: str, workdir: Path, *, timeout_s: float = GIT_TIMEOUT_S) -> None:
        if url.startswith("-"):
            raise SourceError(f"git URL must not start with '-': {redact(url)}")
        if branch.startswith("-") or not branch:
            raise SourceError(f"invalid git branch {branch!r}")
        url, self._credentials = split_credentials(url)
        self.url = str(Path(url).resolve()) if _is_local_path(url) and Path(url).exists() else url
        """The URL git is given: never with credentials."""
        self.branch = branch
        self.subpath = subpath.strip("/") or "."
        self.workdir = Path(workdir)
        self._timeout = timeout_s
        self._ref = f"refs/finops/heads/{branch}"
        self._lock = asyncio.Lock()
        """One git process at a time in the clone: the poll job's fetch and a pass's checkout."""

    @property
    def label(self) -> str:
        return f"{redact(self.url)}#{self.branch}:{self.subpath}"

    @property
    def manifest_root(self) -> Path | None:
        """The checkout: a committed symlink may point elsewhere in the repository, never out of it."""
        return self.workdir.resolve()

    def shorten(self, message: str) -> str:
        root = str(self.workdir.resolve())
        return message.replace(root + os.sep, "").replace(str(self.workdir) + os.sep, "")

    def command(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of one git invocation; argv never holds a credential."""
        env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
        env.pop(GIT_USERNAME_ENV, None)
        env.pop(GIT_PASSWORD_ENV, None)
        cmd = ["git", "-c", "protocol.ext.allow=never"]
        if self._credentials is not None:
            env[GIT_USERNAME_ENV], env[GIT_PASSWORD_ENV] = self._credentials
            # An empty value resets the helper list: the operator's helpers neither answer
            # nor store (``approve``) the token; then ours answers from the environment.
            cmd += ["-c", "credential.helper=", "-c", f"credential.helper={_ENV_CREDENTIAL_HELPER}"]
        return [*cmd, "-C", str(self.workdir), *args], env

    async def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd, env = self.command(*args)
        try:
            result = await asyncio.to_thread(
                subprocess.run, cmd, capture_output=True, text=True, env=env, timeout=self._timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise SourceError(f"git {args[0]} timed out after {self._timeout:.0f}s ({self.label})") from None
        except FileNotFoundError:
            raise SourceError("the git executable was not found on PATH; it is needed for --git") from None
        if check and result.returncode != 0:
            detail = redact(
                " ".join(result.stderr.strip().splitlines()[-3:]) or f"exit {result.returncode}",
                [self.url, *(c for c in self._credentials or () if len(c) >= 4)],
            )
            raise SourceError(f"git {args[0]} failed for {self.label}: {detail}")
        return result

    async def _ensure_repo(self) -> None:
        if (self.workdir / ".git").exists():
            return
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._git("init", "--quiet")

    async def fetch(self) -> str:
        async with self._lock:
            await self._ensure_repo()
            await self._git("fetch", "--quiet", "--no-tags", "--", self.url, f"+refs/heads/{self.branch}:{self._ref}")
            head = await self._head()
        if head is None:  # pragma: no cover - fetch succeeded, so the ref exists
            raise SourceError(f"fetched {self.label} but found no commit")
        return head

    async def head(self) -> str | None:
        async with self._lock:
            return await self._head()

    async def _head(self) -> str | None:
        if not (self.workdir / ".git").exists():
            return None
        result = await self._git("rev-parse", "--verify", "--quiet", f"{self._ref}^{{commit}}", check=False)
        sha = result.stdout.strip()
        return sha if result.returncode == 0 and sha else None

    async def checkout(self, revision: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", revision):
            raise SourceError(f"not a git commit id: {revision!r}")
        async with self._lock:
            await self._ensure_repo()
            await self._git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", "--detach", revision)
            await self._git("clean", "-ffdxq")
        root = self.workdir.resolve()
        path = (root / self.subpath).resolve()
        if not path.is_relative_to(root) or path == root / ".git" or root / ".git" in path.parents:
            raise SourceError(f"--path {self.subpath!r} leaves the repository")
        return path
