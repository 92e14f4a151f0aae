"""Wording of schema errors for people editing YAML, not for Python programmers.

pydantic says "Extra inputs are not permitted" and "Input should be a valid string"; a
manifest author needs "unknown field 'dailycap'; did you mean 'dailyCap'?" and "expected a
string, got an integer (quote it)". This module translates one pydantic error into that.
"""

from __future__ import annotations

import datetime
import types
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from controller.manifest.schema import PATTERN_HELP, SecretRef, kind_of
from policies.tiers import did_you_mean

_EXPECTED = {
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def show(value: object, limit: int = 40) -> str:
    """A short quoted rendering of a user value; long values are cut so output stays readable."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"'{text}'" if isinstance(value, str) else text


def message_for(model: type[BaseModel], error: ErrorDetails) -> str:
    """One line saying what is wrong with the value at ``error['loc']``."""
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return unknown_field(model, loc)
    if kind == "literal_error":
        if value == "admin" and "scopes" in loc:
            return (
                "'admin' is never given to an agent's key (only finops' own gateway key has it); use read and/or write"
            )
        return f"must be {ctx.get('expected', 'one of the allowed values')}, got {show(value)}{_bool_hint(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {show(value) if isinstance(value, str) else kind_of(value)}"
    if kind in ("model_type", "model_attributes_type") and isinstance(value, str) and _is_secret_ref(model, loc):
        # Not echoed: the string may well be the secret itself.
        return "secrets are referenced, never written inline: use {env: NAME} or {file: PATH}"
    if kind == "string_pattern_mismatch":
        help_text = PATTERN_HELP.get(str(ctx.get("pattern")), f"must match {ctx.get('pattern')}")
        what = "value"
        if loc and loc[-1] == "[key]":  # a mapping key, not a value
            what = "tier name" if loc[-3:-2] == ("tiers",) else "key"
        return f"invalid {what} {show(value)}: {help_text}"
    if kind in _EXPECTED:
        hint = ""
        if kind == "string_type" and isinstance(value, (int, float, bool, datetime.date)):
            hint = " (quote it)"
        elif kind == "int_type" and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            hint = f" ({show(value)}; remove the quotes)"
        return f"expected {_EXPECTED[kind]}, got {kind_of(value)}{hint}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, got {show(value)}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, got {show(value)}"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"])


def _bool_hint(value: object) -> str:
    """YAML 1.1 turns unquoted yes/no/on/off into booleans: ``currency: NO`` is ``false``."""
    return " (YAML reads yes/no/on/off/true/false as booleans; quote the value)" if isinstance(value, bool) else ""


def _is_secret_ref(model: type[BaseModel], loc: Sequence[str | int]) -> bool:
    return _model_at(model, loc) is SecretRef


def unknown_field(model: type[BaseModel], loc: Sequence[str | int]) -> str:
    name = str(loc[-1]) if loc else ""
    if name == "<<":
        return "YAML merge keys ('<<') are not supported; write the fields out"
    allowed = allowed_fields(model, loc[:-1])
    hint = did_you_mean(name, allowed)
    if hint is not None:
        return f"unknown field {show(name)}; did you mean '{hint}'?"
    if allowed:
        return f"unknown field {show(name)}; allowed fields: {', '.join(allowed)}"
    return f"unknown field {show(name)}"


def allowed_fields(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The YAML field names valid at ``loc``, found by walking the models' annotations."""
    target = _model_at(model, loc)
    if target is None:
        return []
    return [info.alias or name for name, info in target.model_fields.items()]


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = {info.alias or name: info for name, info in current.model_fields.items()}
            info = fields.get(str(part))
            if info is None:
                return None
            current = info.annotation
        elif get_origin(current) in (list, tuple):
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``X | None`` down to the type that holds fields."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [a for a in get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation
