"""The shared core of the sandbox gateway: its inputs (store, clock, webhook deliverer),
the ``require_tool`` auth chain (auth → scope → admin-only → tier → rate limit → balance
→ budget), the budget arithmetic and ``finalize_response``. The route areas in
``controller.sandbox.routes`` subclass ``GatewayBase``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from controller.sandbox.catalog import (
    ADMIN_TIER,
    CENT,
    DAY_SECONDS,
    FORBIDDEN_DETAIL,
    KEY_AGE_WARNING_SECONDS,
    KEY_GRACE_SECONDS,
    MAX_BODY_BYTES,
    MONTH_SECONDS,
    SCOPE_LEVEL,
    TIER_ORDER,
    TIERS,
    TOOLS,
    WRITE_METHODS,
    Tool,
    format_float,
    money,
    number,
)
from controller.sandbox.faults import FaultInjector
from controller.sandbox.problems import Problem
from controller.sandbox.records import InsufficientFunds, KeyRecord, WalletNotFound, from_atomic, hash_key
from controller.sandbox.request import Call, body_amount_is_nonzero, extract_key, request_id_of
from controller.sandbox.store import SandboxStore

Clock = Callable[[], float]
WebhookDeliverer = Callable[[str, bytes, Mapping[str, str]], tuple[int | None, str]]
"""``(url, body, headers) -> (status code or None, response body)``; the sandbox never
touches the network, so a test that wants a delivery plugs a double in here."""


Handler = Callable[[Request], Awaitable[Response]]


class GatewayBase:
    """The ``require_tool`` chain and the response finaliser that every route area
    shares; one instance per app, holding the store and the clock."""

    def __init__(
        self,
        store: SandboxStore,
        clock: Clock,
        deliver: WebhookDeliverer | None = None,
        *,
        idempotency_race_window: float = 0.0,
        faults: FaultInjector | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.deliver = deliver
        self.idempotency_race_window = idempotency_race_window
        self.faults = faults if faults is not None else FaultInjector()

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
        raw = extract_key(request)
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
            if TIER_ORDER.get(tier, -1) < TIER_ORDER[tool.tier_required]:
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
                        f"Insufficient balance: {format_float(from_atomic(wallet.balance))} < "
                        f"{format_float(tool.price)} credits required",
                    )
                self._check_budget(key.agent_id, cost, now)
            elif request.method in WRITE_METHODS and body_amount_is_nonzero(await self.read_body(request)):
                self._check_budget(key.agent_id, 0, now)
        return Call(tool, key.agent_id, tier, key, rate_count, request_id_of(request), now)

    @staticmethod
    def _check_scope(key: KeyRecord, tool: Tool) -> None:
        if key.allowed_tools is not None and tool.name not in key.allowed_tools:
            raise Problem(403, "scope-violation", f"Tool '{tool.name}' is not allowed for this key")
        level = max((SCOPE_LEVEL.get(s, -1) for s in key.scopes), default=-1)
        if level < SCOPE_LEVEL[tool.scope]:
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
            status[f"{window}_spend"] = number(spend.quantize(CENT, rounding=ROUND_HALF_EVEN))
            status[f"{window}_cap"] = None if limit is None else number(limit)
            status[f"{window}_pct"] = number(pct.quantize(CENT, rounding=ROUND_HALF_EVEN))
        order = ["agent_id", "daily_spend", "daily_cap", "daily_pct", "monthly_spend", "monthly_cap", "monthly_pct"]
        result = {k: status[k] for k in order}
        result["alert_triggered"] = alert
        result["cap_exceeded"] = exceeded
        return result
