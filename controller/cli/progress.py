"""A progress bar for long applies: click's own ``click.progressbar``, on stderr, and only
when stderr is a terminal (a pipe, a CI log or ``--format json`` output never sees it)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import click

from policies.plan_types import Plan

PROGRESS_MIN_AGENTS = 10
"""An apply touching fewer agents is quick: no bar."""


class ApplyProgress:
    """``start(plan)`` before the first write, ``advance()`` per agent done, ``close()``."""

    def __init__(self, stream: TextIO, *, color: bool | None = None, min_agents: int = PROGRESS_MIN_AGENTS) -> None:
        self._stream = stream
        self._color = color
        self._min = min_agents
        self._bar: Any = None

    @classmethod
    def on_stderr(cls, *, color: bool | None = None) -> ApplyProgress:
        """On the process' stderr as it is now (click's test runner swaps it)."""
        return cls(sys.stderr, color=color)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def start(self, plan: Plan) -> None:
        total = len({c.agent_id for c in plan.changes})
        if self._bar is not None or total < self._min or not _isatty(self._stream):
            return
        bar = click.progressbar(
            length=total,
            label=f"Applying to {total} agent(s)",
            file=self._stream,
            color=self._color,
            show_pos=True,
            show_eta=False,
        )
        self._bar = bar.__enter__()

    def advance(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.__exit__(None, None, None)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
