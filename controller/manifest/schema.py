"""The shape of a manifest document, as pydantic models, and its JSON Schema for editors.

These models check shape only (fields, types, formats, per-field rules). Anything that needs
more than one field or document (tier references, budgets, uniqueness) is decided by
``policies.tiers`` so it can be reasoned about and property-tested without YAML.

Every model forbids unknown fields: a typo such as ``dailycap`` must fail loudly rather than
silently leave an agent uncapped.
"""

from __future__ import annotations

import datetime
import itertools
import re
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from policies.fleet_metrics import MAX_METRIC_LABELS, metric_label_problem
from policies.money import GATEWAY_MAX_AMOUNT, MoneyError, parse_money
from policies.tiers import DEFAULT_THRESHOLDS

API_VERSION = "finops.greenhelix.net/v1"
KINDS = ("Fleet", "AgentGroup")
SCHEMA_ID = "https://finops.greenhelix.net/schemas/v1/manifest.json"
"""The schema's ``$id``: one per ``apiVersion``; an identifier, not fetched by finops."""
CURRENCIES = ("CREDITS", "USD", "EUR", "GBP")

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
AGENT_ID_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$"
MONEY_STRING_PATTERN = r"^[0-9]+(\.[0-9]{1,2})?$"

#: Human wording for pattern mismatches; pydantic would otherwise show the bare regex.
PATTERN_HELP = {
    NAME_PATTERN: "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
    AGENT_ID_PATTERN: "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
}

_MONEY_STRING = re.compile(MONEY_STRING_PATTERN)


def _money(value: object) -> Decimal:
    """Money from YAML: a string or a number, never rounded, never negative or non-finite.

    Strings must be plain decimals (``"30"``, ``"30.00"``) so the file reads the same to
    people, to editors using the JSON Schema, and to us; ``"3e1"`` is refused.
    """
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f'expected an amount such as "30.00", got {kind_of(value)}')
    if isinstance(value, str) and not value.strip():
        raise ValueError('amount is empty; write an amount such as "30.00"')
    if isinstance(value, str) and len(value.strip()) > 40 and value.strip().replace(".", "", 1).isdigit():
        # Never parsed, never echoed whole: a 10,000-digit literal is refused in constant time.
        raise ValueError(f"amount is too large: at most {GATEWAY_MAX_AMOUNT} (the gateway's maximum)")
    try:
        amount = parse_money(value)
    except MoneyError as exc:
        raise ValueError(str(exc)) from None
    except ArithmeticError:
        raise ValueError(f"amount is too large: at most {GATEWAY_MAX_AMOUNT} (the gateway's maximum)") from None
    if isinstance(value, str) and not _MONEY_STRING.match(value):
        raise ValueError(f'amount {value!r} must be written as a plain decimal such as "30.00"')
    if amount > GATEWAY_MAX_AMOUNT:
        raise ValueError(
            f"amount {amount} is too large: at most {GATEWAY_MAX_AMOUNT} "
            "(the gateway stores amounts as 64-bit integers of 1e-8 credits)"
        )
    return amount


def kind_of(value: object) -> str:
    """The YAML-level name of a value's type, for messages written for manifest authors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-01-31 as a date
        return "a date"
    return type(value).__name__


MONEY_JSON_SCHEMA: dict[str, Any] = {
    "description": 'An amount with at most 2 decimal places, e.g. "30.00" (string preferred) or 30.5',
    "oneOf": [
        {"type": "string", "pattern": MONEY_STRING_PATTERN},
        {"type": "number", "minimum": 0, "maximum": float(GATEWAY_MAX_AMOUNT)},
    ],
}

Money = Annotated[Decimal, PlainValidator(_money), WithJsonSchema(MONEY_JSON_SCHEMA)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
AgentId = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
Threshold = Annotated[int, Field(strict=True, ge=1, le=1000)]
Labels = dict[str, str]


def _strictly_increasing(values: list[int]) -> list[int]:
    """Thresholds fire in order as spend climbs; a repeat or a step back is a typo."""
    for before, after in itertools.pairwise(values):
        if after <= before:
            raise ValueError(f"thresholds must be strictly increasing, got {values}")
    return values


class _Model(BaseModel):
    """Common config, inherited by every model: camelCase keys in YAML, unknown keys refused
    (``extra="forbid"``), immutable once read."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        frozen=True,
        field_title_generator=lambda name, info: info.alias or name,
    )


class Funding(_Model):
    """Wallet funding band; any field may be left to a less specific level."""

    floor: Money | None = None
    target: Money | None = None
    max_unexplained_per_day: Money | None = Field(
        default=None,
        description=(
            "How much may leave the wallet in a rolling 24 h other than as metered gateway spend "
            "(withdrawals, payments) and still be refilled by finops. Default 0.00: such an agent is "
            "flagged and not refunded."
        ),
    )


class FleetFunding(_Model):
    """Fleet-level funding guardrails."""

    per_run_ceiling: Money
    daily_limit: Money | None = Field(
        default=None,
        description=(
            "The most finops puts into the fleet's wallets in any rolling 24 h: deposits and the "
            "signup bonus of every agent it registers. Default: perRunCeiling + dailyBudgetTotal."
        ),
    )


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
PATTERN_HELP[ENV_NAME_PATTERN] = "must be an environment variable name (letters, digits, '_')"
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
URL_PLACEHOLDERS = ("{agent}", "{fleet}", "{threshold}", "{window}")
WEBHOOK_PLACEHOLDERS = ("{agent}", "{fleet}")
ALERT_EVENT_NAMES = Literal["budget.threshold", "budget.recovered", "budget.forecast", "budget.anomaly"]


def _url_template(value: str, allowed: tuple[str, ...]) -> str:
    """A URL with only known placeholders; safety (https, public host) is judged later, once
    ``allowInsecure`` is known."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if not re.match(r"^https?://[^/\s]+", value):
        if scheme and scheme.group(1).lower() in ("http", "https"):
            if scheme.group(1) != scheme.group(1).lower():
                raise ValueError(f"{value!r}: write the scheme in lowercase ('https://')")
            raise ValueError(f"{value!r} has no host")
        raise ValueError(f"{value!r} is not an http(s) URL")
    if re.search(r"\s", value):
        raise ValueError("URL must not contain whitespace")
    for placeholder in re.findall(r"\{[^}]*\}", value):
        if placeholder not in allowed:
            raise ValueError(f"unknown placeholder {placeholder} (allowed: {', '.join(allowed)})")
    if re.match(r"^https?://[^/@]*@", value):
        raise ValueError("URL must not embed credentials (user:password@); use signingSecret")
    problem = port_problem(re.sub(r"\{[a-z]+\}", "x", value))
    if problem:
        raise ValueError(problem)
    return value


def port_problem(url: str) -> str | None:
    """``None`` when the URL's port (if any) is a number from 1 to 65535."""
    try:
        port = urlsplit(url).port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    if port == 0:
        return "the port must be a number from 1 to 65535, got 0"
    return None


def _default_alert_events() -> list[ALERT_EVENT_NAMES]:
    return ["budget.threshold"]


def _manifest_path(value: str) -> str:
    """A file or directory path in a manifest: absolute, or relative to finops' state
    directory and staying inside it (``controller.manifest.paths``)."""
    if "\x00" in value:
        raise ValueError("a path must not contain a NUL character")
    if value.startswith("~"):
        raise ValueError(
            f"{value!r}: '~' is not expanded here; write an absolute path, or a path relative to finops' "
            "state directory"
        )
    if ".." in value.replace("\\", "/").split("/"):
        raise ValueError(
            f"{value!r}: '..' is not allowed (a relative path names a place inside finops' state directory); "
            "write a plain absolute path for a place elsewhere"
        )
    return value


class SecretRef(_Model):
    """A secret by reference, never inline: ``env: NAME`` or ``file: PATH``; ``generate:
    true`` (with ``file``) creates a random secret there if the file is missing."""

    env: EnvName | None = None
    file: str | None = Field(default=None, min_length=1)
    generate: bool = False

    @field_validator("file")
    @classmethod
    def _file_path(cls, value: str | None) -> str | None:
        return value if value is None else _manifest_path(value)

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if self.env in ("GREENHELIX_API_KEY", "GREENHELIX_API_KEY_FILE"):
            raise ValueError(f"{self.env} holds finops' admin key; a secret reference may never name key material")
        if self.generate and self.file is None:
            raise ValueError("'generate' needs 'file' (the place the generated secret is kept)")
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self


class AlertRoute(_Model):
    """One alert destination. ``url`` may use {agent}, {fleet}, {threshold} and {window}."""

    url: str
    thresholds: list[Threshold] | None = None
    events: list[ALERT_EVENT_NAMES] = Field(default_factory=_default_alert_events, min_length=1)
    signing_secret: SecretRef | None = None

    _url = field_validator("url")(lambda v: _url_template(v, URL_PLACEHOLDERS))
    _increasing = field_validator("thresholds")(lambda v: v if v is None else _strictly_increasing(v))


class GatewayWebhooks(_Model):
    """Opt-in webhooks registered on the gateway itself (one per agent, filtered to it)."""

    enabled: bool = False
    url: str
    events: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        default_factory=lambda: ["billing.usage_recorded", "billing.deposit"], min_length=1
    )
    signing_secret: SecretRef | None = None
    allow_referenced_secret: bool = False
    """The gateway lists webhook secrets in clear: by default finops generates this secret
    itself; ``true`` lets ``signingSecret`` (or the fleet's) be sent to the gateway instead."""

    _url = field_validator("url")(lambda v: _url_template(v, WEBHOOK_PLACEHOLDERS))


class EscalationStep(_Model):
    """One step of the escalation ladder: at ``threshold`` percent of the ``window``'s cap,
    besides alerting, ``pause`` the agent (its cap lowered to what it already spent) or
    ``freeze`` it (the emergency stop). ``release``: ``auto`` (pause only; lifted when
    utilization falls below the re-arm level) or ``manual`` (``finops unfreeze``); default
    ``auto`` for pause, ``manual`` for freeze."""

    threshold: Threshold
    window: Literal["daily", "monthly"] = "daily"
    action: Literal["pause", "freeze"]
    release: Literal["auto", "manual"] | None = None

    @field_validator("release")
    @classmethod
    def _freeze_is_manual(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == "auto" and info.data.get("action") == "freeze":
            raise ValueError(
                "a freeze is released only by `finops unfreeze` (its key is quarantined): use release: manual, "
                "or action: pause for an automatic release"
            )
        return value


def _one_step_per_slot(steps: list[EscalationStep] | None) -> list[EscalationStep] | None:
    """A (window, threshold) has one action; a pause at or above a freeze could never act."""
    if steps is None:
        return None
    seen: set[tuple[str, int]] = set()
    for step in steps:
        if (step.window, step.threshold) in seen:
            raise ValueError(f"two escalation steps for {step.threshold} % of the {step.window} cap: keep one")
        seen.add((step.window, step.threshold))
    for step in steps:
        for other in steps:
            if (
                step.action == "pause"
                and other.action == "freeze"
                and other.window == step.window
                and other.threshold <= step.threshold
            ):
                raise ValueError(
                    f"pause at {step.threshold} % of the {step.window} cap is at or above the freeze at "
                    f"{other.threshold} %: it could never act (the ladder must escalate)"
                )
    return steps
SPAN_PATTERN = r"^[1-9][0-9]{0,5}(s|m|h|d)$"
PATTERN_HELP[SPAN_PATTERN] = 'must be a duration such as "90m", "2h" or "21d"'
Span = Annotated[str, StringConstraints(pattern=SPAN_PATTERN)]
SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
HORIZON_MIN, HORIZON_MAX = 60, 30 * 86_400
ANOMALY_WINDOW_MIN, ANOMALY_WINDOW_MAX = 3600, 7 * 86_400
ANOMALY_BASELINE_MIN, ANOMALY_BASELINE_MAX = 86_400, 30 * 86_400
MULTIPLE_PATTERN = r"^[0-9]+(\.[0-9]{1,2})?$"


def span_seconds(text: str) -> int:
    """``"90m"`` → 5400: a duration written with ``SPAN_PATTERN``."""
    return int(text[:-1]) * SPAN_UNITS[text[-1]]


def show_span(seconds: int) -> str:
    """The shortest way to write ``seconds`` with ``SPAN_PATTERN`` units."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _span_within(text: str, low: int, high: int, what: str) -> str:
    seconds = span_seconds(text)
    if not low <= seconds <= high:
        raise ValueError(f"{what} {text!r} must be between {show_span(low)} and {show_span(high)}")
    return text


def _multiple(value: object) -> Decimal:
    """A factor such as 2 or "2.5": above 1, at most 1000, at most 2 decimals, never rounded."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f'expected a factor such as 2.0 or "2.5", got {kind_of(value)}')
    text = repr(value) if isinstance(value, float) else str(value).strip()
    if not re.match(MULTIPLE_PATTERN, text):
        raise ValueError(f"multiple {text!r} must be a plain decimal with at most 2 decimals, such as 2.0")
    factor = Decimal(text)
    if not Decimal(1) < factor <= Decimal(1000):
        raise ValueError(f"multiple {text} must be above 1 and at most 1000 (a multiple of the baseline rate)")
    return factor


Multiple = Annotated[
    Decimal,
    PlainValidator(_multiple),
    WithJsonSchema({"description": "A factor above 1, e.g. 2.0", "oneOf": [{"type": "number"}, {"type": "string"}]}),
]


class Anomaly(_Model):
    """``budget.anomaly``: spend over the last ``window`` above ``multiple`` × the agent's
    own rate over the ``baseline`` before it, once at least ``minSpend`` was spent."""

    window: Span = "24h"
    baseline: Span = "21d"
    multiple: Multiple = Decimal(2)
    min_spend: Money

    _window = field_validator("window")(
        lambda v: _span_within(v, ANOMALY_WINDOW_MIN, ANOMALY_WINDOW_MAX, "anomaly window")
    )
    _baseline = field_validator("baseline")(
        lambda v: _span_within(v, ANOMALY_BASELINE_MIN, ANOMALY_BASELINE_MAX, "anomaly baseline")
    )

    @model_validator(mode="after")
    def _baseline_longer(self) -> Anomaly:
        if span_seconds(self.baseline) < span_seconds(self.window):
            raise ValueError(
                f"baseline {self.baseline!r} is shorter than window {self.window!r}: the baseline is the agent's "
                "normal rate, measured over a longer period before the window"
            )
        return self


def _horizon(value: str | None) -> str | None:
    return value if value is None else _span_within(value, HORIZON_MIN, HORIZON_MAX, "forecastHorizon")


class FleetAlerts(_Model):
    """Alert thresholds (percent of each agent's caps) and where alerts go."""

    thresholds: list[Threshold] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS), min_length=1)
    signing_secret: SecretRef | None = None
    allow_insecure: bool = False
    routes: list[AlertRoute] = Field(default_factory=list)
    gateway_webhooks: GatewayWebhooks | None = None
    escalation: list[EscalationStep] = Field(default_factory=list)
    """Actions besides notifying, per threshold (default: none)."""
    forecast_horizon: Span | None = Field(
        default=None,
        description="budget.forecast fires when a daily or monthly cap is projected to be reached within this.",
    )
    anomaly: Anomaly | None = None

    _horizon = field_validator("forecast_horizon")(_horizon)

    _increasing = field_validator("thresholds")(_strictly_increasing)
    _ladder = field_validator("escalation")(_one_step_per_slot)


class AgentAlerts(_Model):
    """An agent's own thresholds and/or routes, replacing the fleet's."""

    thresholds: list[Threshold] | None = Field(default=None, min_length=1)
    routes: list[AlertRoute] | None = None
    escalation: list[EscalationStep] | None = None
    """Replaces the fleet's ladder (``[]``: this agent is only alerted)."""
    forecast_horizon: Span | None = None
    anomaly: Anomaly | None = None

    _increasing = field_validator("thresholds")(lambda v: v if v is None else _strictly_increasing(v))
    _ladder = field_validator("escalation")(_one_step_per_slot)
    _horizon = field_validator("forecast_horizon")(_horizon)

    @model_validator(mode="after")
    def _not_empty(self) -> AgentAlerts:
        if all(v is None for v in (self.thresholds, self.routes, self.escalation, self.forecast_horizon, self.anomaly)):
            raise ValueError(
                "give 'thresholds', 'routes', 'escalation', 'forecastHorizon' and/or 'anomaly' "
                "(an empty override is ambiguous)"
            )
        return self


class KeySink(_Model):
    """Where an agent's new keys are delivered: a directory (one 0600 file per agent) or a
    command that receives the key on stdin."""

    directory: str | None = Field(default=None, min_length=1)
    command: list[Annotated[str, StringConstraints(min_length=1)]] | None = Field(default=None, min_length=1)

    @field_validator("directory")
    @classmethod
    def _directory_path(cls, value: str | None) -> str | None:
        """``~`` stays allowed here (sinks have always expanded it); ``..`` does not."""
        if value is None or value.startswith("~"):
            return value
        return _manifest_path(value)

    @model_validator(mode="after")
    def _one_kind(self) -> KeySink:
        if (self.directory is None) == (self.command is None):
            raise ValueError("give exactly one of 'directory' or 'command'")
        return self


class Keys(_Model):
    """Key management; every field may be left to the fleet's ``spec.keys``."""

    manage: bool | None = None
    scopes: list[Literal["read", "write"]] | None = Field(default=None, min_length=1)
    rotation: str | None = None
    sink: KeySink | None = None

    @field_validator("rotation")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from policies.rotation import validate_schedule

        problem = validate_schedule(value)
        if problem and value.strip().lower() in ("weekly", "daily"):
            problem = f"rotation schedule {value!r}: did you mean '{value.strip().lower()}'?"
        if problem:
            raise ValueError(problem)
        return value


class Defaults(_Model):
    """Lowest-precedence values for every agent of the fleet."""

    funding: Funding = Field(default_factory=Funding)
    labels: Labels = Field(default_factory=dict)


class RebalanceBounds(_Model):
    """The range the rebalancer may move a daily cap within (defaults: the fleet's percents)."""

    min_daily_cap: Money | None = None
    max_daily_cap: Money | None = None


Percent = Annotated[int, Field(strict=True, ge=0, le=100)]
DURATION_PATTERN = r"^[1-9][0-9]{0,5}(s|m|h)$"
PATTERN_HELP[DURATION_PATTERN] = 'must be a duration such as "15m", "900s" or "1h"'


class Rebalancing(_Model):
    """Dynamic rebalancing of unused daily budget from idle agents to busy ones."""

    enabled: bool = True
    interval: Annotated[str, StringConstraints(pattern=DURATION_PATTERN)] = "15m"
    donor_below_percent: Percent = 30
    # At least 1: a receiver asks for spend / receiverAbovePercent of budget.
    receiver_above_percent: Annotated[int, Field(strict=True, ge=1, le=100)] = 80
    share_percent: Percent = 50
    min_daily_cap_percent: Annotated[int, Field(strict=True, ge=0, le=100)] = 50
    max_daily_cap_percent: Annotated[int, Field(strict=True, ge=100, le=1000)] = 200

    @model_validator(mode="after")
    def _receivers_above_donors(self) -> Rebalancing:
        """An agent between the two thresholds would be both lending and borrowing."""
        if self.receiver_above_percent < self.donor_below_percent:
            raise ValueError(
                f"receiverAbovePercent {self.receiver_above_percent} is below donorBelowPercent "
                f"{self.donor_below_percent}: an agent between the two would be both a donor and a receiver"
            )
        return self


class Tier(_Model):
    """A role's caps and funding, shared by the agents that name it."""

    daily_cap: Money
    monthly_cap: Money
    funding: Funding = Field(default_factory=Funding)
    rebalance: RebalanceBounds | None = None


class Agent(_Model):
    """One agent; every field but ``id`` and ``tier`` overrides its tier or the defaults."""

    id: AgentId
    tier: str
    labels: Labels = Field(default_factory=dict)
    daily_cap: Money | None = None
    monthly_cap: Money | None = None
    funding: Funding = Field(default_factory=Funding)
    alerts: AgentAlerts | None = None
    keys: Keys | None = None
    rebalance: RebalanceBounds | None = None


class Metadata(_Model):
    """Identity of a document; ``labels`` here describe the document, not its agents."""

    name: Name
    labels: Labels = Field(default_factory=dict)


def _metric_labels(keys: list[str]) -> list[str]:
    problem = metric_label_problem(tuple(keys))
    if problem:
        raise ValueError(problem)
    return keys


class Metrics(_Model):
    """``spec.metrics``: which of the agents' manifest labels become Prometheus labels on the
    per-agent metrics (besides ``agent`` and ``fleet``). Undeclared labels are never exported,
    so the series count stays bounded by the agent count."""

    labels: list[Annotated[str, StringConstraints(min_length=1, max_length=63)]] = Field(
        default_factory=list, max_length=MAX_METRIC_LABELS
    )

    _labels = field_validator("labels")(_metric_labels)


class UnattendedIncrease(_Model):
    """How much more spending authority than a person last approved finops may apply on
    its own (daemon, ``apply --auto-approve``), in the fleet's currency. Default 0: any
    increase waits for ``finops approve``."""

    daily_caps: Money = Decimal("0.00")
    monthly_caps: Money = Decimal("0.00")
    funding: Money = Decimal("0.00")
    agents: Annotated[int, Field(strict=True, ge=0, le=100_000)] = 0


class Approval(_Model):
    """``spec.approval``: what needs an operator's ``finops approve``."""

    max_unattended_increase: UnattendedIncrease = Field(default_factory=UnattendedIncrease)


class FleetSpecModel(_Model):
    """``spec`` of a Fleet."""

    currency: Literal["CREDITS", "USD", "EUR", "GBP"]
    daily_budget_total: Money
    funding: FleetFunding
    alerts: FleetAlerts = Field(default_factory=FleetAlerts)
    defaults: Defaults = Field(default_factory=Defaults)
    keys: Keys = Field(default_factory=Keys)
    rebalancing: Rebalancing | None = None
    approval: Approval = Field(default_factory=Approval)
    metrics: Metrics = Field(default_factory=Metrics)
    tiers: dict[Name, Tier] = Field(min_length=1, json_schema_extra={"additionalProperties": False})
    agents: list[Agent] = Field(default_factory=list)


class AgentGroupSpecModel(_Model):
    """``spec`` of an AgentGroup."""

    fleet: Name
    agents: list[Agent] = Field(min_length=1)


class FleetManifest(_Model):
    """A Fleet document: budget, tiers, defaults and (optionally) agents."""

    api_version: Literal["finops.greenhelix.net/v1"]
    kind: Literal["Fleet"]
    metadata: Metadata
    spec: FleetSpecModel


class AgentGroupManifest(_Model):
    """An AgentGroup document: agents added to a fleet declared in another document."""

    api_version: Literal["finops.greenhelix.net/v1"]
    kind: Literal["AgentGroup"]
    metadata: Metadata
    spec: AgentGroupSpecModel


Manifest = Annotated[FleetManifest | AgentGroupManifest, Field(discriminator="kind")]

MODEL_BY_KIND: dict[str, type[FleetManifest] | type[AgentGroupManifest]] = {
    "Fleet": FleetManifest,
    "AgentGroup": AgentGroupManifest,
}


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema for one manifest document, for editor completion and pre-commit checks.

    Cross-document rules (tier references, budgets, unique ids) and strictly increasing
    thresholds cannot be expressed here; ``finops validate`` remains the authority.
    """
    schema = TypeAdapter(Manifest).json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "finops manifest (Fleet or AgentGroup)",
        **schema,
    }
