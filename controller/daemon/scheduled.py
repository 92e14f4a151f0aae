"""The scheduled reconcilers the daemon runs besides the reconcile pass: alert evaluation,
key rotation and budget rebalancing. Each is the same code the matching CLI command runs
(``alerts check``, ``rotate``, ``rebalance``), wrapped as a daemon job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from controller.alerting.deliver import Sleep
from controller.alerting.engine import check_alerts
from controller.alerting.guard import Resolver, system_resolver
from controller.alerting.ladder import Ladder, active_by_action
from controller.alerting.signals import SignalCache
from controller.daemon.command import DaemonContext
from controller.daemon.jobs import JobFn, JobResult, SkipReason
from controller.keys.rotate import KeyManager
from controller.reconcile.rebalancer import run_rebalance
from policies.escalation import OPEN
from policies.fleet_metrics import forecast_seconds
from policies.spec import DesiredState

REBALANCE_TICK_S = 60.0
"""How often the rebalance job looks; each fleet actually runs on its own ``interval``."""


def alerts_job(
    ctx: DaemonContext,
    now: Callable[[], float] = time.time,
    *,
    resolver: Resolver = system_resolver,
    sleep: Sleep = asyncio.sleep,
) -> JobFn:
    """``resolver`` (the receivers' DNS) and ``sleep`` (the delivery backoff) are injectable,
    like the clock, so a test neither touches DNS nor waits through real backoff. One
    ``SignalCache`` lives as long as the job: usage histories are read about once an hour
    per agent that declares a forecast or anomaly rule, and the spend readings of successive
    checks give the burn rate."""
    signals = SignalCache()

    async def job() -> JobResult:
        desired = ctx.desired()
        if desired is None:
            return JobResult.skipped("no valid manifests yet", SkipReason.NOT_READY)
        async with ctx.client_factory() as client:
            moved: frozenset[str] | None = None
            shared = None
            if ctx.observation is not None:  # the change feed: only agents that moved (or are due) are read
                sync = await ctx.observation.sync(client, [a.agent_id for a in desired.agents()], owner=True)
                moved = sync.moved
                shared = ctx.observation.shared(ctx.observation.freshness(balance=False))
            keys = KeyManager(
                client,
                ctx.store,
                ctx.sink,
                state_path=ctx.store.location,
                clock=now,
                agent_client_factory=ctx.agent_client,
            )
            try:
                result = await check_alerts(
                    client,
                    desired,
                    ctx.store.location,
                    now=now,
                    held=frozenset(ctx.store.holds()),
                    resolver=resolver,
                    sleep=sleep,
                    fence=ctx.fence,
                    ladder=Ladder(client, ctx.store, keys, desired, now=now),
                    signals=signals,
                    moved=moved,
                    shared=shared,
                )
            finally:
                keys.close()
        result.moved = moved
        ctx.metrics.set_forecasts({r.agent_id: forecast_seconds(r.forecasts) for r in result.forecasts})
        if result.ladder is not None:
            ctx.metrics.record_escalations(result.ladder, active_by_action(ctx.store.escalations(statuses=OPEN)))
        ctx.metrics.record_alert_check(
            fired=result.fired,
            recovered=result.recovered,
            delivered=result.delivered,
            failed=result.failed,
            gave_up=result.gave_up,
            refused=result.refused,
            pending=result.pending,
            unread=len(result.agent_errors),
        )
        fields = {k: v for k, v in result.to_dict().items() if isinstance(v, int)}
        if moved is not None:
            fields["moved"] = len(moved)
        if result.ok:
            return JobResult.success(f"{result.fired} crossing(s), {result.delivered} delivered", **fields)
        ladder_problems = result.ladder.problems if result.ladder is not None else []
        problems = [*result.agent_errors.values(), *result.delivery_errors, *ladder_problems]
        return JobResult.partial("; ".join(problems)[:500], **fields)

    return job


def rotation_job(ctx: DaemonContext, now: Callable[[], float] = time.time) -> JobFn:
    """Rotate the keys that are due by ``now`` (finops' clock: ages and settle times)."""

    async def job() -> JobResult:
        desired = ctx.desired()
        if desired is None:
            return JobResult.skipped("no valid manifests yet", SkipReason.NOT_READY)
        async with ctx.client_factory() as client:
            keys = KeyManager(
                client,
                ctx.store,
                ctx.sink,
                state_path=ctx.store.location,
                clock=now,
                agent_client_factory=ctx.agent_client,
            )
            try:
                run = await keys.rotate_due(desired)
                ctx.metrics.set_keys_due_rotation(len(keys.due(desired, datetime.fromtimestamp(now(), UTC))))
            finally:
                keys.close()
        message = f"{len(run.rotated)} rotated, {len(run.failed)} failed"
        for note in run.recovered:
            message += f"; recovered: {note}"
        return JobResult.success(message) if run.ok else JobResult.partial(message, failed=sorted(run.failed))

    return job


def rebalance_job(ctx: DaemonContext, now: Callable[[], float] = time.time) -> JobFn:
    last_run: dict[str, float] = {}

    async def job() -> JobResult:
        desired = ctx.desired()
        if desired is None:
            return JobResult.skipped("no valid manifests yet", SkipReason.NOT_READY)
        at = now()
        due = tuple(
            f
            for f in desired.fleets
            if f.rebalancing is not None
            and f.rebalancing.enabled
            and at - last_run.get(f.name, 0.0) >= f.rebalancing.interval_seconds
        )
        if not due:
            declared = any(f.rebalancing is not None and f.rebalancing.enabled for f in desired.fleets)
            return JobResult.skipped("no fleet due" if declared else "no fleet declares rebalancing")
        async with ctx.client_factory() as client:
            shared = None
            if ctx.observation is not None:
                await ctx.observation.sync(client, [a.agent_id for a in desired.agents()])
                shared = ctx.observation.shared(ctx.observation.freshness())
            run = await run_rebalance(
                client, DesiredState(due), ctx.store, ctx.sink, ctx.target.name, dry_run=False, now=now, shared=shared
            )
        for fleet in due:
            last_run[fleet.name] = at
        ctx.metrics.set_rebalanced_amount(run.moved)
        message = "; ".join(run.lines())[:500]
        if run.applied is not None and not run.applied.ok:
            return JobResult.partial(message)
        return JobResult.success(message, moved=str(run.moved))

    return job


def scheduled_jobs(ctx: DaemonContext) -> None:
    """Add the scheduled reconcilers to the daemon, on ``ctx.clock``. Every job also runs
    once at start-up, after the first reconcile: so ``finops run --once`` is one complete
    pass (reconcile, alerts, due rotations, rebalancing) for cron."""
    ctx.daemon.add_job("alerts", alerts_job(ctx, now=ctx.clock), exclusive=False, run_at_start=True)
    ctx.daemon.add_job("rotation", rotation_job(ctx, now=ctx.clock), run_at_start=True)
    ctx.daemon.add_job("rebalance", rebalance_job(ctx, now=ctx.clock), interval_s=REBALANCE_TICK_S, run_at_start=True)
