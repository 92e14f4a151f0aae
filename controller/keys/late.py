"""Late landings and orphans: keys minted by a rotate finops concluded (or never saw land)
are reported by prefix, and a held key's grace is measured from the first rotate sent.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from controller.gateway.models import KeyRecord
from controller.keys.core import KeyManagerCore
from controller.keys.model import (
    GRACE_SECONDS,
    ORPHAN_HELP,
    key_fp,
)
from controller.keys.vault import MAIN, QUARANTINE
from policies.keyprint import key_prefix

log = logging.getLogger("finops.keys")


class LateWatches(KeyManagerCore):
    """Orphan reports, late-landing watches and the held key's remaining grace."""

    def _report_orphans(self, agent_id: str, prefixes: Collection[str]) -> None:
        if not prefixes:
            return
        self.ledger.record_orphans(agent_id, sorted(prefixes), ORPHAN_HELP)
        for prefix in sorted(prefixes):
            log.warning("ORPHANED KEY %s of agent %s: %s", key_fp(prefix), agent_id, ORPHAN_HELP)

    def _grace_left(self, agent: str, prefix: str) -> int | None:
        """Whole seconds left of the held key's grace, from the first rotate finops sent of
        it (a lower bound: the gateway starts the grace when a rotate lands); ``None`` when
        finops never sent one."""
        sent = self.ledger.rotation_sent_at(agent, prefix)
        if sent is None:
            return None
        return max(0, int(sent + GRACE_SECONDS - self._clock()))

    def _check_late(self, agent: str, rows: Collection[KeyRecord], looked_at: float) -> list[str]:
        """Report live keys that appeared after an interrupted rotation was concluded (a rotate
        that landed late) and that finops does not hold. ``rows`` is a listing made at or after
        ``looked_at``; watches that expired before then end with this look (never unseen)."""
        known = self.ledger.late_watches(agent).get(agent)
        if known is None:
            return []
        held = {key_prefix(raw) for raw in (self.vault.read(agent, MAIN), self.vault.read(agent, QUARANTINE)) if raw}
        late = sorted({k.key_hash_prefix for k in rows if not k.revoked} - known - held)
        self._report_orphans(agent, late)
        self.ledger.end_late_watches(agent, looked_at)
        return late
