"""Keeping API keys out of manifests, and out of our own error messages.

Manifests live in git, where a committed key is leaked for good. The scan is over raw text,
line by line, so a key is caught wherever it hides: a value, a mapping key, a comment, or a
file that is not even valid YAML.
"""

from __future__ import annotations

import re

#: The line breaks YAML (and so PyYAML's line numbers) recognise; ``str.splitlines`` knows more.
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")

#: A GreenHelix API key: ``a2a_``, a tier word, ``_``, then hex (``a2a_free_fa63aab6…``).
API_KEY_PATTERN = re.compile(r"a2a_[a-z]+_[0-9a-f]{16,}", re.IGNORECASE)

KEY_MESSAGE = (
    "looks like an API key; keys must never be committed in a manifest "
    "(use the secrets directory / GREENHELIX_API_KEY_FILE)"
)

REDACTED = "<redacted API key>"


def key_lines(text: str) -> list[int]:
    """1-based numbers of the lines that contain something shaped like an API key."""
    return [n for n, line in enumerate(_LINE_BREAK.split(text), start=1) if API_KEY_PATTERN.search(line)]


def looks_like_key(value: str) -> bool:
    return API_KEY_PATTERN.search(value) is not None


def redact(text: str) -> str:
    """Remove key-shaped substrings; applied to every message we emit, whatever its origin."""
    return API_KEY_PATTERN.sub(REDACTED, text)
