"""The one-writer lock: a second writer fails at once and is told who holds the lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller.daemon.lock import WriterLocked, lock_path, writer_lock
from controller.errors import ConfigError


def test_a_second_writer_fails_fast_naming_the_holder(tmp_path: Path) -> None:
    with writer_lock(tmp_path / "state") as path:
        assert path == lock_path(tmp_path / "state")
        assert (path.stat().st_mode & 0o777) == 0o600
        with pytest.raises(WriterLocked) as caught, writer_lock(tmp_path / "state"):
            pass  # pragma: no cover - never entered
        assert caught.value.holder_pid == os.getpid()
        assert f"pid {os.getpid()}" in str(caught.value)
        assert isinstance(caught.value, ConfigError)  # exit code 1, one line, no traceback


def test_the_lock_is_released_on_exit_even_after_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), writer_lock(tmp_path):
        raise RuntimeError("the apply failed")
    with writer_lock(tmp_path):
        pass
    with writer_lock(tmp_path):  # and again: the file is reused, never deleted
        assert lock_path(tmp_path).exists()


def test_other_state_directories_are_independent(tmp_path: Path) -> None:
    with writer_lock(tmp_path / "a") as held_a, writer_lock(tmp_path / "b") as held_b:
        assert held_a != held_b
        assert held_a == lock_path(tmp_path / "a") and held_b == lock_path(tmp_path / "b")
        # each lock still excludes a second writer on its own directory
        for directory in ("a", "b"):
            with pytest.raises(WriterLocked), writer_lock(tmp_path / directory):
                pass  # pragma: no cover - never entered
