"""``POST /v1/batch``: its own, looser checks (no admin promotion, scope or budget
checks, no deposit limits) and its four tools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from controller.sandbox.catalog import FORBIDDEN_DETAIL, TIER_ORDER, TIERS, TOOLS, format_float
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.records import InsufficientFunds, KeyRecord, WalletNotFound, from_atomic, to_atomic
from controller.sandbox.request import BatchCall, BatchRequest, extract_key, request_id_of


class BatchRoutes(GatewayBase):
    """``/v1/batch``."""

    async def batch(self, request: Request) -> Response:
        """``/v1/batch``: no admin promotion, no scope or budget checks, no deposit limits;
        ownership is applied even to admin keys (their stored tier is used)."""
        now = self.clock()
        raw = extract_key(request)
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
                    f"Insufficient balance: {format_float(available)} < {format_float(total)} credits required",
                )
        request_id = request_id_of(request)
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
        if TIER_ORDER.get(tier, -1) < TIER_ORDER[tool.tier_required]:
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


# --------------------------------------------------------------------------- batch tools


@dataclass(frozen=True)
class _BatchSpec:
    required: tuple[str, ...]
    run: Callable[[GatewayBase, KeyRecord, dict[str, Any], float], dict[str, Any]]


def _batch_balance(gw: GatewayBase, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    wallet = gw.store.get_wallet(str(params["agent_id"]))
    if wallet is None:
        raise Problem(404, "wallet-not-found", f"Wallet not found for agent {params['agent_id']}")
    return {"balance": float(from_atomic(wallet.balance))}


def _batch_deposit(gw: GatewayBase, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    # No tier deposit limit and no budget check in batch (API.md §8.2).
    amount = to_atomic(Decimal(str(params["amount"])))
    if amount <= 0:
        raise ValueError("Deposit amount must be positive")
    new_balance = gw.store.credit(str(params["agent_id"]), amount, now=now)
    gw.store.record_transaction(str(params["agent_id"]), amount, "deposit", str(params.get("description", "")), now=now)
    return {"new_balance": float(from_atomic(new_balance))}


def _batch_budget_status(gw: GatewayBase, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    return gw.budget_status(str(params["agent_id"]), now)


def _batch_best_match(gw: GatewayBase, key: KeyRecord, params: dict[str, Any], now: float) -> dict[str, Any]:
    return {"query": params["query"], "matches": []}


_BATCH_TOOLS: dict[str, _BatchSpec] = {
    "get_balance": _BatchSpec(("agent_id",), _batch_balance),
    "deposit": _BatchSpec(("agent_id", "amount"), _batch_deposit),
    "get_budget_status": _BatchSpec(("agent_id",), _batch_budget_status),
    "best_match": _BatchSpec(("query",), _batch_best_match),
}
