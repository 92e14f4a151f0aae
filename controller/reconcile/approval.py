"""Exposure approvals: the mechanism around ``policies.exposure``.

Who approved (the admin key's fingerprint and the OS user, never the key), which revision
(a git commit, or ``dir:<digest>`` of a manifest directory, the same identity the daemon
uses), and the raw manifest files of applied directory revisions, so a restarted daemon can
keep enforcing the last approved one while a newer revision waits.
"""

from __future__ import annotations

import getpass
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from controller.daemon.source import directory_digest
from controller.errors import FinopsError
from controller.manifest.loader import SUFFIXES
from controller.state import Approval, PendingRevision, StateStore
from policies.exposure import Exposure, ExposureReview, exposure_of, review
from policies.keyprint import fingerprint
from policies.spec import DesiredState

BUNDLE_FILE_LIMIT = 1024 * 1024 + 1
"""Per file; the loader refuses manifest files over 1 MiB anyway."""
BUNDLE_TOTAL_LIMIT = 16 * 1024 * 1024

APPROVE = "approve"
APPLY = "apply"
BOOTSTRAP = "bootstrap"


class ApprovalRequired(FinopsError):
    """The manifests raise exposure above the unattended bound and nobody approved them."""


def operator_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


def key_fingerprint(api_key: str) -> str:
    return fingerprint(api_key)


def approved_exposure(store: StateStore) -> Exposure | None:
    last = store.last_approval()
    return last.exposure_after if last is not None else None


def judge(store: StateStore, desired: DesiredState) -> ExposureReview:
    """``desired``'s exposure against what a person last approved (see policies.exposure)."""
    return review(approved_exposure(store), exposure_of(desired))


def record(
    store: StateStore,
    revision: str,
    source: str,
    desired_exposure: Exposure,
    *,
    how: str,
    api_key: str,
    user: str | None = None,
) -> Approval:
    return store.record_approval(
        revision,
        source,
        how=how,
        by_key=key_fingerprint(api_key),
        by_user=user or operator_user(),
        before=approved_exposure(store),
        after=desired_exposure,
    )


def path_revision(path: Path) -> str:
    """The revision identity of a manifest path, as the daemon's directory source names it."""
    return directory_digest(path)


def _files(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(root.name, root)]
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(SUFFIXES):
                file = Path(dirpath) / name
                out.append(("/".join(file.relative_to(root).parts), file))
    out.sort(key=lambda item: item[0].split("/"))
    return out


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or ``None`` if it is not a regular file or is too large (a FIFO or a
    device must never block or flood the daemon)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def read_bundle(path: Path, revision: str) -> dict[str, bytes] | None:
    """The manifest files under ``path``, or ``None`` when they cannot be captured exactly
    (unreadable, too large, or not ``revision`` any more). Checked by digesting a restored
    copy with the daemon's own ``directory_digest``, so the bundle is the revision."""
    root = Path(path)
    files: dict[str, bytes] = {}
    total = 0
    for name, file in _files(root):
        data = _read_regular(file, BUNDLE_FILE_LIMIT)
        if data is None:
            return None
        total += len(data)
        if total > BUNDLE_TOTAL_LIMIT:
            return None
        files[name] = data
    with tempfile.TemporaryDirectory(prefix="finops-bundle-") as tmp:
        copy = materialize(files, Path(tmp) / "manifests")
        if root.is_file():
            copy = copy / root.name
        same = directory_digest(copy) == revision
    return files if same else None


def materialize(files: Mapping[str, bytes], dest: Path) -> Path:
    """Write a bundle under ``dest`` (a fresh private directory) and return it."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise FinopsError(f"stored manifest bundle holds an unsafe file name {name!r}")
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.write_bytes(data)
    return dest


@dataclass(frozen=True)
class ApprovalStatus:
    """For ``finops status``: the last approval, revisions the daemon holds back, and the
    manifests at PATH against the approved exposure."""

    last: Approval | None
    pending: tuple[PendingRevision, ...]
    path_revision: str
    path_review: ExposureReview

    @property
    def flagged(self) -> bool:
        return bool(self.pending) or self.path_review.requires_approval

    def lines(self) -> list[str]:
        out = []
        if self.last is None:
            out.append("Exposure: no approval recorded yet (the first revision is judged over zero by its own bound).")
        else:
            out.append(
                f"Exposure: last approved {self.last.revision} ({self.last.how}) by {self.last.by_user} "
                f"with admin key {self.last.by_key}."
            )
        for p in self.pending:
            excess = "; ".join(str(e) for e in p.review.excesses)
            out.append(
                f"! WAITING FOR APPROVAL: revision {p.revision} is held back by the daemon ({excess}); "
                f"the last approved revision stays enforced. Run `finops approve {p.revision}`."
            )
        if self.path_review.requires_approval and self.path_revision not in {p.revision for p in self.pending}:
            excess = "; ".join(str(e) for e in self.path_review.excesses)
            out.append(f"! these manifests ({self.path_revision}) need approval before an unattended apply: {excess}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_approval": None
            if self.last is None
            else {
                "revision": self.last.revision,
                "how": self.last.how,
                "approved_at": self.last.approved_at,
                "by_key": self.last.by_key,
                "by_user": self.last.by_user,
            },
            "pending": [{"revision": p.revision, "review": p.review.to_dict()} for p in self.pending],
            "manifests": {"revision": self.path_revision, "review": self.path_review.to_dict()},
            "flagged": self.flagged,
        }


def approval_status(store: StateStore, desired: DesiredState, path: str) -> ApprovalStatus:
    return ApprovalStatus(
        last=store.last_approval(),
        pending=tuple(store.pending_revisions()),
        path_revision=path_revision(Path(path)),
        path_review=judge(store, desired),
    )
