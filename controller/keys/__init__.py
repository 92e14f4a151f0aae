"""Managed agent keys: finops holds each managed agent's current raw key, rotates it on
schedule with durable intents, delivers it to the agent's sink, and can quarantine it.

- ``vault``: ``KeyStore`` (what finops asks of a key store) and ``KeyVault``, the directory
  store (a directory of 0600 files, plus a quarantine area);
- ``sealed``: ``SealedVault``, the database store (keys sealed in the state database, so a
  standby can take over), with ``envelope`` (AES-256-GCM envelope encryption under the
  key-encryption key) and ``selection`` (which store a command uses: ``--key-store``).
- ``sinks``: delivery to the agent (a directory or a command that reads the key on stdin).
- ``store``: rotation times and orphaned-key reports in the state database (never keys).
- ``rotate``: ``KeyManager``, the rotation engine's entry points (rotate, quarantine,
  release, import, ``rotate_due``), combining:
  ``flow`` (the steps of one rotation), ``recovery`` (converging after a crash),
  ``late`` (late landings, orphan reports, grace left), ``status`` (due keys, key status,
  held-key health), on top of ``core`` (collaborators and plumbing) and ``model``
  (constants, errors, value types).

Nothing is re-exported here, so importing ``controller.keys.vault`` (which apply uses) never
pulls in the gateway client and the engine.
"""
