"""Billing wallets: create, balance, deposit, withdraw, freeze and the ledger, with the
gateway's global Idempotency-Key and its duplicate-landing race.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from controller.sandbox.catalog import TIERS, iso, money
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.records import (
    AmountOutOfRange,
    DuplicateIdempotencyKey,
    InsufficientFunds,
    TransactionRecord,
    WalletExists,
    WalletFrozen,
    WalletNotFound,
    from_atomic,
    to_atomic,
)
from controller.sandbox.request import (
    Call,
    CreateWalletRequest,
    MoneyMovementRequest,
    parse_currency,
    query_int,
    validate_body,
)


class WalletRoutes(GatewayBase):
    """``/v1/billing/wallets``: money movement and the ledger."""

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
        currency = parse_currency(request.query_params.get("currency", "CREDITS"))
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
        limit = query_int(request, "limit", 100)
        offset = query_int(request, "offset", 0)
        self.check_ownership(call, agent_id)
        rows = self.store.list_transactions(agent_id, limit=limit, offset=offset)
        return self.finish(request, call, {"transactions": [_transaction_json(t) for t in rows]})


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
