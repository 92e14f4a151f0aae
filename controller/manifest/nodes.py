"""Reading YAML as a node tree, so every value keeps the line it was written on.

``yaml.safe_load`` throws positions away; error messages that say "somewhere in this file"
are not actionable. We compose with PyYAML's SafeLoader instead, build plain Python data from
the nodes ourselves, and keep the nodes to map any error location back to a line.

Aliases (``*ref``) are refused rather than expanded: expansion is what lets a few hundred
bytes of YAML become gigabytes in memory (a "YAML bomb"), and a manifest has no need for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: One step of a field path: a mapping key or a list index.
Loc = tuple[str | int, ...]

#: Deeper than any real manifest (about 8 levels); refusing early keeps recursion bounded.
MAX_DEPTH = 32

_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
#: Scalar tags whose values are not plain text: ``!!binary`` would hide its content (an API
#: key, a URL) from reviewers and from the key scan.
_OPAQUE_SCALAR_TAGS = frozenset({"tag:yaml.org,2002:binary"})

#: How a person writes a whole number. YAML 1.1 also reads ``030`` as octal 24, ``0x1F`` as 31,
#: ``0b11`` as 3 and ``1:30`` as 90 (base 60): a cap written ``030`` would silently be 24.
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")

#: Characters that make two field names look identical: a byte order mark left in the middle
#: of a concatenated file, zero-width spaces pasted from a web page.
_INVISIBLE_NAMES = {
    "\u00a0": "no-break space",
    "\u200b": "zero-width space",
    "\u200c": "zero-width non-joiner",
    "\u200d": "zero-width joiner",
    "\u2060": "word joiner",
    "\ufeff": "byte order mark",
}
_INVISIBLE = re.compile(f"[{''.join(_INVISIBLE_NAMES)}]")

#: What a PyYAML context names, in words for people ("while scanning a quoted scalar").
_OPENED = {
    "a quoted scalar": "a quoted string",
    "a flow mapping": "a '{' mapping",
    "a flow sequence": "a '[' list",
}

ALIAS_MESSAGE = (
    "YAML aliases (*name) are not allowed in manifests: expanding them lets a tiny file blow up "
    "into a huge one (a 'YAML bomb'); write the values out, or use tiers and spec.defaults"
)


@dataclass(frozen=True)
class Problem:
    """A YAML-level problem at a 1-based line, with the field path when one is known."""

    line: int | None
    loc: Loc
    message: str


@dataclass
class Document:
    """One ``---`` document: its node tree, the plain data built from it, and its scalars.

    ``usable`` is false when the data cannot be trusted to mean what the author wrote (an
    alias was dropped, a tag could not be read), so schema checks would only add noise.
    """

    root: Node
    data: Any = None
    scalars: list[tuple[Loc, ScalarNode]] = field(default_factory=list)
    usable: bool = True


@dataclass
class ParsedFile:
    """Everything read from one file. ``complete`` is false when parsing stopped early."""

    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    complete: bool = True


class _NoAliasLoader(yaml.SafeLoader):
    """A SafeLoader that records each alias and composes it as null instead of expanding it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_lines: list[int] = []

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            self.alias_lines.append(event.start_mark.line + 1)
            return ScalarNode("tag:yaml.org,2002:null", "", event.start_mark, event.end_mark)
        return super().compose_node(parent, index)


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def parse_yaml(text: str) -> ParsedFile:
    """Compose every document of ``text``; stop at the first syntax error, keeping earlier ones."""
    result = ParsedFile()
    try:
        _compose_all(text, result)
    except yaml.MarkedYAMLError as exc:
        result.complete = False
        result.problems.append(_syntax_problem(exc))
    except yaml.reader.ReaderError as exc:
        result.complete = False
        line = text.count("\n", 0, exc.position) + 1
        result.problems.append(
            Problem(line, (), f"invalid YAML: unacceptable character #x{exc.character:04x} ({exc.reason})")
        )
    except yaml.YAMLError as exc:
        result.complete = False
        result.problems.append(Problem(None, (), f"invalid YAML: {type(exc).__name__}"))
    except RecursionError:
        result.complete = False
        result.problems.append(Problem(None, (), f"invalid YAML: nested more than {MAX_DEPTH} levels deep"))
    return result


def _compose_all(text: str, result: ParsedFile) -> None:
    loader = _NoAliasLoader(text)  # checks for unprintable characters up front
    try:
        while loader.check_node():
            aliases_before = len(loader.alias_lines)
            root = loader.get_node()
            if root is None:
                continue
            doc = Document(root=root, usable=len(loader.alias_lines) == aliases_before)
            if _is_empty(root):
                continue  # a stray '---' or a comment-only document
            _build(doc, result.problems)
            result.documents.append(doc)
    finally:
        # Reported even when a syntax error stops the file part-way through a document.
        result.problems.extend(Problem(line, (), ALIAS_MESSAGE) for line in loader.alias_lines)
        loader.dispose()


def _is_empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null" and node.value in ("", "~")


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return int(mark.line) + 1 if mark is not None else None


def _syntax_problem(exc: yaml.MarkedYAMLError) -> Problem:
    """A syntax error at the line to fix.

    A quote or bracket left open is only noticed at the end of the file; PyYAML points there,
    but the fix belongs where it was opened.
    """
    problem = exc.problem or ""
    context = (exc.context or "").removeprefix("while scanning ").removeprefix("while parsing ")
    opened = _OPENED.get(context)
    if opened and exc.context_mark is not None and ("end of stream" in problem or "<stream end>" in problem):
        end = f" (the file ends at line {exc.problem_mark.line + 1})" if exc.problem_mark is not None else ""
        return Problem(exc.context_mark.line + 1, (), f"invalid YAML: {opened} starts here and is never closed{end}")
    return Problem(_mark_line(exc), (), _yaml_message(exc))


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's own wording, minus the source excerpt (which could hold a secret)."""
    problem = exc.problem or "syntax error"
    if "'\\t'" in problem:
        problem += "; indent with spaces (YAML does not allow tabs here)"
    elif "<block end>" in problem and "'<scalar>'" in problem:
        problem += "; check the indentation, and for a quote left open on an earlier line"
    elif "<block end>" in problem or "<block mapping start>" in problem:
        problem += "; check the indentation"
    if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
        if exc.context_mark.line != exc.problem_mark.line:
            return f"invalid YAML: {problem} ({exc.context} at line {exc.context_mark.line + 1})"
        return f"invalid YAML: {problem} ({exc.context})"
    return f"invalid YAML: {problem}"


class _Unreadable(Exception):
    """A node we refuse to turn into data; the document is reported and not validated."""

    def __init__(self, node: Node, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.problem = Problem(line_of(node), loc, message)


def _build(doc: Document, problems: list[Problem]) -> None:
    constructor = SafeConstructor()
    try:
        doc.data = _to_data(doc.root, (), constructor, doc, problems, 0)
    except _Unreadable as exc:
        doc.usable = False
        problems.append(exc.problem)


def _to_data(
    node: Node,
    loc: Loc,
    constructor: SafeConstructor,
    doc: Document,
    problems: list[Problem],
    depth: int,
) -> Any:
    """Plain data for ``node``: scalars resolved by YAML 1.1 safe rules, keys kept as written.

    Keys are taken verbatim (``yes:`` is the key "yes", not ``True``) because they are field
    names and label keys, never values. Duplicate keys are reported: PyYAML would silently
    keep the last one, and a cap written twice is a review hazard.
    """
    if depth > MAX_DEPTH:
        raise _Unreadable(node, loc, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ScalarNode):
        doc.scalars.append((loc, node))
        if node.tag in _OPAQUE_SCALAR_TAGS:
            raise _Unreadable(node, loc, _tag_message(node))
        try:
            value = constructor.construct_object(node)
        except ConstructorError:
            raise _Unreadable(node, loc, _tag_message(node)) from None
        surprise = _surprising_number(node, value)
        if surprise:
            doc.usable = False
            problems.append(Problem(line_of(node), loc, surprise))
        return value
    if isinstance(node, (SequenceNode, MappingNode)) and node.tag not in (_SEQ_TAG, _MAP_TAG):
        raise _Unreadable(node, loc, _tag_message(node))
    if isinstance(node, SequenceNode):
        return [_to_data(item, (*loc, i), constructor, doc, problems, depth + 1) for i, item in enumerate(node.value)]
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _Unreadable(key_node, loc, "mapping keys must be plain strings")
            key = str(key_node.value)
            doc.scalars.append(((*loc, key), key_node))
            hidden = _INVISIBLE.search(key)
            if hidden:
                doc.usable = False
                char = hidden.group(0)
                problems.append(
                    Problem(
                        line_of(key_node),
                        (*loc, _INVISIBLE.sub("", key)),
                        f"field name contains an invisible {_INVISIBLE_NAMES[char]} (U+{ord(char):04X}); delete it",
                    )
                )
            if key in first_line:
                problems.append(
                    Problem(
                        line_of(key_node),
                        (*loc, key),
                        f"duplicate key '{key}' (first at line {first_line[key]}); remove one of them",
                    )
                )
            else:
                first_line[key] = line_of(key_node)
            out[key] = _to_data(value_node, (*loc, key), constructor, doc, problems, depth + 1)
        return out
    raise _Unreadable(node, loc, f"unsupported YAML node {type(node).__name__}")


def _surprising_number(node: ScalarNode, value: object) -> str | None:
    """Why a number is not what it looks like, or ``None`` for a plain decimal number."""
    text = str(node.value)
    if node.tag == _INT_TAG and isinstance(value, int) and not _PLAIN_INT.fullmatch(text):
        digits = text.lstrip("+-")
        if ":" in digits:
            form = "base 60"
        elif digits[:2].lower() == "0x":
            form = "hexadecimal"
        elif digits[:2].lower() == "0b":
            form = "binary"
        else:
            form = "octal"
    elif node.tag == _FLOAT_TAG and ":" in text:
        form = "base 60"
    else:
        return None
    return (
        f"YAML reads {text} as the {form} number {value}; write numbers in plain decimal "
        "(no leading zero, 0x, 0b or ':'), or quote the value if it is text"
    )


def _tag_message(node: Node) -> str:
    tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
    return f"unsupported YAML tag '{tag}'; manifests hold plain strings, numbers, lists and mappings"


def _entries(node: MappingNode) -> Iterator[tuple[ScalarNode, Node]]:
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode):
            yield key_node, value_node


def locate(root: Node, loc: Sequence[str | int]) -> tuple[int, bool]:
    """The line that best matches a field path, and whether the whole path was found.

    A path ending at a mapping or list points at its key (where the block starts); ending at
    a scalar points at the value. A path that leaves the tree (a missing field) stops at the
    deepest existing key, which is where the author would add the field.
    """
    node = root
    line = line_of(root)
    for part in loc:
        if isinstance(node, MappingNode) and isinstance(part, str):
            match = None
            for key_node, value_node in _entries(node):
                if key_node.value == part:
                    match = (key_node, value_node)  # last wins, as in the data
            if match is None:
                return line, False
            key_node, node = match
            line = line_of(key_node)
            if isinstance(node, ScalarNode) and node.value != "" and line_of(node) > line:
                line = line_of(node)  # a value written on the line after its key
        elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = line_of(node)
        else:
            return line, False
    return line, True


def dotted(loc: Sequence[str | int]) -> str:
    """``('spec', 'agents', 2, 'dailyCap')`` → ``spec.agents[2].dailyCap``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
