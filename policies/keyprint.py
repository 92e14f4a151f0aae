"""API keys: their one definition, their fingerprints (the only form in which a key may be
shown anywhere), and redaction.

A GreenHelix key is ``a2a_{tier}_{24 hex}`` (API.md §2.1); the 24 hex characters are the
secret. The gateway lists keys by ``key_hash_prefix`` = first 8 hex chars of SHA3-256(raw
key), so using the same prefix lets an operator match our output with the gateway's listings.

Redaction removes the *secret part* wherever it is and whatever surrounds it: the whole key,
the key without ``a2a_`` (``free_fa63…``), the bare 24 hex characters, the key split over
lines, inside JSON or quotes. For a key finops knows (the one it is delivering, its admin
key), any run of 8 or more of its secret characters is removed, even split over lines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

KEY_PREFIX = "a2a_"
SECRET_HEX_LEN = 24
"""Hex characters in the secret part of a key minted by GreenHelix 1.4.8."""
MIN_SECRET_RUN = 8
"""The shortest run of a known key's secret characters that is redacted (32 bits)."""

API_KEY_PATTERN = re.compile(r"a2a_[a-z0-9]+_[0-9a-f]{16,}", re.IGNORECASE)
"""A whole GreenHelix key (what a manifest scan or an import refuses)."""
KEY_TOKEN = re.compile(r"a2a_\S+")
"""The shape finops accepts as one key value (from the gateway, the vault or an operator):
``a2a_`` then no whitespace. Looser than :data:`API_KEY_PATTERN` on purpose: the gateway
checks only the prefix, and a tier word or secret length it mints later must still be kept."""

_BREAK = r"(?:[ \t]*(?:\r\n|[\n\r\x85\u2028\u2029]|\\n|\\r\\n)[ \t]*)"
"""A line break (real or JSON-escaped) with its indentation, where a printed key may be split."""
_HEX = "[0-9a-fA-F]"
_GENERIC = re.compile(
    # a2a_ and whatever follows it that could be key material, across line breaks
    rf"a2a_(?:[A-Za-z0-9_-]|{_BREAK}(?=[0-9a-fA-F]))+"
    # a tier word, "_" and 16+ hex: the key without its a2a_ prefix
    rf"|(?<![A-Za-z0-9])(?:free|starter|pro|enterprise|admin)_{_HEX}(?:{_BREAK}?{_HEX}){{15,}}(?!{_HEX})"
    # exactly the secret's 24 hex characters, on their own (not part of a longer token or
    # of an id such as whk-<24 hex>), possibly split over lines
    rf"|(?<![A-Za-z0-9_-]){_HEX}(?:{_BREAK}?{_HEX}){{{SECRET_HEX_LEN - 1}}}(?![A-Za-z0-9_-])",
    re.IGNORECASE,
)
_KEY_MATERIAL = re.compile(r"a2a_|(?<![A-Za-z0-9])(?:free|starter|pro|enterprise|admin)_[0-9a-f]{16,}", re.I)
_HEX_RUN = re.compile(rf"{_HEX}+(?:(?:[^0-9A-Za-z]|\\[nrt]){{1,4}}{_HEX}+)*")
"""Hex characters, possibly in pieces separated by a few punctuation or space characters
(line breaks, JSON escapes and quotes, dashes, chunks): how a printed key may be cut up."""
REDACTED = "<redacted API key>"


def key_prefix(raw_key: str) -> str:
    """The gateway's ``key_hash_prefix`` for a raw key."""
    return hashlib.sha3_256(raw_key.encode()).hexdigest()[:8]


def fingerprint(raw_key: str) -> str:
    """Human-facing fingerprint, e.g. ``sha3:705a7926``; safe for logs and plans."""
    return f"sha3:{key_prefix(raw_key)}"


def secret_part(raw_key: str) -> str:
    """The secret characters of a key (after its last ``_``), lowercased."""
    return raw_key.strip().rsplit("_", 1)[-1].lower()


def is_key_token(value: str) -> bool:
    """Whether ``value`` is, as a whole, one key value (:data:`KEY_TOKEN`)."""
    return KEY_TOKEN.fullmatch(value) is not None


def looks_like_key(value: str) -> bool:
    """Whether ``value`` contains a whole API key."""
    return API_KEY_PATTERN.search(value) is not None


def looks_like_key_material(value: str) -> bool:
    """Whether ``value`` contains a key, or a key's secret part behind its tier word (not a
    bare hex string: a generated secret is hex too)."""
    return _KEY_MATERIAL.search(value) is not None


def contains_key_material(text: str) -> bool:
    """Whether :func:`redact_keys` would change ``text`` even knowing no key: a key, a key
    without its ``a2a_``, or a bare 24-hex secret, whole or split over lines. What a leak
    check over output looks for (a description such as ``a2a_<tier>_<hex>`` is not one)."""
    return _GENERIC.search(text) is not None


def contains_secret_fragment(text: str, raw_key: str) -> bool:
    """Whether ``text``'s hex characters, everything else ignored, contain 8 or more
    consecutive characters of the key's secret part, however the text cut it up. For text
    a key was handed to (a sink's stderr): if so, withhold the text entirely."""
    secret = secret_part(raw_key)
    if len(secret) < MIN_SECRET_RUN:
        return False
    flat = re.sub(r"[^0-9a-f]", "", text.lower())
    return any(secret[i : i + MIN_SECRET_RUN] in flat for i in range(len(secret) - MIN_SECRET_RUN + 1))


def _known_secrets(known: Iterable[str]) -> list[str]:
    return [s for s in (secret_part(k) for k in known if k) if len(s) >= MIN_SECRET_RUN]


def redact_keys(text: str, known: Iterable[str] = (), replacement: str = REDACTED) -> str:
    """``text`` without any key material: each ``known`` raw key, anything shaped like a
    key, then any run of 8+ of a known key's secret characters (even split over lines)."""
    for raw in known:
        if raw:
            text = text.replace(raw, replacement)
    text = _GENERIC.sub(replacement, text)
    secrets = _known_secrets(known)
    if secrets:

        def scrub_run(match: re.Match[str]) -> str:
            run = re.sub(r"[^0-9a-fA-F]", "", match.group(0)).lower()  # drops breaks, \\n escapes
            for secret in secrets:
                for i in range(len(run) - MIN_SECRET_RUN + 1):
                    if run[i : i + MIN_SECRET_RUN] in secret:
                        return replacement
            return match.group(0)

        text = _HEX_RUN.sub(scrub_run, text)
    return text


def secret_fingerprint(value: str) -> str:
    """A short, non-reversible label for a secret (a webhook signing secret), for plans and
    status (never the value)."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]
