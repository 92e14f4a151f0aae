"""Fingerprints for API keys: the only form in which a key may be shown anywhere.

The gateway lists keys by ``key_hash_prefix`` = first 8 hex chars of SHA3-256(raw key), so
using the same prefix lets an operator match our output with the gateway's listings.
"""

from __future__ import annotations

import hashlib


def key_prefix(raw_key: str) -> str:
    """The gateway's ``key_hash_prefix`` for a raw key."""
    return hashlib.sha3_256(raw_key.encode()).hexdigest()[:8]


def fingerprint(raw_key: str) -> str:
    """Human-facing fingerprint, e.g. ``sha3:705a7926``; safe for logs and plans."""
    return f"sha3:{key_prefix(raw_key)}"
