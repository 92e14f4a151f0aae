"""The writer lock moved to ``controller.state`` (``flock`` for SQLite, ``lock`` for both
backends); kept here so existing imports keep working."""

from controller.state.flock import LOCK_NAME, WriterLocked, lock_path, writer_lock

__all__ = ["LOCK_NAME", "WriterLocked", "lock_path", "writer_lock"]
