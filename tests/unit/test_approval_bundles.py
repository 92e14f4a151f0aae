"""Directory revisions are kept as bundles so a restarted daemon can re-enforce the last
approved one: the bundle must be exactly the revision the daemon named, never block on a
FIFO, and never write outside its directory when restored."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from controller.daemon.source import directory_digest
from controller.errors import FinopsError
from controller.manifest.loader import load_manifests
from controller.reconcile.approval import materialize, read_bundle
from controller.state import StateStore
from policies.exposure import exposure_of

CANONICAL = Path(__file__).resolve().parents[2] / "manifests"


def test_a_bundle_is_the_revision_the_daemon_names_and_restores_the_same_desired_state(tmp_path: Path) -> None:
    shutil.copytree(CANONICAL, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("ignored, like the loader ignores it")
    revision = directory_digest(tmp_path / "m")
    files = read_bundle(tmp_path / "m", revision)
    assert files is not None and sorted(files) == ["research-fleet.yaml", "research-workers.yaml"]
    assert directory_digest(materialize(files, tmp_path / "copy")) == revision
    store = StateStore(tmp_path / "state.db")
    store.store_bundle(revision, files)
    restored = store.bundle(revision)
    store.close()
    assert restored == files
    again, original = load_manifests(materialize(restored, tmp_path / "restored")), load_manifests(tmp_path / "m")
    assert [replace(a, source=None) for a in again.agents()] == [replace(a, source=None) for a in original.agents()]
    assert exposure_of(again) == exposure_of(original)
    assert read_bundle(tmp_path / "m", "dir:0000000000000000") is None  # changed since: not kept


def test_a_fifo_is_never_read_and_unsafe_names_are_never_written(tmp_path: Path) -> None:
    shutil.copytree(CANONICAL, tmp_path / "m")
    revision = directory_digest(tmp_path / "m")
    os.mkfifo(tmp_path / "m" / "pipe.yaml")  # would block a plain read forever
    assert read_bundle(tmp_path / "m", revision) is None
    with pytest.raises(FinopsError, match="unsafe"):
        materialize({"../escape.yaml": b"x"}, tmp_path / "out")
    assert not (tmp_path / "escape.yaml").exists()
