"""The data behind forecast and anomaly alerts: usage history and spend readings, read on
a budget.

``GET …/timeseries`` is one request per agent. At 10,000 agents it must not be read on every
alerts check, and it need not be: completed hours never change. ``SignalCache`` keeps, per
agent that declares a forecast or an anomaly rule (no other agent is ever read):

- its usage history (hourly for the last two days, per UTC day before that, as compact
  integer arrays: at most about 80 buckets, 3.5 KB per agent with its readings), re-read when it is missing,
  older than ``max_age`` (one hour: a new hour has completed), or when the change feed says
  the agent moved (``moved``; ``None`` = no feed: the cache's age alone decides, which is
  enough because the recent rate comes from the readings below, not from the history);
- finops' own readings of the agent's daily and monthly spend, one per check, from the
  budget reads the threshold alerts make anyway (no extra request), thinned to one per
  ``reading_gap`` over the forecast's lookback.

The daemon keeps one cache for its lifetime; ``finops alerts check`` and ``finops status``
start with an empty one (one history read per declaring agent, the rate from the history).
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from controller.gateway.client import GatewayClient
from controller.gateway.errors import GatewayError
from policies.alerts import BudgetReading, WindowReading
from policies.anomaly import AnomalyPolicy, AnomalySample
from policies.currency import CREDITS, to_credits
from policies.forecast import (
    DAILY_SECONDS,
    DEFAULT_LOOKBACK,
    HOUR,
    MIN_SPAN,
    MONTHLY_SECONDS,
    WINDOW_SECONDS,
    History,
    SpendBucket,
    SpendReading,
    WindowForecast,
    forecast_window,
    spent_between,
)
from policies.signal_alerts import AnomalyReading, ForecastReading, SignalKind
from policies.spec import AgentSpec

HISTORY_MAX_AGE = HOUR
"""A history older than this is read again (a new hour has completed since)."""
HOURLY_KEEP = 2 * DAILY_SECONDS
"""Hours older than this are kept per UTC day (enough for the monthly window's decay and
the anomaly baseline)."""
READING_GAP = MIN_SPAN
"""Readings are kept at least this far apart (the newest always)."""
_ATOMIC = Decimal("1e-8")


def declared_kinds(spec: AgentSpec) -> frozenset[SignalKind]:
    kinds = set()
    if spec.forecast_horizon is not None:
        kinds.add(SignalKind.FORECAST)
    if spec.anomaly is not None:
        kinds.add(SignalKind.ANOMALY)
    return frozenset(kinds)


def history_span(spec: AgentSpec) -> int:
    """How far back this agent's history must reach, in seconds."""
    need = 0
    if spec.forecast_horizon is not None:
        need = MONTHLY_SECONDS + DEFAULT_LOOKBACK
    if spec.anomaly is not None:
        need = max(need, spec.anomaly.window_seconds + spec.anomaly.baseline_seconds)
    return need + HOUR


@dataclass
class _Packed:
    """One agent's history: bucket starts, widths and costs in atomic units (1e-8)."""

    as_of: float
    starts: array[int]
    widths: array[int]
    atomic: array[int]

    def history(self) -> History:
        return History(
            tuple(
                SpendBucket(s, w, Decimal(a).scaleb(-8))
                for s, w, a in zip(self.starts, self.widths, self.atomic, strict=True)
            ),
            self.as_of,
        )


def pack(buckets: Iterable[SpendBucket], as_of: float) -> _Packed:
    """Hourly buckets older than ``HOURLY_KEEP`` merged per UTC day; costs to atomic units
    (the gateway's own resolution; anything finer is rounded half-even, for estimation only)."""
    days: dict[int, int] = {}
    recent: list[tuple[int, int, int]] = []
    cut = as_of - HOURLY_KEEP
    for b in sorted(buckets, key=lambda b: b.start):
        atomic = int((b.cost / _ATOMIC).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
        if b.end <= cut:
            day = b.start - b.start % DAILY_SECONDS
            days[day] = days.get(day, 0) + atomic
        else:
            recent.append((b.start, b.seconds, atomic))
    rows = [(d, DAILY_SECONDS, a) for d, a in sorted(days.items())] + recent
    try:
        return _Packed(
            as_of,
            array("q", (r[0] for r in rows)),
            array("q", (r[1] for r in rows)),
            array("q", (r[2] for r in rows)),
        )
    except OverflowError:
        # Beyond 64-bit atomic units: more than the gateway can store; not a usage history.
        raise ValueError("usage history out of range (beyond what the gateway can store)") from None


@dataclass
class _Readings:
    """Times, and daily and monthly spend in atomic units (1e-8 credits): compact arrays."""

    at: array[float] = field(default_factory=lambda: array("d"))
    daily: array[int] = field(default_factory=lambda: array("q"))
    monthly: array[int] = field(default_factory=lambda: array("q"))


def _atomic(amount: Decimal) -> int:
    return int((amount / _ATOMIC).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


class SignalCache:
    """Per-agent history and readings for forecasts and anomalies (module doc)."""

    def __init__(
        self, *, max_age: float = HISTORY_MAX_AGE, lookback: int = DEFAULT_LOOKBACK, reading_gap: float = READING_GAP
    ) -> None:
        self.max_age = max_age
        self.lookback = lookback
        self.reading_gap = reading_gap
        self._history: dict[str, _Packed] = {}
        self._readings: dict[str, _Readings] = {}
        self.history_reads = 0
        """Timeseries requests made through this cache (for tests, logs and metrics)."""

    def stale(self, agent_id: str, now: float, moved: frozenset[str] | None) -> bool:
        packed = self._history.get(agent_id)
        if packed is None or now - packed.as_of >= self.max_age or now < packed.as_of:
            return True
        return moved is not None and agent_id in moved

    def put_history(self, agent_id: str, buckets: Iterable[SpendBucket], as_of: float) -> None:
        self._history[agent_id] = pack(buckets, as_of)

    def history(self, agent_id: str) -> History | None:
        packed = self._history.get(agent_id)
        return None if packed is None else packed.history()

    def add_reading(self, agent_id: str, at: float, daily: Decimal, monthly: Decimal) -> None:
        r = self._readings.setdefault(agent_id, _Readings())
        if r.at and at < r.at[-1]:
            self._readings[agent_id] = r = _Readings()  # the clock went back: start over
        keep = next((i for i, t in enumerate(r.at) if t >= at - self.lookback), len(r.at))
        del r.at[:keep], r.daily[:keep], r.monthly[:keep]
        try:
            values = (_atomic(daily), _atomic(monthly))
            if len(r.at) >= 2 and r.at[-1] - r.at[-2] < self.reading_gap:
                r.at[-1], (r.daily[-1], r.monthly[-1]) = at, values
            else:
                r.at.append(at)
                r.daily.append(values[0])
                r.monthly.append(values[1])
        except OverflowError:  # beyond what the gateway can store: not a reading
            self._readings[agent_id] = _Readings()

    def readings(self, agent_id: str, window: str) -> list[SpendReading]:
        r = self._readings.get(agent_id)
        if r is None:
            return []
        values = r.daily if window == "daily" else r.monthly
        return [SpendReading(t, Decimal(v).scaleb(-8)) for t, v in zip(r.at, values, strict=True)]

    def retain(self, agent_ids: Iterable[str]) -> None:
        """Forget agents no longer declared (or no longer declaring a signal)."""
        keep = set(agent_ids)
        for store in (self._history, self._readings):
            for gone in [a for a in store if a not in keep]:
                del store[gone]


@dataclass
class Signals:
    """What one check learned: per agent its forecasts and anomaly sample."""

    forecasts: list[ForecastReading] = field(default_factory=list)
    anomalies: list[AnomalyReading] = field(default_factory=list)
    declared: dict[str, frozenset[SignalKind]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    history_reads: int = 0


def _to_bucket(start: datetime, seconds: int, cost: Decimal) -> SpendBucket:
    return SpendBucket(int(start.timestamp()), seconds, cost)


async def _read_history(client: GatewayClient, spec: AgentSpec, now: float) -> list[SpendBucket]:
    span = history_span(spec)
    rows = await client.timeseries(spec.agent_id, interval="hour", since=now - span, limit=span // HOUR + 2)
    return [_to_bucket(r.start, HOUR, r.cost) for r in rows]


async def _refresh(
    client: GatewayClient, specs: Sequence[AgentSpec], cache: SignalCache, now: float, moved: frozenset[str] | None
) -> dict[str, str]:
    due = [s for s in specs if cache.stale(s.agent_id, now, moved)]
    results = await asyncio.gather(*(_read_history(client, s, now) for s in due), return_exceptions=True)
    errors: dict[str, str] = {}
    for spec, result in zip(due, results, strict=True):
        cache.history_reads += 1
        if isinstance(result, GatewayError):
            errors[spec.agent_id] = f"cannot read usage history: {result}"  # an older history stays usable
        elif isinstance(result, BaseException):
            raise result
        else:
            try:
                cache.put_history(spec.agent_id, result, now)
            except ValueError as exc:
                errors[spec.agent_id] = f"cannot use usage history: {exc}"
    return errors


def anomaly_sample(
    policy: AnomalyPolicy, history: History | None, daily_spend: Decimal, now: float
) -> AnomalySample | None:
    """Recent and baseline spend: the recent window is the gateway's exact ``daily_spend``
    when it is 24 h, else the history's; the baseline comes from the history."""
    if history is None:
        return None
    window = policy.window_seconds
    if window == DAILY_SECONDS:
        recent = daily_spend
    else:
        recent = spent_between(history.buckets, now - window, now, as_of=history.as_of)
    baseline = spent_between(history.buckets, now - window - policy.baseline_seconds, now - window, as_of=history.as_of)
    return AnomalySample(recent, baseline)


def forecasts_for(
    reading: BudgetReading, history: History | None, cache: SignalCache, now: float
) -> dict[str, WindowForecast]:
    out: dict[str, WindowForecast] = {}
    for name, seconds in WINDOW_SECONDS.items():
        live = reading.window(name)
        out[name] = forecast_window(
            spend=live.spend,
            cap=live.cap,
            history=history,
            readings=cache.readings(reading.agent_id, name),
            now=now,
            window=seconds,
            lookback=cache.lookback,
        )
    return out


def _decide_inputs(
    out: Signals,
    declaring: Sequence[BudgetReading],
    specs: Mapping[str, AgentSpec],
    cache: SignalCache,
    rates: Mapping[str, Decimal | None],
    currencies: Mapping[str, str],
    now: float,
) -> None:
    """Each declaring agent's forecasts and anomaly sample, into ``out`` (pure arithmetic)."""
    for r in declaring:
        spec = specs[r.agent_id]
        history = cache.history(r.agent_id)
        if spec.forecast_horizon is not None:
            out.forecasts.append(
                ForecastReading(r.agent_id, r.fleet, spec.forecast_horizon, forecasts_for(r, history, cache, now))
            )
        if spec.anomaly is not None:
            rate = rates.get(currencies[spec.fleet])
            rule = spec.anomaly
            if rate is None:
                out.anomalies.append(
                    AnomalyReading(r.agent_id, r.fleet, AnomalyPolicy(1, 1, rule.multiple, rule.min_spend), None)
                )
                continue
            policy = AnomalyPolicy(
                rule.window_seconds, rule.baseline_seconds, rule.multiple, to_credits(rule.min_spend, rate)
            )
            out.anomalies.append(
                AnomalyReading(r.agent_id, r.fleet, policy, anomaly_sample(policy, history, r.daily.spend, now))
            )


async def collect_signals(
    client: GatewayClient,
    specs: Mapping[str, AgentSpec],
    readings: Sequence[BudgetReading],
    cache: SignalCache,
    *,
    now: float,
    moved: frozenset[str] | None,
    currencies: Mapping[str, str],
) -> Signals:
    """Forecasts and anomaly samples of every read agent that declares either (module doc).
    ``currencies``: each fleet's currency (``minSpend`` is converted to credits at the
    gateway's rate). One agent's failure is its own: it gets no decision this check."""
    out = Signals()
    out.declared = {r.agent_id: declared_kinds(specs[r.agent_id]) for r in readings}  # the others' slots go
    declaring = [r for r in readings if out.declared[r.agent_id]]
    cache.retain(a for a, s in specs.items() if declared_kinds(s))
    if not declaring:
        return out
    for r in declaring:
        cache.add_reading(r.agent_id, now, r.daily.spend, r.monthly.spend)
    before = cache.history_reads
    out.errors.update(await _refresh(client, [specs[r.agent_id] for r in declaring], cache, now, moved))
    out.history_reads = cache.history_reads - before
    rates: dict[str, Decimal | None] = {CREDITS: Decimal(1)}
    for currency in {currencies[specs[r.agent_id].fleet] for r in declaring if specs[r.agent_id].anomaly}:
        if currency not in rates:
            try:
                rates[currency] = await client.exchange_rate(currency, CREDITS)
            except GatewayError as exc:
                rates[currency] = None
                out.errors[f"rate {currency}"] = f"cannot read the {currency} exchange rate: {exc}"
    # Decimal arithmetic for thousands of agents: off the event loop, so the daemon's other
    # jobs and listeners keep running while it computes.
    await asyncio.to_thread(_decide_inputs, out, declaring, specs, cache, rates, currencies, now)
    return out


async def read_forecasts(
    client: GatewayClient,
    specs: Sequence[AgentSpec],
    budgets: Mapping[str, tuple[WindowReading, WindowReading]],
    now: float,
) -> dict[str, dict[str, WindowForecast] | str]:
    """For ``finops status``: each agent that declares a forecast horizon, its daily and
    monthly forecast from a fresh history read (the rate from the last hour of it), or why
    there is none. ``budgets``: the agent's (daily, monthly) windows as just observed."""
    declaring = [s for s in specs if s.forecast_horizon is not None and s.agent_id in budgets]
    cache = SignalCache()
    errors = await _refresh(client, declaring, cache, now, None)
    out: dict[str, dict[str, WindowForecast] | str] = {}
    for spec in declaring:
        if spec.agent_id in errors:
            out[spec.agent_id] = errors[spec.agent_id]
            continue
        daily, monthly = budgets[spec.agent_id]
        reading = BudgetReading(spec.agent_id, spec.fleet, spec.alert_thresholds, daily, monthly)
        out[spec.agent_id] = forecasts_for(reading, cache.history(spec.agent_id), cache, now)
    return out
