"""Webhooks: registration (with the gateway's URL rules), listing, deletion, test pings
and the delivery log; the sandbox never touches the network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from controller.sandbox.catalog import FORBIDDEN_DETAIL, WEBHOOK_RETRY_BASE_SECONDS, iso
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.records import WebhookRecord
from controller.sandbox.request import Call, RegisterWebhookRequest, query_int, validate_body

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


class WebhookRoutes(GatewayBase):
    """``/v1/infra/webhooks``."""

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
        limit = query_int(request, "limit", 50)
        offset = query_int(request, "offset", 0)
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
