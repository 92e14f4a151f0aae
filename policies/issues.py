"""A problem in a manifest, located (file, line, field): the one value type for it.

The loader (schema, YAML, key scan) and the tier resolution (``policies.tiers``) both report
with it, and ``controller.errors.ManifestError`` carries a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.display import escape_controls


@dataclass(frozen=True)
class ManifestIssue:
    """One problem in one manifest file, pointing at the line and the field."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        """One inert line: control characters and bidi overrides quoted from the manifest
        (or its file name) are shown escaped, never sent to the terminal."""
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        field = f" {self.field}:" if self.field else ""
        return escape_controls(f"{where}:{field} {self.message}")
