"""Forecast and anomaly alert slots (pure): once per episode, hysteresis, missing data;
and the history/readings cache that feeds them."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.alerting.signals import HOURLY_KEEP, SignalCache, pack
from policies.alerts import SlotState
from policies.anomaly import AnomalyPolicy, AnomalySample
from policies.forecast import DAILY_SECONDS, HOUR, Basis, Exhaustion, InsufficientData, NoCap, SpendBucket
from policies.signal_alerts import (
    REARM_FACTOR,
    AnomalyReading,
    ForecastReading,
    SignalKey,
    SignalKind,
    evaluate_signals,
)
from policies.spec import ALERT_EVENT_ANOMALY, ALERT_EVENT_FORECAST

HORIZON = 7200
DAILY = SignalKey("a", SignalKind.FORECAST, "daily")
ANOMALY = SignalKey("a", SignalKind.ANOMALY, "spend")
BOTH = frozenset({SignalKind.FORECAST, SignalKind.ANOMALY})
POLICY = AnomalyPolicy(DAILY_SECONDS, 7 * DAILY_SECONDS, Decimal(2), Decimal("1.00"))


def _forecast(eta: int | None) -> ForecastReading:
    f = Exhaustion(DAILY_SECONDS, Decimal("0.50"), Decimal("1.00"), Decimal("0.001"), eta, Basis.READINGS)
    return ForecastReading("a", "fleet", HORIZON, {"daily": f, "monthly": NoCap()})


etas = st.one_of(st.none(), st.integers(min_value=0, max_value=4 * HORIZON))


@given(st.lists(etas, max_size=30))
def test_forecast_fires_once_per_episode(sequence: list[int | None]) -> None:
    """Over any sequence of ETAs: an event exactly when an armed slot sees an ETA within
    the horizon, and the slot is fired exactly between such an event and a re-arming ETA."""
    state: dict[SignalKey, SlotState] = {}
    fired = False
    for i, eta in enumerate(sequence):
        ev = evaluate_signals([_forecast(eta)], [], state, declared={"a": BOTH}, now=1000.0 + i)
        within = eta is not None and eta <= HORIZON
        rearm = eta is None or eta > REARM_FACTOR * HORIZON
        expected_event = not fired and within
        assert [e.type for e in ev.events] == ([ALERT_EVENT_FORECAST] if expected_event else [])
        fired = True if expected_event else (False if fired and rearm else fired)
        state = dict(ev.state)
        assert state.get(DAILY, SlotState()).fired == fired
        if expected_event:
            (event,) = ev.events
            assert event.payload()["eta_seconds"] == eta and event.id == event.episode == state[DAILY].alert_id


def test_an_eta_between_the_horizon_and_the_rearm_level_changes_nothing() -> None:
    first = evaluate_signals([_forecast(HORIZON)], [], {}, declared={"a": BOTH}, now=1.0)
    assert len(first.events) == 1
    hover = evaluate_signals([_forecast(int(HORIZON * REARM_FACTOR))], [], first.state, declared={"a": BOTH}, now=2.0)
    assert (hover.events, hover.state[DAILY].fired) == ((), True)
    gone = evaluate_signals([_forecast(int(HORIZON * REARM_FACTOR) + 1)], [], hover.state, declared={"a": BOTH}, now=3)
    assert (gone.events, gone.state[DAILY].fired) == ((), False)  # re-armed silently
    again = evaluate_signals([_forecast(60)], [], gone.state, declared={"a": BOTH}, now=4.0)
    (event,) = again.events
    assert again.state[DAILY].episodes == 2 and event.id != first.events[0].id


def test_missing_data_decides_nothing() -> None:
    fired = evaluate_signals([_forecast(0)], [], {}, declared={"a": BOTH}, now=1.0).state
    blind = ForecastReading("a", "fleet", HORIZON, {"daily": InsufficientData("x"), "monthly": NoCap()})
    assert evaluate_signals([blind], [AnomalyReading("a", "fleet", POLICY, None)], fired, declared={"a": BOTH},
                            now=2.0).state == fired  # fmt: skip


def test_slots_of_kinds_no_longer_declared_are_dropped_and_others_kept() -> None:
    state = {DAILY: SlotState(True, 1, "x", 1.0), ANOMALY: SlotState(True, 1, "y", 1.0),
             SignalKey("b", SignalKind.FORECAST, "daily"): SlotState(True, 1, "z", 1.0)}  # fmt: skip
    ev = evaluate_signals([], [], state, declared={"a": frozenset({SignalKind.ANOMALY})}, now=2.0)
    assert ev.dropped(state) == {DAILY}
    assert set(ev.state) == {ANOMALY, SignalKey("b", SignalKind.FORECAST, "daily")}


def test_anomaly_fires_once_and_rearms_below_the_trigger() -> None:
    def step(recent: str, state: dict[SignalKey, SlotState]) -> tuple[list[str], dict[SignalKey, SlotState]]:
        reading = AnomalyReading("a", "fleet", POLICY, AnomalySample(Decimal(recent), Decimal("7.00")))
        ev = evaluate_signals([], [reading], state, declared={"a": BOTH}, now=1.0)
        return [e.type for e in ev.events], dict(ev.state)

    events, state = step("2.50", {})
    assert events == [ALERT_EVENT_ANOMALY]
    for recent in ("2.50", "3.00", "1.70"):  # still ≥ 0.8 × 2 × the baseline rate
        events, state = step(recent, state)
        assert events == [] and state[ANOMALY].fired
    events, state = step("1.60", state)
    assert events == [] and not state[ANOMALY].fired
    events, state = step("2.10", state)
    assert events == [ALERT_EVENT_ANOMALY] and state[ANOMALY].episodes == 2


# ---------------------------------------------------------------- the cache (mechanism, no I/O)

NOW = 1_800_000_000


def test_history_older_than_two_days_is_kept_per_day_with_the_same_total() -> None:
    buckets = [SpendBucket(NOW - h * HOUR, HOUR, Decimal("0.10")) for h in range(1, 24 * 10)]
    packed = pack(buckets, float(NOW))
    history = packed.history()
    assert sum((b.cost for b in history.buckets), Decimal(0)) == sum((b.cost for b in buckets), Decimal(0))
    hourly = [b for b in history.buckets if b.seconds == HOUR]
    assert all(b.end > NOW - HOURLY_KEEP for b in hourly) and len(hourly) == 48
    assert all(b.seconds == DAILY_SECONDS and b.start % DAILY_SECONDS == 0 for b in history.buckets if b not in hourly)
    assert len(history.buckets) <= 48 + 11


@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=200))
def test_readings_stay_bounded_and_keep_the_newest(steps: list[int]) -> None:
    cache = SignalCache()
    at = float(NOW)
    for i, step in enumerate(steps):
        at += step
        cache.add_reading("a", at, Decimal(i), Decimal(i))
    readings = cache.readings("a", "daily")
    assert readings[-1].at == at and readings[-1].spend == Decimal(len(steps) - 1)
    assert all(at - r.at <= cache.lookback for r in readings)
    assert len(readings) <= cache.lookback // cache.reading_gap + 2
    assert all(b.at - a.at >= cache.reading_gap for a, b in itertools.pairwise(readings[:-1]))


def test_a_history_is_stale_when_missing_old_or_moved() -> None:
    cache = SignalCache()
    assert cache.stale("a", NOW, None)
    cache.put_history("a", [], float(NOW))
    assert not cache.stale("a", NOW + HOUR - 1, None)
    assert cache.stale("a", NOW + HOUR, None)
    assert cache.stale("a", NOW + 10, frozenset({"a"})) and not cache.stale("a", NOW + 10, frozenset({"b"}))
    assert cache.stale("a", NOW - 10, None)  # the clock went back
    cache.retain(["b"])
    assert cache.history("a") is None


def test_a_history_beyond_what_the_gateway_can_store_is_refused_not_wrapped() -> None:
    huge = [SpendBucket(NOW - h * HOUR, HOUR, Decimal("90000000000.00")) for h in range(100, 124)]  # one day
    with pytest.raises(ValueError, match="out of range"):
        pack(huge, float(NOW))
    cache = SignalCache()
    cache.put_history("a", [SpendBucket(NOW - HOUR, HOUR, Decimal("0.10"))], float(NOW))
    with pytest.raises(ValueError):
        cache.put_history("a", huge, float(NOW))
    history = cache.history("a")
    assert history is not None and [b.cost for b in history.buckets] == [Decimal("0.10")]  # the old one stays
