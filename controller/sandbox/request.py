"""Request bodies (pydantic, ``extra=forbid`` like the gateway), the per-request context
``require_tool`` resolves, and query/header parsing with the gateway's error wording.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.requests import Request

from controller.sandbox.catalog import ADMIN_TIER, AGENT_ID_PATTERN, CURRENCIES, CURRENCY_DECIMAL_PLACES, Tool
from controller.sandbox.problems import Problem
from controller.sandbox.records import KeyRecord


def _validation_detail(exc: ValidationError, prefix: str = "body") -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join([prefix, *(str(p) for p in err["loc"])])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- request models

_M = TypeVar("_M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterRequest(_Body):
    agent_id: str = Field(min_length=1, max_length=128)


class CreateWalletRequest(_Body):
    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    initial_balance: Decimal = Decimal("0")
    signup_bonus: bool = True


class MoneyMovementRequest(_Body):
    """Deposit and withdraw bodies. ``currency`` is declared first so the amount's
    decimal-place check can see it; an ``idempotency_key`` field is an unknown field (422)."""

    currency: str = "CREDITS"
    amount: Decimal = Field(gt=0, le=1_000_000_000)
    description: str = Field(default="", max_length=2000)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in CURRENCY_DECIMAL_PLACES:
            raise ValueError(f"Unsupported currency '{value}'")
        return value

    @field_validator("amount")
    @classmethod
    def _decimal_places(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        currency = info.data.get("currency", "CREDITS")
        places = CURRENCY_DECIMAL_PLACES.get(currency, 2)
        exponent = value.normalize().as_tuple().exponent
        if isinstance(exponent, int) and -exponent > places:
            raise ValueError(f"Amount has more than {places} decimal places for {currency}")
        return value


class BudgetCapRequest(_Body):
    daily_cap: Decimal | None = Field(default=None, validation_alias=AliasChoices("daily_cap", "daily"))
    monthly_cap: Decimal | None = Field(default=None, validation_alias=AliasChoices("monthly_cap", "monthly"))
    alert_threshold: float = 0.8


class CreateKeyRequest(_Body):
    tier: str = "free"


class RevokeKeyRequest(_Body):
    key_hash_prefix: str


class RotateKeyRequest(_Body):
    current_key: str


class RegisterWebhookRequest(_Body):
    url: str
    event_types: list[str] = Field(validation_alias=AliasChoices("event_types", "events"))
    secret: str
    filter_agent_ids: list[str] | None = None


class ClockRequest(_Body):
    advance: float | None = None
    set: float | None = None


class FaultsRequest(_Body):
    spec: str


class BatchCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    tool: str
    params: dict[str, Any] = Field(default_factory=dict)


class BatchRequest(_Body):
    calls: list[BatchCall]


def validate_body(model: type[_M], body: bytes) -> _M:
    if not body.strip():
        raise Problem(422, "validation-error", "body: Field required")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise Problem(422, "validation-error", _validation_detail(exc)) from None


# --------------------------------------------------------------------------- request context


@dataclass(frozen=True)
class Call:
    """What ``require_tool`` resolved for one request."""

    tool: Tool
    agent_id: str
    tier: str  # effective tier: "admin" for a key with the admin scope
    key: KeyRecord
    rate_count: int
    request_id: str
    now: float

    @property
    def is_admin(self) -> bool:
        return self.tier == ADMIN_TIER


def request_id_of(request: Request) -> str:
    rid = request.scope.get("sandbox.request_id")
    return rid if isinstance(rid, str) else str(uuid.uuid4())


def extract_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise Problem(
            422,
            "validation-error",
            f"query.{name}: Input should be a valid integer, unable to parse string as an integer",
        ) from None


def query_float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise Problem(
            422, "validation-error", f"query.{name}: Input should be a valid number, unable to parse string as a number"
        )
    return value


def query_required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if value is None:
        raise Problem(422, "validation-error", f"query.{name}: Field required")
    return value


def body_amount_is_nonzero(body: bytes) -> bool:
    """The budget gate also fires for zero-cost calls whose JSON body carries an amount."""
    if not body:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    if not isinstance(data, dict) or "amount" not in data:
        return False
    raw = data["amount"]
    if isinstance(raw, bool) or raw is None:
        return False
    try:
        return Decimal(str(raw)) != 0
    except (InvalidOperation, ValueError):
        return False


def parse_currency(value: str) -> str:
    if value not in CURRENCIES:
        raise Problem(400, "validation-error", f"'{value}' is not a valid Currency")
    return value
