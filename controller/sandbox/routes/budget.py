"""Budget caps, budget status and the usage summary."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from controller.sandbox.catalog import number
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.records import AmountOutOfRange, from_atomic, to_atomic
from controller.sandbox.request import BudgetCapRequest, query_float, validate_body


class BudgetRoutes(GatewayBase):
    """``/v1/billing/wallets/{agent_id}/budget`` and ``/usage``."""

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

    async def usage(self, request: Request) -> Response:
        call = await self.prepare(request, "get_usage_summary")
        agent_id: str = request.path_params["agent_id"]
        since = query_float(request, "since")
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
