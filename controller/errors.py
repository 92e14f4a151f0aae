"""One exception hierarchy for everything a user can act on.

The CLI maps these types to exit codes in one place (``controller.cli``); anything else is
a bug and is shown as one. Messages say what went wrong, where, and what to do; they never
contain key material.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.exitcodes import ExitCode
from policies.display import escape_controls


class FinopsError(Exception):
    """Base for errors with a user-facing message (no traceback shown)."""

    exit_code: int = ExitCode.ERROR


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


class ManifestError(FinopsError):
    """The manifests are invalid; ``issues`` lists every problem found, not just the first."""

    def __init__(self, issues: Sequence[ManifestIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class ConfigError(FinopsError):
    """The command line or environment is wrong (missing key, unreachable gateway…)."""


class GuardrailViolation(FinopsError):
    """A plan breaks a safety rule; nothing was applied."""


class StalePlanError(FinopsError):
    """A saved plan no longer matches the live gateway; re-plan before applying."""
