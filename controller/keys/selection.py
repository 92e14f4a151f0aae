"""Which key store a command uses: the directory store (``KeyVault``) or the database store
(``SealedVault``), decided once here from ``--key-store`` / ``FINOPS_KEY_STORE``.

- Unset: ``database`` when the state is shared (``--state-url``: several machines must be
  able to take over managed keys), ``directory`` with the embedded SQLite file.
- ``directory`` with a PostgreSQL state: allowed, as an explicit choice (keys then stay on
  the one machine that holds the directory; a standby cannot rotate them).
- ``database`` with SQLite: allowed (keys sealed in the state file).

The database store needs ``FINOPS_KEY_ENCRYPTION_KEY_FILE``; without it (or with an unsafe
or malformed file, or one that is not the key the stored rows were sealed with) opening the
store is a ``ConfigError``, raised before any gateway write. So is a directory store that
holds keys the database store lacks (keys not moved yet: ``finops keys import-dir``).
"""

from __future__ import annotations

from pathlib import Path

from controller.errors import ConfigError
from controller.io.secretref import protect_secret_path
from controller.keys.vault import KeyStore, KeyVault
from controller.state.location import StateLocation

KEY_STORE_ENV = "FINOPS_KEY_STORE"
DIRECTORY = "directory"
DATABASE = "database"
KINDS = (DIRECTORY, DATABASE)


def chosen_kind(kind: str | None, location: StateLocation) -> str:
    if kind is None or not kind.strip():
        return DATABASE if location.shared else DIRECTORY
    if kind not in KINDS:
        raise ConfigError(f"--key-store / {KEY_STORE_ENV} must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


def open_key_store(kind: str | None, location: StateLocation, secrets_dir: Path) -> KeyStore:
    """The key store ``kind`` selects for this state; see the module docstring."""
    protect_secret_path(secrets_dir)
    if chosen_kind(kind, location) == DIRECTORY:
        return KeyVault(secrets_dir)
    from controller.keys.envelope import kek_from_env
    from controller.keys.sealed import SealedVault

    sealed = SealedVault(location, kek_from_env(), sink_directory=secrets_dir)
    try:
        _refuse_unmoved_keys(sealed, secrets_dir)
    except BaseException:
        sealed.close()
        raise
    return sealed


def _refuse_unmoved_keys(sealed: KeyStore, secrets_dir: Path) -> None:
    """A directory store with keys the database store lacks: those keys were never moved
    (the state was migrated, the keys not). Using the empty database store would make every
    such agent look keyless; stop and say how to move them."""
    if not secrets_dir.exists():
        return
    have = set(sealed.entries())
    missing = [f"{agent} ({slot})" for agent, slot in KeyVault(secrets_dir).entries() if (agent, slot) not in have]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(
            f"the directory key store {secrets_dir} holds keys that the database key store lacks: {shown}. Move "
            "them with `finops keys import-dir` (same options), or keep using the directory with "
            f"--key-store {DIRECTORY}; nothing was done"
        )
