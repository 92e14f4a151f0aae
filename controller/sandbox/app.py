"""The sandbox gateway: a Starlette app that answers like GreenHelix 1.4.8 (API.md).

It reproduces the real gateway's behaviour for every endpoint the controller uses,
*quirks included*: the global deposit idempotency key, spend that undercounts on reused
request ids, budget caps that block the agent's own deposits, keys that keep working
for 300 s after revocation, rotation that drops scopes, webhooks that never deliver.
A sandbox kinder than the real gateway would hide exactly the bugs we need to find.

Every request runs the gateway's ``require_tool`` chain in its order: auth → scope →
admin-only → tier → rate limit → balance → budget, then body validation, then the
ownership check, then the operation, then usage recording and the charge.

All time comes from the injected ``clock`` so tests can move rolling windows, grace
periods and rate windows without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.sandbox.clock import MutableClock
from controller.sandbox.faults import FaultInjector, FaultMiddleware
from controller.sandbox.store import (
    DEFAULT_SCOPES,
    AmountOutOfRange,
    DuplicateIdempotencyKey,
    InsufficientFunds,
    KeyRecord,
    RequestStats,
    SandboxStore,
    TransactionRecord,
    UnknownTier,
    WalletExists,
    WalletFrozen,
    WalletNotFound,
    WebhookRecord,
    from_atomic,
    hash_key,
    to_atomic,
)

logger = logging.getLogger("finops.sandbox")

GATEWAY_VERSION = "1.4.8-sandbox"
PROBLEM_TYPE_BASE = "https://api.greenhelix.net/errors/"
MAX_BODY_BYTES = 1024 * 1024
KEY_GRACE_SECONDS = 300.0
KEY_AGE_WARNING_SECONDS = 90 * 86400.0
DAY_SECONDS = 86400.0
MONTH_SECONDS = 30 * 86400.0
WEBHOOK_RETRY_BASE_SECONDS = 10.0
AGENT_ID_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$"
FORBIDDEN_DETAIL = "Forbidden: you do not have access to this resource"
ADMIN_TIER = "admin"

_CENT = Decimal("0.01")
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Clock = Callable[[], float]
WebhookDeliverer = Callable[[str, bytes, Mapping[str, str]], tuple[int | None, str]]
"""``(url, body, headers) -> (status code or None, response body)``; the sandbox never
touches the network, so a test that wants a delivery plugs a double in here."""


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class TierConfig:
    rate_limit_per_hour: int
    burst_allowance: int
    deposit_limit: int


TIERS: dict[str, TierConfig] = {
    "free": TierConfig(100, 10, 1_000),
    "starter": TierConfig(1_000, 25, 10_000),
    "pro": TierConfig(10_000, 100, 100_000),
    "enterprise": TierConfig(100_000, 1_000, 10_000_000),
}
_TIER_ORDER = {"free": 0, "starter": 1, "pro": 2, "enterprise": 3}
# _create_api_key's ranking: unknown names are 0 for the caller but 99 when requested,
# which is why an enterprise caller can mint only free keys and admin no enterprise key.
_KEY_RANK = {"free": 0, "starter": 1, "pro": 2, "admin": 3}

_READ_PREFIXES = ("get_", "search_", "list_", "verify_", "check_", "estimate_", "best_match", "describe_", "explain_")
_ADMIN_SCOPE_TOOLS = frozenset({"backup_database", "restore_database", "check_db_integrity", "list_backups"})
_SCOPE_LEVEL = {"read": 0, "write": 1, "admin": 2}


def required_scope(tool_name: str) -> str:
    """The gateway derives a tool's scope from its name (API.md §2.3)."""
    if tool_name in _ADMIN_SCOPE_TOOLS:
        return "admin"
    if tool_name.startswith(_READ_PREFIXES):
        return "read"
    return "write"


@dataclass(frozen=True)
class Tool:
    name: str
    tier_required: str = "free"
    price: Decimal = Decimal("0")
    admin_only: bool = False
    rate_limit_per_hour: int | None = None

    @property
    def scope(self) -> str:
        return required_scope(self.name)

    @property
    def price_atomic(self) -> int:
        return to_atomic(self.price)


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("create_wallet"),
        Tool("get_balance"),
        Tool("deposit"),
        Tool("withdraw"),
        Tool("freeze_wallet", tier_required="pro", admin_only=True),
        Tool("unfreeze_wallet", tier_required="pro", admin_only=True),
        Tool("get_transactions"),
        Tool("set_budget_cap"),
        Tool("get_budget_status"),
        Tool("get_usage_summary"),
        Tool("get_exchange_rate"),
        Tool("create_api_key", rate_limit_per_hour=20),
        Tool("list_api_keys", admin_only=True),
        Tool("revoke_api_key", admin_only=True),
        Tool("rotate_key", admin_only=True, rate_limit_per_hour=10),
        Tool("register_webhook", tier_required="pro"),
        Tool("list_webhooks", tier_required="pro"),
        Tool("delete_webhook", tier_required="pro"),
        Tool("get_webhook_deliveries", tier_required="pro"),
        Tool("test_webhook"),
        Tool("best_match", price=Decimal("0.10")),
    )
}

# Default exchange rates of products/billing/exchange.py, expressed as X -> CREDITS;
# the inverse direction is 1/rate at Decimal's default 28-digit precision.
_CREDIT_RATES: dict[str, Decimal] = {
    "USD": Decimal("100"),
    "EUR": Decimal("110"),
    "GBP": Decimal("125"),
    "BTC": Decimal("6000000"),
    "ETH": Decimal("400000"),
}
CURRENCIES = ("CREDITS", *_CREDIT_RATES)
_CURRENCY_DECIMAL_PLACES = {"CREDITS": 2, "USD": 2, "EUR": 2, "GBP": 2, "BTC": 8, "ETH": 8}


def exchange_rate(from_currency: str, to_currency: str) -> Decimal:
    """Direct rate, else a two-hop pivot through CREDITS, like the gateway."""
    if from_currency == to_currency:
        return Decimal("1")
    if to_currency == "CREDITS":
        return _CREDIT_RATES[from_currency]
    if from_currency == "CREDITS":
        return Decimal("1") / _CREDIT_RATES[to_currency]
    return _CREDIT_RATES[from_currency] * (Decimal("1") / _CREDIT_RATES[to_currency])


# --------------------------------------------------------------------------- serialisation


def money(value: Decimal) -> str:
    """The gateway's money fields: 2-dp strings, rounded half-even."""
    return str(value.quantize(_CENT, rounding=ROUND_HALF_EVEN))


def number(value: Decimal) -> int | float:
    """Fields the gateway leaves as JSON numbers (caps, spend): ints when integral."""
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def _format_float(value: Decimal) -> str:
    """Python float repr, as the gateway puts floats into error messages ("0.1", "70.5")."""
    return repr(float(value))


# --------------------------------------------------------------------------- problems


class Problem(Exception):
    """An RFC 9457 error response; ``code`` is the type's last segment (``budget-exceeded``)."""

    def __init__(self, status: int, code: str, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})


def problem_response(path: str, problem: Problem) -> JSONResponse:
    body = {
        "type": PROBLEM_TYPE_BASE + problem.code,
        "title": HTTPStatus(problem.status).phrase,
        "status": problem.status,
        "detail": problem.detail,
        "instance": path,
    }
    return JSONResponse(
        body, status_code=problem.status, headers=problem.headers, media_type="application/problem+json"
    )


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
        if value not in _CURRENCY_DECIMAL_PLACES:
            raise ValueError(f"Unsupported currency '{value}'")
        return value

    @field_validator("amount")
    @classmethod
    def _decimal_places(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        currency = info.data.get("currency", "CREDITS")
        places = _CURRENCY_DECIMAL_PLACES.get(currency, 2)
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


# --------------------------------------------------------------------------- webhook URL rules

_BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "0.0.0.0/8",
        "::1/128",
        "fe80::/10",
        "fc00::/7",
    )
)
_BLOCKED_HOSTNAMES = frozenset({"localhost", "metadata.google.internal", "metadata.google.internal."})


def webhook_url_error(url: str) -> str | None:
    """Both of the gateway's validators, minus DNS: the sandbox treats every name as
    unresolvable, which the gateway accepts ("delivery will fail naturally")."""
    try:
        parsed = urlsplit(url)
        host = parsed.hostname
    except ValueError:
        return "Invalid URL"
    if parsed.scheme not in ("http", "https"):
        return f"Unsupported scheme: {parsed.scheme!r} (must be http or https)"
    if not host:
        return "Missing hostname"
    if host.lower() in _BLOCKED_HOSTNAMES:
        return f"Blocked hostname: {host}"
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        for network in _BLOCKED_NETWORKS:
            if addr.version == network.version and addr in network:
                return f"Blocked IP range ({network}): {addr}"
    if parsed.scheme != "https":
        return "Webhook URL must use HTTPS scheme"
    if addr is not None:
        target = addr.ipv4_mapped or addr if isinstance(addr, ipaddress.IPv6Address) else addr
        if (
            target.is_private
            or target.is_loopback
            or target.is_link_local
            or target.is_reserved
            or target.is_multicast
            or target.is_unspecified
        ):
            return f"Webhook URL must not target a private, loopback, link-local or reserved address: {host}"
    return None


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


def _request_id(request: Request) -> str:
    rid = request.scope.get("sandbox.request_id")
    return rid if isinstance(rid, str) else str(uuid.uuid4())


def _extract_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def _query_int(request: Request, name: str, default: int) -> int:
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


def _query_float(request: Request, name: str) -> float | None:
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


def _query_required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if value is None:
        raise Problem(422, "validation-error", f"query.{name}: Field required")
    return value


def _body_amount_is_nonzero(body: bytes) -> bool:
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


def _parse_currency(value: str) -> str:
    if value not in CURRENCIES:
        raise Problem(400, "validation-error", f"'{value}' is not a valid Currency")
    return value


# --------------------------------------------------------------------------- edge middleware


class _Edge:
    """Request id, body size and path hygiene, done before routing like the gateway's
    middleware stack (so a 413 or a ``%2F`` never reaches auth)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str | None = None
        content_length: int | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
        if not request_id:
            request_id = str(uuid.uuid4())
        scope["sandbox.request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        problem = self._reject(scope, content_length)
        if problem is not None:
            path: str = scope["path"]
            if not path.startswith("/_sandbox"):
                self.stats.count(scope["method"], "<rejected>")
            await problem_response(path, problem)(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    @staticmethod
    def _reject(scope: Scope, content_length: int | None) -> Problem | None:
        if content_length is not None and content_length > MAX_BODY_BYTES:
            return Problem(413, "payload-too-large", f"Request body exceeds {MAX_BODY_BYTES} bytes")
        path: str = scope["path"]
        if path.startswith("/v1/"):
            raw_path: bytes = scope.get("raw_path") or path.encode()
            lowered = raw_path.lower()
            if b"%2f" in lowered or b"%5c" in lowered:
                return Problem(400, "encoded-path-separator", "Encoded path separators are not allowed")
            if any(len(segment) > 128 for segment in path.split("/")):
                return Problem(400, "path-too-long", "Path segment exceeds 128 characters")
        return None


# --------------------------------------------------------------------------- the gateway


Handler = Callable[[Request], Awaitable[Response]]


class SandboxGateway:
    """Request handling; one instance per app, holding the store and the clock."""

    def __init__(
        self,
        store: SandboxStore,
        clock: Clock,
        deliver: WebhookDeliverer | None = None,
        *,
        idempotency_race_window: float = 0.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.deliver = deliver
        self.idempotency_race_window = idempotency_race_window

    # ------------------------------------------------------------ auth chain

    def validate_key(self, raw: str, now: float) -> KeyRecord:
        """``KeyManager.validate_key``; raises the 401 the REST routes return."""
        if not raw.startswith("a2a_"):
            raise Problem(401, "authentication-error", "Invalid key format")
        record = self.store.get_key(hash_key(raw))
        if record is None:
            raise Problem(401, "authentication-error", "API key not found")
        if record.revoked and (record.revoked_at is None or now - record.revoked_at > KEY_GRACE_SECONDS):
            raise Problem(401, "authentication-error", "API key has been revoked")
        if record.expires_at is not None and record.expires_at < now:
            raise Problem(401, "authentication-error", "API key has expired")
        return record

    def authenticate(self, request: Request, now: float) -> tuple[KeyRecord, str]:
        raw = _extract_key(request)
        if raw is None:
            raise Problem(401, "missing-key", "Missing API key")
        record = self.validate_key(raw, now)
        return record, (ADMIN_TIER if record.is_admin else record.tier)

    async def prepare(self, request: Request, tool_name: str, *, admin_router: bool = False) -> Call:
        """``require_tool``: auth → scope → admin-only → tier → rate limit → balance → budget."""
        tool = TOOLS[tool_name]
        now = self.clock()
        key, tier = self.authenticate(request, now)
        if admin_router and tier != ADMIN_TIER:
            raise Problem(403, "forbidden-admin-only", "This route requires admin privileges")
        self._check_scope(key, tool)
        if tool.admin_only and tier != ADMIN_TIER:
            raise Problem(403, "admin-only", f"Tool '{tool.name}' requires admin privileges")
        rate_count = 0
        if tier != ADMIN_TIER:
            if _TIER_ORDER.get(tier, -1) < _TIER_ORDER[tool.tier_required]:
                raise Problem(
                    403,
                    "insufficient-tier",
                    f"Tier '{tier}' cannot access tool '{tool.name}' (requires '{tool.tier_required}')",
                )
            rate_count = self._check_rate(key.agent_id, tier, tool, now)
            cost = tool.price_atomic
            if cost > 0:
                wallet = self.store.get_wallet(key.agent_id)
                if wallet is None:
                    raise Problem(404, "wallet-not-found", f"Wallet not found for agent {key.agent_id}")
                if wallet.balance < cost:
                    raise Problem(
                        402,
                        "insufficient-balance",
                        f"Insufficient balance: {_format_float(from_atomic(wallet.balance))} < "
                        f"{_format_float(tool.price)} credits required",
                    )
                self._check_budget(key.agent_id, cost, now)
            elif request.method in _WRITE_METHODS and _body_amount_is_nonzero(await self.read_body(request)):
                self._check_budget(key.agent_id, 0, now)
        return Call(tool, key.agent_id, tier, key, rate_count, _request_id(request), now)

    @staticmethod
    def _check_scope(key: KeyRecord, tool: Tool) -> None:
        if key.allowed_tools is not None and tool.name not in key.allowed_tools:
            raise Problem(403, "scope-violation", f"Tool '{tool.name}' is not allowed for this key")
        level = max((_SCOPE_LEVEL.get(s, -1) for s in key.scopes), default=-1)
        if level < _SCOPE_LEVEL[tool.scope]:
            raise Problem(
                403,
                "scope-violation",
                f"Key scopes {list(key.scopes)} do not include '{tool.scope}' required by '{tool.name}'",
            )

    def _check_rate(self, agent_id: str, tier: str, tool: Tool, now: float) -> int:
        config = TIERS[tier]
        counts = self.store.record_rate_event(agent_id, tool.name, now=now)
        if counts.last_hour >= config.rate_limit_per_hour:
            burst_limit = config.rate_limit_per_hour // 60 + config.burst_allowance
            if counts.last_minute >= burst_limit:
                raise Problem(
                    429,
                    "rate-limit-exceeded",
                    f"Rate limit exceeded: {counts.last_hour}/{config.rate_limit_per_hour} per hour",
                )
        if tool.rate_limit_per_hour is not None and counts.tool_last_hour >= tool.rate_limit_per_hour:
            raise Problem(
                429,
                "rate-limit-exceeded",
                f"Per-tool rate limit exceeded for '{tool.name}': "
                f"{counts.tool_last_hour}/{tool.rate_limit_per_hour} per hour",
            )
        return counts.last_hour

    def _check_budget(self, agent_id: str, pending: int, now: float) -> None:
        cap = self.store.get_budget_cap(agent_id)
        if cap is None:
            return
        for label, limit, window in (
            ("Daily", cap.daily_cap, DAY_SECONDS),
            ("Monthly", cap.monthly_cap, MONTH_SECONDS),
        ):
            if limit is None:
                continue
            spent = self.store.spend_since(agent_id, now - window)
            if spent + pending > limit:
                raise Problem(
                    402,
                    "budget-exceeded",
                    f"{label} budget cap exceeded: spent {money(from_atomic(spent))} + pending "
                    f"{money(from_atomic(pending))} > cap {money(from_atomic(limit))} credits.",
                )

    @staticmethod
    def check_ownership(call: Call, agent_id: str) -> None:
        if not call.is_admin and agent_id != call.agent_id:
            raise Problem(403, "forbidden", FORBIDDEN_DETAIL)

    @staticmethod
    async def read_body(request: Request) -> bytes:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise Problem(413, "payload-too-large", f"Request body exceeds {MAX_BODY_BYTES} bytes")
        return body

    def finish(
        self,
        request: Request,
        call: Call,
        body: Mapping[str, Any],
        *,
        status: int = 200,
        location: str | None = None,
    ) -> JSONResponse:
        """``finalize_response``: record usage (deduplicated by key), charge (never
        deduplicated), then the gateway's headers."""
        usage_key = request.headers.get("idempotency-key") or f"{call.request_id}:{call.tool.name}"
        try:
            self.store.record_usage_and_charge(
                call.agent_id, call.tool.name, call.tool.price_atomic, usage_key, now=call.now
            )
        except WalletNotFound as exc:
            raise Problem(404, "wallet-not-found", str(exc)) from None
        except InsufficientFunds as exc:
            raise Problem(402, "insufficient-balance", str(exc)) from None
        headers = {"X-Charged": money(call.tool.price)}
        if not call.is_admin:
            config = TIERS[call.tier]
            headers["X-RateLimit-Limit"] = str(config.rate_limit_per_hour)
            headers["X-RateLimit-Remaining"] = str(max(0, config.rate_limit_per_hour - call.rate_count))
            headers["X-RateLimit-Reset"] = str(max(1, math.ceil(3600 - call.now % 3600)))
        age = call.now - call.key.created_at
        if age > KEY_AGE_WARNING_SECONDS:
            headers["X-Key-Age-Warning"] = f"API key is {int(age // 86400)} days old; rotate it"
        if location:
            headers["Location"] = location
        return JSONResponse(dict(body), status_code=status, headers=headers)

    # ------------------------------------------------------------ public routes

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": GATEWAY_VERSION})

    async def livez(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        return JSONResponse({"status": "ready"})

    async def legacy_health(self, request: Request) -> Response:
        return RedirectResponse("/v1/health", status_code=301)

    async def execute_removed(self, request: Request) -> Response:
        raise Problem(
            410,
            "endpoint-removed",
            "POST /v1/execute has been removed; use the REST endpoints or POST /v1/batch.",
            headers={
                "Deprecation": "true",
                "Sunset": "Thu, 01 Oct 2026 00:00:00 GMT",
                "Link": '</docs/api-reference.md#deprecation-v1-execute>; rel="sunset"',
            },
        )

    async def register(self, request: Request) -> Response:
        body = await self.read_body(request)
        try:
            req = RegisterRequest.model_validate_json(body)
        except ValidationError:
            raise Problem(400, "bad-request", "Invalid request body") from None
        now = self.clock()
        try:
            raw, key, wallet = self.store.register_agent(req.agent_id, now=now)
        except WalletExists:
            raise Problem(409, "already-exists", f"Agent '{req.agent_id}' is already registered") from None
        # Unserialised like the gateway's register route: a raw number, not a 2-dp string.
        return JSONResponse(
            {
                "agent_id": req.agent_id,
                "api_key": raw,
                "tier": key.tier,
                "balance": number(from_atomic(wallet.balance)),
                "identity_registered": False,
                "public_key": None,
                "next_steps": {"onboarding": "/v1/onboarding", "docs": "/docs", "pricing": "/v1/pricing"},
            },
            status_code=201,
        )

    # ------------------------------------------------------------ wallets

    async def create_wallet(self, request: Request) -> Response:
        call = await self.prepare(request, "create_wallet")
        req = validate_body(CreateWalletRequest, await self.read_body(request))
        self.check_ownership(call, req.agent_id)
        try:
            wallet = self.store.create_wallet(
                req.agent_id, to_atomic(req.initial_balance), signup_bonus=req.signup_bonus, now=call.now
            )
        except (WalletExists, AmountOutOfRange) as exc:
            raise Problem(400, "validation-error", str(exc)) from None
        return self.finish(
            request,
            call,
            {
                "agent_id": wallet.agent_id,
                "balance": money(from_atomic(wallet.balance)),
                "created_at": iso(wallet.created_at),
                "updated_at": iso(wallet.updated_at),
            },
            status=201,
            location=f"/v1/billing/wallets/{wallet.agent_id}",
        )

    async def get_balance(self, request: Request) -> Response:
        call = await self.prepare(request, "get_balance")
        agent_id = request.path_params["agent_id"]
        self.check_ownership(call, agent_id)
        currency = _parse_currency(request.query_params.get("currency", "CREDITS"))
        wallet = self.store.get_wallet(agent_id)
        if wallet is None:
            raise Problem(404, "wallet-not-found", f"Wallet not found for agent {agent_id}")
        if currency != "CREDITS":
            # The sandbox holds CREDITS only; other currency balances are always zero.
            return self.finish(request, call, {"balance": money(Decimal(0)), "currency": currency})
        return self.finish(request, call, {"balance": money(from_atomic(wallet.balance))})

    async def _money_movement(self, request: Request, tool_name: str) -> tuple[Call, str, MoneyMovementRequest]:
        call = await self.prepare(request, tool_name)
        req = validate_body(MoneyMovementRequest, await self.read_body(request))
        agent_id: str = request.path_params["agent_id"]
        self.check_ownership(call, agent_id)
        return call, agent_id, req

    @staticmethod
    def _require_credits(req: MoneyMovementRequest) -> None:
        if req.currency != "CREDITS":
            raise Problem(
                400, "validation-error", f"The sandbox holds CREDITS wallets only; {req.currency} is not supported"
            )

    async def deposit(self, request: Request) -> Response:
        call, agent_id, req = await self._money_movement(request, "deposit")
        if not call.is_admin:
            limit = TIERS[call.tier].deposit_limit
            if req.amount > limit:
                raise Problem(
                    403, "deposit-limit-exceeded", f"Deposit amount exceeds {call.tier}-tier limit of {limit:,} credits"
                )
        self._require_credits(req)
        idem = request.headers.get("idempotency-key")
        if idem:
            hit = self.store.find_transaction_by_key(idem)
            if hit is not None:
                return self.finish(request, call, {**_snapshot(hit), "transaction_id": hit.id})
        amount = to_atomic(req.amount)
        try:
            new_balance = self.store.credit(agent_id, amount, now=call.now)
        except WalletNotFound as exc:
            raise Problem(404, "wallet-not-found", str(exc)) from None
        except WalletFrozen as exc:
            raise Problem(403, "wallet-frozen", str(exc)) from None
        result = {"new_balance": money(from_atomic(new_balance))}
        tx_id = await self._ledger(agent_id, amount, "deposit", req.description, call.now, idem, result)
        return self.finish(request, call, {**result, "transaction_id": tx_id})

    async def withdraw(self, request: Request) -> Response:
        call, agent_id, req = await self._money_movement(request, "withdraw")
        self._require_credits(req)
        idem = request.headers.get("idempotency-key")
        if idem:
            hit = self.store.find_transaction_by_key(idem)
            if hit is not None:
                return self.finish(request, call, _snapshot(hit))
        amount = to_atomic(req.amount)
        try:
            new_balance = self.store.debit(agent_id, amount, now=call.now)
        except WalletNotFound as exc:
            raise Problem(404, "wallet-not-found", str(exc)) from None
        except WalletFrozen as exc:
            raise Problem(403, "wallet-frozen", str(exc)) from None
        except InsufficientFunds as exc:
            raise Problem(402, "insufficient-balance", str(exc)) from None
        result = {"new_balance": money(from_atomic(new_balance))}
        await self._ledger(agent_id, -amount, "withdrawal", req.description, call.now, idem, result)
        return self.finish(request, call, result)

    async def _ledger(
        self,
        agent_id: str,
        amount: int,
        tx_type: str,
        description: str,
        now: float,
        idem: str | None,
        result: Mapping[str, Any],
    ) -> int:
        """Write the ledger row *after* the balance moved, with a yield in between: the
        gateway does the same, so concurrent duplicates of one Idempotency-Key all move
        money and all but one then fail with 500 IntegrityError (API.md §9, verified live).
        The gateway's window is a few awaited DB round trips; ``idempotency_race_window``
        widens ours so tests can hit it on purpose."""
        await asyncio.sleep(self.idempotency_race_window if idem else 0)
        try:
            return self.store.record_transaction(
                agent_id,
                amount,
                tx_type,
                description,
                now=now,
                idempotency_key=idem,
                result_snapshot=json.dumps(dict(result)) if idem else None,
            )
        except DuplicateIdempotencyKey:
            raise Problem(
                500,
                "internal-error",
                "Internal error: IntegrityError (UNIQUE constraint failed: transactions.idempotency_key)",
            ) from None

    async def _set_frozen(self, request: Request, tool_name: str, frozen: bool) -> Response:
        call = await self.prepare(request, tool_name)
        agent_id: str = request.path_params["agent_id"]
        self.check_ownership(call, agent_id)
        self.store.set_frozen(agent_id, frozen, now=call.now)
        return self.finish(request, call, {"agent_id": agent_id, "frozen": frozen})

    async def freeze(self, request: Request) -> Response:
        return await self._set_frozen(request, "freeze_wallet", True)

    async def unfreeze(self, request: Request) -> Response:
        return await self._set_frozen(request, "unfreeze_wallet", False)

    async def transactions(self, request: Request) -> Response:
        call = await self.prepare(request, "get_transactions")
        agent_id: str = request.path_params["agent_id"]
        limit = _query_int(request, "limit", 100)
        offset = _query_int(request, "offset", 0)
        self.check_ownership(call, agent_id)
        rows = self.store.list_transactions(agent_id, limit=limit, offset=offset)
        return self.finish(request, call, {"transactions": [_transaction_json(t) for t in rows]})

    async def set_budget(self, request: Request) -> Response:
        call = await self.prepare(request, "set_budget_cap")
        req = validate_body(BudgetCapRequest, await self.read_body(request))
        agent_id: str = request.path_params["agent_id"]
        self.check_ownership(call, agent_id)
        try:
            daily = None if req.daily_cap is None else to_atomic(req.daily_cap)
            monthly = None if req.monthly_cap is None else to_atomic(req.monthly_cap)
        except AmountOutOfRange as exc:
            raise Problem(400, "validation-error", str(exc)) from None
        cap = self.store.set_budget_cap(agent_id, daily, monthly, req.alert_threshold, now=call.now)
        return self.finish(
            request,
            call,
            {
                "agent_id": agent_id,
                "daily_cap": None if cap.daily_cap is None else number(from_atomic(cap.daily_cap)),
                "monthly_cap": None if cap.monthly_cap is None else number(from_atomic(cap.monthly_cap)),
                "alert_threshold": cap.alert_threshold,
            },
        )

    async def get_budget(self, request: Request) -> Response:
        call = await self.prepare(request, "get_budget_status")
        agent_id: str = request.path_params["agent_id"]
        self.check_ownership(call, agent_id)
        return self.finish(request, call, self.budget_status(agent_id, call.now))

    def budget_status(self, agent_id: str, now: float) -> dict[str, Any]:
        """``_get_budget_status``: zero/None caps count as "no cap" here (``if daily_cap:``)."""
        cap = self.store.get_budget_cap(agent_id)
        threshold = cap.alert_threshold if cap else 0.8
        status: dict[str, Any] = {"agent_id": agent_id}
        alert = exceeded = False
        for window, seconds, units in (
            ("daily", DAY_SECONDS, cap.daily_cap if cap else None),
            ("monthly", MONTH_SECONDS, cap.monthly_cap if cap else None),
        ):
            spend = from_atomic(self.store.spend_since(agent_id, now - seconds))
            limit = None if units is None else from_atomic(units)
            pct = Decimal(0)
            if limit:
                pct = spend / limit * 100
                alert = alert or spend / limit >= Decimal(repr(threshold))
                exceeded = exceeded or spend >= limit
            status[f"{window}_spend"] = number(spend.quantize(_CENT, rounding=ROUND_HALF_EVEN))
            status[f"{window}_cap"] = None if limit is None else number(limit)
            status[f"{window}_pct"] = number(pct.quantize(_CENT, rounding=ROUND_HALF_EVEN))
        order = ["agent_id", "daily_spend", "daily_cap", "daily_pct", "monthly_spend", "monthly_cap", "monthly_pct"]
        result = {k: status[k] for k in order}
        result["alert_triggered"] = alert
        result["cap_exceeded"] = exceeded
        return result

    async def usage(self, request: Request) -> Response:
        call = await self.prepare(request, "get_usage_summary")
        agent_id: str = request.path_params["agent_id"]
        since = _query_float(request, "since")
        self.check_ownership(call, agent_id)
        summary = self.store.usage_summary(agent_id, since)
        return self.finish(
            request,
            call,
            {
                "total_calls": summary.total_calls,
                "total_cost": number(from_atomic(summary.total_cost)),
                "total_tokens": summary.total_tokens,
            },
        )

    async def exchange_rates(self, request: Request) -> Response:
        call = await self.prepare(request, "get_exchange_rate")
        from_currency = _query_required(request, "from_currency")
        to_currency = _query_required(request, "to_currency")
        rate = exchange_rate(_parse_currency(from_currency), _parse_currency(to_currency))
        return self.finish(
            request, call, {"from_currency": from_currency, "to_currency": to_currency, "rate": str(rate)}
        )

    async def best_match(self, request: Request) -> Response:
        call = await self.prepare(request, "best_match")
        query = _query_required(request, "query")
        return self.finish(request, call, {"query": query, "matches": []})

    # ------------------------------------------------------------ keys

    async def create_key(self, request: Request) -> Response:
        call = await self.prepare(request, "create_api_key")
        req = validate_body(CreateKeyRequest, await self.read_body(request))
        if _KEY_RANK.get(req.tier, 99) > _KEY_RANK.get(call.tier, 0):
            raise Problem(
                403, "forbidden", f"Tier escalation denied: your tier '{call.tier}' cannot create '{req.tier}' keys"
            )
        try:
            raw, key = self.store.create_key(call.agent_id, req.tier, now=call.now)
        except UnknownTier as exc:
            raise Problem(400, "validation-error", str(exc)) from None
        return self.finish(
            request,
            call,
            {"key": raw, "agent_id": key.agent_id, "tier": key.tier, "created_at": iso(key.created_at)},
            status=201,
        )

    async def list_own_keys(self, request: Request) -> Response:
        # Wired to create_api_key in the gateway: listing spends the 20/h create quota,
        # and ?agent_id= is ignored (always the caller's keys).
        call = await self.prepare(request, "create_api_key")
        keys = self.store.list_keys(call.agent_id)
        return self.finish(request, call, {"keys": [_key_json(k, "self") for k in keys]})

    async def list_fleet_keys(self, request: Request) -> Response:
        call = await self.prepare(request, "list_api_keys", admin_router=True)
        agent_id = request.query_params.get("agent_id") or None
        keys = self.store.list_keys(agent_id)
        return self.finish(request, call, {"keys": [_key_json(k, "admin") for k in keys]})

    async def revoke_key(self, request: Request) -> Response:
        call = await self.prepare(request, "revoke_api_key", admin_router=True)
        req = validate_body(RevokeKeyRequest, await self.read_body(request))
        if self.store.revoke_key_by_prefix(call.agent_id, req.key_hash_prefix, now=call.now):
            return self.finish(request, call, {"revoked": True, "key_hash_prefix": req.key_hash_prefix})
        return self.finish(request, call, {"revoked": False})

    async def rotate_key(self, request: Request) -> Response:
        call = await self.prepare(request, "rotate_key", admin_router=True)
        req = validate_body(RotateKeyRequest, await self.read_body(request))
        if request.headers.get("x-rotate-confirmation") != "confirm":
            return JSONResponse(
                {
                    "type": PROBLEM_TYPE_BASE + "rotate-confirmation-required",
                    "title": "Rotate confirmation required",
                    "status": 428,
                    "detail": "Key rotation is a destructive action. Include the header "
                    "'X-Rotate-Confirmation: confirm' to proceed. The old key remains valid for a "
                    "300s grace window after a successful rotation.",
                    "instance": "/v1/infra/keys/rotate",
                },
                status_code=428,
            )
        try:
            old = self.validate_key(req.current_key, call.now)
        except Problem:
            raise Problem(403, "forbidden", "Key validation failed") from None
        raw, new = self.store.rotate_key(old, now=call.now)
        return self.finish(
            request,
            call,
            {
                "new_key": raw,
                "tier": new.tier,
                "agent_id": new.agent_id,
                "revoked": False,
                "grace_period_seconds": int(KEY_GRACE_SECONDS),
                "grace_expires_at": int(call.now + KEY_GRACE_SECONDS),
            },
        )

    async def keys_moved(self, request: Request) -> Response:
        raise Problem(
            410,
            "endpoint-moved",
            "Self-service API key creation has moved to POST /v1/billing/keys.",
            headers={
                "Deprecation": "true",
                "Sunset": "Sun, 01 Mar 2026 00:00:00 GMT",
                "Link": '</v1/billing/keys>; rel="successor-version"',
            },
        )

    # ------------------------------------------------------------ webhooks

    async def register_webhook(self, request: Request) -> Response:
        call = await self.prepare(request, "register_webhook")
        req = validate_body(RegisterWebhookRequest, await self.read_body(request))
        error = webhook_url_error(req.url)
        if error is None and not req.secret:
            error = "Webhook secret is required"
        if error is not None:
            raise Problem(400, "validation-error", error)
        hook = self.store.create_webhook(
            call.agent_id, req.url, req.event_types, req.secret, req.filter_agent_ids, now=call.now
        )
        return self.finish(
            request,
            call,
            _webhook_json(
                hook.id, hook.agent_id, hook.url, hook.event_types, hook.secret, hook.created_at, hook.filter_agent_ids
            ),
            status=201,
            location=f"/v1/infra/webhooks/{hook.id}",
        )

    async def list_webhooks(self, request: Request) -> Response:
        call = await self.prepare(request, "list_webhooks")
        hooks = self.store.list_webhooks(call.agent_id)
        return self.finish(
            request,
            call,
            {
                "webhooks": [
                    _webhook_json(h.id, h.agent_id, h.url, h.event_types, h.secret, h.created_at, h.filter_agent_ids)
                    for h in hooks
                ]
            },
        )

    def _owned_webhook(self, call: Call, webhook_id: str) -> WebhookRecord:
        hook = self.store.get_active_webhook(webhook_id)
        if hook is None:
            raise Problem(404, "not-found", f"Webhook not found: {webhook_id}")
        if hook.agent_id != call.agent_id:  # no admin bypass for webhooks
            raise Problem(403, "forbidden", FORBIDDEN_DETAIL)
        return hook

    async def delete_webhook(self, request: Request) -> Response:
        call = await self.prepare(request, "delete_webhook")
        webhook_id: str = request.path_params["webhook_id"]
        self._owned_webhook(call, webhook_id)
        if not self.store.deactivate_webhook(webhook_id):
            raise Problem(404, "not-found", f"Webhook not found: {webhook_id}")
        return self.finish(request, call, {"deleted": True})

    async def test_webhook(self, request: Request) -> Response:
        call = await self.prepare(request, "test_webhook")
        webhook_id: str = request.path_params["webhook_id"]
        hook = self._owned_webhook(call, webhook_id)
        payload = json.dumps(
            {
                "type": "test.ping",
                "webhook_id": webhook_id,
                "timestamp": call.now,
                "message": "Test ping from A2A gateway",
            }
        )
        code: int | None = None
        response_body = "sandbox: outbound webhook delivery is disabled"
        if self.deliver is not None:
            signature = hmac.new(hook.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
            headers = {"Content-Type": "application/json", "X-A2A-Signature": signature}
            try:
                code, response_body = self.deliver(hook.url, payload.encode(), headers)
            except Exception as exc:  # a failing test double is a failed delivery, as in the gateway
                code, response_body = None, str(exc)
        delivered = code is not None and 200 <= code < 300
        # First attempt of three: a failure stays "pending" with a retry time nobody acts on.
        delivery = self.store.add_delivery(
            webhook_id,
            "test.ping",
            payload,
            status="delivered" if delivered else "pending",
            attempts=1,
            last_attempt_at=call.now,
            next_retry_at=None if delivered else call.now + WEBHOOK_RETRY_BASE_SECONDS,
            response_code=code,
            response_body=response_body,
            now=call.now,
        )
        return self.finish(
            request,
            call,
            {"delivery_id": delivery.id, "status": delivery.status, "response_code": delivery.response_code},
        )

    async def webhook_deliveries(self, request: Request) -> Response:
        call = await self.prepare(request, "get_webhook_deliveries")
        webhook_id: str = request.path_params["webhook_id"]
        limit = _query_int(request, "limit", 50)
        offset = _query_int(request, "offset", 0)
        self._owned_webhook(call, webhook_id)
        rows = self.store.list_deliveries(webhook_id, limit=limit, offset=offset)
        return self.finish(
            request,
            call,
            {
                "deliveries": [
                    {
                        "id": d.id,
                        "webhook_id": d.webhook_id,
                        "event_type": d.event_type,
                        "payload": d.payload,
                        "status": d.status,
                        "attempts": d.attempts,
                        "last_attempt_at": d.last_attempt_at,
                        "next_retry_at": d.next_retry_at,
                        "response_code": d.response_code,
                        "response_body": d.response_body,
                        "created_at": iso(d.created_at),
                    }
                    for d in rows
                ]
            },
        )

    # ------------------------------------------------------------ batch

    async def batch(self, request: Request) -> Response:
        """``/v1/batch``: no admin promotion, no scope or budget checks, no deposit limits;
        ownership is applied even to admin keys (their stored tier is used)."""
        now = self.clock()
        raw = _extract_key(request)
        if raw is None:
            raise Problem(401, "missing-key", "Missing API key")
        try:
            key = self.validate_key(raw, now)
        except Problem as exc:
            code = "expired-key" if "expired" in exc.detail else "invalid-key"
            raise Problem(401, code, exc.detail) from None
        body = await self.read_body(request)
        try:
            req = BatchRequest.model_validate_json(body)
        except ValidationError:
            raise Problem(400, "bad-request", "Invalid batch request body") from None
        if len(req.calls) > 10:
            raise Problem(400, "batch-too-large", f"Batch contains {len(req.calls)} calls; the maximum is 10")
        tier = key.tier
        config = TIERS[tier]
        counts = self.store.record_rate_event(key.agent_id, "batch", now=now)
        if (
            counts.last_hour >= config.rate_limit_per_hour
            and counts.last_minute >= config.rate_limit_per_hour // 60 + config.burst_allowance
        ):
            raise Problem(
                429,
                "rate-limit-exceeded",
                f"Rate limit exceeded: {counts.last_hour}/{config.rate_limit_per_hour} per hour",
            )
        total = sum((TOOLS[c.tool].price for c in req.calls if c.tool in TOOLS), Decimal(0))
        if total > 0:
            wallet = self.store.get_wallet(key.agent_id)
            available = from_atomic(wallet.balance) if wallet else Decimal(0)
            if available < total:
                raise Problem(
                    402,
                    "insufficient-balance",
                    f"Insufficient balance: {_format_float(available)} < {_format_float(total)} credits required",
                )
        request_id = _request_id(request)
        idem = request.headers.get("idempotency-key")
        results: list[dict[str, Any]] = []
        for index, item in enumerate(req.calls):
            results.append(self._batch_call(key, tier, item, index, now, request_id, idem))
        return JSONResponse({"results": results})

    def _batch_call(
        self,
        key: KeyRecord,
        tier: str,
        item: BatchCall,
        index: int,
        now: float,
        request_id: str,
        idem: str | None,
    ) -> dict[str, Any]:
        def fail(code: str, message: str) -> dict[str, Any]:
            return {"success": False, "error": {"code": code, "message": message}}

        tool = TOOLS.get(item.tool)
        if tool is None or item.tool not in _BATCH_TOOLS:
            return fail("unknown_tool", f"Unknown tool: {item.tool}")
        spec = _BATCH_TOOLS[item.tool]
        params = item.params
        missing = [p for p in spec.required if p not in params]
        if missing:
            return fail("missing_parameter", f"Missing required parameter(s): {', '.join(missing)}")
        for owner_field in ("agent_id", "payer", "sender", "opener", "initiator"):
            if owner_field in params and params[owner_field] != key.agent_id:
                return fail("forbidden", FORBIDDEN_DETAIL)
        if tool.admin_only:
            return fail("admin_only", f"Tool '{tool.name}' requires admin privileges")
        if _TIER_ORDER.get(tier, -1) < _TIER_ORDER[tool.tier_required]:
            return fail(
                "insufficient_tier", f"Tier '{tier}' cannot access tool '{tool.name}' (requires '{tool.tier_required}')"
            )
        try:
            outcome: dict[str, Any] = {"success": True, "result": spec.run(self, key, params, now)}
        except Problem as exc:
            outcome = fail(exc.code.replace("-", "_"), exc.detail)
        except Exception as exc:  # the gateway leaks the raw exception text here
            outcome = fail("execution_error", str(exc))
        usage_key = f"{idem}:{index}" if idem else f"{request_id}:{index}:{tool.name}"
        with contextlib.suppress(WalletNotFound, InsufficientFunds):  # charged whatever the outcome
            self.store.record_usage_and_charge(key.agent_id, tool.name, tool.price_atomic, usage_key, now=now)
        return outcome

    # ------------------------------------------------------------ sandbox-only routes

    def _sandbox_admin(self, request: Request) -> None:
        _, tier = self.authenticate(request, self.clock())
        if tier != ADMIN_TIER:
            raise Problem(403, "forbidden-admin-only", "This route requires admin privileges")

    async def sandbox_stats(self, request: Request) -> Response:
        self._sandbox_admin(request)
        return JSONResponse(self.store.request_counts())

    async def sandbox_stats_reset(self, request: Request) -> Response:
        self._sandbox_admin(request)
        self.store.reset_request_counts()
        return JSONResponse({"reset": True})

    async def sandbox_clock(self, request: Request) -> Response:
        self._sandbox_admin(request)
        if request.method == "POST":
            req = validate_body(ClockRequest, await self.read_body(request))
            advance = getattr(self.clock, "advance", None)
            setter = getattr(self.clock, "set", None)
            if advance is None or setter is None:
                raise Problem(409, "clock-fixed", "This sandbox's clock cannot be moved")
            if req.set is not None:
                setter(req.set)
            if req.advance is not None:
                advance(req.advance)
        return JSONResponse({"now": self.clock()})


# --------------------------------------------------------------------------- batch tools


@dataclass(frozen=True)
class _BatchSpec:
    required: tuple[str, ...]
    run: Callable[[SandboxGateway, KeyRecord, dict[str, Any], float], dict[str, Any]]


def _batch_balance(gw: SandboxGateway, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    wallet = gw.store.get_wallet(str(params["agent_id"]))
    if wallet is None:
        raise Problem(404, "wallet-not-found", f"Wallet not found for agent {params['agent_id']}")
    return {"balance": float(from_atomic(wallet.balance))}


def _batch_deposit(gw: SandboxGateway, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    # No tier deposit limit and no budget check in batch (API.md §8.2).
    amount = to_atomic(Decimal(str(params["amount"])))
    if amount <= 0:
        raise ValueError("Deposit amount must be positive")
    new_balance = gw.store.credit(str(params["agent_id"]), amount, now=now)
    gw.store.record_transaction(str(params["agent_id"]), amount, "deposit", str(params.get("description", "")), now=now)
    return {"new_balance": float(from_atomic(new_balance))}


def _batch_budget_status(gw: SandboxGateway, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    return gw.budget_status(str(params["agent_id"]), now)


def _batch_best_match(gw: SandboxGateway, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    return {"query": params["query"], "matches": []}


_BATCH_TOOLS: dict[str, _BatchSpec] = {
    "get_balance": _BatchSpec(("agent_id",), _batch_balance),
    "deposit": _BatchSpec(("agent_id", "amount"), _batch_deposit),
    "get_budget_status": _BatchSpec(("agent_id",), _batch_budget_status),
    "best_match": _BatchSpec(("query",), _batch_best_match),
}


# --------------------------------------------------------------------------- JSON views


def _snapshot(hit: TransactionRecord) -> dict[str, Any]:
    if hit.result_snapshot is None:
        return {"new_balance": money(from_atomic(hit.amount))}
    data = json.loads(hit.result_snapshot)
    return dict(data) if isinstance(data, dict) else {"result": data}


def _transaction_json(t: TransactionRecord) -> dict[str, Any]:
    created = iso(t.created_at)
    return {
        "id": t.id,
        "agent_id": t.agent_id,
        "amount": money(from_atomic(t.amount)),
        "tx_type": t.tx_type,
        "type": t.tx_type,
        "description": t.description,
        "currency": t.currency,
        "created_at": created,
        "timestamp": created,
        "idempotency_key": t.idempotency_key,
        "result_snapshot": t.result_snapshot,
    }


def _key_json(k: KeyRecord, owner: str) -> dict[str, Any]:
    return {
        "key_hash_prefix": k.key_hash_prefix,
        "agent_id": k.agent_id,
        "owner": owner,
        "tier": k.tier,
        "scopes": list(k.scopes),
        "created_at": iso(k.created_at),
        "revoked": k.revoked,
    }


def _webhook_json(
    id_: str,
    agent_id: str,
    url: str,
    event_types: Sequence[str],
    secret: str,
    created_at: float,
    filter_agent_ids: Sequence[str] | None,
) -> dict[str, Any]:
    return {
        "id": id_,
        "agent_id": agent_id,
        "url": url,
        "event_types": list(event_types),
        "secret": secret,
        "created_at": iso(created_at),
        "active": 1,
        "filter_agent_ids": None if filter_agent_ids is None else list(filter_agent_ids),
    }


# --------------------------------------------------------------------------- assembly


def _wrap(handler: Handler, stats: RequestStats | None, method: str, path: str) -> Handler:
    """Count the request (before any work, so a reader of the stats never races the
    response) and turn every failure into problem+json."""

    async def endpoint(request: Request) -> Response:
        if stats is not None:
            stats.count(method, path)
        try:
            return await handler(request)
        except Problem as problem:
            return problem_response(request.url.path, problem)
        except Exception:
            logger.exception("sandbox: unhandled error on %s %s", method, path)
            return problem_response(request.url.path, Problem(500, "internal-error", "Internal server error"))

    return endpoint


def create_app(
    store: SandboxStore,
    *,
    clock: Clock | None = None,
    deliver: WebhookDeliverer | None = None,
    idempotency_race_window: float = 0.0,
    faults: FaultInjector | None = None,
) -> Starlette:
    """The sandbox ASGI app. ``clock`` (unix seconds) drives every time read; pass a
    ``MutableClock`` to move it, also over HTTP via ``POST /_sandbox/clock``. ``faults``
    (off unless configured) misbehaves on ``/v1/*`` on purpose; ``/_sandbox/faults`` shows
    and reconfigures it."""
    if clock is None:
        clock = MutableClock()
    gw = SandboxGateway(store, clock, deliver, idempotency_race_window=idempotency_race_window)
    stats = store.stats
    injector = faults if faults is not None else FaultInjector()

    async def sandbox_faults(request: Request) -> Response:
        gw._sandbox_admin(request)
        if request.method == "POST":
            req = validate_body(FaultsRequest, await gw.read_body(request))
            try:
                injector.configure(req.spec)
            except ValueError as exc:
                raise Problem(422, "validation-error", str(exc)) from None
        return JSONResponse(injector.snapshot())

    table: list[tuple[str, str, Handler, bool]] = [
        ("GET", "/v1/health", gw.health, True),
        ("GET", "/livez", gw.livez, True),
        ("GET", "/readyz", gw.readyz, True),
        ("GET", "/health", gw.legacy_health, True),
        ("POST", "/v1/execute", gw.execute_removed, True),
        ("POST", "/v1/register", gw.register, True),
        ("POST", "/v1/batch", gw.batch, True),
        ("POST", "/v1/billing/wallets", gw.create_wallet, True),
        ("GET", "/v1/billing/wallets/{agent_id}/balance", gw.get_balance, True),
        ("POST", "/v1/billing/wallets/{agent_id}/deposit", gw.deposit, True),
        ("POST", "/v1/billing/wallets/{agent_id}/withdraw", gw.withdraw, True),
        ("POST", "/v1/billing/wallets/{agent_id}/freeze", gw.freeze, True),
        ("POST", "/v1/billing/wallets/{agent_id}/unfreeze", gw.unfreeze, True),
        ("GET", "/v1/billing/wallets/{agent_id}/transactions", gw.transactions, True),
        ("PUT", "/v1/billing/wallets/{agent_id}/budget", gw.set_budget, True),
        ("GET", "/v1/billing/wallets/{agent_id}/budget", gw.get_budget, True),
        ("GET", "/v1/billing/wallets/{agent_id}/usage", gw.usage, True),
        ("GET", "/v1/billing/exchange-rates", gw.exchange_rates, True),
        ("GET", "/v1/marketplace/match", gw.best_match, True),
        ("POST", "/v1/billing/keys", gw.create_key, True),
        ("GET", "/v1/billing/keys", gw.list_own_keys, True),
        ("POST", "/v1/infra/keys", gw.keys_moved, True),
        ("GET", "/v1/infra/keys", gw.list_fleet_keys, True),
        ("POST", "/v1/infra/keys/revoke", gw.revoke_key, True),
        ("POST", "/v1/infra/keys/rotate", gw.rotate_key, True),
        ("POST", "/v1/infra/webhooks", gw.register_webhook, True),
        ("GET", "/v1/infra/webhooks", gw.list_webhooks, True),
        ("DELETE", "/v1/infra/webhooks/{webhook_id}", gw.delete_webhook, True),
        ("POST", "/v1/infra/webhooks/{webhook_id}/test", gw.test_webhook, True),
        ("GET", "/v1/infra/webhooks/{webhook_id}/deliveries", gw.webhook_deliveries, True),
        ("GET", "/_sandbox/stats", gw.sandbox_stats, False),
        ("POST", "/_sandbox/stats/reset", gw.sandbox_stats_reset, False),
        ("GET", "/_sandbox/clock", gw.sandbox_clock, False),
        ("POST", "/_sandbox/clock", gw.sandbox_clock, False),
        ("GET", "/_sandbox/faults", sandbox_faults, False),
        ("POST", "/_sandbox/faults", sandbox_faults, False),
    ]
    routes = [
        Route(path, _wrap(handler, stats if counted else None, method, path), methods=[method])
        for method, path, handler, counted in table
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths (404) and wrong methods such as webhook PUT/PATCH/GET-by-id (405).
        assert isinstance(exc, HTTPException)
        if not request.url.path.startswith("/_sandbox"):
            stats.count(request.method, "<unmatched>")
        return problem_response(
            request.url.path, Problem(exc.status_code, "http-error", exc.detail, headers=exc.headers)
        )

    return Starlette(
        routes=routes,
        # Faults outermost: they model the network and the edge in front of the gateway.
        middleware=[Middleware(FaultMiddleware, injector=injector), Middleware(_Edge, stats=stats)],
        exception_handlers={HTTPException: http_error},
    )


__all__ = [
    "DEFAULT_SCOPES",
    "TOOLS",
    "Call",
    "Clock",
    "Problem",
    "SandboxGateway",
    "WebhookDeliverer",
    "create_app",
    "exchange_rate",
    "required_scope",
    "webhook_url_error",
]
