"""Envelope encryption of agents' keys for the database key store (``controller.keys.sealed``).

Each sealed record has its own random 256-bit *data key*: the agent's raw key is encrypted
with it (AES-256-GCM), and the data key is encrypted ("wrapped") with the *key-encryption
key* (KEK, AES-256-GCM too). The KEK lives only in a file named by
``FINOPS_KEY_ENCRYPTION_KEY_FILE`` on the machines that run finops; the database holds the
KEK's id (a fingerprint), never the KEK. Re-wrapping under a new KEK touches only the
wrapped data key.

Associated data binds each record to where it belongs: the ciphertext to ``agent + slot``,
the wrapped data key to ``agent + slot + KEK id``. A row copied to another agent or slot,
or a wrapped key relabelled with another KEK id, does not decrypt. After decrypting, the
key's gateway prefix must match the row's ``key_prefix``. Every failure is an exception that
says what and which record, never ``None`` (a key that exists but cannot be read is not "no
key held": treating it so would make finops believe a key was lost).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.errors import ConfigError, FinopsError
from controller.io.safefile import read_bounded
from controller.io.secretref import KEK_FILE_ENV as KEK_FILE_ENV
from policies.keyprint import is_key_token, key_prefix

KEK_BYTES = 32
FORMAT = 1
"""The record layout below; a row with another format is refused, never guessed at."""
NONCE_BYTES = 12
_MAX_KEK_FILE = 4096
_MIN_DISTINCT_BYTES = 16
"""32 random bytes have ~30 distinct values; fewer than 16 happens with probability < 2^-60,
so such a KEK was not drawn at random (all zeros, a repeated pattern, a short passphrase)."""
_PSEUDO_FS = ("/proc", "/sys", "/dev")
_GENERATE = "create one with `finops keys generate-kek FILE`"
_HEX_TEXT = re.compile(rb"[0-9a-fA-F]{64}")
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/]{43}=?|[A-Za-z0-9_-]{43}=?")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


class KekFileError(ConfigError):
    """The key-encryption key file is missing, unsafe or not 32 random bytes."""


class SealedKeyError(FinopsError):
    """A sealed key exists but cannot be opened; finops stops rather than call it lost."""


class KekMismatch(SealedKeyError):
    """A record was sealed under another key-encryption key than the one configured."""


class SealedKeyCorrupt(SealedKeyError):
    """A record does not decrypt under its KEK: tampered with, copied, or truncated."""


def _kek_id(material: bytes) -> str:
    return "kek:" + hashlib.sha256(b"finops key-encryption key id v1\x00" + material).hexdigest()[:16]


@dataclass(frozen=True)
class KeyEncryptionKey:
    """A KEK in memory: its ``id`` may be shown and stored, its bytes never."""

    material: bytes = field(repr=False)
    source: str = ""
    """Where it was read from (for messages)."""

    def __post_init__(self) -> None:
        if len(self.material) != KEK_BYTES:
            raise KekFileError(f"a key-encryption key is {KEK_BYTES} bytes, not {len(self.material)}")

    @property
    def id(self) -> str:
        return _kek_id(self.material)

    def __repr__(self) -> str:
        return f"KeyEncryptionKey({self.id})"

    __str__ = __repr__


def parse_kek(data: bytes, where: str) -> bytes:
    """32 raw bytes, or their hex (64 characters) or base64 (44 with padding) text; anything
    else, and anything that is visibly not random, is refused naming ``where``."""
    if len(data) == KEK_BYTES and not all(32 <= b < 127 for b in data):
        material = data  # raw bytes (32 printable characters are a passphrase, not a key)
    else:
        text = data.strip()
        if _HEX_TEXT.fullmatch(text):
            material = bytes.fromhex(text.decode("ascii"))
        elif _BASE64_TEXT.fullmatch(text):
            material = base64.b64decode(text.rstrip(b"=").translate(_URLSAFE) + b"=")
        else:
            what = f"{len(data)} bytes"
            if len(data) == KEK_BYTES:
                what = f"{KEK_BYTES} printable characters (a passphrase?)"
            raise KekFileError(
                f"the key-encryption key file {where} holds {what}, not a {KEK_BYTES}-byte key "
                f"(expected {KEK_BYTES} raw random bytes, or them as 64 hex characters or base64 text); {_GENERATE}"
            )
    if len(set(material)) < _MIN_DISTINCT_BYTES:
        raise KekFileError(
            f"the key-encryption key in {where} is not random (only {len(set(material))} distinct byte values); "
            f"{_GENERATE}"
        )
    return material


def load_kek(path: Path | str) -> KeyEncryptionKey:
    """The KEK in ``path``: a regular file (a symlink to one is fine: mounted secrets are
    symlinks) that group and others cannot read or write, at most 4 KiB."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KekFileError(f"the key-encryption key file {path} does not exist; {_GENERATE}") from None
    except OSError as exc:
        raise KekFileError(f"cannot read the key-encryption key file {path}: {exc.strerror}") from None
    real = os.path.realpath(path)
    if not stat.S_ISREG(st.st_mode) or any(real == p or real.startswith(p + "/") for p in _PSEUDO_FS):
        raise KekFileError(f"the key-encryption key file {path} is not a regular file on disk")
    if st.st_mode & 0o077:
        raise KekFileError(
            f"the key-encryption key file {path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); treat it as exposed: generate a new one, `chmod 600` it and run "
            "`finops keys rewrap --new-key-file NEW` (in Kubernetes mount it with `defaultMode: 0400`)"
        )
    try:
        data = read_bounded(path, _MAX_KEK_FILE)
    except OSError as exc:
        raise KekFileError(f"cannot read the key-encryption key file {path}: {exc.strerror or exc}") from None
    return KeyEncryptionKey(parse_kek(data, str(path)), source=str(path))


def kek_from_env(environ: dict[str, str] | None = None) -> KeyEncryptionKey:
    env = os.environ if environ is None else environ
    name = env.get(KEK_FILE_ENV, "").strip()
    if not name:
        raise KekFileError(
            f"the database key store needs a key-encryption key: set {KEK_FILE_ENV} to a file holding "
            f"{KEK_BYTES} random bytes ({_GENERATE}; the same file on every machine sharing the state), or keep "
            "the keys in the directory store with --key-store directory"
        )
    return load_kek(name)


def generate_kek_text() -> str:
    """A new KEK as base64 text (what ``finops keys generate-kek`` writes)."""
    return base64.b64encode(os.urandom(KEK_BYTES)).decode("ascii")


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedRecord:
    """One agent's key in one slot, as stored: nothing here is secret without the KEK."""

    agent_id: str
    slot: str
    ciphertext: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    wrapped_key: bytes = field(repr=False)
    wrap_nonce: bytes = field(repr=False)
    kek_id: str
    key_prefix: str
    format: int = FORMAT

    @property
    def label(self) -> str:
        return f"{self.agent_id} ({self.slot} slot, key sha3:{self.key_prefix})"


def _data_aad(agent_id: str, slot: str) -> bytes:
    return b"\x00".join((b"finops sealed key v1", agent_id.encode(), slot.encode()))


def _wrap_aad(agent_id: str, slot: str, kek_id: str) -> bytes:
    return b"\x00".join((b"finops wrapped data key v1", agent_id.encode(), slot.encode(), kek_id.encode()))


def _wrap(kek: KeyEncryptionKey, agent_id: str, slot: str, data_key: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_BYTES)
    return AESGCM(kek.material).encrypt(nonce, data_key, _wrap_aad(agent_id, slot, kek.id)), nonce


def seal(kek: KeyEncryptionKey, agent_id: str, slot: str, raw_key: str) -> SealedRecord:
    """Encrypt ``raw_key`` under a fresh data key wrapped by ``kek``."""
    if not is_key_token(raw_key):
        raise ValueError(f"refusing to store a value that is not a GreenHelix API key for {agent_id}")
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, raw_key.encode(), _data_aad(agent_id, slot))
    wrapped, wrap_nonce = _wrap(kek, agent_id, slot, data_key)
    return SealedRecord(agent_id, slot, ciphertext, nonce, wrapped, wrap_nonce, kek.id, key_prefix(raw_key))


def _check_kek(kek: KeyEncryptionKey, record: SealedRecord) -> None:
    if record.format != FORMAT:
        raise SealedKeyCorrupt(
            f"the sealed key of {record.label} has record format {record.format}; this finops reads format "
            f"{FORMAT} (written by a newer finops?); nothing was done"
        )
    if record.kek_id != kek.id:
        raise KekMismatch(
            f"the sealed key of {record.label} is wrapped under key-encryption key {record.kek_id}, but "
            f"{KEK_FILE_ENV} ({kek.source or 'configured'}) holds {kek.id}; point {KEK_FILE_ENV} at the key it was "
            "sealed with (or finish `finops keys rewrap`); finops does not treat the key as lost"
        )


def _unwrap(kek: KeyEncryptionKey, record: SealedRecord) -> bytes:
    _check_kek(kek, record)
    try:
        data_key = AESGCM(kek.material).decrypt(
            record.wrap_nonce, record.wrapped_key, _wrap_aad(record.agent_id, record.slot, record.kek_id)
        )
    except (InvalidTag, ValueError):
        raise SealedKeyCorrupt(
            f"the sealed key of {record.label} does not decrypt under {kek.id}: the row was altered or copied from "
            "another agent or slot; restore it from a backup (finops does not treat the key as lost)"
        ) from None
    if len(data_key) != KEK_BYTES:
        raise SealedKeyCorrupt(f"the sealed key of {record.label} has a malformed data key")
    return data_key


def unseal(kek: KeyEncryptionKey, record: SealedRecord) -> str:
    """The raw key, or :class:`KekMismatch` / :class:`SealedKeyCorrupt` (never ``None``)."""
    data_key = _unwrap(kek, record)
    try:
        plain = AESGCM(data_key).decrypt(record.nonce, record.ciphertext, _data_aad(record.agent_id, record.slot))
    except (InvalidTag, ValueError):
        raise SealedKeyCorrupt(
            f"the sealed key of {record.label} does not decrypt: the ciphertext was altered or copied from another "
            "agent or slot; restore it from a backup (finops does not treat the key as lost)"
        ) from None
    try:
        raw = plain.decode("utf-8")
    except UnicodeDecodeError:
        raw = ""
    if not is_key_token(raw) or key_prefix(raw) != record.key_prefix:
        raise SealedKeyCorrupt(
            f"the sealed key of {record.label} decrypts to a key whose fingerprint is not the recorded one; "
            "restore the row from a backup"
        )
    return raw


def rewrap(old: KeyEncryptionKey, new: KeyEncryptionKey, record: SealedRecord) -> SealedRecord:
    """The same record with its data key wrapped under ``new`` (the ciphertext unchanged),
    proven to decrypt under ``new`` to the same key before it is returned."""
    raw = unseal(old, record)
    data_key = _unwrap(old, record)
    wrapped, wrap_nonce = _wrap(new, record.agent_id, record.slot, data_key)
    out = SealedRecord(
        record.agent_id,
        record.slot,
        record.ciphertext,
        record.nonce,
        wrapped,
        wrap_nonce,
        new.id,
        record.key_prefix,
        record.format,
    )
    if unseal(new, out) != raw:  # pragma: no cover - AES-GCM round trip; checked, not assumed
        raise SealedKeyCorrupt(f"re-wrapping the sealed key of {record.label} did not round-trip")
    return out
