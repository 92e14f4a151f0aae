"""finops' own store of agents' raw keys: the gateway rotates only on presentation of the
current raw key, so finops must keep it, and it is shown once, so it must survive a crash.

``KeyStore`` is what the rest of finops asks of a key store; there are two: this module's
``KeyVault`` (the directory store, the default with SQLite) and
``controller.keys.sealed.SealedVault`` (the database store: keys sealed in the state
database under a key-encryption key, so that another machine can take over). Which one a
command uses is decided once, in ``controller.keys.selection``.

The directory store's layout (the same as before key management existed, so existing
secrets dirs keep working)::

    <dir>/<agent>.key              the agent's current key (0600)
    <dir>/quarantine/<agent>.key   a key finops holds but does not deliver (emergency stop)

Every write is atomic and fsynced (``controller.io.secretfile``) before the caller moves on.
The directory is created 0700 whatever the umask, and refused (``UnsafeSecretPath``) when
another user could write to it or it is a symlink; a key file that is not finops' own
regular 0600 file is refused before it is read. The check runs when the vault is opened,
so an unsafe directory stops a command before its first gateway write.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from controller.io.secretfile import (
    check_private_dir,
    check_private_file,
    make_private_dirs,
    read_secret_file,
    why_not_writable,
    write_secret_file,
)
from controller.io.secretref import protect_secret_path
from policies.keyprint import is_key_token, key_prefix

_SAFE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$")

MAIN = "main"
"""The slot whose key is the agent's current, delivered key."""
QUARANTINE = "quarantine"
"""The slot for a key finops keeps but does not deliver."""
SLOTS = (MAIN, QUARANTINE)


def key_path(directory: Path, agent_id: str, slot: str = MAIN) -> Path:
    """``<directory>/<agent>.key`` (or under ``quarantine/``); refuses unsafe agent ids."""
    if not _SAFE_NAME.match(agent_id) or agent_id in {".", ".."}:
        raise ValueError(f"agent id {agent_id!r} cannot be used as a file name")
    if slot == MAIN:
        return Path(directory) / f"{agent_id}.key"
    if slot == QUARANTINE:
        return Path(directory) / QUARANTINE / f"{agent_id}.key"
    raise ValueError(f"unknown key slot {slot!r}")


class KeyStore(Protocol):
    """finops' store of agents' raw keys, per agent and slot (``MAIN``, ``QUARANTINE``).

    Every write is durable before it returns. A read returns ``None`` only when no key is
    held; a key that is held but cannot be read (an unsafe file, a wrong key-encryption key,
    a tampered row) raises, so that finops never mistakes it for a lost key."""

    kind: str
    """``directory`` or ``database`` (for messages and ``status``)."""

    def write(self, agent_id: str, raw_key: str, slot: str = MAIN) -> str:
        """Persist the key durably; returns its gateway hash prefix."""
        ...

    def read(self, agent_id: str, slot: str = MAIN) -> str | None: ...
    def clear(self, agent_id: str, slot: str) -> bool: ...
    def is_quarantined(self, agent_id: str) -> bool: ...
    def held(self, agent_id: str) -> tuple[str, str] | None: ...
    def store(self, agent_id: str, raw_key: str) -> str: ...
    def load(self, agent_id: str) -> str | None: ...
    def entries(self) -> list[tuple[str, str]]:
        """Every ``(agent, slot)`` that holds a key, sorted."""
        ...

    def describe(self, agent_id: str, slot: str = MAIN) -> str:
        """Where the agent's key in ``slot`` is kept, for people (never the key)."""
        ...

    def key_file(self, agent_id: str) -> Path | None:
        """The store's own file for the agent's delivered key, when that file is the agent's
        key file (the directory store); ``None`` when the store has no files."""
        ...

    @property
    def sink_directory(self) -> Path:
        """Where a ``directory`` sink without a path delivers (``<dir>/<agent>.key``)."""
        ...

    def unwritable(self) -> str | None:
        """Why a new key could not be stored right now (``None``: it can). Checked before
        registering an agent, whose key the gateway shows only once."""
        ...

    def close(self) -> None: ...


class SlotAccess:
    """What every key store derives from its ``read``/``write`` of one slot: which key is
    held (quarantine wins: it is the newer key, and the delivered one is dying in its grace
    period), and the ``MAIN`` slot as the agent's current key."""

    def read(self, agent_id: str, slot: str = MAIN) -> str | None:
        raise NotImplementedError

    def write(self, agent_id: str, raw_key: str, slot: str = MAIN) -> str:
        raise NotImplementedError

    def is_quarantined(self, agent_id: str) -> bool:
        return self.read(agent_id, QUARANTINE) is not None

    def held(self, agent_id: str) -> tuple[str, str] | None:
        for slot in (QUARANTINE, MAIN):
            raw = self.read(agent_id, slot)
            if raw is not None:
                return raw, slot
        return None

    def store(self, agent_id: str, raw_key: str) -> str:
        """Persist the agent's current key durably; returns its gateway hash prefix."""
        return self.write(agent_id, raw_key, MAIN)

    def load(self, agent_id: str) -> str | None:
        return self.read(agent_id, MAIN)


class KeyVault(SlotAccess):
    """The directory store: one 0600 file per agent and slot."""

    kind = "directory"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.check()
        protect_secret_path(self.directory)

    def check(self) -> None:
        """Refuse an unsafe key store (see the module docstring); a missing one is fine."""
        check_private_dir(self.directory)
        check_private_dir(self.directory / QUARANTINE, what="quarantine directory")

    # -- paths -----------------------------------------------------------------

    def path_for(self, agent_id: str, slot: str = MAIN) -> Path:
        return key_path(self.directory, agent_id, slot)

    def quarantine_path_for(self, agent_id: str) -> Path:
        return self.path_for(agent_id, QUARANTINE)

    def describe(self, agent_id: str, slot: str = MAIN) -> str:
        return str(self.path_for(agent_id, slot))

    def key_file(self, agent_id: str) -> Path | None:
        return self.path_for(agent_id, MAIN)

    @property
    def sink_directory(self) -> Path:
        return self.directory

    def unwritable(self) -> str | None:
        problem = why_not_writable(self.directory)
        return f"finops' key store {self.directory}: {problem}" if problem else None

    def entries(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for slot, where in ((MAIN, self.directory), (QUARANTINE, self.directory / QUARANTINE)):
            try:
                names = sorted(os.listdir(where))
            except FileNotFoundError:
                continue
            for name in names:
                agent = name[: -len(".key")]
                if not name.endswith(".key") or not _SAFE_NAME.match(agent) or agent in {".", ".."}:
                    continue
                if self.read(agent, slot) is not None:
                    found.append((agent, slot))
        return sorted(found)

    def close(self) -> None:
        """Nothing to release (files are closed after each operation)."""

    # -- reads and writes ------------------------------------------------------

    def write(self, agent_id: str, raw_key: str, slot: str = MAIN) -> str:
        """Persist the key durably; returns its gateway hash prefix."""
        if not is_key_token(raw_key):
            raise ValueError(f"refusing to store a value that is not a GreenHelix API key for {agent_id}")
        path = self.path_for(agent_id, slot)
        make_private_dirs(path.parent)
        self.check()
        write_secret_file(path, raw_key + "\n")
        return key_prefix(raw_key)

    def read(self, agent_id: str, slot: str = MAIN) -> str | None:
        path = self.path_for(agent_id, slot)
        if not os.path.lexists(path):
            return None
        check_private_file(path)
        return read_secret_file(path) or None

    def clear(self, agent_id: str, slot: str) -> bool:
        """Remove a slot's file durably; ``False`` if there was none."""
        path = self.path_for(agent_id, slot)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

