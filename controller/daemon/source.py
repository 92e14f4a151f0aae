"""Where the daemon reads manifests from: a directory, or a branch of a git repository.

A source names each version of the manifests by a *revision* (a git commit, or a digest of
a directory's files), so a pass can tell "same manifests as last time" from "new ones",
record what it applied, and return to the last good revision when a new one is invalid.

Git is driven through the ``git`` executable: it brings every transport, credential
helper and SSH setup the operator already has, which a library would have to re-create.
Credentials are never passed on the command line by finops and are redacted from every
message (use SSH keys or a credential helper, not a token in the URL).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Protocol

from controller.blocking import off_loop
from controller.daemon.logs import redact
from controller.errors import FinopsError, ManifestError
from controller.manifest.loader import MAX_FILE_BYTES, manifest_files
from controller.safefile import TooLarge, read_bounded

GIT_TIMEOUT_S = 120.0


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
        self.url = str(Path(url).resolve()) if _is_local_path(url) and Path(url).exists() else url
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

    async def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
        cmd = ["git", "-c", "protocol.ext.allow=never", "-C", str(self.workdir), *args]
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
                " ".join(result.stderr.strip().splitlines()[-3:]) or f"exit {result.returncode}", [self.url]
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
