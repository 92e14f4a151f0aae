"""Fleet-wide and per-agent usage analytics: the leaderboard and the usage timeseries,
with GreenHelix 1.4.8's atomic-unit bug (API.md §5): the leaderboard's ``spend`` values and
the timeseries' ``cost`` are sums of stored integers (1e-8 credit), sent as if they were
credits. All time comes from the injected clock (the usage records' own times).
"""

from __future__ import annotations

from decimal import Decimal

from starlette.requests import Request
from starlette.responses import Response

from controller.sandbox.catalog import iso, money
from controller.sandbox.gateway import GatewayBase
from controller.sandbox.problems import Problem
from controller.sandbox.request import query_float, query_int

LEADERBOARD_METRICS = ("spend", "calls", "trust_score", "revenue", "rating")
INTERVAL_SECONDS = {"hour": 3600, "day": 86400}


class AnalyticsRoutes(GatewayBase):
    """``GET /v1/billing/leaderboard`` and ``GET /v1/billing/wallets/{agent_id}/timeseries``."""

    async def leaderboard(self, request: Request) -> Response:
        """Any key, any tier (a free read that shows other agents' ids). ``calls`` counts
        an agent's usage records (every successful call it made, free ones included),
        ``spend`` sums their cost in atomic units (the bug), both all time, best first.
        Only agents with usage appear; hidden prefixes never do; ``limit`` has no upper
        bound. ``trust_score``, ``revenue`` and ``rating`` rank identities, settlements and
        marketplace ratings, which the sandbox does not hold: they are always empty."""
        call = await self.prepare(request, "get_agent_leaderboard")
        metric = request.query_params.get("metric", "spend")
        limit = query_int(request, "limit", 10)
        if metric not in LEADERBOARD_METRICS:
            raise Problem(400, "validation-error", f"Unknown metric: {metric}")
        rows = self.store.leaderboard(metric, limit) if metric in ("calls", "spend") else []
        board = [{"rank": rank, "agent_id": agent, "value": value} for rank, (agent, value) in enumerate(rows, 1)]
        return self.finish(request, call, {"leaderboard": board})

    async def timeseries(self, request: Request) -> Response:
        """The agent's usage per UTC hour or day (``interval``, default ``hour``): the
        newest ``limit`` (default 24) non-empty buckets of records at or after ``since``
        (unix seconds; all time when absent), oldest first. Buckets without usage are
        left out, not sent as zeros. ``cost`` is a 2-dp string of atomic units (the bug:
        ``"30000000.00"`` is 0.30 credits)."""
        call = await self.prepare(request, "get_metrics_timeseries")
        agent_id: str = request.path_params["agent_id"]
        interval = request.query_params.get("interval", "hour")
        since = query_float(request, "since")
        limit = query_int(request, "limit", 24)
        self.check_ownership(call, agent_id)
        step = INTERVAL_SECONDS.get(interval)
        if step is None:
            raise Problem(
                400, "validation-error", f"Invalid interval '{interval}': must be one of {sorted(INTERVAL_SECONDS)}"
            )
        buckets = [
            {"timestamp": iso(start), "calls": calls, "cost": money(Decimal(cost))}
            for start, calls, cost in self.store.usage_buckets(agent_id, step, since, limit)
        ]
        return self.finish(request, call, {"buckets": buckets})
