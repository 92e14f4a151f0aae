"""Alert memory in finops' state database: slot states, the outbox and the delivery log.

The tables live in finops' one state database (``controller.state``: its migrations
create them, ``controller.state.db.connect`` opens the file) and are read and written only
here. The outbox is what makes delivery at-least-once: a slot's
new state and one outbox row per route are committed in one transaction *before* anything
is sent, so a crash between deciding and delivering is repaired by the next check, which
finds the row pending and sends the very same bytes (same alert id, same body).

Only references to signing secrets are stored (``{"env": …}`` / ``{"file": …}``), never
their values. The rendered URL is stored so a pending alert goes where it was decided to
go; logs and status only ever show ``redact_url`` forms.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from controller.state import escalations
from controller.state.db import Database, connect
from controller.state.location import StateLocation, as_location
from policies.alerts import WINDOWS, SlotKey, SlotState
from policies.escalation import UNFINISHED, Escalation, LadderDecision
from policies.signal_alerts import SignalKey, SignalKind
from policies.spec import SecretRef

PENDING = "pending"
DELIVERED = "delivered"
GAVE_UP = "gave_up"
REFUSED = "refused"
"""The route's URL breaks the SSRF rules: never sent (terminal, like ``gave_up``)."""


@dataclass(frozen=True)
class OutboxRow:
    """One alert for one route. ``route`` is the redacted URL template (the route's
    identity in status); ``url`` the rendered URL it is sent to."""

    id: int
    alert_id: str
    agent_id: str
    event_type: str
    route: str
    url: str
    allow_insecure: bool
    secret: SecretRef
    body: bytes
    status: str
    attempts: int


@dataclass(frozen=True)
class Attempt:
    """One entry of the delivery log (``url`` is redacted)."""

    outbox_id: int
    alert_id: str
    agent_id: str
    route: str
    url: str
    attempted_at: float
    ok: bool
    status_code: int | None
    error: str


@dataclass(frozen=True)
class FiredAlert:
    agent_id: str
    window: str
    threshold: int
    alert_id: str
    fired_at: float | None


@dataclass(frozen=True)
class RouteStatus:
    """How an agent's alert route is doing, for ``finops status``. A receiver that is down
    is a silent budget breach, so ``failing`` must be shown, not averaged away."""

    agent_id: str
    route: str
    last_attempt_at: float | None
    last_ok: bool | None
    last_code: int | None
    last_error: str
    consecutive_failures: int
    pending: int
    gave_up: int
    refused: int

    @property
    def failing(self) -> bool:
        """The latest attempt failed (or the route was refused): alerts are not arriving."""
        return self.consecutive_failures > 0


def _secret_json(ref: SecretRef) -> str:
    return json.dumps({"env": ref.env, "file": ref.file, "generate": ref.generate}, sort_keys=True)


def _secret_ref(text: str) -> SecretRef:
    data = json.loads(text)
    return SecretRef(env=data.get("env"), file=data.get("file"), generate=bool(data.get("generate")))


class AlertTx:
    """The writes of one check's decision, inside one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, db: Database, at: float) -> None:
        self._db = db
        self._at = at

    def slots(self) -> dict[SlotKey, SlotState]:
        return _load_slots(self._db)

    def save_slots(self, changed: Mapping[SlotKey, SlotState], dropped: Iterable[SlotKey]) -> None:
        for key, slot in changed.items():
            self._db.execute(
                "INSERT INTO alert_slots (agent_id, budget_window, threshold, fired, episodes, alert_id, fired_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id, budget_window, threshold)"
                " DO UPDATE SET fired = excluded.fired, episodes = excluded.episodes, alert_id = excluded.alert_id,"
                " fired_at = excluded.fired_at, updated_at = excluded.updated_at",
                (key.agent_id, key.window, key.threshold, int(slot.fired), slot.episodes, slot.alert_id,
                 slot.fired_at, self._at),
            )  # fmt: skip
        for key in dropped:
            self._db.execute(
                "DELETE FROM alert_slots WHERE agent_id = ? AND budget_window = ? AND threshold = ?",
                (key.agent_id, key.window, key.threshold),
            )

    def escalations(self) -> list[Escalation]:
        """The ladder's unfinished escalations (pending, active, releasing)."""
        return escalations.load(self._db, statuses=UNFINISHED)

    def record_escalations(self, decision: LadderDecision) -> None:
        """Persist the ladder's decision with the slots it rides on: new rows first (one per
        crossing, never replaced), then releases of rows still open."""
        for row in decision.started:
            escalations.insert(self._db, row, self._at)
        for row in decision.releasing:
            escalations.update(self._db, row, self._at, expect=("pending", "active"))

    def signal_slots(self) -> dict[SignalKey, SlotState]:
        return _load_signal_slots(self._db)

    def save_signal_slots(self, changed: Mapping[SignalKey, SlotState], dropped: Iterable[SignalKey]) -> None:
        self.save_slots(
            {SlotKey(k.agent_id, _signal_window(k), 0): v for k, v in changed.items()},
            [SlotKey(k.agent_id, _signal_window(k), 0) for k in dropped],
        )

    def forget_agents_except(self, agent_ids: Iterable[str]) -> None:
        """The manifests are the inventory: slots of agents no longer declared go."""
        keep = sorted(set(agent_ids))
        if not keep:
            self._db.execute("DELETE FROM alert_slots")
            return
        marks = ",".join("?" * len(keep))
        self._db.execute(f"DELETE FROM alert_slots WHERE agent_id NOT IN ({marks})", keep)

    def enqueue(
        self,
        *,
        alert_id: str,
        agent_id: str,
        event_type: str,
        route: str,
        url: str,
        allow_insecure: bool,
        secret: SecretRef,
        body: bytes,
        refused: str | None = None,
    ) -> int | None:
        """Queue one delivery; a refused URL is recorded as refused (with its reason in the
        log) instead of pending. Returns the row id, or ``None`` if it was already queued."""
        cur = self._db.execute(
            "INSERT INTO alert_outbox (alert_id, agent_id, event_type, route, url, allow_insecure,"
            " secret_ref, body, status, last_error, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (alert_id, url) DO NOTHING RETURNING id",
            (alert_id, agent_id, event_type, route, url, int(allow_insecure), _secret_json(secret), body,
             REFUSED if refused else PENDING, refused or "", self._at, self._at),
        )  # fmt: skip
        row = cur.fetchone()
        if row is None:
            return None
        row_id = int(row[0])
        if refused:
            _log(self._db, row_id, alert_id, agent_id, route, route, self._at, ok=False, code=None, error=refused)
        return row_id


def _log(
    db: Database,
    outbox_id: int,
    alert_id: str,
    agent_id: str,
    route: str,
    url: str,
    at: float,
    *,
    ok: bool,
    code: int | None,
    error: str,
) -> None:
    db.execute(
        "INSERT INTO alert_delivery_log (outbox_id, alert_id, agent_id, route, url, attempted_at, ok, status_code,"
        " error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (outbox_id, alert_id, agent_id, route, url, at, int(ok), code, error),
    )


_THRESHOLD_SLOTS = f"budget_window IN ({', '.join(repr(w) for w in WINDOWS)})"
"""Threshold slots; forecast and anomaly slots share the table (``_signal_window``)."""


def _load_slots(db: Database) -> dict[SlotKey, SlotState]:
    rows = db.execute(
        "SELECT agent_id, budget_window, threshold, fired, episodes, alert_id, fired_at FROM alert_slots"
        f" WHERE {_THRESHOLD_SLOTS}"
    ).fetchall()
    return {SlotKey(a, w, int(t)): SlotState(bool(f), int(e), str(i), fa) for a, w, t, f, e, i, fa in rows}


def _signal_window(key: SignalKey) -> str:
    """A forecast or anomaly slot is stored in ``alert_slots`` as window ``kind:window``,
    threshold 0: the same table, transaction and pruning as threshold slots, no migration."""
    return f"{key.kind}:{key.window}"


def _load_signal_slots(db: Database) -> dict[SignalKey, SlotState]:
    rows = db.execute(
        "SELECT agent_id, budget_window, fired, episodes, alert_id, fired_at FROM alert_slots"
        f" WHERE NOT {_THRESHOLD_SLOTS}"
    ).fetchall()
    out: dict[SignalKey, SlotState] = {}
    for agent_id, stored, fired, episodes, alert_id, fired_at in rows:
        kind, _, window = str(stored).partition(":")
        if kind in SignalKind.__members__.values():
            out[SignalKey(agent_id, SignalKind(kind), window)] = SlotState(
                bool(fired), int(episodes), str(alert_id), fired_at
            )
    return out


class AlertStore:
    """Access to the alert tables; every method commits before it returns."""

    def __init__(self, path: Path | StateLocation) -> None:
        self.location = as_location(path)
        self.path = self.location.file
        self._lock = threading.Lock()
        self._db = connect(self.location)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def decide(self, at: float) -> Iterator[AlertTx]:
        """Read slots, decide and queue in one write transaction, so two concurrent checks
        cannot both fire the same crossing (the second sees the first's fired slot)."""
        with self._lock, self._db.transaction() as db:
            yield AlertTx(db, at)

    def slots(self) -> dict[SlotKey, SlotState]:
        with self._lock:
            return _load_slots(self._db)

    def signal_slots(self) -> dict[SignalKey, SlotState]:
        with self._lock:
            return _load_signal_slots(self._db)

    def pending(self) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, alert_id, agent_id, event_type, route, url, allow_insecure, secret_ref, body, status,"
                " attempts FROM alert_outbox WHERE status = ? ORDER BY id",
                (PENDING,),
            ).fetchall()
        return [
            OutboxRow(i, a, ag, e, r, u, bool(ins), _secret_ref(s), bytes(b), st, int(n))
            for i, a, ag, e, r, u, ins, s, b, st, n in rows
        ]

    def count(self, status: str) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM alert_outbox WHERE status = ?", (status,)).fetchone()
        return int(n)

    def record_attempt(self, row: OutboxRow, url: str, at: float, *, ok: bool, code: int | None, error: str) -> None:
        """Log one attempt (``url`` already redacted) and count it on the row."""
        with self._lock, self._db.transaction() as db:
            _log(db, row.id, row.alert_id, row.agent_id, row.route, url, at, ok=ok, code=code, error=error)
            db.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, last_code = ?, last_error = ?, updated_at = ?"
                " WHERE id = ?",
                (code, error, at, row.id),
            )

    def set_status(self, row_id: int, status: str, at: float, error: str | None = None) -> None:
        with self._lock:
            if error is None:
                self._db.execute(
                    "UPDATE alert_outbox SET status = ?, updated_at = ? WHERE id = ?", (status, at, row_id)
                )
            else:
                self._db.execute(
                    "UPDATE alert_outbox SET status = ?, last_error = ?, updated_at = ? WHERE id = ?",
                    (status, error, at, row_id),
                )

    def attempts_of(self, row_id: int) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT attempts FROM alert_outbox WHERE id = ?", (row_id,)).fetchone()
        return int(n)

    def prune(self, older_than: float) -> None:
        """Bound the history: finished outbox rows and log entries older than the horizon go;
        pending rows always stay."""
        with self._lock:
            self._db.execute("DELETE FROM alert_delivery_log WHERE attempted_at < ?", (older_than,))
            self._db.execute("DELETE FROM alert_outbox WHERE status != ? AND updated_at < ?", (PENDING, older_than))

    def log(self, alert_id: str | None = None) -> list[Attempt]:
        """The delivery log, oldest first (optionally one alert's)."""
        sql = (
            "SELECT outbox_id, alert_id, agent_id, route, url, attempted_at, ok, status_code, error"
            " FROM alert_delivery_log"
        )
        args: tuple[str, ...] = ()
        if alert_id is not None:
            sql += " WHERE alert_id = ?"
            args = (alert_id,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [Attempt(o, a, ag, r, u, t, bool(ok), c, e) for o, a, ag, r, u, t, ok, c, e in rows]

    def fired(self) -> list[FiredAlert]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, budget_window, threshold, alert_id, fired_at FROM alert_slots WHERE fired = 1"
                f" AND {_THRESHOLD_SLOTS} ORDER BY agent_id, budget_window, threshold"
            ).fetchall()
        return [FiredAlert(a, w, int(t), i, fa) for a, w, t, i, fa in rows]

    def route_statuses(self) -> list[RouteStatus]:
        with self._lock:
            counts = self._db.execute(
                "SELECT agent_id, route, status, COUNT(*) FROM alert_outbox GROUP BY agent_id, route, status"
            ).fetchall()
            log = self._db.execute(
                "SELECT agent_id, route, attempted_at, ok, status_code, error FROM alert_delivery_log ORDER BY id DESC"
            ).fetchall()
        by_route: dict[tuple[str, str], dict[str, int]] = {}
        for agent_id, route, status, n in counts:
            by_route.setdefault((agent_id, route), {})[status] = int(n)
        latest: dict[tuple[str, str], tuple[float, bool, int | None, str]] = {}
        streak: dict[tuple[str, str], int] = {}
        broken: set[tuple[str, str]] = set()
        for agent_id, route, at, ok, code, error in log:
            key = (agent_id, route)
            by_route.setdefault(key, {})
            latest.setdefault(key, (at, bool(ok), code, error))
            if key in broken:
                continue
            if ok:
                broken.add(key)
            else:
                streak[key] = streak.get(key, 0) + 1
        out: list[RouteStatus] = []
        for (agent_id, route), statuses in sorted(by_route.items()):
            at, ok, code, error = latest.get((agent_id, route), (None, None, None, ""))
            out.append(
                RouteStatus(
                    agent_id=agent_id,
                    route=route,
                    last_attempt_at=at,
                    last_ok=ok,
                    last_code=code,
                    last_error=error,
                    consecutive_failures=streak.get((agent_id, route), 0),
                    pending=statuses.get(PENDING, 0),
                    gave_up=statuses.get(GAVE_UP, 0),
                    refused=statuses.get(REFUSED, 0),
                )
            )
        return out
