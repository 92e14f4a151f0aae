"""finops' own durable memory: one database per gateway target (a SQLite file, or a shared
PostgreSQL database: ``controller.state.db``).

The gateway is the source of truth for everything it can show; this store holds only what
it cannot: intents written *before* non-idempotent steps (so a crash is recovered by
looking, not guessing), the budget ``alert_threshold`` finops last wrote (the gateway never
returns it), and the fingerprints of keys finops stored. It never holds key material.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from controller.state import escalations, keys
from controller.state.db import Database, connect
from controller.state.location import StateLocation, as_location
from controller.state.recovery import check_kind
from policies.escalation import Escalation
from policies.exposure import Exposure, ExposureReview
from policies.funding_window import WINDOW_SECONDS, FundingEvent, FundingKind
from policies.keyprint import redact_keys
from policies.records import Adjustment as Adjustment
from policies.records import Approval as Approval
from policies.records import BudgetWrite as BudgetWrite
from policies.records import Hold as Hold
from policies.records import Intent as Intent
from policies.records import ManagedWebhook as ManagedWebhook
from policies.records import PendingRevision as PendingRevision

Clock = Callable[[], float]


FUNDING_UNKNOWN = "unknown"
"""A credit finops sent (or is about to send) whose outcome is not known: it counts."""
FUNDING_LANDED = "landed"
FUNDING_KEPT_SECONDS = 30 * 86_400
HISTORY_KEPT_SECONDS = 90 * 86_400
"""Resolved intents and the apply log are kept 90 days, then pruned (a daemon writes a row
per applying pass: unpruned, the state grows without bound). Pending intents are never
pruned, nor each agent's newest landed deposit (its ledger id is the funding epoch)."""
BUNDLES_KEPT = 20
"""Directory revisions whose manifests are kept (the newest), to re-enforce after a restart."""

PENDING = "pending"
"""Unresolved: written before the request; ``sent_at`` says when finops last may have had it
on the wire. It blocks further non-idempotent steps of its kind on its object."""
DONE = "done"
"""Landed (proven from the gateway: ledger row, wallet, webhook, key)."""
ABANDONED = "abandoned"
"""Not landed: proven only after the settle time (``policies.settle``) by a fresh look."""
FAILED = "failed"


def _dec(value: str | None) -> Decimal | None:
    return Decimal(value) if value is not None else None


class StateStore:
    """Thread-safe access to the state database; every write commits immediately."""

    def __init__(self, where: Path | StateLocation, *, clock: Clock = time.time) -> None:
        self.location = as_location(where)
        self.path = self.location.file
        """SQLite: the database file; PostgreSQL: the machine-local anchor (generated secrets)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.location)  # SQLite: 0600, WAL, synchronous=FULL; schema brought forward

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Database]:
        with self._lock, self._db.transaction() as db:
            yield db

    # -- budgets ---------------------------------------------------------------

    def budget_writes(self) -> dict[str, BudgetWrite]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, daily_cap, monthly_cap, alert_threshold FROM budget_writes"
            ).fetchall()
        return {
            r[0]: BudgetWrite(daily_cap=_dec(r[1]), monthly_cap=_dec(r[2]), alert_threshold=Decimal(r[3])) for r in rows
        }

    def record_budget_write(self, agent_id: str, write: BudgetWrite) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO budget_writes VALUES (?,?,?,?,?) ON CONFLICT(agent_id) DO UPDATE SET "
                "daily_cap=excluded.daily_cap, monthly_cap=excluded.monthly_cap, "
                "alert_threshold=excluded.alert_threshold, written_at=excluded.written_at",
                (
                    agent_id,
                    str(write.daily_cap) if write.daily_cap is not None else None,
                    str(write.monthly_cap) if write.monthly_cap is not None else None,
                    str(write.alert_threshold),
                    self._clock(),
                ),
            )

    # -- intents ---------------------------------------------------------------

    def begin_intent(
        self, intent_key: str, kind: str, agent_id: str, payload: Mapping[str, Any], *, sent_at: float | None = None
    ) -> None:
        """Record a non-idempotent step before it is attempted. Re-attempting a key (only
        ever after it was proven not landed) makes it pending again with the new payload and
        send time. ``sent_at`` defaults to now. A kind without a resolver in
        ``controller.state.recovery`` is refused before anything is written."""
        check_kind(kind)
        now = self._clock()
        at = now if sent_at is None else sent_at
        with self._tx() as db:
            db.execute(
                "INSERT INTO intents (intent_key, kind, agent_id, payload, status, detail, created_at, updated_at, "
                "sent_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(intent_key) DO UPDATE SET "
                "status=excluded.status, payload=excluded.payload, detail='', ref=NULL, "
                "updated_at=excluded.updated_at, sent_at=excluded.sent_at",
                (intent_key, kind, agent_id, json.dumps(dict(payload), sort_keys=True), PENDING, "", now, now, at),
            )

    def mark_sent(self, intent_key: str, at: float) -> None:
        """Move an unresolved intent's ``sent_at`` to ``at`` (when finops gave up on the
        request: nothing of it was on the wire from finops' side after that)."""
        with self._tx() as db:
            db.execute(
                "UPDATE intents SET sent_at=?, updated_at=? WHERE intent_key=? AND status=?",
                (at, self._clock(), intent_key, PENDING),
            )

    def finish_intent(self, intent_key: str, status: str, detail: str = "", *, ref: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE intents SET status=?, detail=?, ref=?, updated_at=? WHERE intent_key=?",
                (status, detail, ref, self._clock(), intent_key),
            )

    def last_deposit_ids(self) -> dict[str, int]:
        """Per agent, the ledger id of finops' newest deposit known to have landed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, ref FROM intents WHERE kind='deposit' AND status=? AND ref IS NOT NULL", (DONE,)
            ).fetchall()
        newest: dict[str, int] = {}
        for agent_id, ref in rows:
            if str(ref).isdigit():
                newest[agent_id] = max(newest.get(agent_id, 0), int(ref))
        return newest

    def intents(self, *, status: str | None = None, kind: str | None = None) -> list[Intent]:
        query = "SELECT intent_key, kind, agent_id, payload, status, detail, created_at, sent_at, ref FROM intents"
        clauses, args = [], []
        if status is not None:
            clauses.append("status=?")
            args.append(status)
        if kind is not None:
            clauses.append("kind=?")
            args.append(kind)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY created_at"
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [
            Intent(
                intent_key=r[0],
                kind=r[1],
                agent_id=r[2],
                payload=json.loads(r[3]),
                status=r[4],
                detail=r[5],
                created_at=r[6],
                sent_at=r[7],
                ref=r[8],
            )
            for r in rows
        ]

    def intent_counts(self) -> dict[str, int]:
        """How many intents there are per status (``finops state show``)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM intents GROUP BY status").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def recent_intents(self, limit: int) -> list[Intent]:
        """The ``limit`` most recently updated resolved (not pending) intents, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT intent_key, kind, agent_id, payload, status, detail, created_at, sent_at, ref FROM intents "
                "WHERE status <> ? ORDER BY updated_at DESC LIMIT ?",
                (PENDING, limit),
            ).fetchall()
        return [Intent(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8]) for r in rows]

    # -- keys ------------------------------------------------------------------

    def record_key(self, agent_id: str, key_prefix: str, source: str) -> None:
        """finops now holds ``key_prefix`` for the agent (the keys repository's one table)."""
        with self._tx() as db:
            keys.record_key(db, agent_id, key_prefix, source, self._clock())

    def key_prefixes(self) -> dict[str, str]:
        with self._lock:
            return keys.key_prefixes(self._db)

    def held_keys(self) -> dict[str, keys.HeldKey]:
        """The key finops holds per agent, with when it got it (key age, metrics)."""
        with self._lock:
            return keys.held_keys(self._db)

    # -- holds -----------------------------------------------------------------

    def holds(self) -> dict[str, Hold]:
        with self._lock:
            rows = self._db.execute("SELECT agent_id, reason, held_at, auto FROM holds").fetchall()
        return {r[0]: Hold(r[0], r[1], r[2], bool(r[3])) for r in rows}

    def set_hold(self, agent_id: str, reason: str, *, auto: bool = False) -> None:
        """An operator hold replaces an automatic one; an automatic hold never replaces (or
        weakens) an operator's. The reason is free text from a person: anything shaped like
        a key is redacted before it is stored (plans, status and logs print the reason)."""
        reason = redact_keys(reason)
        with self._tx() as db:
            db.execute(
                "INSERT INTO holds (agent_id, reason, held_at, auto) VALUES (?,?,?,?) "
                "ON CONFLICT(agent_id) DO UPDATE SET reason=excluded.reason, auto=excluded.auto "
                "WHERE holds.auto=1 OR excluded.auto=0",
                (agent_id, reason, self._clock(), int(auto)),
            )

    def clear_auto_hold(self, agent_id: str) -> bool:
        """Lift finops' own automatic hold (never an operator's)."""
        with self._tx() as db:
            return db.execute("DELETE FROM holds WHERE agent_id=? AND auto=1", (agent_id,)).rowcount > 0

    def clear_hold(self, agent_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM holds WHERE agent_id=?", (agent_id,)).rowcount > 0

    # -- escalations (the ladder's pauses and freezes) ---------------------------

    def escalations(
        self, *, statuses: tuple[str, ...] | None = None, agent_id: str | None = None
    ) -> list[Escalation]:
        with self._lock:
            return escalations.load(self._db, statuses=statuses, agent_id=agent_id)

    def update_escalation(self, row: Escalation, *, expect: tuple[str, ...] | None = None) -> bool:
        with self._tx() as db:
            return escalations.update(db, row, self._clock(), expect=expect)

    def release_escalations(self, agent_id: str, detail: str) -> int:
        """``finops unfreeze``: every unfinished escalation of the agent ends now."""
        with self._tx() as db:
            return escalations.release_all(db, agent_id, self._clock(), detail)

    # -- managed webhooks ------------------------------------------------------

    def managed_webhooks(self) -> dict[str, ManagedWebhook]:
        with self._lock:
            rows = self._db.execute("SELECT webhook_id, agent_id, fleet, url FROM managed_webhooks").fetchall()
        return {r[0]: ManagedWebhook(r[0], r[1], r[2], r[3]) for r in rows}

    def record_webhook(self, hook: ManagedWebhook) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO managed_webhooks (webhook_id, agent_id, fleet, url, created_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(webhook_id) DO UPDATE SET agent_id=excluded.agent_id, fleet=excluded.fleet, "
                "url=excluded.url, created_at=excluded.created_at",
                (hook.webhook_id, hook.agent_id, hook.fleet, hook.url, self._clock()),
            )

    def forget_webhook(self, webhook_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM managed_webhooks WHERE webhook_id=?", (webhook_id,))

    # -- rebalancing -----------------------------------------------------------

    def adjustments(self) -> dict[str, Adjustment]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, fleet, amount, explanation, computed_at FROM rebalance_adjustments"
            ).fetchall()
        return {r[0]: Adjustment(r[0], r[1], Decimal(r[2]), r[3], r[4]) for r in rows}

    def replace_adjustments(self, fleet: str, adjustments: list[Adjustment]) -> None:
        """One fleet's adjustments as a unit: the rebalancer recomputes them all each pass."""
        with self._tx() as db:
            db.execute("DELETE FROM rebalance_adjustments WHERE fleet=?", (fleet,))
            db.executemany(
                "INSERT INTO rebalance_adjustments (agent_id, fleet, amount, explanation, computed_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT(agent_id) DO UPDATE SET fleet=excluded.fleet, "
                "amount=excluded.amount, explanation=excluded.explanation, computed_at=excluded.computed_at",
                [(a.agent_id, a.fleet, str(a.amount), a.explanation, a.computed_at) for a in adjustments],
            )

    # -- funding ---------------------------------------------------------------

    def now(self) -> float:
        """The store's clock: the time funding events are stamped with."""
        return self._clock()

    def note_funding(
        self, ref: str, agent_id: str, fleet: str, kind: FundingKind, credits: Decimal, *, landed: bool
    ) -> None:
        """Record a credit finops puts in, *before* sending it (``landed=False``: it counts
        from now on, whatever happens to the request) and again once it is proven on the
        gateway. The first record's time is kept: the window runs from the first attempt."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO funding_events VALUES (?,?,?,?,?,?,?) ON CONFLICT(ref) DO UPDATE SET "
                "credits=excluded.credits, status=CASE WHEN funding_events.status=? THEN funding_events.status "
                "ELSE excluded.status END",
                (
                    ref,
                    agent_id,
                    fleet,
                    kind.value,
                    str(credits),
                    self._clock(),
                    FUNDING_LANDED if landed else FUNDING_UNKNOWN,
                    FUNDING_LANDED,
                ),
            )
            # Kept a month for the record; only the last 24 h decide anything.
            db.execute("DELETE FROM funding_events WHERE at < ?", (self._clock() - FUNDING_KEPT_SECONDS,))

    def release_funding(self, ref: str) -> None:
        """Forget a credit proven never to have landed (a landed one is never forgotten)."""
        with self._tx() as db:
            db.execute("DELETE FROM funding_events WHERE ref=? AND status=?", (ref, FUNDING_UNKNOWN))

    def funding_events(self, *, now: float | None = None) -> list[FundingEvent]:
        """Every credit finops put in within the rolling window ending ``now``."""
        since = (self._clock() if now is None else now) - WINDOW_SECONDS
        with self._lock:
            rows = self._db.execute(
                "SELECT ref, agent_id, fleet, kind, credits, at FROM funding_events WHERE at > ? ORDER BY at",
                (since,),
            ).fetchall()
        return [FundingEvent(r[0], r[1], r[2], FundingKind(r[3]), Decimal(r[4]), r[5]) for r in rows]

    def unknown_funding(self, *, now: float | None = None) -> int:
        """Credits of unknown outcome within the rolling window (they count against the limit)."""
        since = (self._clock() if now is None else now) - WINDOW_SECONDS
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM funding_events WHERE at > ? AND status = ?", (since, FUNDING_UNKNOWN)
            ).fetchone()
        return int(row[0])

    # -- history ---------------------------------------------------------------

    def log_apply(self, started_at: float, ok: bool, summary: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO apply_log (started_at, finished_at, ok, summary) VALUES (?,?,?,?)",
                (started_at, self._clock(), int(ok), json.dumps(dict(summary), sort_keys=True)),
            )
        self.prune_history()

    def prune_history(self, *, kept_seconds: float = HISTORY_KEPT_SECONDS) -> int:
        """Forget resolved intents and apply-log rows older than ``kept_seconds``; returns how
        many rows went. Kept whatever their age: every pending intent (it still blocks its
        agent) and, per agent, the newest landed deposit (``last_deposit_ids``: the funding
        epoch of the next deposit key must never move back)."""
        cutoff = self._clock() - kept_seconds
        newest = self.last_deposit_ids()
        with self._tx() as db:
            old = db.execute(
                "SELECT intent_key, kind, agent_id, status, ref FROM intents WHERE status <> ? AND updated_at < ?",
                (PENDING, cutoff),
            ).fetchall()
            doomed = [
                str(key)
                for key, kind, agent_id, status, ref in old
                if not (kind == "deposit" and status == DONE and str(ref) == str(newest.get(agent_id)))
            ]
            for key in doomed:
                db.execute("DELETE FROM intents WHERE intent_key=? AND status <> ?", (key, PENDING))
            logged = db.execute("SELECT COUNT(*) FROM apply_log WHERE finished_at < ?", (cutoff,)).fetchone()
            db.execute("DELETE FROM apply_log WHERE finished_at < ?", (cutoff,))
        return len(doomed) + int(logged[0])

    # -- exposure approvals ------------------------------------------------------

    def record_approval(
        self,
        revision: str,
        source: str,
        *,
        how: str,
        by_key: str,
        by_user: str,
        before: Exposure | None,
        after: Exposure,
    ) -> Approval:
        """The new exposure baseline; also clears the revision from the pending list."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO exposure_approvals (revision, source, how, approved_at, by_key, by_user, "
                "exposure_before, exposure_after) VALUES (?,?,?,?,?,?,?,?)",
                (
                    revision,
                    source,
                    how,
                    now,
                    by_key,
                    by_user,
                    json.dumps(before.to_dict(), sort_keys=True) if before is not None else None,
                    json.dumps(after.to_dict(), sort_keys=True),
                ),
            )
            db.execute("DELETE FROM exposure_pending WHERE revision=?", (revision,))
        return Approval(revision, source, how, now, by_key, by_user, before, after)

    def approvals(self, limit: int = 20) -> list[Approval]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT revision, source, how, approved_at, by_key, by_user, exposure_before, exposure_after "
                "FROM exposure_approvals ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            Approval(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                Exposure.from_dict(json.loads(r[6])) if r[6] else None,
                Exposure.from_dict(json.loads(r[7])),
            )
            for r in rows
        ]

    def last_approval(self) -> Approval | None:
        rows = self.approvals(1)
        return rows[0] if rows else None

    def record_pending(self, revision: str, source: str, exposure: Exposure, review: ExposureReview) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO exposure_pending VALUES (?,?,?,?,?,?) ON CONFLICT(revision) DO UPDATE SET "
                "last_seen=excluded.last_seen, exposure=excluded.exposure, review=excluded.review",
                (
                    revision,
                    source,
                    now,
                    now,
                    json.dumps(exposure.to_dict(), sort_keys=True),
                    json.dumps(review.to_dict(), sort_keys=True),
                ),
            )

    def clear_pending(self, *, except_revision: str | None = None) -> None:
        """Forget revisions superseded by a newer one (only the newest can be waiting)."""
        with self._tx() as db:
            db.execute("DELETE FROM exposure_pending WHERE revision IS DISTINCT FROM ?", (except_revision,))

    def pending_revisions(self) -> list[PendingRevision]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT revision, source, first_seen, last_seen, exposure, review FROM exposure_pending "
                "ORDER BY last_seen DESC"
            ).fetchall()
        return [
            PendingRevision(
                r[0],
                r[1],
                r[2],
                r[3],
                Exposure.from_dict(json.loads(r[4])),
                ExposureReview.from_dict(json.loads(r[5])),
            )
            for r in rows
        ]

    # -- revision bundles (directory sources) -------------------------------------

    def store_bundle(self, revision: str, files: Mapping[str, bytes]) -> None:
        """The raw manifest files of an applied directory revision (they hold no secrets:
        the loader refuses key material), so a restarted daemon can re-enforce it."""
        payload = json.dumps({name: base64.b64encode(data).decode() for name, data in sorted(files.items())})
        with self._tx() as db:
            db.execute(
                "INSERT INTO revision_bundles (revision, files, stored_at) VALUES (?,?,?) "
                "ON CONFLICT(revision) DO UPDATE SET "
                "stored_at=excluded.stored_at",
                (revision, payload, self._clock()),
            )
            db.execute(
                "DELETE FROM revision_bundles WHERE revision NOT IN "
                "(SELECT revision FROM revision_bundles ORDER BY stored_at DESC, rowid DESC LIMIT ?)",
                (BUNDLES_KEPT,),
            )

    def bundle(self, revision: str) -> dict[str, bytes] | None:
        with self._lock:
            row = self._db.execute("SELECT files FROM revision_bundles WHERE revision=?", (revision,)).fetchone()
        if row is None:
            return None
        return {name: base64.b64decode(data) for name, data in json.loads(row[0]).items()}
