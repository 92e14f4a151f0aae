"""Making untrusted text safe to show on a terminal or in a PR comment.

Agent ids are pattern-checked, but names, labels, reasons, URLs, file names and the snippets
quoted in error messages come from manifests, the gateway or the file system. A value holding
ESC sequences could recolour or clear the operator's terminal, rewrite the line above
(``\\r``), fake a second "error" line (``\\n``), or reorder what is read (bidi overrides such as
U+202E). :func:`escape_controls` is the one place that neutralises them: every text renderer
(plans, status, apply results, error lines, text logs) calls it on what it prints. JSON output
is escaped by ``json.dumps`` already.
"""

from __future__ import annotations

import re

#: C0 controls (tab included: it can hide text), DEL, C1 controls (``\x9b`` is a one-byte CSI),
#: the Unicode line/paragraph separators, and the bidi embedding, override, isolate and mark
#: characters.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control, separator and bidi character shown as ``\\xNN`` /
    ``\\uNNNN``, so it prints as exactly one inert line."""
    return _UNSAFE.sub(_escape, text)


def escape_lines(text: str) -> str:
    """:func:`escape_controls` on each line of ``text`` (the line breaks themselves stay)."""
    return "\n".join(escape_controls(line) for line in text.split("\n"))
