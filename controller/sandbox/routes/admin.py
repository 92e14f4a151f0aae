"""Sandbox-only ``/_sandbox`` routes (admin key required, never counted in the stats):
request stats, the injectable clock and the fault layer's configuration.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from controller.sandbox.catalog import ADMIN_TIER
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.request import ClockRequest, FaultsRequest, validate_body


class SandboxAdminRoutes(GatewayBase):
    """``/_sandbox/stats``, ``/_sandbox/clock``, ``/_sandbox/faults``."""

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

    async def sandbox_faults(self, request: Request) -> Response:
        self._sandbox_admin(request)
        if request.method == "POST":
            req = validate_body(FaultsRequest, await self.read_body(request))
            try:
                self.faults.configure(req.spec)
            except ValueError as exc:
                raise Problem(422, "validation-error", str(exc)) from None
        return JSONResponse(self.faults.snapshot())
