"""Budget alerts: when spend crosses a threshold of a cap, decide what to tell whom.

GreenHelix 1.4.8 emits no budget alerts (API.md §0.6, §0.7): ``alert_threshold`` only flips a
boolean in ``GET …/budget``. finops polls the budget status and makes the decision here, as a
pure function of (live spend and caps, declared thresholds, remembered slot state, clock).

A *slot* is one (agent, window, threshold), window ``daily`` or ``monthly``. A slot is either
**armed** or **fired**:

- armed and utilization (spend / cap × 100) ≥ threshold → one ``budget.threshold`` event; the
  slot fires and a new *episode* begins;
- fired and utilization < threshold − margin → one ``budget.recovered`` event; the slot re-arms.

Caps are rolling windows (last 24 h / 30 days), so spend ages out and utilization falls
without anything "resetting"; a raised cap lowers utilization the same way. The re-arm margin
(hysteresis, ``REARM_MARGIN`` = 5 percentage points, at most half the threshold) keeps a value
hovering at the boundary, such as a 0.10 call ageing out as another one is made, from
alternating fire/recover on every check.

A window whose cap is ``None`` (no cap) or 0 is not evaluated and its slots are left as they
are: 0 is what a hold (``finops freeze``) sets, utilization is meaningless there, and the
agent's operator already knows. When the hold lifts, fired slots are still fired, so the
agent does not re-alert for a crossing it already reported.

Alert ids are deterministic per episode (a hash of the slot, its episode number and the time
it fired) and are persisted with the slot before any delivery is attempted, so a re-delivery
after a crash carries the same id and receivers can deduplicate on it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from policies.money import CENT, format_money
from policies.spec import ALERT_EVENT_RECOVERED, ALERT_EVENT_THRESHOLD, AlertRoute
from policies.urls import check_url_safety

DAILY = "daily"
MONTHLY = "monthly"
WINDOWS = (DAILY, MONTHLY)

REARM_MARGIN = Decimal(5)
"""Percentage points below the threshold that utilization must fall to re-arm a slot."""

PAYLOAD_VERSION = 1
CREDITS = "CREDITS"
"""Budget statuses are in gateway credits; that is what caps are enforced in."""

SIGNATURE_HEADER = "X-A2A-Signature"
"""Legacy: hex HMAC-SHA256 of the body alone (no send time, so a captured alert can be
replayed). Still sent beside ``X-Finops-Signature`` while receivers migrate
(``LEGACY_SIGNATURE``); a later release stops sending it."""
ALERT_ID_HEADER = "X-Finops-Alert-Id"
TIMESTAMP_HEADER = "X-Finops-Timestamp"
"""The send time of this delivery attempt, integer seconds since the epoch."""
SIGNATURE_V1_HEADER = "X-Finops-Signature"
"""``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`` (Stripe's scheme)."""
LEGACY_SIGNATURE = True
"""Whether ``X-A2A-Signature`` is still sent (the documented transition)."""
SIGNATURE_TOLERANCE_S = 300
"""A receiver rejects an alert whose timestamp is further than this from its own clock."""


@dataclass(frozen=True)
class WindowReading:
    """One window of ``GET …/budget``: spend and cap in credits (``cap`` ``None`` = no cap)."""

    spend: Decimal
    cap: Decimal | None


@dataclass(frozen=True)
class BudgetReading:
    """What the evaluation needs to know about one agent right now."""

    agent_id: str
    fleet: str
    thresholds: tuple[int, ...]
    daily: WindowReading
    monthly: WindowReading

    def window(self, name: str) -> WindowReading:
        return self.daily if name == DAILY else self.monthly


@dataclass(frozen=True, order=True)
class SlotKey:
    agent_id: str
    window: str
    threshold: int


@dataclass(frozen=True)
class SlotState:
    """``episodes`` counts how often the slot has fired, ever; with the fire time it makes
    every episode's id unique even when a test clock stands still. ``alert_id`` and
    ``fired_at`` describe the latest episode (kept after re-arming, for the record)."""

    fired: bool = False
    episodes: int = 0
    alert_id: str = ""
    fired_at: float | None = None


ARMED = SlotState()


@dataclass(frozen=True)
class AlertEvent:
    """One alert to deliver. ``episode`` is the id of the ``budget.threshold`` alert that
    opened the episode (equal to ``id`` for that alert), so receivers can pair a recovery
    with its crossing."""

    id: str
    type: str
    episode: str
    agent_id: str
    fleet: str
    window: str
    threshold: int
    spend: Decimal
    cap: Decimal
    at: float
    action: str | None = None
    """What finops does besides alerting (``policies.escalation``): ``pause``/``freeze`` on
    the crossing that triggers it, ``release`` on the recovery that lifts a pause."""

    @property
    def percent(self) -> Decimal:
        return _percent(self.spend, self.cap)

    def payload(self) -> dict[str, object]:
        """The JSON document receivers get (README "Budget alerts"). Key order is fixed so
        the body, and therefore the signature, is reproducible."""
        fields = {
            "threshold": self.threshold,
            "percent": format_money(self.percent),
            "spend": format_money(self.spend),
            "cap": format_money(self.cap),
        }
        envelope = (self.id, self.type, self.episode, self.agent_id, self.fleet, self.window, self.at)
        return alert_payload(*envelope, fields) | ({"action": self.action} if self.action else {})

    def body(self) -> bytes:
        return encode_body(self.payload())


def alert_payload(
    alert_id: str,
    event_type: str,
    episode: str,
    agent_id: str,
    fleet: str,
    window: str,
    at: float,
    fields: Mapping[str, object],
) -> dict[str, object]:
    """Every alert's JSON document: the common envelope around its own ``fields``, in a fixed
    key order so the body, and therefore the signature, is reproducible."""
    return {
        "version": PAYLOAD_VERSION,
        "id": alert_id,
        "type": event_type,
        "episode": episode,
        "agent": agent_id,
        "fleet": fleet,
        "window": window,
        **fields,
        "currency": CREDITS,
        "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
    }


K = TypeVar("K", bound=Hashable)
E = TypeVar("E")


@dataclass(frozen=True)
class SlotEvaluation(Generic[K, E]):
    """One evaluation of a kind of slot: the events it decided and every slot's new state."""

    events: tuple[E, ...]
    state: Mapping[K, SlotState]

    def changed(self, before: Mapping[K, SlotState]) -> dict[K, SlotState]:
        return {k: v for k, v in self.state.items() if before.get(k) != v}

    def dropped(self, before: Mapping[K, SlotState]) -> frozenset[K]:
        return frozenset(before.keys() - self.state.keys())


Evaluation = SlotEvaluation[SlotKey, AlertEvent]


def _percent(spend: Decimal, cap: Decimal) -> Decimal:
    return (spend / cap * 100).quantize(CENT, rounding=ROUND_HALF_EVEN)


def utilization(spend: Decimal, cap: Decimal | None) -> Decimal | None:
    """Exact spend/cap × 100, or ``None`` when the window is not evaluated (no cap, or 0)."""
    if cap is None or cap <= 0:
        return None
    return spend / cap * 100


def rearm_below(threshold: int, margin: Decimal = REARM_MARGIN) -> Decimal:
    """The utilization under which a fired slot re-arms: threshold − margin, but never less
    than half the threshold, so small thresholds (1–9 %) can re-arm at all."""
    return Decimal(threshold) - min(margin, Decimal(threshold) / 2)


def alert_id(key: SlotKey, episode: int, fired_at: float) -> str:
    seed = f"finops-alert\0{key.agent_id}\0{key.window}\0{key.threshold}\0{episode}\0{fired_at!r}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def recovery_id(episode_alert_id: str) -> str:
    return hashlib.sha256(f"finops-recovered\0{episode_alert_id}".encode()).hexdigest()[:32]


def evaluate(
    readings: Iterable[BudgetReading],
    state: Mapping[SlotKey, SlotState],
    *,
    now: float,
    margin: Decimal = REARM_MARGIN,
) -> Evaluation:
    """Events for this check and the complete new slot state.

    Slots of agents not in ``readings`` (their budget could not be read, or they are held)
    are carried over untouched. For an agent that is read, slots of thresholds it no longer
    declares are dropped, and a window that is not evaluated keeps its slots.
    """
    new_state = dict(state)
    events: list[AlertEvent] = []
    for reading in readings:
        declared = {SlotKey(reading.agent_id, w, t) for w in WINDOWS for t in reading.thresholds}
        for key in [k for k in new_state if k.agent_id == reading.agent_id and k not in declared]:
            del new_state[key]
        for window in WINDOWS:
            live = reading.window(window)
            pct = utilization(live.spend, live.cap)
            if pct is None or live.cap is None:
                continue
            for threshold in sorted(reading.thresholds):
                key = SlotKey(reading.agent_id, window, threshold)
                slot = new_state.get(key, ARMED)
                if not slot.fired and pct >= threshold:
                    episode = slot.episodes + 1
                    aid = alert_id(key, episode, now)
                    new_state[key] = SlotState(True, episode, aid, now)
                    events.append(_event(ALERT_EVENT_THRESHOLD, aid, aid, reading, key, live.spend, live.cap, now))
                elif slot.fired and pct < rearm_below(threshold, margin):
                    new_state[key] = SlotState(False, slot.episodes, slot.alert_id, slot.fired_at)
                    rid = recovery_id(slot.alert_id)
                    events.append(
                        _event(ALERT_EVENT_RECOVERED, rid, slot.alert_id, reading, key, live.spend, live.cap, now)
                    )
    return Evaluation(tuple(events), new_state)


def _event(
    type_: str, id_: str, episode: str, reading: BudgetReading, key: SlotKey, spend: Decimal, cap: Decimal, at: float
) -> AlertEvent:
    return AlertEvent(id_, type_, episode, key.agent_id, reading.fleet, key.window, key.threshold, spend, cap, at)


def routes_for(event: AlertEvent, routes: Iterable[AlertRoute]) -> tuple[AlertRoute, ...]:
    """The routes that asked for this event's type and threshold."""
    return tuple(r for r in routes if event.type in r.events and event.threshold in r.thresholds)


def render_url(route: AlertRoute, event: AlertEvent) -> str:
    return route.render(agent=event.agent_id, fleet=event.fleet, threshold=event.threshold, window=event.window)


def encode_body(payload: Mapping[str, object]) -> bytes:
    """``json.dumps`` with default separators, like the gateway's own webhook bodies, so a
    receiver written for gateway webhooks verifies finops alerts unchanged."""
    return json.dumps(payload).encode("utf-8")


def sign(secret: str, body: bytes) -> str:
    """``X-A2A-Signature``: hex HMAC-SHA256(secret, raw body), no prefix, no timestamp."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, body), signature.strip().lower())


def signed_payload(timestamp: int, body: bytes) -> bytes:
    """What ``v1`` signs: the send time, a dot, the raw body. Binding the time into the MAC
    means a captured alert cannot be replayed later with a fresh ``X-Finops-Timestamp``."""
    return str(timestamp).encode("ascii") + b"." + body


def sign_v1(secret: str, body: bytes, timestamp: int) -> str:
    """``X-Finops-Signature``: ``t=<timestamp>,v1=<hex HMAC-SHA256(secret, signed_payload)>``."""
    mac = hmac.new(secret.encode("utf-8"), signed_payload(timestamp, body), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_v1(secret: str, body: bytes, header: str, *, now: float, tolerance: float = SIGNATURE_TOLERANCE_S) -> bool:
    """The reference check (the README's receiver does the same): a well-formed header, a
    timestamp within ``tolerance`` seconds of ``now`` (either side), and one ``v1`` that
    matches. Replays within the tolerance are the receiver's to refuse (on the alert id)."""
    stamps: list[str] = []
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key == "t":
            stamps.append(value)
        elif sep and key == "v1":
            macs.append(value.lower())
    if len(stamps) != 1 or not stamps[0].isascii() or not stamps[0].isdigit() or len(stamps[0]) > 12:
        return False
    timestamp = int(stamps[0])
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign_v1(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, mac) for mac in macs)


def signature_headers(secret: str, body: bytes, alert_id: str, *, now: float) -> dict[str, str]:
    """The headers of one delivery attempt of ``body`` at ``now``: a fresh timestamp and
    ``v1`` signature on every attempt (the stored body and the alert id never change), and
    the legacy body-only signature during the transition."""
    timestamp = int(now)
    headers = {
        "Content-Type": "application/json",
        ALERT_ID_HEADER: alert_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_V1_HEADER: sign_v1(secret, body, timestamp),
    }
    if LEGACY_SIGNATURE:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    return headers


_SAMPLE = {"agent": "agent", "fleet": "fleet", "threshold": 100, "window": DAILY}


def check_alert_url(url: str, allow_insecure: bool) -> str | None:
    """``None`` when an alert route URL (template) is acceptable, else a one-line reason.

    The gateway's SSRF rules (API.md §7) judged on the literal URL, with placeholders filled
    with sample values: https only, no credentials, no ``localhost`` and no loopback,
    private, link-local or reserved IP literals, unless ``allow_insecure``. Hostnames are not
    resolved, so validation does not depend on DNS; delivery checks each rendered URL again,
    because an agent id placed in the host could itself be an IP literal.
    """
    rendered = url
    for name, value in _SAMPLE.items():
        rendered = rendered.replace("{" + name + "}", str(value))
    return check_url_safety(rendered, allow_insecure=allow_insecure)


def redact_url(url: str) -> str:
    """A URL safe for logs and status: no user-info, and query values elided (a receiver
    may take a token there); scheme, host, port and path stay, so an operator can tell which
    endpoint is failing."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparseable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    query = "&".join(f"{p.split('=', 1)[0]}=…" for p in parts.query.split("&") if p) if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
