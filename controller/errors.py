"""One exception hierarchy for everything a user can act on.

The CLI maps these types to exit codes in one place (``controller.cli``); anything else is
a bug and is shown as one. Messages say what went wrong, where, and what to do; they never
contain key material.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.exitcodes import ExitCode
from policies.issues import ManifestIssue as ManifestIssue  # the one type; named here too


class FinopsError(Exception):
    """Base for errors with a user-facing message (no traceback shown)."""

    exit_code: int = ExitCode.ERROR


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
