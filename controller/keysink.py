"""Where agents' own API keys go the moment the gateway reveals them (shown once).

Issue-2 scope: a directory of per-agent 0600 files, written atomically and fsynced before
finops moves on. Only the fingerprint is recorded in finops' state.
"""

from __future__ import annotations

import re
from pathlib import Path

from controller.secretfile import read_secret_file, write_secret_file
from policies.keyprint import key_prefix

_SAFE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$")


class DirectoryKeySink:
    """One file per agent: ``<dir>/<agent_id>.key``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, agent_id: str) -> Path:
        if not _SAFE_NAME.match(agent_id) or agent_id in {".", ".."}:
            raise ValueError(f"agent id {agent_id!r} cannot be used as a file name")
        return self.directory / f"{agent_id}.key"

    def store(self, agent_id: str, raw_key: str) -> str:
        """Persist the key durably; returns its gateway hash prefix."""
        write_secret_file(self.path_for(agent_id), raw_key + "\n")
        return key_prefix(raw_key)

    def load(self, agent_id: str) -> str | None:
        path = self.path_for(agent_id)
        return read_secret_file(path) if path.exists() else None
