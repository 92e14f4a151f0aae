"""One definition of an API key and one redaction: the secret part of a key never survives,
whatever surrounds it (no ``a2a_`` prefix, split over lines, inside JSON or quotes)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from policies.keyprint import (
    API_KEY_PATTERN,
    MIN_SECRET_RUN,
    REDACTED,
    contains_key_material,
    is_key_token,
    looks_like_key_material,
    redact_keys,
    secret_part,
)

TIERS = st.sampled_from(["free", "starter", "pro", "enterprise"])
SECRETS = st.text(alphabet="0123456789abcdef", min_size=24, max_size=24)
DELIMS = st.sampled_from([" ", "\n", "=", ":", '"', "'", "(", "[", ",", "\t", ""])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def _runs_of(secret: str, text: str) -> list[str]:
    """Every run of MIN_SECRET_RUN secret characters still present in ``text`` once line
    breaks and JSON escapes are removed (what a reader could piece together)."""
    flat = text.replace("\\n", "").replace("\n", "").replace("\r", "").replace(" ", "").lower()
    return [
        secret[i : i + MIN_SECRET_RUN]
        for i in range(len(secret) - MIN_SECRET_RUN + 1)
        if secret[i : i + MIN_SECRET_RUN] in flat
    ]


def _variants(key: str, split_at: int) -> list[str]:
    secret = secret_part(key)
    without_prefix = key.removeprefix("a2a_")
    cut = 4 + len(key.split("_")[1]) + 1 + split_at  # inside the secret part
    return [
        key,
        without_prefix,
        secret,
        key.upper(),
        key[:cut] + "\n" + key[cut:],
        key[:cut] + "\n    " + key[cut:],
        json.dumps({"key": key[:cut] + "\n" + key[cut:]}),
        secret[:split_at] + "\n" + secret[split_at:],
        json.dumps({"api_key": without_prefix}),
    ]


@given(tier=TIERS, secret=SECRETS, before=TEXT, after=TEXT, split_at=st.integers(1, 23))
def test_a_known_key_leaves_no_run_of_its_secret_whatever_surrounds_it(
    tier: str, secret: str, before: str, after: str, split_at: int
) -> None:
    key = f"a2a_{tier}_{secret}"
    for variant in _variants(key, split_at):
        out = redact_keys(before + variant + after, [key])
        assert _runs_of(secret, out) == [] or _runs_of(secret, before + after), (variant, out)


@given(tier=TIERS, secret=SECRETS, d1=DELIMS, d2=DELIMS, split_at=st.integers(1, 23))
def test_an_unknown_key_is_redacted_in_every_printed_form(
    tier: str, secret: str, d1: str, d2: str, split_at: int
) -> None:
    key = f"a2a_{tier}_{secret}"
    for variant in _variants(key, split_at):
        out = redact_keys(f"stderr: {d1}{variant}{d2} done")
        assert secret not in out.lower().replace("\n", "").replace("\\n", "").replace(" ", ""), (variant, out)
        assert REDACTED in out


def test_ids_hashes_and_fingerprints_are_not_mistaken_for_keys() -> None:
    text = (
        "webhook whk-0123456789abcdef01234567 sha3:705a7926 sha256:0123456789ab "
        "finops-topup-" + "ab" * 20 + " plan " + "f" * 64 + " expected a2a_<tier>_<hex>"
    )
    assert redact_keys(text) == text


def test_key_material_detection_for_secret_values() -> None:
    assert looks_like_key_material("a2a_free_fa63aab628959ce3b1ec48a5")
    assert looks_like_key_material("pro_fa63aab628959ce3b1ec48a5\n")
    assert looks_like_key_material("prefix a2a_")
    assert not looks_like_key_material("9f" * 32)  # a generated signing secret


@given(TIERS, SECRETS, TEXT, TEXT)
def test_a_key_anywhere_is_key_material_and_a_whole_key_token(tier: str, secret: str, before: str, after: str) -> None:
    key = f"a2a_{tier}_{secret}"
    assert is_key_token(key) and API_KEY_PATTERN.fullmatch(key)
    assert contains_key_material(f"{before} {key} {after}")
    assert contains_key_material(f"{before} {tier}_{secret} {after}")  # without its a2a_
    assert redact_keys(f"{before} {key} {after}") != f"{before} {key} {after}"


def test_what_is_not_a_key_token_or_key_material() -> None:
    # (a trailing line break too: the vault writes the key plus one, and must not double it)
    for value in ("", "a2a_", "a2a_free_00 11", "a2a_free_0011\n", " a2a_x", "free_0011"):
        assert not is_key_token(value), value
    # a description of the format, a fingerprint, an idempotency key: nothing to redact
    for text in ("expected a2a_<tier>_<hex>", "key sha3:705a7926", "finops-topup-" + "ab" * 20):
        assert not contains_key_material(text) and redact_keys(text) == text, text
