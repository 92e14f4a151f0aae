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

import itertools
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

_PRECISION = 60
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
    """The bucket holding ``as_of`` covers only its start up to the read."""
    end = Decimal(bucket.end)
    if as_of is not None and Decimal(bucket.start) < as_of < end:
        return as_of
    return end


def spent_between(
    buckets: Iterable[SpendBucket], start: float | Decimal, end: float | Decimal, *, as_of: float | None = None
) -> Decimal:
    """Spend recorded in ``[start, end)``, each bucket's cost spread evenly over it (up to
    ``as_of`` for the bucket being written when it was read)."""
    s, e = _d(start), _d(end)
    cut = _d(as_of) if as_of is not None else None
    if e <= s:
        return ZERO
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        total = ZERO
        for b in buckets:
            b0, b1 = Decimal(b.start), _effective_end(b, cut)
            width = b1 - b0
            if width <= 0:
                if s <= b0 < e:
                    total += b.cost  # a bucket read at its very first instant: a point
                continue
            part = _overlap(b0, b1, s, e)
            if part > 0:
                total += b.cost * part / width
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
) -> tuple[Decimal, Basis] | InsufficientData:
    """Credits per second (never negative) and where it came from (module doc)."""
    if history is None:
        return InsufficientData("no usage history (the gateway's timeseries could not be read)")
    t_now = _d(now)
    recent = sorted((r for r in readings if t_now - lookback <= _d(r.at) <= t_now), key=lambda r: r.at)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        if len(recent) >= 2 and _d(recent[-1].at) - _d(recent[0].at) >= min_span:
            first, last = recent[0], recent[-1]
            t0, t1 = _d(first.at), _d(last.at)
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
    history: History, *, spend: Decimal, cap: Decimal, rate: Decimal, now: float, window: int
) -> int | None:
    """Seconds until ``P(h) ≥ cap``, rounded up; 0 if already there; ``None`` if never."""
    if spend >= cap:
        return 0
    if rate <= 0:
        return None
    t_now = _d(now)
    points = {ZERO, Decimal(window)}
    for b in history.buckets:
        for edge in (Decimal(b.start), _effective_end(b, _d(history.as_of))):
            h = edge + window - t_now
            if 0 < h < window:
                points.add(h)
    ordered = sorted(points)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        before = project(history, spend=spend, rate=rate, now=now, window=window, ahead=ZERO)
        for h0, h1 in itertools.pairwise(ordered):
            after = project(history, spend=spend, rate=rate, now=now, window=window, ahead=h1)
            if after >= cap:
                slope = (after - before) / (h1 - h0)
                exact = h0 + (cap - before) / slope  # slope > 0: before < cap ≤ after
                # To the microsecond first: a rate such as 0.03/3600 does not terminate, and
                # its last digit must not add a whole second.
                return math.ceil(exact.quantize(_MICRO, rounding=ROUND_HALF_EVEN))
            before = after
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
    rate = burn_rate(history, readings, now=now, window=window, lookback=lookback, min_span=min_span)
    if isinstance(rate, InsufficientData):
        return rate
    per_second, basis = rate
    assert history is not None  # burn_rate refuses None
    eta = time_to_cap(history, spend=spend, cap=cap, rate=per_second, now=now, window=window)
    return Exhaustion(window, spend, cap, per_second, eta, basis)
