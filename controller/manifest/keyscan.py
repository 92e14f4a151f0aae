"""Keeping API keys out of manifests, and out of our own error messages.

Manifests live in git, where a committed key is leaked for good. The scan is over raw text,
line by line, so a key is caught wherever it hides: a value, a mapping key, a comment, or a
file that is not even valid YAML.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Iterable

from policies import keyprint

#: The line breaks YAML (and so PyYAML's line numbers) recognise; ``str.splitlines`` knows more.
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")

#: A GreenHelix API key: ``a2a_``, a tier word, ``_``, then hex (``a2a_free_fa63aab6…``);
#: defined once, in ``policies.keyprint``.
API_KEY_PATTERN = keyprint.API_KEY_PATTERN

KEY_MESSAGE = (
    "looks like an API key; keys must never be committed in a manifest "
    "(use the secrets directory / GREENHELIX_API_KEY_FILE)"
)

REDACTED = keyprint.REDACTED


def key_lines(text: str) -> list[int]:
    """1-based numbers of the lines that contain something shaped like an API key."""
    return [n for n, line in enumerate(_LINE_BREAK.split(text), start=1) if API_KEY_PATTERN.search(line)]


def key_lines_in_chunks(chunks: Iterable[bytes], *, tail: int = 4096) -> list[int]:
    """:func:`key_lines` over a file read in pieces, in memory bounded by the piece size.

    For files too large to parse, which are still about to be committed. A line is scanned
    once it is complete; a line longer than a piece is scanned piece by piece, keeping a
    ``tail`` of overlap so that a key split between two pieces is still seen.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    found: list[int] = []
    line_no, pending = 1, ""

    def hit(text: str) -> None:
        if API_KEY_PATTERN.search(text) and (not found or found[-1] != line_no):
            found.append(line_no)

    for chunk in itertools.chain(chunks, [None]):
        final = chunk is None
        text = pending + decoder.decode(chunk or b"", final=final)
        held = "\r" if not final and text.endswith("\r") else ""  # maybe the first half of "\r\n"
        parts = _LINE_BREAK.split(text[: len(text) - len(held)])
        pending = parts.pop() + held
        for part in parts:
            hit(part)
            line_no += 1
        if final or len(pending) > 2 * tail:
            hit(pending)
            pending = pending[-tail:]
    return found


def looks_like_key(value: str) -> bool:
    return keyprint.looks_like_key(value)


def redact(text: str) -> str:
    """Remove key material (whole keys and their secret parts, see
    ``policies.keyprint.redact_keys``); applied to every message we emit, whatever its origin."""
    return keyprint.redact_keys(text)
