"""Burn-rate forecast and anomaly decision (pure): properties and worked examples."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policies.anomaly import (
    REARM_FRACTION,
    AnomalyPolicy,
    AnomalySample,
    has_recovered,
    is_anomalous,
    ratio,
)
from policies.forecast import (
    DAILY_SECONDS,
    HOUR,
    Basis,
    Exhaustion,
    History,
    InsufficientData,
    NoCap,
    SpendBucket,
    SpendReading,
    burn_rate,
    forecast_window,
    project,
    spent_between,
    time_to_cap,
)

NOW = 1_800_000_000  # an hour boundary (divisible by 3600)
W = DAILY_SECONDS
EMPTY = History((), float(NOW))

money = st.integers(min_value=0, max_value=100_000).map(lambda c: Decimal(c) / 100)
positive_money = st.integers(min_value=1, max_value=100_000).map(lambda c: Decimal(c) / 100)
rates = st.integers(min_value=0, max_value=10**9).map(lambda n: Decimal(n) / 10**9)  # credits/s up to 1


def _uniform_history(per_hour: Decimal, hours: int = 24) -> History:
    """A constant spend of ``per_hour`` in every completed hour of the last ``hours``."""
    return History(tuple(SpendBucket(NOW - (i + 1) * HOUR, HOUR, per_hour) for i in range(hours)), float(NOW))


@st.composite
def histories(draw: st.DrawFn) -> tuple[History, Decimal]:
    """Random hourly buckets inside the daily window, and a gateway spend that agrees."""
    hours = draw(st.lists(st.integers(min_value=1, max_value=24), unique=True, max_size=24))
    costs = [draw(money) for _ in hours]
    buckets = tuple(SpendBucket(NOW - h * HOUR, HOUR, c) for h, c in zip(hours, costs, strict=True))
    total = sum(costs, Decimal(0))
    return History(buckets, float(NOW)), total


def _eta_key(eta: int | None) -> float:
    return math.inf if eta is None else eta


# ---------------------------------------------------------------- the projection


@given(histories(), rates, st.integers(min_value=0, max_value=3 * W))
def test_projection_is_never_negative(hs: tuple[History, Decimal], rate: Decimal, ahead: int) -> None:
    history, spend = hs
    assert project(history, spend=spend, rate=rate, now=NOW, window=W, ahead=Decimal(ahead)) >= 0


@given(histories(), rates, rates, st.integers(min_value=1, max_value=W))
def test_projection_is_monotone_in_rate(hs: tuple[History, Decimal], r1: Decimal, r2: Decimal, ahead: int) -> None:
    history, spend = hs
    low, high = sorted((r1, r2))
    p_low = project(history, spend=spend, rate=low, now=NOW, window=W, ahead=Decimal(ahead))
    p_high = project(history, spend=spend, rate=high, now=NOW, window=W, ahead=Decimal(ahead))
    assert p_low <= p_high


@given(histories(), rates)
def test_after_one_window_only_projected_spend_remains(hs: tuple[History, Decimal], rate: Decimal) -> None:
    """Rolling window: every charge in it now has aged out a window later."""
    history, spend = hs
    assert project(history, spend=spend, rate=rate, now=NOW, window=W, ahead=Decimal(W)) == rate * W
    assert project(history, spend=spend, rate=rate, now=NOW, window=W, ahead=Decimal(2 * W)) == rate * W


# ---------------------------------------------------------------- the ETA


@given(histories(), rates, rates, positive_money)
def test_eta_is_monotone_in_rate(hs: tuple[History, Decimal], r1: Decimal, r2: Decimal, extra: Decimal) -> None:
    """A faster burn never exhausts later (``None`` = never)."""
    history, spend = hs
    cap = spend + extra
    low, high = sorted((r1, r2))
    slow = time_to_cap(history, spend=spend, cap=cap, rate=low, now=NOW, window=W)
    fast = time_to_cap(history, spend=spend, cap=cap, rate=high, now=NOW, window=W)
    assert _eta_key(fast) <= _eta_key(slow)


@given(histories(), rates, positive_money, positive_money)
def test_eta_is_monotone_in_cap(hs: tuple[History, Decimal], rate: Decimal, a: Decimal, b: Decimal) -> None:
    history, spend = hs
    small, large = sorted((spend + a, spend + b))
    assert _eta_key(time_to_cap(history, spend=spend, cap=small, rate=rate, now=NOW, window=W)) <= _eta_key(
        time_to_cap(history, spend=spend, cap=large, rate=rate, now=NOW, window=W)
    )


@given(histories(), rates, positive_money)
def test_eta_is_the_first_second_the_projection_reaches_the_cap(
    hs: tuple[History, Decimal], rate: Decimal, extra: Decimal
) -> None:
    history, spend = hs
    cap = spend + extra
    eta = time_to_cap(history, spend=spend, cap=cap, rate=rate, now=NOW, window=W)
    if eta is None:
        assert project(history, spend=spend, rate=rate, now=NOW, window=W, ahead=Decimal(W)) < cap
        return
    assert 0 < eta <= W
    assert project(history, spend=spend, rate=rate, now=NOW, window=W, ahead=Decimal(eta)) >= cap
    assert project(history, spend=spend, rate=rate, now=NOW, window=W, ahead=Decimal(eta - 1)) < cap


@given(histories(), positive_money)
def test_no_eta_without_spend(hs: tuple[History, Decimal], extra: Decimal) -> None:
    history, spend = hs
    assert time_to_cap(history, spend=spend, cap=spend + extra, rate=Decimal(0), now=NOW, window=W) is None


@given(st.integers(min_value=1, max_value=10_000).map(lambda c: Decimal(c) / 100), st.data())
def test_eta_is_none_when_rate_does_not_exceed_the_decay(per_hour: Decimal, data: st.DataObject) -> None:
    """A steady agent whose new spend only replaces what ages out never reaches a cap above
    its current spend."""
    history = _uniform_history(per_hour)
    spend = per_hour * 24
    decay = per_hour / HOUR
    rate = data.draw(st.integers(min_value=0, max_value=1000)) * decay / 1000  # 0 … the decay rate
    cap = spend + data.draw(positive_money)
    assert time_to_cap(history, spend=spend, cap=cap, rate=rate, now=NOW, window=W) is None


@given(positive_money, st.integers(min_value=1, max_value=10**6))
def test_eta_is_exact_for_a_constant_rate_from_nothing(cap: Decimal, per_million: int) -> None:
    """No history: P(h) = r·h, so the ETA is ⌈cap / r⌉ when that is within one window."""
    rate = Decimal(per_million) / 10**6
    eta = time_to_cap(EMPTY, spend=Decimal(0), cap=cap, rate=rate, now=NOW, window=W)
    exact = cap / rate
    assert eta == (math.ceil(exact) if exact <= W else None)


@given(st.integers(min_value=1, max_value=1000).map(lambda c: Decimal(c) / 100), st.integers(2, 20), positive_money)
def test_eta_is_exact_for_a_faster_constant_rate_over_a_steady_history(
    per_hour: Decimal, factor: int, headroom: Decimal
) -> None:
    """Steady history at c per hour, new rate k·c: the window grows by (k−1)·c per hour
    (each old hour leaves as a new one comes), exactly."""
    history = _uniform_history(per_hour)
    spend = per_hour * 24
    rate = per_hour * factor / HOUR
    eta = time_to_cap(history, spend=spend, cap=spend + headroom, rate=rate, now=NOW, window=W)
    exact = Fraction(headroom) * HOUR / (Fraction(per_hour) * (factor - 1))  # growth (k−1)·c per hour
    assume(exact <= W)
    assert eta == math.ceil(exact)


def test_already_at_the_cap_is_now() -> None:
    assert time_to_cap(EMPTY, spend=Decimal("1.00"), cap=Decimal("1.00"), rate=Decimal(0), now=NOW, window=W) == 0


def test_old_spend_ageing_out_postpones_exhaustion() -> None:
    """0.90 of a 1.00 cap, all spent 24 h ago: it leaves the window within the hour. At
    0.10/h a naive S + r·h says one hour; the rolling window says ten (0.10 × 10 h)."""
    history = History((SpendBucket(NOW - 24 * HOUR, HOUR, Decimal("0.90")),), float(NOW))
    spend, cap = Decimal("0.90"), Decimal("1.00")
    assert time_to_cap(history, spend=spend, cap=cap, rate=Decimal("0.10") / HOUR, now=NOW, window=W) == 10 * HOUR
    assert time_to_cap(history, spend=spend, cap=cap, rate=Decimal("0.20") / HOUR, now=NOW, window=W) == 5 * HOUR
    # At 0.04/h the steady state is 0.96 < 1.00: never.
    assert time_to_cap(history, spend=spend, cap=cap, rate=Decimal("0.04") / HOUR, now=NOW, window=W) is None


# ---------------------------------------------------------------- the rate


def test_rate_from_readings_adds_what_aged_out() -> None:
    """The window gained 0.40 in 10 min while 0.60 aged out: 1.00 was spent."""
    history = History((SpendBucket(NOW - W - HOUR, HOUR, Decimal("3.60")),), float(NOW))
    readings = [SpendReading(NOW - 600, Decimal("2.00")), SpendReading(NOW, Decimal("2.40"))]
    rate = burn_rate(history, readings, now=NOW, window=W)
    assert not isinstance(rate, InsufficientData)
    assert ((rate[0] * 600).quantize(Decimal("1e-20")), rate[1]) == (Decimal("1.00"), Basis.READINGS)


def test_rate_falls_back_to_the_history_then_to_insufficient_data() -> None:
    history = History((SpendBucket(NOW - HOUR, HOUR, Decimal("1.20")),), float(NOW))
    rate = burn_rate(history, [SpendReading(NOW, Decimal("1.20"))], now=NOW, window=W)
    assert not isinstance(rate, InsufficientData)
    assert ((rate[0] * HOUR).quantize(Decimal("1e-20")), rate[1]) == (Decimal("1.20"), Basis.HISTORY)
    stale = History(history.buckets, float(NOW - 2 * HOUR))
    assert isinstance(burn_rate(stale, [], now=NOW, window=W), InsufficientData)
    assert isinstance(burn_rate(None, [], now=NOW, window=W), InsufficientData)


def test_the_hour_being_written_counts_from_its_start_to_the_read() -> None:
    """0.50 in the first 10 min of the current hour: 0.50 over those 600 s, not over 3600."""
    bucket = SpendBucket(NOW, HOUR, Decimal("0.50"))
    assert spent_between((bucket,), NOW, NOW + 600, as_of=NOW + 600) == Decimal("0.50")
    assert spent_between((bucket,), NOW, NOW + 300, as_of=NOW + 600) == Decimal("0.25")


@given(histories(), st.lists(st.tuples(st.integers(0, 3600), money), min_size=2, max_size=6))
def test_rate_is_never_negative(hs: tuple[History, Decimal], raw: list[tuple[int, Decimal]]) -> None:
    history, _ = hs
    readings = [SpendReading(NOW - ago, spend) for ago, spend in raw]
    rate = burn_rate(history, readings, now=NOW, window=W)
    assert not isinstance(rate, InsufficientData)
    assert rate[0] >= 0


def test_forecast_window_outcomes() -> None:
    readings = [SpendReading(NOW - 600, Decimal(0)), SpendReading(NOW, Decimal("0.50"))]
    assert forecast_window(spend=Decimal("0.50"), cap=None, history=EMPTY, readings=readings, now=NOW, window=W) == (
        NoCap()
    )
    assert isinstance(
        forecast_window(spend=Decimal("0.50"), cap=Decimal(0), history=EMPTY, readings=readings, now=NOW, window=W),
        NoCap,
    )
    burst = forecast_window(
        spend=Decimal("0.50"), cap=Decimal("1.00"), history=EMPTY, readings=readings, now=NOW, window=W
    )
    assert isinstance(burst, Exhaustion)
    assert (burst.eta_seconds, burst.rate_per_hour.quantize(Decimal("1e-20")), burst.basis) == (
        600,
        Decimal("3.00"),
        Basis.READINGS,
    )
    assert burst.within(600) and not burst.within(599)


# ---------------------------------------------------------------- anomaly

POLICY = AnomalyPolicy(window_seconds=DAILY_SECONDS, baseline_seconds=21 * DAILY_SECONDS, multiple=Decimal(2),
                       min_spend=Decimal("5.00"))  # fmt: skip
multiples = st.integers(min_value=100, max_value=1000).map(lambda n: Decimal(n) / 100)


@st.composite
def policies(draw: st.DrawFn) -> AnomalyPolicy:
    window = draw(st.integers(min_value=1, max_value=7 * 24)) * HOUR
    baseline = draw(st.integers(min_value=1, max_value=30)) * DAILY_SECONDS
    return AnomalyPolicy(window, baseline, draw(multiples), draw(money))


@given(policies(), money, money, money)
def test_anomaly_is_monotone_in_recent_spend(policy: AnomalyPolicy, a: Decimal, b: Decimal, base: Decimal) -> None:
    low, high = sorted((a, b))
    if is_anomalous(policy, AnomalySample(low, base)):
        assert is_anomalous(policy, AnomalySample(high, base))


@given(policies(), money, money, money)
def test_a_higher_baseline_never_makes_an_anomaly(
    policy: AnomalyPolicy, recent: Decimal, a: Decimal, b: Decimal
) -> None:
    low, high = sorted((a, b))
    if is_anomalous(policy, AnomalySample(recent, high)):
        assert is_anomalous(policy, AnomalySample(recent, low))


@given(policies(), money, money)
def test_never_below_the_minimum_spend(policy: AnomalyPolicy, recent: Decimal, base: Decimal) -> None:
    if recent < policy.min_spend:
        assert not is_anomalous(policy, AnomalySample(recent, base))


@given(policies(), money, money)
def test_no_reading_both_fires_and_rearms(policy: AnomalyPolicy, recent: Decimal, base: Decimal) -> None:
    """Hysteresis: the trigger and the re-arm condition never overlap, so one reading cannot
    open and close an episode."""
    sample = AnomalySample(recent, base)
    assert not (is_anomalous(policy, sample) and has_recovered(policy, sample))


@given(policies(), positive_money, multiples)
def test_anomaly_compares_rates_not_totals(policy: AnomalyPolicy, per_hour: Decimal, factor: Decimal) -> None:
    """Recent spend at exactly ``factor`` × the baseline rate fires iff factor > multiple."""
    base = per_hour * (policy.baseline_seconds // HOUR)
    recent = per_hour * factor * (policy.window_seconds // HOUR)
    assume(recent >= policy.min_spend)
    assert is_anomalous(policy, AnomalySample(recent, base)) == (factor > policy.multiple)
    assert ratio(policy, AnomalySample(recent, base)) == factor


def test_quiet_doubling_over_three_weeks() -> None:
    """21 days at 10.00/day, then 25.00 in one day: 2.5 × the baseline rate."""
    sample = AnomalySample(recent=Decimal("25.00"), baseline=Decimal("210.00"))
    assert is_anomalous(POLICY, sample)
    assert not has_recovered(POLICY, AnomalySample(Decimal("17.00"), Decimal("210.00")))  # 1.7× ≥ 0.8 × 2
    assert has_recovered(POLICY, AnomalySample(Decimal("16.00"), Decimal("210.00")))  # 1.6× = 0.8 × 2
    assert not is_anomalous(POLICY, AnomalySample(Decimal("4.99"), Decimal(0)))  # idle agent's first calls
    assert is_anomalous(POLICY, AnomalySample(Decimal("5.00"), Decimal(0)))
    assert has_recovered(POLICY, AnomalySample(Decimal("3.99"), Decimal(0)))  # < 0.8 × minSpend
    assert Decimal("0.8") == REARM_FRACTION


@settings(max_examples=50)
@given(histories(), rates, positive_money)
def test_forecast_agrees_with_time_to_cap(hs: tuple[History, Decimal], rate: Decimal, extra: Decimal) -> None:
    """``forecast_window`` with a history-based rate gives the ETA of that rate."""
    history, spend = hs
    f = forecast_window(spend=spend, cap=spend + extra, history=history, readings=[], now=NOW, window=W)
    assert isinstance(f, Exhaustion) and f.basis is Basis.HISTORY
    assert f.eta_seconds == time_to_cap(history, spend=spend, cap=spend + extra, rate=f.rate, now=NOW, window=W)
