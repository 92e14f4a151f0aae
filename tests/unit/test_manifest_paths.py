"""Relative paths in manifests (a secret file, a key sink directory) resolve against finops'
state directory, never the working directory; ``..`` and ``~`` are refused; a file only found
where an older finops looked (the working directory) stops loading instead of being replaced
(``controller.manifest.paths``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from controller.errors import ManifestError
from controller.manifest.loader import load_manifests
from controller.manifest.schema import KeySink, SecretRef
from policies.spec import DesiredState

ROOT = Path(__file__).resolve().parents[2]
CANONICAL_LINE = "signingSecret: {file: alert-signing.secret, generate: true}"
SINK_LINE = "    # sink: {directory: /run/agent-keys}"


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    target = tmp_path / "checkout" / "manifests"
    shutil.copytree(ROOT / "manifests", target)
    return target


def _edit(manifests: Path, old: str, new: str) -> None:
    fleet = manifests / "research-fleet.yaml"
    text = fleet.read_text()
    assert old in text, old
    fleet.write_text(text.replace(old, new))


def _route_files(desired: DesiredState) -> set[str | None]:
    return {r.secret.file for a in desired.agents() for r in a.alert_routes}


def test_the_canonical_signing_secret_lands_in_the_state_directory_wherever_finops_runs(
    manifests: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "var" / "lib" / "finops"
    for cwd in (tmp_path, manifests.parent, Path("/")):  # a checkout, its parent, systemd's default
        monkeypatch.chdir(cwd)
        desired = load_manifests(manifests, state_dir=state)
        assert _route_files(desired) == {str(state / "alert-signing.secret")}
    # The gateway webhooks' secret is finops-generated (managed), not a path: untouched.
    hooks = {h.secret for a in desired.agents() for h in a.gateway_webhooks}
    assert {h.managed for h in hooks} == {"gateway-webhook-research"} and {h.file for h in hooks} == {None}


def test_the_quick_start_keeps_its_secret_in_dot_finops(manifests: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the repository root with the default state directory (a relative ``.finops``):
    the same file as before, made absolute so a later change of directory cannot move it."""
    monkeypatch.chdir(manifests.parent)
    desired = load_manifests("manifests", state_dir=".finops")
    assert _route_files(desired) == {str(manifests.parent / ".finops" / "alert-signing.secret")}


def test_validate_offline_leaves_paths_as_written(manifests: Path) -> None:
    assert _route_files(load_manifests(manifests)) == {"alert-signing.secret"}


def test_absolute_paths_stay_and_relative_sinks_are_anchored(manifests: Path, tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "signing.secret"
    _edit(manifests, CANONICAL_LINE, f"signingSecret: {{file: {absolute}}}")
    _edit(manifests, SINK_LINE, "    sink: {directory: agent-keys}")
    state = tmp_path / "state"
    desired = load_manifests(manifests, state_dir=state)
    assert _route_files(desired) == {str(absolute)}
    assert {a.keys.sink.path for a in desired.agents()} == {str(state / "agent-keys")}


def test_a_sink_in_the_home_directory_is_still_expanded_by_the_sink(manifests: Path, tmp_path: Path) -> None:
    _edit(manifests, SINK_LINE, "    sink: {directory: ~/agent-keys}")
    desired = load_manifests(manifests, state_dir=tmp_path / "state")
    assert {a.keys.sink.path for a in desired.agents()} == {"~/agent-keys"}


def test_a_secret_left_where_older_finops_looked_stops_loading_instead_of_being_replaced(
    manifests: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old canonical line with an existing secret in the working directory: a new
    generated secret would break every receiver's signature check, silently."""
    _edit(manifests, CANONICAL_LINE, "signingSecret: {file: .finops/alert-signing.secret, generate: true}")
    checkout = manifests.parent
    monkeypatch.chdir(checkout)
    old = checkout / ".finops" / "alert-signing.secret"
    old.parent.mkdir()
    old.write_text("the receivers' secret\n")
    with pytest.raises(ManifestError) as caught:
        load_manifests("manifests", state_dir=".finops")
    (issue,) = caught.value.issues
    new = checkout / ".finops" / ".finops" / "alert-signing.secret"
    assert str(old) in issue.message and str(new) in issue.message and "mv" in issue.message
    assert issue.file.endswith("research-fleet.yaml") and issue.line is not None
    assert not new.exists()
    # Once moved (or when the state directory holds it), it loads.
    new.parent.mkdir()
    os.rename(old, new)
    assert _route_files(load_manifests("manifests", state_dir=".finops")) == {str(new)}


def test_nothing_anywhere_yet_is_not_a_legacy_problem(manifests: Path, tmp_path: Path) -> None:
    _edit(manifests, CANONICAL_LINE, "signingSecret: {file: sub/alert.secret, generate: true}")
    desired = load_manifests(manifests, state_dir=tmp_path / "state")
    assert _route_files(desired) == {str(tmp_path / "state" / "sub" / "alert.secret")}


_segment = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True).filter(lambda s: s != "..")


@given(parts=st.lists(_segment, min_size=1, max_size=5))
def test_an_accepted_relative_path_never_leaves_the_state_directory(parts: list[str]) -> None:
    relative = "/".join(parts)
    ref = SecretRef(file=relative)
    assert ref.file == relative
    state = Path("/var/lib/finops")
    resolved = Path(os.path.normpath(state / relative))
    assert resolved.is_relative_to(state) and resolved != state


@given(
    before=st.lists(_segment, max_size=3),
    after=st.lists(_segment, max_size=3),
    absolute=st.booleans(),
)
def test_any_parent_reference_is_refused_in_a_secret_file_and_a_sink(
    before: list[str], after: list[str], absolute: bool
) -> None:
    path = ("/" if absolute else "") + "/".join([*before, "..", *after])
    with pytest.raises(ValidationError, match=r"'\.\.' is not allowed"):
        SecretRef(file=path)
    with pytest.raises(ValidationError, match=r"'\.\.' is not allowed"):
        KeySink(directory=path)


@given(rest=st.lists(_segment, max_size=3))
def test_a_tilde_secret_file_is_refused(rest: list[str]) -> None:
    with pytest.raises(ValidationError, match="'~' is not expanded"):
        SecretRef(file="/".join(["~", *rest]))
