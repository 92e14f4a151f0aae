"""Forecast and anomaly alerts: once per episode, with hysteresis, like threshold alerts.

Threshold alerts (``policies.alerts``) fire on what *has* been spent. These fire on what
the spend *says*:

- ``budget.forecast``: a window's cap is projected to be reached within the agent's
  ``forecastHorizon`` (``policies.forecast``). One slot per (agent, window). It fires when
  the ETA is within the horizon (0 included: already at the cap) and re-arms, silently, when
  the window is no longer projected to exhaust or its ETA is beyond ``REARM_FACTOR`` ×
  the horizon; an ETA in between changes nothing, so an agent whose ETA hovers at the
  horizon alerts once.
- ``budget.anomaly``: the agent's recent spend is above a multiple of its own baseline
  (``policies.anomaly``, which also holds its hysteresis). One slot per agent.

A forecast without a cap (``NoCap``) or without enough data (``InsufficientData``), and an
anomaly sample that could not be taken, leave the slot as it is: nothing is decided from
missing data. Slots of a kind the agent no longer declares are dropped.

Slot states are ``policies.alerts.SlotState`` and alert ids are deterministic per episode
(the same scheme as threshold alerts, under their own prefix), persisted with the slot
before any delivery, so a re-delivery after a crash carries the same id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum

from policies.alerts import ARMED, SlotEvaluation, SlotState, alert_payload, encode_body
from policies.anomaly import AnomalyPolicy, AnomalySample, has_recovered, is_anomalous, ratio
from policies.forecast import HOUR, Exhaustion, WindowForecast
from policies.money import format_money
from policies.spec import ALERT_EVENT_ANOMALY, ALERT_EVENT_FORECAST, AlertRoute

REARM_FACTOR = Decimal("1.5")
"""A fired forecast re-arms when the ETA moves beyond this multiple of the horizon."""

FORECAST_WINDOWS = ("daily", "monthly")
ANOMALY_WINDOW = "spend"
"""The anomaly slot's window name: there is one anomaly slot per agent."""


class SignalKind(StrEnum):
    FORECAST = "forecast"
    ANOMALY = "anomaly"


@dataclass(frozen=True, order=True)
class SignalKey:
    """One forecast or anomaly slot: ``window`` is ``daily``/``monthly`` for a forecast,
    ``ANOMALY_WINDOW`` for the anomaly."""

    agent_id: str
    kind: SignalKind
    window: str


@dataclass(frozen=True)
class ForecastReading:
    """An agent's forecasts this check (``forecasts`` by window name)."""

    agent_id: str
    fleet: str
    horizon_seconds: int
    forecasts: Mapping[str, WindowForecast]


@dataclass(frozen=True)
class AnomalyReading:
    """An agent's anomaly sample this check (``None``: could not be taken)."""

    agent_id: str
    fleet: str
    policy: AnomalyPolicy
    sample: AnomalySample | None


@dataclass(frozen=True)
class SignalEvent:
    """One ``budget.forecast`` or ``budget.anomaly`` alert. ``details`` are the type's own
    payload fields (strings for money with 2 decimals, integers for seconds)."""

    id: str
    type: str
    episode: str
    agent_id: str
    fleet: str
    window: str
    at: float
    details: Mapping[str, object] = field(default_factory=dict)

    def payload(self) -> dict[str, object]:
        """Key order is fixed so the body, and therefore the signature, is reproducible."""
        envelope = (self.id, self.type, self.episode, self.agent_id, self.fleet, self.window, self.at)
        return alert_payload(*envelope, self.details)

    def body(self) -> bytes:
        return encode_body(self.payload())


SignalEvaluation = SlotEvaluation[SignalKey, SignalEvent]


def signal_alert_id(key: SignalKey, episode: int, fired_at: float) -> str:
    seed = f"finops-signal\0{key.agent_id}\0{key.kind}\0{key.window}\0{episode}\0{fired_at!r}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def forecast_details(forecast: Exhaustion, horizon_seconds: int, at: float) -> dict[str, object]:
    """The payload fields of a ``budget.forecast`` alert (and of ``status``' JSON)."""
    eta = forecast.eta_seconds
    return {
        "horizon_seconds": horizon_seconds,
        "eta_seconds": eta,
        "exhausts_at": None if eta is None else datetime.fromtimestamp(at + eta, UTC).isoformat(timespec="seconds"),
        "rate_per_hour": format_money(forecast.rate_per_hour),
        "spend": format_money(forecast.spend),
        "cap": format_money(forecast.cap),
        "basis": str(forecast.basis),
    }


def anomaly_details(policy: AnomalyPolicy, sample: AnomalySample) -> dict[str, object]:
    """The payload fields of a ``budget.anomaly`` alert."""
    factor = ratio(policy, sample)
    return {
        "window_seconds": policy.window_seconds,
        "baseline_seconds": policy.baseline_seconds,
        "spend": format_money(sample.recent),
        "baseline_spend": format_money(sample.baseline),
        "rate_per_hour": format_money(sample.recent * HOUR / policy.window_seconds),
        "baseline_per_hour": format_money(sample.baseline * HOUR / policy.baseline_seconds),
        "ratio": None if factor is None else format_money(factor),
        "multiple": format_money(policy.multiple),
        "min_spend": format_money(policy.min_spend),
    }


def _fire(
    new_state: dict[SignalKey, SlotState],
    key: SignalKey,
    slot: SlotState,
    fleet: str,
    now: float,
    details: dict[str, object],
) -> SignalEvent:
    episode = slot.episodes + 1
    aid = signal_alert_id(key, episode, now)
    new_state[key] = SlotState(True, episode, aid, now)
    type_ = ALERT_EVENT_FORECAST if key.kind is SignalKind.FORECAST else ALERT_EVENT_ANOMALY
    return SignalEvent(aid, type_, aid, key.agent_id, fleet, key.window, now, details)


def _rearm(new_state: dict[SignalKey, SlotState], key: SignalKey, slot: SlotState) -> None:
    new_state[key] = SlotState(False, slot.episodes, slot.alert_id, slot.fired_at)


def forecast_rearms(forecast: Exhaustion, horizon_seconds: int) -> bool:
    """No longer projected to exhaust, or not before ``REARM_FACTOR`` × the horizon."""
    return forecast.eta_seconds is None or forecast.eta_seconds > REARM_FACTOR * horizon_seconds


def evaluate_signals(
    forecasts: Iterable[ForecastReading],
    anomalies: Iterable[AnomalyReading],
    state: Mapping[SignalKey, SlotState],
    *,
    declared: Mapping[str, frozenset[SignalKind]],
    now: float,
) -> SignalEvaluation:
    """Events for this check and the complete new slot state (module doc). ``declared``:
    per evaluated agent, the kinds it declares; its slots of other kinds are dropped.
    Agents absent from ``declared`` keep their slots untouched."""
    new_state = {k: v for k, v in state.items() if k.agent_id not in declared or k.kind in declared[k.agent_id]}
    events: list[SignalEvent] = []
    for reading in forecasts:
        for window in FORECAST_WINDOWS:
            forecast = reading.forecasts.get(window)
            if not isinstance(forecast, Exhaustion):
                continue
            key = SignalKey(reading.agent_id, SignalKind.FORECAST, window)
            slot = new_state.get(key, ARMED)
            if not slot.fired and forecast.within(reading.horizon_seconds):
                details = forecast_details(forecast, reading.horizon_seconds, now)
                events.append(_fire(new_state, key, slot, reading.fleet, now, details))
            elif slot.fired and forecast_rearms(forecast, reading.horizon_seconds):
                _rearm(new_state, key, slot)
    for anomaly in anomalies:
        if anomaly.sample is None:
            continue
        key = SignalKey(anomaly.agent_id, SignalKind.ANOMALY, ANOMALY_WINDOW)
        slot = new_state.get(key, ARMED)
        if not slot.fired and is_anomalous(anomaly.policy, anomaly.sample):
            details = anomaly_details(anomaly.policy, anomaly.sample)
            events.append(_fire(new_state, key, slot, anomaly.fleet, now, details))
        elif slot.fired and has_recovered(anomaly.policy, anomaly.sample):
            _rearm(new_state, key, slot)
    return SignalEvaluation(tuple(events), new_state)


def signal_routes(event: SignalEvent, routes: Iterable[AlertRoute]) -> tuple[AlertRoute, ...]:
    """The routes that list this event's type (``events:``); route thresholds do not apply."""
    return tuple(r for r in routes if event.type in r.events)


def render_signal_url(route: AlertRoute, event: SignalEvent) -> str:
    """``{threshold}`` becomes the kind (``forecast``/``anomaly``): these alerts have none."""
    kind = SignalKind.FORECAST if event.type == ALERT_EVENT_FORECAST else SignalKind.ANOMALY
    return route.render(agent=event.agent_id, fleet=event.fleet, threshold=str(kind), window=event.window)
