"""API keys: self-service creation, the admin fleet listing, revocation and rotation
(old key valid for a 300 s grace window; rotation drops scopes).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from controller.sandbox.catalog import KEY_GRACE_SECONDS, KEY_RANK, PROBLEM_TYPE_BASE, iso
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.records import KeyRecord, UnknownTier
from controller.sandbox.request import CreateKeyRequest, RevokeKeyRequest, RotateKeyRequest, validate_body


class KeyRoutes(GatewayBase):
    """``/v1/billing/keys`` and ``/v1/infra/keys``."""

    async def create_key(self, request: Request) -> Response:
        call = await self.prepare(request, "create_api_key")
        req = validate_body(CreateKeyRequest, await self.read_body(request))
        if KEY_RANK.get(req.tier, 99) > KEY_RANK.get(call.tier, 0):
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
