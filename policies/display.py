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


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str) -> str:
    """``text`` with every character that does not print as itself shown as ``\\xNN`` /
    ``\\uNNNN``: C0 and C1 controls (ESC, ``\\r``, ``\\n``, tab, the one-byte CSI ``\\x9b``),
    bidi overrides and marks (U+202E), line separators, zero-width and unassigned characters
    (Python's ``str.isprintable``; the plain space stays). The result is one inert line."""
    if text.isprintable():
        return text  # the common case, at C speed
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def escape_lines(text: str) -> str:
    """:func:`escape_controls` on each line of ``text`` (the line breaks themselves stay)."""
    return "\n".join(escape_controls(line) for line in text.split("\n"))


_MARKDOWN_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    "@": "&#64;",
    "\\": "\\\\",
    "`": "\\`",
    "*": "\\*",
    "_": "\\_",
    "[": "\\[",
    "]": "\\]",
    "|": "\\|",
    "~": "\\~",
    "#": "\\#",
}


def escape_markdown(text: str) -> str:
    """``text`` as inert GitHub-flavoured markdown inline content, one line: controls and
    bidi overrides as with :func:`escape_controls`; ``& < >`` as entities (no HTML, no
    autolink, no closing a ``<details>``); ``@`` as an entity (no mention pings a team from a
    PR comment); and the characters that open emphasis, code, links, tables, strikethrough or
    headings backslash-escaped (a ``|`` opens no table column). It renders as ``text``
    itself, control characters shown escaped."""
    out = "".join(_MARKDOWN_ESCAPES.get(ch, ch) for ch in escape_controls(text))
    # At the start of a list item a value could open a block: a nested list ("1. ", "- ",
    # "+ "), a thematic break ("---") or, after leading spaces, an indented code block.
    stripped = out.lstrip(" ")
    if len(stripped) < len(out):
        out = "&#32;" + out[1:]
    elif out[:1] in ("-", "+"):
        out = "\\" + out
    else:
        digits = len(out) - len(out.lstrip("0123456789"))
        if digits and out[digits : digits + 1] in (".", ")"):
            out = out[:digits] + "\\" + out[digits:]
    return out
