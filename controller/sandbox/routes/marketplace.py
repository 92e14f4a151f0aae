"""Exchange rates and the marketplace match (the paid tool finops is charged for)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from controller.sandbox.catalog import exchange_rate
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.request import parse_currency, query_required


class MarketplaceRoutes(GatewayBase):
    """``/v1/billing/exchange-rates`` and ``/v1/marketplace/match``."""

    async def exchange_rates(self, request: Request) -> Response:
        call = await self.prepare(request, "get_exchange_rate")
        from_currency = query_required(request, "from_currency")
        to_currency = query_required(request, "to_currency")
        rate = exchange_rate(parse_currency(from_currency), parse_currency(to_currency))
        return self.finish(
            request, call, {"from_currency": from_currency, "to_currency": to_currency, "rate": str(rate)}
        )

    async def best_match(self, request: Request) -> Response:
        call = await self.prepare(request, "best_match")
        query = query_required(request, "query")
        return self.finish(request, call, {"query": query, "matches": []})
