"""finops' one state database per gateway target: an embedded SQLite file (the default) or a
shared PostgreSQL database (``--state-url``), behind one API.

- ``location``: where the state lives (``StateLocation``: a SQLite path or a PostgreSQL URL);
- ``db``: ``Database`` (one SQL dialect over both drivers), the connection policy, the
  ``schema_version`` table and the forward migrations;
- ``lock`` / ``flock``: the writer lock (PostgreSQL advisory lock, or ``flock`` for SQLite),
  which is also the fence checked before every gateway write;
- ``store``: ``StateStore``, the repositories of the reconcile loop (intents, budget
  writes, holds, webhooks, adjustments, funding events, approvals, bundles, apply log);
- ``keys``: the one table of keys finops holds (used by ``StateStore`` and the key ledger);
- ``recovery``: the registry of resolvers for interrupted steps (intent kind -> resolver);
- ``interface``: ``StateDB`` and the other repository protocols.

The key ledger (``controller.keys.store``), alert memory (``controller.alerting.store``)
and revision log (``controller.daemon.revisions``) keep their own repositories but open the
database through ``db.connect`` and have their tables created by ``db``'s migrations. Every
repository runs unchanged on both backends (``tests/integration/test_state_backends.py``).
"""

from typing import TYPE_CHECKING

from controller.state.db import SCHEMA_VERSION, SchemaTooNew
from controller.state.store import (
    ABANDONED,
    BUNDLES_KEPT,
    DONE,
    FAILED,
    FUNDING_KEPT_SECONDS,
    FUNDING_LANDED,
    FUNDING_UNKNOWN,
    PENDING,
    Adjustment,
    Approval,
    BudgetWrite,
    Clock,
    Hold,
    Intent,
    ManagedWebhook,
    PendingRevision,
    StateStore,
)

__all__ = [
    "ABANDONED",
    "BUNDLES_KEPT",
    "DONE",
    "FAILED",
    "FUNDING_KEPT_SECONDS",
    "FUNDING_LANDED",
    "FUNDING_UNKNOWN",
    "PENDING",
    "SCHEMA_VERSION",
    "Adjustment",
    "Approval",
    "BudgetWrite",
    "Clock",
    "Hold",
    "Intent",
    "ManagedWebhook",
    "PendingRevision",
    "SchemaTooNew",
    "StateStore",
]

if TYPE_CHECKING:  # mypy proves the SQLite repositories implement the interface
    from controller.daemon.revisions import RevisionLog
    from controller.keys.store import KeyLedger
    from controller.state.interface import KeyLedgerRepo, RevisionRepo, StateDB

    _state: type[StateDB] = StateStore
    _ledger: type[KeyLedgerRepo] = KeyLedger
    _revisions: type[RevisionRepo] = RevisionLog
