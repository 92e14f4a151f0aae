"""GitHub Actions output: workflow-command annotations for ``validate --format github`` and
the job summary (``GITHUB_STEP_SUMMARY``) that ``plan`` appends its markdown to.

Annotation values are escaped as the runner requires (``%``, CR and LF in the message; also
``:`` and ``,`` in properties), after control characters are made inert: a manifest cannot
end an annotation early, start another workflow command on a new line, or forge a property.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from policies.display import escape_controls
from policies.issues import ManifestIssue

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def escape_data(text: str) -> str:
    """A workflow command's message (``::error …::MESSAGE``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value (``file=…``, ``title=…``)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(issue: ManifestIssue, level: str = "error") -> str:
    """``::error file=F,line=N,title=finops%3A FIELD::MESSAGE`` for one manifest problem."""
    props = [f"file={escape_property(escape_controls(issue.file))}"]
    if issue.line is not None:
        props.append(f"line={int(issue.line)}")
    title = f"finops: {issue.field}" if issue.field else "finops"
    props.append(f"title={escape_property(escape_controls(title))}")
    message = f"{issue.field}: {issue.message}" if issue.field else issue.message
    return f"::{level} {','.join(props)}::{escape_data(escape_controls(message))}"


def plain_annotation(message: str, level: str = "error") -> str:
    """An annotation without a location (a problem that is not in one file)."""
    return f"::{level} title=finops::{escape_data(escape_controls(message))}"


class StepSummaryError(OSError):
    """``GITHUB_STEP_SUMMARY`` names something finops will not write to."""


def append_step_summary(path: str | Path, markdown: str) -> None:
    """Append ``markdown`` to the job summary file. Opened without blocking (a FIFO with no
    reader fails at once instead of hanging) and refused unless it is a regular file."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise StepSummaryError(exc.errno, "not a regular file (a FIFO with no reader)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StepSummaryError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        data = (markdown.rstrip("\n") + "\n\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)
