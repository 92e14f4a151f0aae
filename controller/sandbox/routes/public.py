"""Unauthenticated routes: health probes, the removed ``/v1/execute`` and ``/v1/register``."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from controller.sandbox.catalog import GATEWAY_VERSION, number
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.records import WalletExists, from_atomic
from controller.sandbox.request import RegisterRequest


class PublicRoutes(GatewayBase):
    """Health, removed endpoints and agent registration."""

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
