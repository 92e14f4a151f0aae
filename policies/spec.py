"""The desired state after defaults, tiers and overrides are resolved.

These frozen dataclasses are the contract between manifest loading (controller) and every
decision (policies, planner). They carry no pydantic and no I/O so that pure functions and
property tests can build them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True)
class Source:
    """Where a declaration came from, for error messages that point at a line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class SecretRef:
    """A secret named by reference, never written in a manifest: an environment variable or
    a file. With ``generate``, finops creates the file (random, 0600) when it is missing, so
    a development setup works out of the box and receivers read the same file."""

    env: str | None = None
    file: str | None = None
    generate: bool = False
    managed: str | None = None
    """A secret finops generates and keeps itself (in its state directory) under this name;
    used for gateway webhooks, whose secrets the gateway lists in clear."""

    def describe(self) -> str:
        if self.managed:
            return f"finops-generated secret {self.managed}"
        return f"env {self.env}" if self.env else f"file {self.file}"


ALERT_EVENT_THRESHOLD = "budget.threshold"
"""Spend reached a declared threshold of a cap (once per crossing)."""
ALERT_EVENT_RECOVERED = "budget.recovered"
"""Spend fell back below a threshold that had fired (rolling windows age spend out)."""
ALERT_EVENT_FORECAST = "budget.forecast"
"""Spend is projected to reach a cap within the declared horizon (once per episode)."""
ALERT_EVENT_ANOMALY = "budget.anomaly"
"""Recent spend is above a declared multiple of the agent's own trailing baseline."""
ALERT_EVENTS = (ALERT_EVENT_THRESHOLD, ALERT_EVENT_RECOVERED, ALERT_EVENT_FORECAST, ALERT_EVENT_ANOMALY)


@dataclass(frozen=True)
class AnomalySpec:
    """``alerts.anomaly`` resolved: an agent is anomalous when its spend over the last
    ``window_seconds`` is at least ``min_spend`` (fleet currency) and above ``multiple`` ×
    its rate over the ``baseline_seconds`` before that window (``policies.anomaly``)."""

    window_seconds: int = 86_400
    baseline_seconds: int = 21 * 86_400
    multiple: Decimal = Decimal(2)
    min_spend: Decimal = Decimal("0.00")


@dataclass(frozen=True)
class AlertRoute:
    """Where finops delivers an agent's budget alerts. ``url`` is a template; the
    placeholders ``{agent}``, ``{fleet}``, ``{threshold}`` and ``{window}`` are filled per
    alert. Only the listed thresholds and event types go to this route."""

    url: str
    thresholds: tuple[int, ...]
    events: tuple[str, ...]
    secret: SecretRef
    allow_insecure: bool = False
    """Permit ``http://`` and loopback/private hosts (development and tests only)."""

    def render(self, *, agent: str, fleet: str, threshold: int | str, window: str) -> str:
        return (
            self.url.replace("{agent}", agent)
            .replace("{fleet}", fleet)
            .replace("{threshold}", str(threshold))
            .replace("{window}", window)
        )


ESCALATE_PAUSE = "pause"
"""Lower the window's cap to what was already spent in it: the next paid call gets 402."""
ESCALATE_FREEZE = "freeze"
"""The emergency stop (``finops freeze``): caps 0, wallet frozen, key quarantined."""
ESCALATION_ACTIONS = (ESCALATE_PAUSE, ESCALATE_FREEZE)
RELEASE_AUTO = "auto"
"""Released by finops when utilization of the declared cap falls below the re-arm level."""
RELEASE_MANUAL = "manual"
"""Released only by ``finops unfreeze``."""
RELEASES = (RELEASE_AUTO, RELEASE_MANUAL)


@dataclass(frozen=True)
class EscalationRule:
    """One step of an agent's escalation ladder: when spend crosses ``threshold`` percent of
    the ``window``'s cap, besides alerting, ``action`` (pause or freeze), lifted per
    ``release``."""

    threshold: int
    window: str
    action: str
    release: str


@dataclass(frozen=True)
class GatewayWebhookSpec:
    """An opt-in webhook on the gateway itself, registered with the admin key and
    ``filter_agent_ids=[agent]``. ``url`` is already rendered for the agent."""

    url: str
    events: tuple[str, ...]
    secret: SecretRef


@dataclass(frozen=True)
class KeySinkSpec:
    """Where an agent's new keys are delivered. ``directory``: one 0600 file per agent
    (``None`` means finops' own key store). ``command``: an argv that gets the key on stdin."""

    kind: str = "directory"
    path: str | None = None
    command: tuple[str, ...] = ()


WEEKLY = "weekly"


@dataclass(frozen=True)
class KeyPolicy:
    """How finops manages an agent's API key."""

    manage: bool = True
    scopes: tuple[str, ...] = ("read", "write")
    """Declared for the record; GreenHelix 1.4.8 cannot set scopes over HTTP."""
    rotation: str = WEEKLY
    """``weekly``, ``daily`` or a 5-field cron expression (UTC)."""
    sink: KeySinkSpec = KeySinkSpec()


@dataclass(frozen=True)
class AgentSpec:
    """One agent's resolved desired state. Amounts are in the fleet's currency."""

    agent_id: str
    fleet: str
    tier: str
    daily_cap: Decimal
    monthly_cap: Decimal
    funding_floor: Decimal
    funding_target: Decimal
    alert_thresholds: tuple[int, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    source: Source | None = None
    alert_routes: tuple[AlertRoute, ...] = ()
    gateway_webhooks: tuple[GatewayWebhookSpec, ...] = ()
    keys: KeyPolicy = KeyPolicy()
    daily_cap_min: Decimal | None = None
    """Bounds the rebalancer keeps this agent's daily cap within (``None``: fleet not rebalanced)."""
    daily_cap_max: Decimal | None = None
    max_unexplained_per_day: Decimal = Decimal("0.00")
    """How much may leave this wallet in 24 h other than as metered spend (withdrawals,
    payments) and still be refilled by finops (fleet currency). Default 0: an agent whose
    balance falls without matching spend is not refunded at all until a human decides."""
    escalation: tuple[EscalationRule, ...] = ()
    """The escalation ladder (``alerts.escalation``; default: none, alerts only)."""
    forecast_horizon: int | None = None
    """``alerts.forecastHorizon`` in seconds: ``budget.forecast`` fires when a cap is
    projected to be reached within it (``None``: no forecast alert)."""
    anomaly: AnomalySpec | None = None
    """``alerts.anomaly``: ``budget.anomaly`` (``None``: not evaluated)."""


@dataclass(frozen=True)
class RebalanceSettings:
    """``spec.rebalancing`` resolved: fractions (0.30 = 30 %) and the run interval."""

    enabled: bool = True
    interval_seconds: int = 900
    donor_below: Decimal = Decimal("0.30")
    receiver_above: Decimal = Decimal("0.80")
    share: Decimal = Decimal("0.50")


@dataclass(frozen=True)
class ApprovalPolicy:
    """``spec.approval.maxUnattendedIncrease``: how much more spending authority (over the
    exposure a person last approved) finops may apply on its own, in the fleet's currency.
    The default is zero everywhere: any increase waits for ``finops approve``."""

    daily_caps: Decimal = Decimal("0.00")
    """Increase of the sum of the agents' daily caps."""
    monthly_caps: Decimal = Decimal("0.00")
    """Increase of the sum of the agents' monthly caps."""
    funding: Decimal = Decimal("0.00")
    """Increase of each funding figure: the sum of funding targets, the per-run ceiling and
    the rolling daily funding limit (each on its own)."""
    agents: int = 0
    """Agents added."""


@dataclass(frozen=True)
class FleetSpec:
    """A fleet: shared currency, totals and the agents that belong to it."""

    name: str
    currency: str
    daily_total: Decimal
    funding_ceiling: Decimal
    agents: tuple[AgentSpec, ...]
    source: Source | None = None
    rebalancing: RebalanceSettings | None = None
    daily_funding_limit: Decimal | None = None
    """``spec.funding.dailyLimit``; ``None``: the default, see ``funding_daily_limit``."""

    @property
    def funding_daily_limit(self) -> Decimal:
        """The most finops puts into this fleet's wallets in any rolling 24 h (deposits and
        signup bonuses). Default: one full per-run ceiling (filling the wallets) plus one
        day of capped spend (refilling them): all an honest fleet can need in a day."""
        if self.daily_funding_limit is not None:
            return self.daily_funding_limit
        return self.funding_ceiling + self.daily_total

    approval: ApprovalPolicy = ApprovalPolicy()
    metric_labels: tuple[str, ...] = ()
    """``spec.metrics.labels``: the agents' manifest label keys exported as Prometheus labels
    on the per-agent metrics (bounded: ``policies.fleet_metrics.MAX_METRIC_LABELS``)."""


@dataclass(frozen=True)
class DesiredState:
    """Everything the manifests declare: the inventory of managed agents."""

    fleets: tuple[FleetSpec, ...]

    def agents(self) -> tuple[AgentSpec, ...]:
        return tuple(a for f in self.fleets for a in f.agents)

    def fleet(self, name: str) -> FleetSpec:
        for f in self.fleets:
            if f.name == name:
                return f
        raise KeyError(name)
