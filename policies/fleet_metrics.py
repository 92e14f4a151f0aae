"""Per-agent gauges: one typed snapshot per agent, built by a pure function from what the
daemon already knows (a budget reading, the balance, holds, the key finops holds, a forecast).

``controller.daemon.metrics.update_agent_metrics`` exports a list of these snapshots; the
daemon decides where each figure comes from. Every field that was not observed is ``None``
and produces no series (a missing sample is honest; a 0 would be a lie a rule could fire on).

Cardinality is bounded by the agent count: each agent's series carry ``agent``, ``fleet`` and
only the manifest labels its fleet declares in ``spec.metrics.labels`` (at most
``MAX_METRIC_LABELS`` keys, values at most ``MAX_LABEL_VALUE`` characters, both checked when
the manifests are loaded). A label an agent has but its fleet does not declare never becomes
a label name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

from policies.forecast import Exhaustion, WindowForecast
from policies.rotation import next_rotation
from policies.spec import AgentSpec, DesiredState

__all__ = [
    "HOLD_KINDS",
    "MAX_LABEL_VALUE",
    "MAX_METRIC_LABELS",
    "RESERVED_LABELS",
    "AgentGauges",
    "KeyAge",
    "WindowGauges",
    "agent_gauges",
    "fleet_gauges",
    "hold_kind",
    "metric_label_name",
    "metric_label_problem",
]

MAX_METRIC_LABELS = 5
"""Manifest label keys a fleet may export as Prometheus labels."""
MAX_LABEL_VALUE = 64
"""Longest label value exported (checked at load time, never truncated)."""

HOLD_KINDS: tuple[str, ...] = ("freeze", "auto", "pause")
"""``finops_agent_hold_active{kind}``: an operator's ``finops freeze`` and finops' own
automatic hold (a new agent whose caps could not be set yet). Other actions (the escalation
ladder's ``pause``) extend this tuple; every kind is exported 0 or 1 for every agent, so a
hold's first appearance is a change Prometheus sees, not a new series."""

RESERVED_LABELS = frozenset({"agent", "fleet", "window", "kind", "job", "instance", "le", "quantile", "version"})
"""Label names the exporter or Prometheus itself uses."""

_LABEL_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")


def metric_label_name(key: str) -> str:
    """The Prometheus label name of manifest label ``key``: ``cost-center`` → ``cost_center``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def metric_label_problem(keys: tuple[str, ...]) -> str | None:
    """``None`` when ``spec.metrics.labels`` is acceptable, else a one-line reason."""
    if len(keys) > MAX_METRIC_LABELS:
        return f"at most {MAX_METRIC_LABELS} labels may be exported as metric labels, got {len(keys)}"
    seen: dict[str, str] = {}
    for key in keys:
        if not _LABEL_KEY.match(key):
            return f"label key {key!r} must start with a letter and hold only letters, digits, '_', '.' or '-'"
        name = metric_label_name(key)
        if name in RESERVED_LABELS or name.startswith("__"):
            return f"label key {key!r} would be exported as {name!r}, a label name finops or Prometheus already uses"
        if name in seen:
            return f"label keys {seen[name]!r} and {key!r} would both be exported as {name!r}"
        seen[name] = key
    return None


@dataclass(frozen=True)
class WindowGauges:
    """One rolling window (daily = 24 h, monthly = 30 d) in gateway credits."""

    spend: Decimal
    cap: Decimal | None
    """``None``: no cap on this window."""
    forecast_exhaustion_s: float | None = None
    """Seconds until spend is projected to reach the cap (``forecast``'s estimator);
    ``None``: no estimate (too few samples, no cap, or not spending)."""

    @property
    def utilization(self) -> Decimal | None:
        """spend / cap as a ratio (1 = at the cap), ``None`` without a positive cap (a
        ``finops freeze`` sets caps to 0: its hold gauge says so instead)."""
        if self.cap is None or self.cap <= 0:
            return None
        return self.spend / self.cap


@dataclass(frozen=True)
class KeyAge:
    """The key finops holds for an agent: its age and when it is next due for rotation
    (negative when overdue)."""

    age_s: float
    next_rotation_s: float


@dataclass(frozen=True)
class AgentGauges:
    """Everything exported about one agent; ``None`` fields produce no series."""

    agent_id: str
    fleet: str
    labels: tuple[tuple[str, str], ...] = ()
    """(Prometheus label name, value) for the fleet's declared ``spec.metrics.labels``, in
    declared order; an agent without the label exports an empty value (= absent)."""
    balance: Decimal | None = None
    daily: WindowGauges | None = None
    monthly: WindowGauges | None = None
    holds: frozenset[str] = frozenset()
    """The kinds (``HOLD_KINDS``) active on this agent."""
    key: KeyAge | None = None
    observed_at: float | None = None
    """Clock time of the newest reading in this snapshot (staleness on the dashboard)."""

    def window(self, name: str) -> WindowGauges | None:
        return self.daily if name == "daily" else self.monthly


def _labels(spec: AgentSpec, declared: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((metric_label_name(key), spec.labels.get(key, "")) for key in declared)


def agent_gauges(
    spec: AgentSpec,
    *,
    declared_labels: tuple[str, ...] = (),
    balance: Decimal | None = None,
    daily: WindowGauges | None = None,
    monthly: WindowGauges | None = None,
    hold_kinds: frozenset[str] = frozenset(),
    key_since: float | None = None,
    observed_at: float | None = None,
    now: float,
) -> AgentGauges:
    """One agent's snapshot at ``now`` (seconds since the epoch, passed in).

    ``key_since`` is when finops got the key it holds (``None``: it holds none, or the key
    is not managed: no key series); the next rotation follows the agent's declared schedule
    (``policies.rotation``)."""
    key: KeyAge | None = None
    if key_since is not None and spec.keys.manage:
        at = datetime.fromtimestamp(now, UTC)
        due = next_rotation(spec.keys.rotation, datetime.fromtimestamp(key_since, UTC), at)
        key = KeyAge(age_s=max(0.0, now - key_since), next_rotation_s=(due - at).total_seconds())
    return AgentGauges(
        agent_id=spec.agent_id,
        fleet=spec.fleet,
        labels=_labels(spec, declared_labels),
        balance=balance,
        daily=daily,
        monthly=monthly,
        holds=frozenset(k for k in hold_kinds if k in HOLD_KINDS),
        key=key,
        observed_at=observed_at,
    )


def hold_kind(auto: bool) -> str:
    """The ``HOLD_KINDS`` entry of a stored hold."""
    return "auto" if auto else "freeze"


def _with_forecast(window: WindowGauges, seconds: float | None) -> WindowGauges:
    return window if seconds is None else replace(window, forecast_exhaustion_s=seconds)


def forecast_seconds(forecasts: Mapping[str, WindowForecast]) -> tuple[float | None, float | None]:
    """(daily, monthly) seconds to exhaustion for the ``forecast`` gauges from one agent's
    forecasts by window name: ``+Inf`` when the cap is never reached at this rate, ``None``
    (no series) without an estimate (too little data, no cap)."""

    def seconds(name: str) -> float | None:
        found = forecasts.get(name)
        if not isinstance(found, Exhaustion):
            return None
        return float("inf") if found.eta_seconds is None else float(found.eta_seconds)

    return seconds("daily"), seconds("monthly")


def with_forecasts(
    snapshots: Iterable[AgentGauges], forecasts: Mapping[str, tuple[float | None, float | None]]
) -> tuple[AgentGauges, ...]:
    """``snapshots`` with the latest forecasts (from the alerts job) on their windows."""
    out: list[AgentGauges] = []
    for snap in snapshots:
        daily_s, monthly_s = forecasts.get(snap.agent_id, (None, None))
        out.append(
            replace(
                snap,
                daily=None if snap.daily is None else _with_forecast(snap.daily, daily_s),
                monthly=None if snap.monthly is None else _with_forecast(snap.monthly, monthly_s),
            )
        )
    return tuple(out)


def fleet_gauges(
    desired: DesiredState,
    *,
    now: float,
    windows: Mapping[str, tuple[WindowGauges, WindowGauges]] | None = None,
    balances: Mapping[str, Decimal] | None = None,
    holds: Mapping[str, frozenset[str]] | None = None,
    key_since: Mapping[str, float] | None = None,
    observed_at: Mapping[str, float] | None = None,
    forecasts: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> tuple[AgentGauges, ...]:
    """A snapshot for every declared agent (so each has its series from the first export),
    from whatever was read: ``windows`` (daily, monthly) and ``balances`` by agent id, the
    active ``holds`` kinds, when finops got each held key, when each agent was read, and the
    burn-rate ``forecasts`` (seconds to exhaust the daily and monthly cap; ``None``: no
    estimate), which override any forecast already in ``windows``. An agent missing from a
    mapping simply has no series for that figure."""
    forecasts = forecasts or {}
    windows = {
        agent: (_with_forecast(daily, forecasts.get(agent, (None, None))[0]),
                _with_forecast(monthly, forecasts.get(agent, (None, None))[1]))
        for agent, (daily, monthly) in (windows or {}).items()
    }  # fmt: skip
    balances = balances or {}
    holds = holds or {}
    key_since = key_since or {}
    observed_at = observed_at or {}
    out: list[AgentGauges] = []
    for fleet in desired.fleets:
        for spec in fleet.agents:
            daily, monthly = windows.get(spec.agent_id, (None, None))
            out.append(
                agent_gauges(
                    spec,
                    declared_labels=fleet.metric_labels,
                    balance=balances.get(spec.agent_id),
                    daily=daily,
                    monthly=monthly,
                    hold_kinds=holds.get(spec.agent_id, frozenset()),
                    key_since=key_since.get(spec.agent_id),
                    observed_at=observed_at.get(spec.agent_id),
                    now=now,
                )
            )
    return tuple(out)
