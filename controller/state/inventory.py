"""What finops remembers, as a value (``finops state show``): read offline from the state
database alone, no gateway and no admin key.

Read-only. Every row comes through its table's repository (``StateStore``, ``KeyLedger``,
``AlertStore``, ``RevisionLog``); the only SQL here is schema-level: rows per table, counted
for every table alike (as ``state migrate`` reports them), so a table added later by a
migration is at least counted.
Nothing secret comes out: keys only as fingerprints (``sha3:`` + the prefix finops stores),
URLs without user-info and with query values elided, free text (reasons, errors, intent
keys, which may embed a webhook URL) through the same URL and key redaction, intent payloads
reduced to their amount and fleet, manifest bundles and alert bodies counted, never shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from controller.alerting.store import DELIVERED, GAVE_UP, REFUSED, AlertStore
from controller.alerting.store import PENDING as ALERT_PENDING
from controller.daemon.revisions import RevisionLog
from controller.keys.store import KeyLedger
from controller.state.db import Database
from controller.state.location import StateLocation
from controller.state.store import PENDING, Intent, StateStore
from controller.state.transfer import finops_tables, row_counts
from policies.alerts import redact_url
from policies.keyprint import redact_keys

Scalar = str | int | float | bool | None

SECTIONS = (
    "intents",
    "holds",
    "webhooks",
    "budgets",
    "adjustments",
    "funding",
    "alerts",
    "revisions",
    "approvals",
    "keys",
    "tables",
)
"""What ``--section`` may name; the order of the text output."""

DEFAULT_LIMIT = 20
MAX_TEXT = 200
"""Longest free-text value shown (a reason, an error)."""

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def safe_text(text: object, limit: int = MAX_TEXT) -> str:
    """Free text fit to print: every URL redacted (user-info dropped, query values elided),
    anything shaped like a key removed, bounded in length."""
    shown = _URL.sub(lambda m: redact_url(m.group(0)), str(text))
    shown = redact_keys(shown)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def fingerprint(prefix: str) -> str:
    """The form a key is shown in: the gateway's ``key_hash_prefix`` (8 hex characters)."""
    clean = safe_text(prefix, 16)
    return clean if clean.startswith("sha3:") else f"sha3:{clean}"


@dataclass(frozen=True)
class Section:
    """One concern of the state: its totals and (at most ``limit``) items. Items are flat
    mappings of JSON scalars, already redacted; ``more`` counts the items not listed."""

    name: str
    title: str
    counts: Mapping[str, int]
    items: tuple[Mapping[str, Scalar], ...] = ()
    more: int = 0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "counts": dict(self.counts),
            "items": [dict(i) for i in self.items],
            "more": self.more,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class StateSummary:
    backend: str
    location: str
    """A path, or the URL with its password redacted."""
    schema_version: int
    generated_at: float
    sections: tuple[Section, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "location": self.location,
            "schema_version": self.schema_version,
            "generated_at": self.generated_at,
            "sections": {s.name: s.to_dict() for s in self.sections},
        }


def _age(now: float, at: float | None) -> int | None:
    return None if at is None else max(0, int(now - at))


def _limited(items: Sequence[Mapping[str, Scalar]], limit: int) -> tuple[tuple[Mapping[str, Scalar], ...], int]:
    return tuple(items[:limit]), max(0, len(items) - limit)


class _Reader:
    """The repositories of one state database, opened together, closed together."""

    def __init__(self, location: StateLocation, db: Database, now: float, limit: int) -> None:
        self.db = db
        self.now = now
        self.limit = limit
        self._store = StateStore(location, clock=lambda: now)
        self._ledger = KeyLedger(location, clock=lambda: now)
        self._alerts = AlertStore(location)
        self._revisions = RevisionLog(location, clock=lambda: now)
        self.rows = row_counts(db, finops_tables(db))
        """Rows per table: a schema-level count (as ``state migrate`` reports), no table's SQL."""

    def close(self) -> None:
        for repo in (self._store, self._ledger, self._alerts, self._revisions):
            repo.close()

    # -- sections ------------------------------------------------------------------------

    def intents(self) -> Section:
        by_status = self._store.intent_counts()
        pending = [self._intent_item(i) for i in self._store.intents(status=PENDING)]
        recent = [self._intent_item(i) for i in self._store.recent_intents(self.limit)]
        shown_pending, more = _limited(pending, self.limit)
        room = max(0, self.limit - len(shown_pending))
        resolved = sum(n for s, n in by_status.items() if s != PENDING)
        notes: tuple[str, ...] = ()
        if pending:
            notes = (
                f"{len(pending)} unresolved intent(s): each blocks further steps of its kind on its agent "
                "until finops resolves it from the gateway (apply or a daemon pass)",
            )
        return Section(
            "intents",
            "Intents (pending first, oldest first; then the latest resolved)",
            by_status,
            shown_pending + tuple(recent[:room]),
            more + max(0, resolved - min(room, len(recent))),
            notes,
        )

    def _intent_item(self, intent: Intent) -> dict[str, Scalar]:
        item: dict[str, Scalar] = {
            "status": intent.status,
            "kind": intent.kind,
            "agent": intent.agent_id,
            "age_s": _age(self.now, intent.created_at),
            "sent_ago_s": _age(self.now, intent.sent_at),
            "intent": safe_text(intent.intent_key),
        }
        for name in ("amount", "fleet"):  # the payload's other fields may name sinks, URLs
            if isinstance(intent.payload.get(name), str):
                item[name] = safe_text(intent.payload[name], 40)
        item["detail"] = safe_text(intent.detail)
        return item

    def holds(self) -> Section:
        holds = sorted(self._store.holds().values(), key=lambda h: h.held_at)
        items = [
            {
                "agent": h.agent_id,
                "by": "finops (auto)" if h.auto else "operator",
                "age_s": _age(self.now, h.held_at),
                "reason": safe_text(h.reason),
            }
            for h in holds
        ]
        shown, more = _limited(items, self.limit)
        auto = sum(1 for h in holds if h.auto)
        return Section(
            "holds", "Holds (agents finops does not fund)", {"operator": len(holds) - auto, "auto": auto}, shown, more
        )

    def webhooks(self) -> Section:
        hooks = sorted(self._store.managed_webhooks().values(), key=lambda w: (w.agent_id, w.webhook_id))
        items = [
            {"agent": w.agent_id, "fleet": w.fleet, "webhook_id": safe_text(w.webhook_id, 64), "url": safe_text(w.url)}
            for w in hooks
        ]
        per_agent: dict[str, int] = {}
        for w in hooks:
            per_agent[w.agent_id] = per_agent.get(w.agent_id, 0) + 1
        doubled = sorted(a for a, n in per_agent.items() if n > 1)
        notes = (f"more than one managed webhook for: {', '.join(doubled)}",) if doubled else ()
        shown, more = _limited(items, self.limit)
        return Section(
            "webhooks",
            "Gateway webhooks finops created (its ownership record)",
            {"webhooks": len(hooks), "agents": len(per_agent)},
            shown,
            more,
            notes,
        )

    def budgets(self) -> Section:
        writes = sorted(self._store.budget_writes().items())
        items = [
            {
                "agent": agent,
                "daily_cap": None if w.daily_cap is None else str(w.daily_cap),
                "monthly_cap": None if w.monthly_cap is None else str(w.monthly_cap),
                "alert_threshold": str(w.alert_threshold),
            }
            for agent, w in writes
        ]
        shown, more = _limited(items, self.limit)
        return Section(
            "budgets",
            "Budget writes (what finops last wrote; the gateway never returns alert_threshold)",
            {"agents": len(items)},
            shown,
            more,
        )

    def adjustments(self) -> Section:
        adjustments = sorted(self._store.adjustments().values(), key=lambda a: (a.fleet, a.agent_id))
        items = [
            {
                "fleet": a.fleet,
                "agent": a.agent_id,
                "amount": str(a.amount),
                "age_s": _age(self.now, a.computed_at),
                "explanation": safe_text(a.explanation),
            }
            for a in adjustments
        ]
        shown, more = _limited(items, self.limit)
        return Section("adjustments", "Rebalancing adjustments of daily caps", {"agents": len(items)}, shown, more)

    def funding(self) -> Section:
        totals: dict[tuple[str, str], tuple[int, Decimal]] = {}
        for event in self._store.funding_events(now=self.now):
            n, credits = totals.get((event.fleet, event.kind.value), (0, Decimal(0)))
            totals[(event.fleet, event.kind.value)] = (n + 1, credits + event.credits)
        unknown = self._store.unknown_funding(now=self.now)
        items: list[dict[str, Scalar]] = [
            {"fleet": f, "kind": k, "events": n, "credits": str(c)} for (f, k), (n, c) in sorted(totals.items())
        ]
        shown, more = _limited(items, self.limit)
        notes = (
            (f"{unknown} credit(s) of unknown outcome still count against the daily funding limit",) if unknown else ()
        )
        return Section(
            "funding",
            "Funding finops put in over the last 24 h (counts against spec.funding.dailyLimit)",
            {
                "events_24h": sum(n for n, _ in totals.values()),
                "unknown_outcome": unknown,
                "kept": self.rows["funding_events"],
            },
            shown,
            more,
            notes,
        )

    def alerts(self) -> Section:
        slots = self._alerts.slots()
        routes = self._alerts.route_statuses()
        failing = [r for r in routes if r.failing]
        counts = {
            "slots": len(slots),
            "fired": sum(1 for s in slots.values() if s.fired),
            "outbox_pending": self._alerts.count(ALERT_PENDING),
            "outbox_delivered": self._alerts.count(DELIVERED),
            "outbox_gave_up": self._alerts.count(GAVE_UP),
            "outbox_refused": self._alerts.count(REFUSED),
            "delivery_log": self.rows["alert_delivery_log"],
            "routes": len(routes),
            "routes_failing": len(failing),
        }
        items = [
            {
                "agent": r.agent_id,
                "route": safe_text(r.route),
                "consecutive_failures": r.consecutive_failures,
                "last_code": r.last_code,
                "last_error": safe_text(r.last_error),
                "pending": r.pending,
                "last_attempt_ago_s": _age(self.now, r.last_attempt_at),
            }
            for r in failing
        ]
        shown, more = _limited(items, self.limit)
        notes = (f"{len(failing)} alert route(s) failing: their alerts are not arriving",) if failing else ()
        return Section("alerts", "Alerts (slots, outbox, failing routes)", counts, shown, more, notes)

    def revisions(self) -> Section:
        history = self._revisions.history(self.limit)
        total = self.rows["revisions"]
        items = [
            {
                "revision": safe_text(r.revision, 80),
                "source": safe_text(r.source, 80),
                "status": r.status,
                "passes": r.passes,
                "last_ok": r.last_ok,
                "last_seen_ago_s": _age(self.now, r.last_seen),
                "detail": safe_text(r.detail),
            }
            for r in history
        ]
        bundles = self.rows["revision_bundles"]
        return Section(
            "revisions",
            "Manifest revisions the daemon applied or refused (newest first)",
            {"revisions": total, "bundles_kept": bundles},
            tuple(items),
            max(0, total - len(items)),
        )

    def approvals(self) -> Section:
        waiting = self._store.pending_revisions()
        approvals = self._store.approvals(self.limit)
        total = self.rows["exposure_approvals"]
        items: list[dict[str, Scalar]] = [
            {
                "state": "waiting",
                "revision": safe_text(p.revision, 80),
                "source": safe_text(p.source, 80),
                "age_s": _age(self.now, p.first_seen),
                "by_key": None,
                "by_user": None,
            }
            for p in waiting
        ]
        items += [
            {
                "state": f"approved ({a.how})",
                "revision": safe_text(a.revision, 80),
                "source": safe_text(a.source, 80),
                "age_s": _age(self.now, a.approved_at),
                "by_key": safe_text(a.by_key, 40),
                "by_user": safe_text(a.by_user, 80),
            }
            for a in approvals
        ]
        shown, more = _limited(items, self.limit)
        notes = (f"{len(waiting)} revision(s) waiting for `finops approve`",) if waiting else ()
        return Section(
            "approvals",
            "Exposure approvals (waiting first, then newest approved)",
            {"approvals": total, "waiting": len(waiting)},
            shown,
            more + max(0, total - len(approvals)),
            notes,
        )

    def keys(self) -> Section:
        held = sorted(self._ledger.held().values(), key=lambda k: k.agent_id)
        orphans = [o for agent in sorted(self._ledger.orphans()) for o in self._ledger.orphans()[agent]]
        items: list[dict[str, Scalar]] = [
            {
                "agent": k.agent_id,
                "state": "held",
                "key": fingerprint(k.key_prefix),
                "origin": safe_text(k.origin, 40),
                "age_s": _age(self.now, k.since),
                "last_rotated_ago_s": _age(self.now, k.last_rotated_at),
                "detail": safe_text(k.last_reason),
            }
            for k in held
        ]
        items += [
            {
                "agent": o.agent_id,
                "state": "orphan",
                "key": fingerprint(o.key_prefix),
                "origin": None,
                "age_s": _age(self.now, o.detected_at),
                "last_rotated_ago_s": None,
                "detail": safe_text(o.detail),
            }
            for o in orphans
        ]
        shown, more = _limited(items, self.limit)
        counts = {
            "held": len(held),
            "orphans": len(orphans),
            "late_watches": self.rows["keys_late_watch"],
            "rotations_sent": self.rows["keys_rotation_sent"],
            "sealed": self.rows.get("sealed_keys", 0),
        }
        notes = (
            "keys appear here as fingerprints only (the gateway's key_hash_prefix); with the database key store "
            "the keys themselves are in sealed_keys, encrypted under the key-encryption key (never shown)",
        )
        return Section("keys", "Keys finops holds (fingerprints only) and orphaned keys", counts, shown, more, notes)

    def tables(self) -> Section:
        counts = self.rows
        items: list[dict[str, Scalar]] = [{"table": table, "rows": rows} for table, rows in counts.items()]
        return Section("tables", "Rows per table", {"tables": len(counts), "rows": sum(counts.values())}, tuple(items))


def summarize(
    location: StateLocation,
    db: Database,
    *,
    now: float,
    sections: Sequence[str] = SECTIONS,
    limit: int = DEFAULT_LIMIT,
    version: int,
) -> StateSummary:
    """The summary of the state database ``db`` (already open at ``location``)."""
    reader = _Reader(location, db, now, limit)
    try:
        build: dict[str, Callable[[], Section]] = {name: getattr(reader, name) for name in SECTIONS}
        parts = tuple(build[name]() for name in SECTIONS if name in sections)
    finally:
        reader.close()
    return StateSummary(location.backend, str(location), version, now, parts)
