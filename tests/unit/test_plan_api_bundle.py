"""The plan API's bundle rules (pure parts of ``controller.daemon.planapi``) and the
``--remote`` client's URL rule: properties over arbitrary names and bodies."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.cli.remote import check_plan_api_url, pack
from controller.daemon.planapi import (
    BundleLimits,
    BundleRefused,
    PlanApi,
    PlanApiServer,
    bundle_name,
    parse_bundle,
    read_plan_token,
    write_bundle,
)
from controller.errors import ConfigError

LIMITS = BundleLimits(max_bytes=1 << 20, max_files=5)
segment = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=0, max_size=12)
names = st.lists(segment, min_size=1, max_size=4).map("/".join) | st.text(max_size=40)


@given(names)
@settings(max_examples=400)
def test_an_accepted_name_stays_inside_the_bundle_and_is_a_visible_manifest(name: str) -> None:
    try:
        checked = bundle_name(name)
    except BundleRefused as exc:
        assert exc.status == 400
        return
    root = "/bundle"
    joined = os.path.normpath(os.path.join(root, *checked.split("/")))
    assert joined.startswith(root + "/")
    parts = checked.split("/")
    assert all(p and not p.startswith(".") and p != ".." for p in parts)
    assert checked.lower().endswith((".yaml", ".yml"))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=8), c),
        max_leaves=12,
    )
)
def test_any_json_body_is_parsed_or_refused_never_crashes(value: object) -> None:
    for body in (json.dumps(value).encode(), json.dumps({"format_version": 1, "files": value}).encode()):
        try:
            parse_bundle(body, LIMITS)
        except BundleRefused as exc:
            assert 400 <= exc.status < 500


def test_bundle_rules() -> None:
    def body(files: dict[str, str], **extra: object) -> bytes:
        enc = {k: base64.b64encode(v.encode()).decode() for k, v in files.items()}
        return json.dumps({"format_version": 1, "files": enc, **extra}).encode()

    files, prune = parse_bundle(body({"a.yaml": "x: 1\n", "d/b.yml": "y\n"}, prune=True), LIMITS)
    assert files == {"a.yaml": b"x: 1\n", "d/b.yml": b"y\n"} and prune is True
    refusals = {
        "too many": (body({f"f{i}.yaml": "" for i in range(6)}), 413),
        "case twins": (body({"a.yaml": "", "A.yaml": ""}), 400),
        "file and dir": (body({"a.yaml": "", "a.yaml/b.yaml": ""}), 400),
        "unknown field": (body({"a.yaml": ""}, apply=True), 400),
        "bad version": (json.dumps({"format_version": 2, "files": {"a.yaml": ""}}).encode(), 400),
        "bad base64": (json.dumps({"format_version": 1, "files": {"a.yaml": "!!"}}).encode(), 400),
    }
    for what, (raw, status) in refusals.items():
        with pytest.raises(BundleRefused) as caught:
            parse_bundle(raw, LIMITS)
        assert caught.value.status == status, what


def test_written_bundle_is_private(tmp_path: Path) -> None:
    write_bundle({"a.yaml": b"x", "d/e/b.yaml": b"y"}, tmp_path)
    assert (tmp_path / "d" / "e" / "b.yaml").read_bytes() == b"y"
    assert (tmp_path / "a.yaml").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700


def test_token_checks(tmp_path: Path) -> None:
    api = PlanApi("t" * 20, lambda d, p: None, state_dir=tmp_path, renderers={})  # type: ignore[arg-type,return-value]
    assert api.authorized("Bearer " + "t" * 20)
    assert api.authorized("bearer " + "t" * 20)
    for header in (None, "", "Bearer", "Bearer " + "t" * 19, "Basic " + "t" * 20, "t" * 20):
        assert not api.authorized(header)
    token = tmp_path / "token"
    token.write_text("short\n")
    token.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        read_plan_token(token)
    token.write_text("a2a_admin_" + "0123456789abcdef" * 2 + "\n")
    with pytest.raises(ConfigError, match="separate secret"):
        read_plan_token(token)
    token.write_text("x" * 32 + "\n")
    token.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        read_plan_token(token)


def test_a_non_loopback_listener_requires_tls(tmp_path: Path) -> None:
    api = PlanApi("t" * 20, lambda d, p: None, state_dir=tmp_path, renderers={})  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="needs TLS"):
        PlanApiServer(api, host="0.0.0.0")


@pytest.mark.parametrize(
    "url",
    ["http://ci.example.com:8443", "ftp://127.0.0.1", "https://user:pw@x.example", "https://x/?a=1", "https://", "x"],
)
def test_remote_url_rule_refuses(url: str) -> None:
    with pytest.raises(ConfigError):
        check_plan_api_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://[::1]:1/", "http://localhost:9", "https://x.example"])
def test_remote_url_rule_accepts(url: str) -> None:
    assert check_plan_api_url(url).endswith("/v1/plan")


def test_pack_reads_what_the_loader_reads(tmp_path: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.yaml").write_text("a\n")
    (tmp_path / "m" / "sub" / "b.yml").write_text("b\n")
    (tmp_path / "m" / ".hidden.yaml").write_text("h\n")
    (tmp_path / "m" / "notes.txt").write_text("n\n")
    files, labels = pack(str(tmp_path / "m"))
    assert {k: base64.b64decode(v) for k, v in files.items()} == {"a.yaml": b"a\n", "sub/b.yml": b"b\n"}
    assert labels["sub/b.yml"] == str(tmp_path / "m" / "sub" / "b.yml")
