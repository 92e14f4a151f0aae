"""Schema models and the editor JSON Schema: strict shape, exact money, a usable schema."""

from __future__ import annotations

import inspect
import json
import re
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from controller.manifest import schema
from controller.manifest.schema import (
    MONEY_STRING_PATTERN,
    FleetManifest,
    Tier,
    manifest_json_schema,
)


def _models() -> list[type[BaseModel]]:
    return [
        obj
        for _, obj in inspect.getmembers(schema, inspect.isclass)
        if issubclass(obj, BaseModel) and obj.__module__ == schema.__name__
    ]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_model_forbids_unknown_fields(model: type[BaseModel]) -> None:
    assert model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30", "30.00"), ("30.5", "30.50"), ("30.50", "30.50"), (30, "30.00"), (30.5, "30.50"), (0.1, "0.10"),
     ("0", "0.00")],
)  # fmt: skip
def test_money_accepts_strings_and_numbers_exactly(value: object, expected: str) -> None:
    tier = Tier.model_validate({"dailyCap": value, "monthlyCap": "1000"})
    assert tier.daily_cap == Decimal(expected)
    assert str(tier.daily_cap) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("30.123", "has more than 2 decimal places"),
        (30.123, "has more than 2 decimal places"),
        ("-1", "must not be negative"),
        (-1, "must not be negative"),
        ("NaN", "must be finite"),
        (float("inf"), "must be finite"),
        ("3e1", "plain decimal"),
        (" 30", "plain decimal"),
        (True, "got a boolean"),
        (None, "got null"),
        ("10" * 40, "too large"),
    ],
)
def test_money_rejects_lossy_or_odd_amounts(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Tier.model_validate({"dailyCap": value, "monthlyCap": "1000"})
    (error,) = info.value.errors()
    assert error["loc"] == ("dailyCap",)
    assert message in error["msg"]


def test_thresholds_are_strict_integers() -> None:
    with pytest.raises(ValidationError) as info:
        schema.FleetAlerts.model_validate({"thresholds": [75, "90", 100.0, True]})
    assert [e["loc"] for e in info.value.errors()] == [("thresholds", 1), ("thresholds", 2), ("thresholds", 3)]


def test_default_thresholds() -> None:
    assert schema.FleetAlerts().thresholds == [75, 90, 100]


def test_json_schema_is_a_discriminated_union_on_kind() -> None:
    doc = manifest_json_schema()
    json.dumps(doc)  # serialisable as-is
    assert doc["$schema"].startswith("https://json-schema.org/")
    assert sorted(ref["$ref"] for ref in doc["oneOf"]) == [
        "#/$defs/AgentGroupManifest",
        "#/$defs/FleetManifest",
    ]
    assert doc["discriminator"]["propertyName"] == "kind"
    defs: dict[str, Any] = doc["$defs"]
    assert defs["FleetManifest"]["properties"]["kind"]["const"] == "Fleet"
    assert defs["FleetManifest"]["properties"]["apiVersion"]["const"] == "finops.greenhelix.net/v1"
    assert defs["FleetManifest"]["additionalProperties"] is False


def test_json_schema_uses_yaml_field_names_and_money_as_string_or_number() -> None:
    defs = manifest_json_schema()["$defs"]
    tier = defs["Tier"]["properties"]
    assert set(tier) == {"dailyCap", "monthlyCap", "funding", "rebalance"}
    money = tier["dailyCap"]["oneOf"]
    assert {"type": "string", "pattern": MONEY_STRING_PATTERN} in money
    assert {"type": "number", "minimum": 0, "maximum": 92233720368.54} in money  # the gateway's int64 range
    assert re.fullmatch(MONEY_STRING_PATTERN[1:-1], "30.00")
    assert not re.fullmatch(MONEY_STRING_PATTERN[1:-1], "30.123")
    assert set(defs["FleetSpecModel"]["properties"]) == {
        "currency", "dailyBudgetTotal", "funding", "alerts", "defaults", "keys", "rebalancing", "approval", "metrics",
        "tiers", "agents",
    }  # fmt: skip
    assert defs["FleetSpecModel"]["properties"]["tiers"]["additionalProperties"] is False


def test_fleet_model_reads_camel_case_keys() -> None:
    doc = {
        "apiVersion": "finops.greenhelix.net/v1",
        "kind": "Fleet",
        "metadata": {"name": "research"},
        "spec": {
            "currency": "USD",
            "dailyBudgetTotal": "200.00",
            "funding": {"perRunCeiling": "500.00"},
            "tiers": {"worker": {"dailyCap": "30.00", "monthlyCap": "600.00"}},
        },
    }
    fleet = FleetManifest.model_validate(doc)
    assert fleet.spec.funding.per_run_ceiling == Decimal("500.00")
    assert fleet.spec.agents == []
