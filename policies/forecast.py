"""Burn-rate forecast: when will an agent's rolling-window spend reach its cap?

GreenHelix's budget windows are *rolling* (API.md §4): ``daily_spend`` is the spend of the
last 86 400 s, ``monthly_spend`` of the last 30 × 86 400 s. Nothing resets; spend also
*leaves* the window as it ages. So the projection ``h`` seconds ahead is

    P(h) = S + r·h − A(h)

where ``S`` is the window's spend now (the gateway's own figure), ``r`` the burn rate and
``A(h)`` the spend that ages out between now and now + h, i.e. the spend recorded between
now − W and now − W + h, known from the gateway's usage timeseries (hourly buckets).

**Burn rate** (credits per second), from the most direct evidence available:

1. finops' own successive readings of the window spend (``SpendReading``, one per alert
   check), over the last ``lookback`` (default 1 h), at least ``min_span`` (5 min) apart:
   the gross spend between the first and the last is ``S₁ − S₀ + A(t₀, t₁)`` (what the
   window gained plus what aged out meanwhile); ``r`` = gross / elapsed.
2. Otherwise the timeseries itself (``History``): the spend in the ``lookback`` before the
   history was read, divided by ``lookback``. The hour being written is counted from its
   start to the time of the read.
3. Otherwise: ``InsufficientData`` (no usage history could be read, or it is older than the
   lookback and finops has not watched the agent long enough).

**Exhaustion time** (ETA): the first ``h`` with ``P(h) ≥ cap``. ``P`` is piecewise linear
(buckets are assumed to be spent evenly within themselves), so it is found exactly at the
bucket boundaries, then rounded *up* to whole seconds. ``0`` when spend already reaches the
cap. ``None`` when it never does: the rate is zero, or the window's steady state at this
rate (``r·W``, every older charge aged out) stays under the cap. A window without a cap or
with cap 0 (a hold) has no forecast (``NoCap``).

**Limits** (state them to users): the rate is a straight-line extrapolation of the last
hour, so a burst that stops is still projected for up to an hour, and a ramp is followed
with a lag; spend inside a bucket is assumed uniform (an hour for the daily window; older
history may be kept per day, which matters for the monthly window's decay); when the
history adds up to more than the gateway's window spend (the gateway undercounts repeated
idempotency keys, API.md §4) it is scaled down to agree; spend the history does not show
yet (read before it happened) is assumed *not* to age out within the window, which can only
make the ETA earlier (the safe side for a circuit breaker). Admin calls and ``/v1/batch``
spend are in the window like any other (the gateway counts them).

Everything here is pure: plain values in, plain values out, the clock passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from enum import StrEnum

HOUR = 3600
DAILY_SECONDS = 86_400
MONTHLY_SECONDS = 30 * 86_400
WINDOW_SECONDS = {"daily": DAILY_SECONDS, "monthly": MONTHLY_SECONDS}

DEFAULT_LOOKBACK = HOUR
"""How far back the burn rate looks."""
MIN_SPAN = 300
"""Readings closer together than this are too noisy to give a rate from alone."""

_PRECISION = 40
_MICRO = Decimal("0.000001")
ZERO = Decimal(0)


def _d(value: float | int | Decimal) -> Decimal:
    """A time as a Decimal: exact for ints, the shortest repr for floats (a clock's float)."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    return Decimal(repr(value))


@dataclass(frozen=True)
class SpendBucket:
    """Spend recorded in ``[start, start + seconds)`` (credits), as the timeseries reports
    it: ``start`` unix seconds, ``seconds`` 3600 for an hour, 86 400 for a day."""

    start: int
    seconds: int
    cost: Decimal

    @property
    def end(self) -> int:
        return self.start + self.seconds


@dataclass(frozen=True)
class History:
    """The buckets read from the gateway's timeseries, and when they were read: spend up to
    ``as_of`` is in them (the bucket that contains ``as_of`` holds only what was spent
    from its start to ``as_of``). Buckets without spend may be absent: absent means 0."""

    buckets: tuple[SpendBucket, ...]
    as_of: float


@dataclass(frozen=True)
class SpendReading:
    """A window's spend as the gateway reported it at ``at`` (``GET …/budget``)."""

    at: float
    spend: Decimal


class Basis(StrEnum):
    """Where the burn rate came from."""

    READINGS = "readings"
    HISTORY = "history"


@dataclass(frozen=True)
class Exhaustion:
    """A forecast for one window. ``eta_seconds`` ``None``: the cap is never reached at
    this rate; 0: already reached. ``rate`` is credits per second (exact)."""

    window_seconds: int
    spend: Decimal
    cap: Decimal
    rate: Decimal
    eta_seconds: int | None
    basis: Basis

    @property
    def rate_per_hour(self) -> Decimal:
        return self.rate * HOUR

    def within(self, horizon_seconds: int) -> bool:
        return self.eta_seconds is not None and self.eta_seconds <= horizon_seconds


@dataclass(frozen=True)
class InsufficientData:
    """Not enough data for a rate (``reason`` says which); nothing is decided from it."""

    reason: str


@dataclass(frozen=True)
class NoCap:
    """The window has no cap (``None``) or cap 0 (a hold): nothing to exhaust."""


WindowForecast = Exhaustion | InsufficientData | NoCap


def _overlap(a0: Decimal, a1: Decimal, b0: Decimal, b1: Decimal) -> Decimal:
    return max(ZERO, min(a1, b1) - max(a0, b0))


def _effective_end(bucket: SpendBucket, as_of: Decimal | None) -> Decimal:
    """The bucket holding ``as_of`` covers only its start up to the read (at least one
    second: a bucket read in its first instant)."""
    if as_of is not None and bucket.start <= as_of < bucket.end:
        return max(as_of, Decimal(bucket.start + 1))
    return Decimal(bucket.end)


def spent_between(
    buckets: Iterable[SpendBucket], start: float | Decimal, end: float | Decimal, *, as_of: float | None = None
) -> Decimal:
    """Spend recorded in ``[start, end)``, each bucket's cost spread evenly over it (up to
    ``as_of`` for the bucket being written when it was read)."""
    s, e = _d(start), _d(end)
    if e <= s:
        return ZERO
    lo, hi = math.floor(s), math.ceil(e)  # whole seconds: buckets outside are skipped without Decimal work
    cut = _d(as_of) if as_of is not None else None
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        total = ZERO
        for b in buckets:
            if b.start >= hi or b.end <= lo or not b.cost:
                continue
            if s <= b.start and b.end <= e and (cut is None or b.end <= cut):
                total += b.cost  # wholly inside, and complete
                continue
            b0, b1 = Decimal(b.start), _effective_end(b, cut)
            part = _overlap(b0, b1, s, e)
            if part > 0:
                total += b.cost if part == b1 - b0 else b.cost * part / (b1 - b0)
        return total


def _window_scale(history: History, now: Decimal, window: int, spend: Decimal) -> Decimal:
    """Factor (≤ 1) that makes the history's total for the window agree with the gateway's
    spend when the history shows more (see the module's limits)."""
    shown = spent_between(history.buckets, now - window, now, as_of=history.as_of)
    if shown <= spend or shown <= 0:
        return Decimal(1)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return spend / shown


def aged_out(
    history: History, start: float | Decimal, end: float | Decimal, window: int, scale: Decimal = Decimal(1)
) -> Decimal:
    """Spend that leaves a rolling ``window`` between ``start`` and ``end``: what was
    recorded between ``start − window`` and ``end − window``."""
    s, e = _d(start), _d(end)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return scale * spent_between(history.buckets, s - window, e - window, as_of=history.as_of)


def burn_rate(
    history: History | None,
    readings: Sequence[SpendReading],
    *,
    now: float,
    window: int,
    lookback: int = DEFAULT_LOOKBACK,
    min_span: int = MIN_SPAN,
    scale: Decimal | None = None,
) -> tuple[Decimal, Basis] | InsufficientData:
    """Credits per second (never negative) and where it came from (module doc). ``scale``:
    the history's agreement factor with the gateway's spend, if already computed."""
    if history is None:
        return InsufficientData("no usage history (the gateway's timeseries could not be read)")
    t_now = _d(now)
    recent = sorted((r for r in readings if t_now - lookback <= _d(r.at) <= t_now), key=lambda r: r.at)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        if len(recent) >= 2 and _d(recent[-1].at) - _d(recent[0].at) >= min_span:
            first, last = recent[0], recent[-1]
            t0, t1 = _d(first.at), _d(last.at)
            if scale is None:
                scale = _window_scale(history, t1, window, last.spend)
            gross = last.spend - first.spend + aged_out(history, t0, t1, window, scale)
            return max(ZERO, gross) / (t1 - t0), Basis.READINGS
        as_of = _d(history.as_of)
        if as_of < t_now - lookback:
            return InsufficientData(
                f"usage history is {int(t_now - as_of)} s old and finops has watched this agent for less than "
                f"{min_span} s"
            )
        spent = spent_between(history.buckets, as_of - lookback, as_of, as_of=history.as_of)
        return max(ZERO, spent) / lookback, Basis.HISTORY


def project(history: History, *, spend: Decimal, rate: Decimal, now: float, window: int, ahead: Decimal) -> Decimal:
    """``P(ahead)``: the window's spend ``ahead`` seconds from now at ``rate`` (≥ 0)."""
    t_now = _d(now)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        scale = _window_scale(history, t_now, window, spend)
        h = min(max(ZERO, ahead), Decimal(window))
        # Beyond one window every older charge has aged out: P stays at P(window).
        gone = min(spend, aged_out(history, t_now, t_now + h, window, scale))
        return spend + rate * h - gone


def time_to_cap(
    history: History,
    *,
    spend: Decimal,
    cap: Decimal,
    rate: Decimal,
    now: float,
    window: int,
    scale: Decimal | None = None,
) -> int | None:
    """Seconds until ``P(h) ≥ cap``, rounded up; 0 if already there; ``None`` if never.

    One sweep over the bucket edges (``P`` is linear between them, with slope ``rate`` minus
    the density of what is ageing out), so it costs O(n log n) in the buckets; ``project``
    is the definition it agrees with."""
    if spend >= cap:
        return 0
    if rate <= 0:
        return None
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        if spend + rate * window < cap:
            return None  # ageing out only lowers P: P(h) ≤ S + r·min(h, W)
        t_now, as_of, w = _d(now), _d(history.as_of), Decimal(window)
        if scale is None:
            scale = _window_scale(history, t_now, window, spend)
        changes: dict[Decimal, Decimal] = {}
        oldest, newest = math.floor(t_now) - window, math.ceil(t_now)
        for b in history.buckets:
            if b.end <= oldest or b.start >= newest or not b.cost:
                continue  # not in the window: nothing of it ages out in the next one
            b0 = Decimal(b.start)
            b1 = _effective_end(b, as_of)
            lo, hi = max(b0 + w - t_now, ZERO), min(b1 + w - t_now, w)
            if hi <= lo or b.cost == 0:
                continue
            density = scale * b.cost / (b1 - b0)
            changes[lo] = changes.get(lo, ZERO) + density
            changes[hi] = changes.get(hi, ZERO) - density
        h_prev, p_prev, ageing = ZERO, spend, changes.pop(ZERO, ZERO)
        for h in sorted({*changes, w}):
            slope = rate - ageing
            p_h = p_prev + slope * (h - h_prev)
            if p_h >= cap:
                exact = h_prev + (cap - p_prev) / slope  # slope > 0: p_prev < cap ≤ p_h
                # To the microsecond first: a rate such as 0.03/3600 does not terminate, and
                # its last digit must not add a whole second.
                return math.ceil(exact.quantize(_MICRO, rounding=ROUND_HALF_EVEN))
            ageing += changes.get(h, ZERO)
            h_prev, p_prev = h, p_h
    return None


def forecast_window(
    *,
    spend: Decimal,
    cap: Decimal | None,
    history: History | None,
    readings: Sequence[SpendReading],
    now: float,
    window: int,
    lookback: int = DEFAULT_LOOKBACK,
    min_span: int = MIN_SPAN,
) -> WindowForecast:
    """The forecast of one window (module doc): ``NoCap``, ``InsufficientData`` or an
    ``Exhaustion`` with its ETA."""
    if cap is None or cap <= 0:
        return NoCap()
    if history is None:
        return InsufficientData("no usage history (the gateway's timeseries could not be read)")
    scale = _window_scale(history, _d(now), window, spend)
    rate = burn_rate(history, readings, now=now, window=window, lookback=lookback, min_span=min_span, scale=scale)
    if isinstance(rate, InsufficientData):
        return rate
    per_second, basis = rate
    eta = time_to_cap(history, spend=spend, cap=cap, rate=per_second, now=now, window=window, scale=scale)
    return Exhaustion(window, spend, cap, per_second, eta, basis)
