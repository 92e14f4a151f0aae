"""Compatibility name for finops' key store (``controller.keys.vault.KeyVault``).

Registration writes an agent's key here the moment the gateway reveals it (shown once);
key management then rotates it in place. ``DirectoryKeySink(dir)`` keeps its
``path_for``/``store``/``load`` interface: ``<dir>/<agent_id>.key``, 0600, atomic.
"""

from __future__ import annotations

from controller.keys.vault import KeyVault

DirectoryKeySink = KeyVault

__all__ = ["DirectoryKeySink", "KeyVault"]
