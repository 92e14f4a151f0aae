"""Budget alert decisions (pure), payload signing, URL rules and secret resolution."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.alerting.deliver import SecretCache
from controller.errors import ConfigError
from policies.alerts import (
    ARMED,
    DAILY,
    MONTHLY,
    AlertEvent,
    BudgetReading,
    SlotKey,
    SlotState,
    WindowReading,
    check_alert_url,
    encode_body,
    evaluate,
    rearm_below,
    redact_url,
    routes_for,
    sign,
    utilization,
    verify,
)
from policies.spec import ALERT_EVENT_RECOVERED, ALERT_EVENT_THRESHOLD, AlertRoute, SecretRef

D = Decimal
NO_CAP = WindowReading(D("0.00"), None)


def reading(
    spend: str | Decimal,
    cap: str | Decimal | None = "1.00",
    *,
    thresholds: tuple[int, ...] = (75, 90, 100),
    agent: str = "res-01",
    monthly: WindowReading = NO_CAP,
) -> BudgetReading:
    daily = WindowReading(D(spend), None if cap is None else D(cap))
    return BudgetReading(agent, "research", thresholds, daily, monthly)


def run(
    spends: Sequence[str], state: Mapping[SlotKey, SlotState] | None = None, **kw: object
) -> tuple[list[AlertEvent], Mapping[SlotKey, SlotState]]:
    events: list[AlertEvent] = []
    current: Mapping[SlotKey, SlotState] = state or {}
    for i, spend in enumerate(spends):
        ev = evaluate([reading(spend, **kw)], current, now=1000.0 + i)  # type: ignore[arg-type]
        events.extend(ev.events)
        current = ev.state
    return events, current


# -- crossings ------------------------------------------------------------------------------


def test_crossing_fires_once_and_is_remembered() -> None:
    first = evaluate([reading("0.80")], {}, now=100.0)
    assert [(e.type, e.window, e.threshold, e.percent) for e in first.events] == [
        (ALERT_EVENT_THRESHOLD, DAILY, 75, D("80.00"))
    ]
    event = first.events[0]
    assert event.episode == event.id and len(event.id) == 32
    slot = first.state[SlotKey("res-01", DAILY, 75)]
    assert slot == SlotState(True, 1, event.id, 100.0)
    again = evaluate([reading("0.85")], first.state, now=200.0)
    assert again.events == () and again.state == first.state


def test_a_jump_fires_every_threshold_crossed_in_order() -> None:
    ev = evaluate([reading("1.00")], {}, now=1.0)
    assert [e.threshold for e in ev.events] == [75, 90, 100]
    assert len({e.id for e in ev.events}) == 3


def test_exactly_at_threshold_fires() -> None:
    assert [e.threshold for e in evaluate([reading("0.75")], {}, now=1.0).events] == [75]
    assert evaluate([reading("0.74")], {}, now=1.0).events == ()


def test_recovery_needs_the_hysteresis_margin() -> None:
    fired = evaluate([reading("0.75")], {}, now=1.0)
    (crossing,) = fired.events
    hovering = evaluate([reading("0.70")], fired.state, now=2.0)  # 70 is not below 75 - 5
    assert hovering.events == ()
    recovered = evaluate([reading("0.69")], hovering.state, now=3.0)
    (event,) = recovered.events
    assert (event.type, event.threshold, event.episode) == (ALERT_EVENT_RECOVERED, 75, crossing.id)
    assert event.id != crossing.id
    assert recovered.state[SlotKey("res-01", DAILY, 75)] == SlotState(False, 1, crossing.id, 1.0)
    refired = evaluate([reading("0.80")], recovered.state, now=4.0)
    (again,) = refired.events
    assert again.type == ALERT_EVENT_THRESHOLD and again.id not in (crossing.id, event.id)
    assert refired.state[SlotKey("res-01", DAILY, 75)].episodes == 2


def test_rearm_level() -> None:
    assert rearm_below(75) == D(70)
    assert rearm_below(100) == D(95)
    assert rearm_below(4) == D(2)  # small thresholds can still re-arm
    assert rearm_below(1) == D("0.5")


def test_no_cap_or_zero_cap_is_not_evaluated_and_keeps_slots() -> None:
    assert utilization(D("5.00"), None) is None and utilization(D("5.00"), D("0.00")) is None
    assert evaluate([reading("5.00", None)], {}, now=1.0).events == ()
    fired = evaluate([reading("0.95")], {}, now=1.0)
    held = evaluate([reading("0.00", "0.00")], fired.state, now=2.0)  # a hold sets caps to 0
    assert held.events == () and held.state == fired.state


def test_both_windows_are_evaluated_independently() -> None:
    r = reading("0.10", monthly=WindowReading(D("28.00"), D("30.00")))
    ev = evaluate([r], {}, now=1.0)
    assert [(e.window, e.threshold) for e in ev.events] == [(MONTHLY, 75), (MONTHLY, 90)]


def test_undeclared_thresholds_are_dropped_and_unread_agents_kept() -> None:
    fired = evaluate([reading("1.00"), reading("1.00", agent="res-02")], {}, now=1.0)
    narrowed = evaluate([reading("1.00", thresholds=(90,))], fired.state, now=2.0)
    assert narrowed.events == ()
    assert sorted(k.threshold for k in narrowed.state if k.agent_id == "res-01") == [90]
    assert sorted(k.threshold for k in narrowed.state if k.agent_id == "res-02") == [75, 90, 100]
    assert narrowed.dropped(fired.state) == {SlotKey("res-01", DAILY, 75), SlotKey("res-01", DAILY, 100)}
    assert narrowed.changed(fired.state) == {}


def test_ids_are_deterministic_and_unique_per_episode_even_with_a_frozen_clock() -> None:
    a = evaluate([reading("0.80")], {}, now=5.0).events[0].id
    assert a == evaluate([reading("0.80")], {}, now=5.0).events[0].id
    assert a != evaluate([reading("0.80")], {}, now=6.0).events[0].id
    assert a != evaluate([reading("0.80", agent="res-02")], {}, now=5.0).events[0].id
    state: Mapping[SlotKey, SlotState] = {}
    ids: list[str] = []
    for spend in ("0.80", "0.10", "0.80", "0.10", "0.80"):
        ev = evaluate([reading(spend, thresholds=(75,))], state, now=5.0)
        ids.extend(e.id for e in ev.events)
        state = ev.state
    assert len(ids) == 5 and len(set(ids)) == 5


# -- properties -------------------------------------------------------------------------------

cents = st.integers(min_value=0, max_value=300_000).map(lambda c: D(c) / 100)
thresholds_st = st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=5, unique=True).map(
    lambda xs: tuple(sorted(xs))
)
caps = st.one_of(st.none(), st.just(D("0.00")), st.integers(min_value=1, max_value=100_000).map(lambda c: D(c) / 100))


@settings(max_examples=200, deadline=None)
@given(thresholds=thresholds_st, cap=st.integers(min_value=1, max_value=100_000).map(lambda c: D(c) / 100),
       increments=st.lists(cents, min_size=1, max_size=30))  # fmt: skip
def test_monotone_spend_fires_each_crossed_threshold_exactly_once(
    thresholds: tuple[int, ...], cap: Decimal, increments: list[Decimal]
) -> None:
    state: Mapping[SlotKey, SlotState] = {}
    spend = D("0.00")
    fired: list[int] = []
    for i, inc in enumerate(increments):
        spend += inc
        ev = evaluate([reading(spend, cap, thresholds=thresholds)], state, now=float(i))
        assert all(e.type == ALERT_EVENT_THRESHOLD for e in ev.events)
        fired.extend(e.threshold for e in ev.events)
        state = ev.state
    final = spend / cap * 100
    assert sorted(fired) == [t for t in thresholds if final >= t]
    assert len(fired) == len(set(fired))


@st.composite
def check_steps(draw: st.DrawFn) -> tuple[Decimal, Decimal | None]:
    """(spend, cap) for one check; mostly a utilization near the usual thresholds, so the
    hysteresis band right under a threshold is visited often, sometimes raw amounts."""
    cap = draw(caps)
    if cap and draw(st.booleans()):
        pct = draw(st.integers(min_value=0, max_value=1600)) / D(10)
        return (cap * pct / 100).quantize(D("0.01")), cap
    return draw(cents), cap


usual_thresholds = st.lists(st.sampled_from([3, 10, 50, 75, 90, 100, 120]), min_size=1, unique=True).map(
    lambda xs: tuple(sorted(xs))
)
dt = st.integers(min_value=0, max_value=5)


@settings(max_examples=300, deadline=None)
@given(
    thresholds=st.one_of(thresholds_st, usual_thresholds),
    steps=st.lists(st.tuples(check_steps(), dt), min_size=1, max_size=40),
)
def test_no_slot_fires_twice_without_a_recovery_between(
    thresholds: tuple[int, ...], steps: list[tuple[tuple[Decimal, Decimal | None], int]]
) -> None:
    state: Mapping[SlotKey, SlotState] = {}
    history: dict[int, list[str]] = {t: [] for t in thresholds}
    threshold_ids: list[str] = []
    episodes: dict[int, str] = {}
    now = 0.0
    for (spend, cap), dt in steps:
        now += dt  # the clock may stand still between checks
        ev = evaluate([reading(spend, cap, thresholds=thresholds)], state, now=now)
        pct = utilization(spend, cap)
        for e in ev.events:
            assert pct is not None and e.window == DAILY
            history[e.threshold].append(e.type)
            if e.type == ALERT_EVENT_THRESHOLD:
                assert pct >= e.threshold
                threshold_ids.append(e.id)
                episodes[e.threshold] = e.id
            else:
                assert pct < rearm_below(e.threshold)
                assert e.episode == episodes[e.threshold]
        state = ev.state
    for t, types in history.items():
        expected = [ALERT_EVENT_THRESHOLD, ALERT_EVENT_RECOVERED] * len(types)
        assert types == expected[: len(types)], (t, types)
        slot = state.get(SlotKey("res-01", DAILY, t), ARMED)
        assert slot.fired == (bool(types) and types[-1] == ALERT_EVENT_THRESHOLD)
    assert len(threshold_ids) == len(set(threshold_ids))


# -- payload and signature ------------------------------------------------------------------------


def test_payload_schema_and_exact_body() -> None:
    (event,) = evaluate([reading("0.8")], {}, now=1_795_000_000.0).events
    payload = event.payload()
    assert payload == {
        "version": 1,
        "id": event.id,
        "type": "budget.threshold",
        "episode": event.id,
        "agent": "res-01",
        "fleet": "research",
        "window": "daily",
        "threshold": 75,
        "percent": "80.00",
        "spend": "0.80",
        "cap": "1.00",
        "currency": "CREDITS",
        "time": "2026-11-18T11:06:40+00:00",
    }
    assert event.body() == json.dumps(payload).encode()
    assert b'", "' in event.body() and b'": ' in event.body()  # default separators, like the gateway


def test_signature_is_hex_hmac_sha256_of_the_raw_body() -> None:
    body = encode_body({"id": "x", "spend": "0.80"})
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body) == expected
    assert verify("s3cret", body, expected) and verify("s3cret", body, expected.upper())
    assert not verify("s3cret", body + b" ", expected)
    assert not verify("other", body, expected)


def route(thresholds: tuple[int, ...], events: tuple[str, ...] = (ALERT_EVENT_THRESHOLD,)) -> AlertRoute:
    return AlertRoute("https://alerts.example.com/{agent}", thresholds, events, SecretRef(env="X"))


def test_routes_get_only_their_thresholds_and_event_types() -> None:
    low, high = route((75, 90)), route((100,), (ALERT_EVENT_THRESHOLD, ALERT_EVENT_RECOVERED))
    events = evaluate([reading("1.00")], {}, now=1.0)
    assert [routes_for(e, [low, high]) for e in events.events] == [(low,), (low,), (high,)]
    recovered = evaluate([reading("0.10")], events.state, now=2.0).events
    assert [routes_for(e, [low, high]) for e in recovered] == [(), (), (high,)]


# -- URL rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "insecure", "expect"),
    [
        ("https://alerts.example.com/research/{agent}/{threshold}", False, None),
        ("https://pager.example.com/finops/{fleet}?agent={agent}&window={window}", False, None),
        ("https://8.8.8.8/hook", False, None),
        ("http://alerts.example.com/x", False, "must use https"),
        ("https://localhost/x", False, "is local"),
        ("https://api.localhost/x", False, "is local"),
        ("https://127.0.0.1/x", False, "loopback"),
        ("https://[::1]/x", False, "loopback"),
        ("https://[::ffff:127.0.0.1]/x", False, "loopback"),
        ("https://10.1.2.3/x", False, "private"),
        ("https://192.168.0.10/x", False, "private"),
        ("https://169.254.169.254/latest", False, "link-local"),
        ("https://0.0.0.0/x", False, "address"),
        ("ftp://alerts.example.com/x", False, "scheme"),
        ("https://user:pw@alerts.example.com/x", False, "credentials"),
        ("http://127.0.0.1:8080/x", True, None),
        ("http://localhost/x", True, None),
        ("https://user:pw@127.0.0.1/x", True, "credentials"),
        ("file:///etc/passwd", True, "scheme"),
    ],
)
def test_check_alert_url(url: str, insecure: bool, expect: str | None) -> None:
    problem = check_alert_url(url, insecure)
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem


def test_redact_url_drops_userinfo_and_query_values() -> None:
    assert redact_url("https://u:tok@pager.example.com:8443/p/x?token=abc&agent=r1#f") == (
        "https://pager.example.com:8443/p/x?token=…&agent=…"
    )
    assert redact_url("http://[::1]:9/a") == "http://[::1]:9/a"


# -- secrets --------------------------------------------------------------------------------------


def test_secret_from_env_and_missing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINOPS_TEST_ALERT_SECRET", "abc")
    cache = SecretCache()
    assert cache.get(SecretRef(env="FINOPS_TEST_ALERT_SECRET")) == "abc"
    monkeypatch.setenv("FINOPS_TEST_ALERT_SECRET", "changed")
    assert cache.get(SecretRef(env="FINOPS_TEST_ALERT_SECRET")) == "abc"  # resolved once per check
    with pytest.raises(ConfigError, match="FINOPS_TEST_ALERT_MISSING is not set"):
        cache.get(SecretRef(env="FINOPS_TEST_ALERT_MISSING"))


def test_secret_file_generated_once_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "alert.secret"
    value = SecretCache().get(SecretRef(file=str(path), generate=True))
    assert len(value) == 64 and int(value, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert SecretCache().get(SecretRef(file=str(path), generate=True)) == value  # never regenerated
    with pytest.raises(ConfigError, match="does not exist"):
        SecretCache().get(SecretRef(file=str(tmp_path / "absent")))
