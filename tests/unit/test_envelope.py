"""Envelope encryption of agents' keys (``controller.keys.envelope``): round trips, every
kind of tampering refused loudly (never read as "no key"), records bound to their agent,
slot and key-encryption key, re-wrapping, and the KEK file's rules."""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.keys.envelope import (
    KEK_BYTES,
    KekFileError,
    KekMismatch,
    KeyEncryptionKey,
    SealedKeyCorrupt,
    SealedRecord,
    generate_kek_text,
    kek_from_env,
    load_kek,
    parse_kek,
    rewrap,
    seal,
    unseal,
)
from policies.keyprint import API_KEY_PATTERN, key_prefix

KEY = "a2a_free_" + "3f" * 12

agents = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,40}", fullmatch=True)
slots = st.sampled_from(["main", "quarantine"])
raw_keys = st.builds(
    lambda tier, secret: f"a2a_{tier}_{secret}",
    st.sampled_from(["free", "pro", "starter", "enterprise"]),
    st.binary(min_size=12, max_size=24).map(bytes.hex),
)


def new_kek() -> KeyEncryptionKey:
    return KeyEncryptionKey(os.urandom(KEK_BYTES), source="test")


@settings(max_examples=60, deadline=None)
@given(agent=agents, slot=slots, raw=raw_keys)
def test_round_trip_and_no_plaintext_in_the_record(agent: str, slot: str, raw: str) -> None:
    kek = new_kek()
    record = seal(kek, agent, slot, raw)
    assert unseal(kek, record) == raw
    assert record.kek_id == kek.id and record.key_prefix == key_prefix(raw)
    stored = record.ciphertext + record.nonce + record.wrapped_key + record.wrap_nonce
    assert raw.encode() not in stored and raw.rsplit("_", 1)[1].encode() not in stored
    assert kek.material not in stored
    assert not API_KEY_PATTERN.search(repr(record)) and kek.material.hex() not in repr(kek)
    assert KEY not in repr(record)


def test_each_record_has_its_own_data_key_and_nonces() -> None:
    kek = new_kek()
    a, b = seal(kek, "a", "main", KEY), seal(kek, "a", "main", KEY)
    assert a.ciphertext != b.ciphertext and a.wrapped_key != b.wrapped_key
    assert a.nonce != b.nonce and a.wrap_nonce != b.wrap_nonce


@settings(max_examples=80, deadline=None)
@given(
    field=st.sampled_from(["ciphertext", "nonce", "wrapped_key", "wrap_nonce"]),
    index=st.integers(min_value=0, max_value=200),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_flipped_bit_is_refused_as_corrupt(field: str, index: int, bit: int) -> None:
    kek = new_kek()
    record = seal(kek, "agent-1", "main", KEY)
    data = bytearray(getattr(record, field))
    data[index % len(data)] ^= 1 << bit
    tampered = dataclasses.replace(record, **{field: bytes(data)})
    with pytest.raises(SealedKeyCorrupt) as info:
        unseal(kek, tampered)
    assert "agent-1" in str(info.value) and "not treat the key as lost" in str(info.value)


@pytest.mark.parametrize("agent,slot", [("agent-2", "main"), ("agent-1", "quarantine"), ("agent-10", "main")])
def test_a_row_copied_to_another_agent_or_slot_does_not_decrypt(agent: str, slot: str) -> None:
    kek = new_kek()
    record = seal(kek, "agent-1", "main", KEY)
    with pytest.raises(SealedKeyCorrupt):
        unseal(kek, dataclasses.replace(record, agent_id=agent, slot=slot))


def test_a_recorded_prefix_that_does_not_match_is_refused() -> None:
    kek = new_kek()
    record = seal(kek, "a", "main", KEY)
    with pytest.raises(SealedKeyCorrupt, match="fingerprint"):
        unseal(kek, dataclasses.replace(record, key_prefix="00000000"))


def test_a_wrong_kek_names_both_ids_and_is_never_none() -> None:
    right, wrong = new_kek(), new_kek()
    record = seal(right, "a", "main", KEY)
    with pytest.raises(KekMismatch) as info:
        unseal(wrong, record)
    assert right.id in str(info.value) and wrong.id in str(info.value)
    # A row relabelled with the wrong KEK's id still does not open: the id is in the AAD.
    with pytest.raises(SealedKeyCorrupt):
        unseal(wrong, dataclasses.replace(record, kek_id=wrong.id))


def test_an_unknown_record_format_is_refused() -> None:
    kek = new_kek()
    with pytest.raises(SealedKeyCorrupt, match="format"):
        unseal(kek, dataclasses.replace(seal(kek, "a", "main", KEY), format=2))


@settings(max_examples=30, deadline=None)
@given(agent=agents, slot=slots, raw=raw_keys)
def test_rewrap_moves_the_record_to_the_new_kek_only(agent: str, slot: str, raw: str) -> None:
    old, new = new_kek(), new_kek()
    record = seal(old, agent, slot, raw)
    moved = rewrap(old, new, record)
    assert unseal(new, moved) == raw and moved.kek_id == new.id
    assert moved.ciphertext == record.ciphertext and moved.wrapped_key != record.wrapped_key
    with pytest.raises(KekMismatch):
        unseal(old, moved)


def test_seal_refuses_what_is_not_a_key() -> None:
    with pytest.raises(ValueError, match="not a GreenHelix API key"):
        seal(new_kek(), "a", "main", "hunter2")


# -- the KEK file -------------------------------------------------------------------------


def test_parse_accepts_raw_hex_and_base64() -> None:
    material = os.urandom(KEK_BYTES)
    while all(32 <= b < 127 for b in material):  # pragma: no cover - p < 1e-14
        material = os.urandom(KEK_BYTES)
    for text in (
        material,
        material.hex().encode() + b"\n",
        material.hex().upper().encode(),
        base64.b64encode(material) + b"\n",
        base64.urlsafe_b64encode(material).rstrip(b"="),
    ):
        assert parse_kek(text, "f") == material
    generated = generate_kek_text().encode()
    assert len(parse_kek(generated, "f")) == KEK_BYTES


@pytest.mark.parametrize(
    "data,why",
    [
        (b"", "0 bytes"),
        (b"correct horse battery staple 123", "passphrase"),
        (bytes(32), "not random"),
        (b"\x01\x02" * 16, "not random"),
        (os.urandom(31), "31 bytes"),
        (os.urandom(33), "33 bytes"),
        (os.urandom(16).hex().encode(), "32 printable"),
        (base64.b64encode(os.urandom(24)), "32 printable"),
        (("0" * 64).encode(), "not random"),
    ],
)
def test_parse_refuses_anything_else(data: bytes, why: str) -> None:
    with pytest.raises(KekFileError, match=why) as info:
        parse_kek(data, "/etc/kek")
    assert "/etc/kek" in str(info.value) and "generate-kek" in str(info.value)


def _kek_file(path: Path, mode: int = 0o600) -> Path:
    path.write_text(generate_kek_text() + "\n")
    path.chmod(mode)
    return path


def test_load_kek_file_rules(tmp_path: Path) -> None:
    good = _kek_file(tmp_path / "kek")
    kek = load_kek(good)
    assert kek.id.startswith("kek:") and kek.material.hex() not in repr(kek) and str(good) in kek.source
    assert load_kek(good).id == kek.id  # stable
    link = tmp_path / "mounted"
    link.symlink_to(good)  # Kubernetes mounts secrets as symlinks
    assert load_kek(link).id == kek.id
    with pytest.raises(KekFileError, match="group or others"):
        load_kek(_kek_file(tmp_path / "open", 0o644))
    with pytest.raises(KekFileError, match="group or others"):
        load_kek(_kek_file(tmp_path / "group", 0o640))
    with pytest.raises(KekFileError, match="does not exist"):
        load_kek(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KekFileError, match="not a regular file"):
        load_kek(fifo)  # never blocks
    with pytest.raises(KekFileError, match="not a regular file"):
        load_kek(tmp_path)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(10_000))
    big.chmod(0o600)
    with pytest.raises(KekFileError):
        load_kek(big)


def test_kek_from_env_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(KekFileError, match="FINOPS_KEY_ENCRYPTION_KEY_FILE") as info:
        kek_from_env({})
    assert "--key-store directory" in str(info.value)
    path = _kek_file(tmp_path / "kek")
    assert kek_from_env({"FINOPS_KEY_ENCRYPTION_KEY_FILE": str(path)}).id == load_kek(path).id


def test_kek_ids_differ_and_do_not_reveal_the_key() -> None:
    a, b = new_kek(), new_kek()
    assert a.id != b.id
    assert a.material.hex()[:8] not in a.id


def test_sealed_record_repr_holds_no_bytes() -> None:
    record = seal(new_kek(), "a", "main", KEY)
    text = repr(record)
    assert isinstance(record, SealedRecord) and record.ciphertext.hex()[:16] not in text
    assert not any(name in text for name in ("ciphertext", "nonce", "wrapped_key", "wrap_nonce"))


def test_the_kek_file_is_never_a_secret_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.io.secretref import SecretRefused, check_secret_ref, resolve_secret
    from policies.spec import SecretRef

    path = _kek_file(tmp_path / "kek")
    link = tmp_path / "alias.secret"
    link.symlink_to(path)
    monkeypatch.setenv("FINOPS_KEY_ENCRYPTION_KEY_FILE", str(path))
    for ref in (SecretRef(file=str(path)), SecretRef(file=str(link)), SecretRef(env="FINOPS_KEY_ENCRYPTION_KEY_FILE")):
        assert check_secret_ref(ref) is not None
        with pytest.raises(SecretRefused):
            resolve_secret(ref)


def test_a_sink_command_never_gets_the_kek_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.keys.sinks import CommandSink

    monkeypatch.setenv("FINOPS_KEY_ENCRYPTION_KEY_FILE", "/run/secrets/kek")
    monkeypatch.setenv("UNRELATED", "kept")
    env = CommandSink(("true",))._env("a", KEY)
    assert "FINOPS_KEY_ENCRYPTION_KEY_FILE" not in env and env["UNRELATED"] == "kept"
