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

The gateway is split by area: ``controller.sandbox.gateway`` holds the shared
``require_tool`` chain, ``controller.sandbox.routes`` one module per gateway area
(public, wallets, budget, marketplace, keys, webhooks, batch, ``/_sandbox`` admin), and
this module combines them into ``SandboxGateway`` and wires the routes and middleware.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from controller.sandbox.catalog import TOOLS, exchange_rate, required_scope
from controller.sandbox.clock import MutableClock
from controller.sandbox.edge import EdgeMiddleware
from controller.sandbox.faults import FaultInjector, FaultMiddleware
from controller.sandbox.gateway import Clock, Handler, WebhookDeliverer
from controller.sandbox.problems import Problem, problem_response
from controller.sandbox.quirks import QuirkCounters, WalletNotFoundBreaksConnection
from controller.sandbox.records import DEFAULT_SCOPES
from controller.sandbox.request import Call
from controller.sandbox.routes.admin import SandboxAdminRoutes
from controller.sandbox.routes.analytics import AnalyticsRoutes
from controller.sandbox.routes.batch import BatchRoutes
from controller.sandbox.routes.budget import BudgetRoutes
from controller.sandbox.routes.keys import KeyRoutes
from controller.sandbox.routes.marketplace import MarketplaceRoutes
from controller.sandbox.routes.public import PublicRoutes
from controller.sandbox.routes.wallets import WalletRoutes
from controller.sandbox.routes.webhooks import WebhookRoutes, webhook_url_error
from controller.sandbox.stats import RequestStats
from controller.sandbox.store import SandboxStore

logger = logging.getLogger("finops.sandbox")


class SandboxGateway(
    PublicRoutes,
    WalletRoutes,
    BudgetRoutes,
    AnalyticsRoutes,
    MarketplaceRoutes,
    KeyRoutes,
    WebhookRoutes,
    BatchRoutes,
    SandboxAdminRoutes,
):
    """Request handling, every gateway area; one instance per app."""


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
    wallet_404_breaks_connection: bool = True,
    quirks: QuirkCounters | None = None,
) -> Starlette:
    """The sandbox ASGI app. ``clock`` (unix seconds) drives every time read; pass a
    ``MutableClock`` to move it, also over HTTP via ``POST /_sandbox/clock``. ``faults``
    (off unless configured) misbehaves on ``/v1/*`` on purpose; ``/_sandbox/faults`` shows
    and reconfigures it. ``wallet_404_breaks_connection`` (on, like every quirk of the real
    gateway) leaves a connection broken after a 404 wallet-not-found
    (``controller.sandbox.quirks``); ``quirks`` counts what it did."""
    if clock is None:
        clock = MutableClock()
    injector = faults if faults is not None else FaultInjector()
    gw = SandboxGateway(store, clock, deliver, idempotency_race_window=idempotency_race_window, faults=injector)
    stats = store.stats

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
        ("GET", "/v1/billing/wallets/{agent_id}/timeseries", gw.timeseries, True),
        ("GET", "/v1/billing/leaderboard", gw.leaderboard, True),
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
        ("GET", "/_sandbox/faults", gw.sandbox_faults, False),
        ("POST", "/_sandbox/faults", gw.sandbox_faults, False),
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
        middleware=[
            Middleware(FaultMiddleware, injector=injector),
            Middleware(WalletNotFoundBreaksConnection, enabled=wallet_404_breaks_connection, counters=quirks),
            Middleware(EdgeMiddleware, stats=stats),
        ],
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
