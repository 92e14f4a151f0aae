"""The shape of a manifest document, as pydantic models, and its JSON Schema for editors.

These models check shape only (fields, types, formats, per-field rules). Anything that needs
more than one field or document (tier references, budgets, uniqueness) is decided by
``policies.tiers`` so it can be reasoned about and property-tested without YAML.

Every model forbids unknown fields: a typo such as ``dailycap`` must fail loudly rather than
silently leave an agent uncapped.
"""

from __future__ import annotations

import itertools
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
)
from pydantic.alias_generators import to_camel

from policies.money import MoneyError, parse_money
from policies.tiers import DEFAULT_THRESHOLDS

API_VERSION = "finops.greenhelix.net/v1"
KINDS = ("Fleet", "AgentGroup")
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
    try:
        amount = parse_money(value)
    except MoneyError as exc:
        raise ValueError(str(exc)) from None
    except ArithmeticError:
        raise ValueError("amount is too large") from None
    if isinstance(value, str) and not _MONEY_STRING.match(value):
        raise ValueError(f'amount {value!r} must be written as a plain decimal such as "30.00"')
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
    return type(value).__name__


MONEY_JSON_SCHEMA: dict[str, Any] = {
    "description": 'An amount with at most 2 decimal places, e.g. "30.00" (string preferred) or 30.5',
    "oneOf": [
        {"type": "string", "pattern": MONEY_STRING_PATTERN},
        {"type": "number", "minimum": 0},
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
    """Wallet funding band; either field may be left to a less specific level."""

    floor: Money | None = None
    target: Money | None = None


class FleetFunding(_Model):
    """Fleet-level funding guardrails."""

    per_run_ceiling: Money


class FleetAlerts(_Model):
    """Alert thresholds, in percent of each agent's daily cap."""

    thresholds: list[Threshold] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS), min_length=1)

    _increasing = field_validator("thresholds")(_strictly_increasing)


class AgentAlerts(_Model):
    """An agent's own thresholds; required here, since an empty override would be ambiguous."""

    thresholds: list[Threshold] = Field(min_length=1)

    _increasing = field_validator("thresholds")(_strictly_increasing)


class Defaults(_Model):
    """Lowest-precedence values for every agent of the fleet."""

    funding: Funding = Field(default_factory=Funding)
    labels: Labels = Field(default_factory=dict)


class Tier(_Model):
    """A role's caps and funding, shared by the agents that name it."""

    daily_cap: Money
    monthly_cap: Money
    funding: Funding = Field(default_factory=Funding)


class Agent(_Model):
    """One agent; every field but ``id`` and ``tier`` overrides its tier or the defaults."""

    id: AgentId
    tier: str
    labels: Labels = Field(default_factory=dict)
    daily_cap: Money | None = None
    monthly_cap: Money | None = None
    funding: Funding = Field(default_factory=Funding)
    alerts: AgentAlerts | None = None


class Metadata(_Model):
    """Identity of a document; ``labels`` here describe the document, not its agents."""

    name: Name
    labels: Labels = Field(default_factory=dict)


class FleetSpecModel(_Model):
    """``spec`` of a Fleet."""

    currency: Literal["CREDITS", "USD", "EUR", "GBP"]
    daily_budget_total: Money
    funding: FleetFunding
    alerts: FleetAlerts = Field(default_factory=FleetAlerts)
    defaults: Defaults = Field(default_factory=Defaults)
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
        "title": "finops manifest (Fleet or AgentGroup)",
        **schema,
    }
