"""No file a user names can hang finops or exhaust its memory: the bounded reader, and the
manifest loader's use of it (FIFOs, devices, symlinks out of the root, symlinked directories).

Symlinks and FIFOs are created at run time (git would not keep a FIFO, and links to /dev/zero
would be hostile to check out)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.errors import ManifestError, ManifestIssue
from controller.io import safefile
from controller.io.secretfile import MAX_SECRET_BYTES, read_secret_file
from controller.manifest import load_manifests
from controller.manifest.loader import MAX_FILE_BYTES
from tests.unit.test_manifest_loader import FLEET_HEAD

GROUP = (
    "apiVersion: finops.greenhelix.net/v1\nkind: AgentGroup\nmetadata: {name: a}\n"
    "spec:\n  fleet: research\n  agents: [{id: res-01, tier: researcher}]\n"
)


def _issues(path: str | Path, **kw: object) -> list[ManifestIssue]:
    with pytest.raises(ManifestError) as info:
        load_manifests(path, **kw)  # type: ignore[arg-type]
    return list(info.value.issues)


# --- the reader ------------------------------------------------------------------------------


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert safefile.read_bounded(f, 100) == b"x" * 100


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(safefile.UnsafeFile) as info:
        safefile.read_bounded(fifo, 1024)
    assert time.monotonic() - started < 1
    assert "FIFO" in info.value.reason and str(fifo) in str(info.value)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_and_links_to_them_are_refused(tmp_path: Path, device: str) -> None:
    link = tmp_path / "link"
    link.symlink_to(device)
    for path in (Path(device), link):
        with pytest.raises(safefile.UnsafeFile) as info:
            safefile.read_bounded(path, 1024)
        assert "character device" in info.value.reason


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(safefile.UnsafeFile) as info:
        safefile.read_bounded(tmp_path, 10)
    assert "directory" in info.value.reason
    assert isinstance(info.value, OSError)  # existing `except OSError` handlers still apply


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=3 * safefile.CHUNK),
    limit=st.integers(min_value=0, max_value=2 * safefile.CHUNK),
)
def test_the_limit_is_exact_and_enforced_while_reading(
    tmp_path_factory: pytest.TempPathFactory, size: int, limit: int
) -> None:
    f = tmp_path_factory.mktemp("sized") / "f"
    f.write_bytes(b"a" * size)
    if size <= limit:
        assert safefile.read_bounded(f, limit) == b"a" * size
    else:
        with pytest.raises(safefile.TooLarge) as info:
            safefile.read_bounded(f, limit)
        assert info.value.head == b"a" * (limit + 1)  # never more than limit + 1 bytes read


def test_a_file_that_claims_to_be_small_is_still_bounded(tmp_path: Path) -> None:
    """/proc files say size 0 and can be long: the bound comes from reading, not from stat."""
    proc = Path("/proc/self/maps")
    if not proc.exists():  # pragma: no cover - Linux only
        pytest.skip("no /proc")
    assert proc.stat().st_size == 0
    with pytest.raises(safefile.TooLarge):
        safefile.read_bounded(proc, 10)


def test_links_must_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").write_text("secret")
    (root / "inside").write_text("ok")
    (root / "in-link").symlink_to("inside")
    (root / "out-link").symlink_to(tmp_path / "outside")
    assert safefile.read_bounded(root / "in-link", 10, root=root) == b"ok"
    with pytest.raises(safefile.UnsafeFile) as info:
        safefile.read_bounded(root / "out-link", 10, root=root)
    assert "outside" in info.value.reason
    assert not safefile.inside(tmp_path / "rootx", root)  # a prefix is not a parent


def test_secret_files_are_read_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"a" * (MAX_SECRET_BYTES + 1))
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    for path in (big, tmp_path / "zero", tmp_path / "fifo", tmp_path):
        with pytest.raises(OSError) as info:
            read_secret_file(path)
        assert info.value.strerror  # a message the callers print ("cannot read X: ...")


# --- the manifest loader ---------------------------------------------------------------------


def _fleet_dir(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "fleet.yaml").write_text(FLEET_HEAD)
    return root


def test_a_fifo_manifest_is_an_error_line_not_a_hang(tmp_path: Path) -> None:
    root = _fleet_dir(tmp_path)
    os.mkfifo(root / "agents.yaml")
    started = time.monotonic()
    (issue,) = _issues(root)
    assert time.monotonic() - started < 2
    assert issue.file == str(root / "agents.yaml") and issue.line is None
    assert "FIFO" in issue.message and "regular files" in issue.message


def test_a_manifest_linked_to_dev_zero_is_refused_at_once(tmp_path: Path) -> None:
    root = _fleet_dir(tmp_path)
    (root / "zero.yaml").symlink_to("/dev/zero")
    started = time.monotonic()
    (issue,) = _issues(root)
    assert time.monotonic() - started < 2
    assert issue.file == str(root / "zero.yaml")
    assert "leads outside" in issue.message and "/dev/zero" in issue.message


def test_a_device_named_directly_is_refused(tmp_path: Path) -> None:
    (issue,) = _issues("/dev/zero")
    assert issue.file == "/dev/zero" and "character device" in issue.message


def test_a_symlinked_directory_inside_the_root_is_followed(tmp_path: Path) -> None:
    root = _fleet_dir(tmp_path)
    shared = root / ".shared" / "teams"
    shared.mkdir(parents=True)
    (shared / "a.yaml").write_text(GROUP)
    (root / "teams").symlink_to(".shared/teams")
    (agent,) = load_manifests(root).agents()
    assert agent.agent_id == "res-01" and agent.source is not None
    assert agent.source.file == str(root / "teams" / "a.yaml")


def test_a_symlinked_directory_outside_the_root_is_an_error_never_a_silent_skip(tmp_path: Path) -> None:
    root = _fleet_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.yaml").write_text(GROUP)
    (root / "teams").symlink_to(elsewhere)
    (issue,) = _issues(root)
    assert issue.file == str(root / "teams")
    assert "leads outside" in issue.message and str(elsewhere) in issue.message


def test_a_wider_root_admits_links_within_it(tmp_path: Path) -> None:
    """The git source's root is the repository: manifests may link to a sibling directory."""
    root = _fleet_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.yaml").write_text(GROUP)
    (root / "teams").symlink_to(elsewhere)
    (agent,) = load_manifests(root, root=tmp_path).agents()
    assert agent.agent_id == "res-01"


def test_link_loops_and_duplicate_directories_are_reported_once(tmp_path: Path) -> None:
    root = _fleet_dir(tmp_path)
    team = root / "team"
    team.mkdir()
    (team / "a.yaml").write_text(GROUP)
    (root / "again").symlink_to("team")  # sorts before "team": still the link is reported
    (team / "up").symlink_to("..")
    issues = _issues(root)
    assert sorted(i.file for i in issues) == [str(root / "again"), str(team / "up")]
    assert all("already read" in i.message for i in issues)


def test_a_huge_manifest_is_scanned_within_a_bound(tmp_path: Path) -> None:
    root = _fleet_dir(tmp_path)
    big = root / "big.yaml"
    with big.open("wb") as fh:
        fh.truncate(4 * 1024 * 1024 * 1024)  # a sparse 4 GiB file: reading it all would take long
    started = time.monotonic()
    issues = _issues(root)
    assert time.monotonic() - started < 10
    assert [i.file for i in issues] == [str(big)] and "larger than the 1 MiB" in issues[0].message
    assert MAX_FILE_BYTES == 1024 * 1024


def test_a_manifest_path_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fleet.yaml"
    os.mkfifo(fifo)
    (issue,) = _issues(fifo)
    assert "FIFO" in issue.message
