"""One alert check: read every agent's budget, decide, persist, deliver.

This is what ``finops alerts check``, ``finops status`` and the daemon call. The order is
the at-least-once contract: (1) read budgets (one agent's failure is reported and the others
go on); (2) in one transaction, evaluate against the remembered slots, store the new slots
and queue one outbox row per (alert, route); (3) deliver everything pending, this check's
alerts and any left over from earlier checks. A crash after (2) loses nothing: the next
check delivers the queued rows with the same ids.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from controller.alerting.deliver import DEFAULT_POLICY, Clock, DeliveryPolicy, Sleep, deliver_pending
from controller.alerting.guard import Resolver, system_resolver
from controller.alerting.signals import SignalCache, collect_signals
from controller.alerting.store import PENDING, AlertStore, AlertTx, Attempt, FiredAlert, RouteStatus
from controller.gateway.client import GatewayClient
from controller.gateway.errors import GatewayError
from controller.gateway.models import BudgetStatus
from controller.observation.store import SharedRead
from controller.state.location import StateLocation, as_location
from policies.alerts import (
    AlertEvent,
    BudgetReading,
    WindowReading,
    evaluate,
    redact_url,
    render_url,
    routes_for,
)
from policies.signal_alerts import ForecastReading, SignalEvent, evaluate_signals, render_signal_url, signal_routes
from policies.spec import (
    ALERT_EVENT_ANOMALY,
    ALERT_EVENT_FORECAST,
    ALERT_EVENT_RECOVERED,
    ALERT_EVENT_THRESHOLD,
    AgentSpec,
    AlertRoute,
    DesiredState,
)
from policies.urls import check_url_safety

if TYPE_CHECKING:
    from controller.alerting.ladder import Ladder, LadderReport

logger = logging.getLogger("finops.alerts")

T = TypeVar("T", RouteStatus, FiredAlert)


@dataclass
class AlertCheckResult:
    """Counts are for this check, except ``pending`` (rows still waiting after it)."""

    evaluated: int = 0
    fired: int = 0
    recovered: int = 0
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    gave_up: int = 0
    refused: int = 0
    deferred: int = 0
    pending: int = 0
    held: tuple[str, ...] = ()
    events: tuple[AlertEvent, ...] = ()
    agent_errors: dict[str, str] = field(default_factory=dict)
    delivery_errors: list[str] = field(default_factory=list)
    ladder: LadderReport | None = None
    """What the escalation ladder did (``None``: no ladder in this check)."""
    forecasts_fired: int = 0
    anomalies_fired: int = 0
    history_reads: int = 0
    """Usage-history (timeseries) requests this check made (forecasts and anomalies)."""
    signal_events: tuple[SignalEvent, ...] = ()
    forecasts: tuple[ForecastReading, ...] = ()
    """This check's forecasts of every agent with a forecast horizon (for metrics)."""
    moved: frozenset[str] | None = None
    """The agents the daemon's change feed saw move since its last poll (``None``: unknown,
    any may have: no feed, its first poll, or a failed one); for jobs that follow the check
    (e.g. a forecast reading timeseries only for agents that moved)."""

    @property
    def ok(self) -> bool:
        """Every agent was read, every escalation converged and nothing failed to deliver."""
        ladder_ok = self.ladder is None or not self.ladder.problems
        return not self.agent_errors and not (self.failed or self.gave_up or self.refused) and ladder_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluated": self.evaluated,
            "fired": self.fired,
            "recovered": self.recovered,
            "queued": self.queued,
            "delivered": self.delivered,
            "failed": self.failed,
            "gave_up": self.gave_up,
            "refused": self.refused,
            "deferred": self.deferred,
            "pending": self.pending,
            "held": list(self.held),
            "forecasts_fired": self.forecasts_fired,
            "anomalies_fired": self.anomalies_fired,
            "history_reads": self.history_reads,
            "events": [e.payload() for e in self.events] + [e.payload() for e in self.signal_events],
            "agent_errors": dict(sorted(self.agent_errors.items())),
            "delivery_errors": list(self.delivery_errors),
        } | ({"escalation": self.ladder.to_dict()} if self.ladder is not None else {})


def _reading(spec: AgentSpec, status: BudgetStatus) -> BudgetReading:
    return BudgetReading(
        agent_id=spec.agent_id,
        fleet=spec.fleet,
        thresholds=spec.alert_thresholds,
        daily=WindowReading(status.daily_spend, status.daily_cap),
        monthly=WindowReading(status.monthly_spend, status.monthly_cap),
    )


async def _read_budgets(
    client: GatewayClient, specs: list[AgentSpec], shared: SharedRead | None = None
) -> tuple[list[BudgetReading], dict[str, str]]:
    """Every agent's budget status, with ``client.concurrency`` workers (never one task per
    agent: 10,000 pending tasks hold ~100 MB). ``shared`` (the daemon): through the shared
    observation store, reading only budgets that are stale for the job's freshness."""
    readings: list[BudgetReading] = []
    errors: dict[str, str] = {}
    if shared is not None:
        ensured = await shared.store.ensure(
            client, [s.agent_id for s in specs], shared.freshness, authoritative=shared.authoritative
        )
        for spec in specs:
            view = shared.store.view(spec.agent_id)
            if spec.agent_id in ensured.errors or view.budget is None:
                errors[spec.agent_id] = f"cannot read budget: {ensured.errors.get(spec.agent_id, 'not read')}"
            else:
                readings.append(_reading(spec, view.budget.value))
        return readings, errors
    statuses: dict[int, BudgetStatus] = {}
    pending = iter(enumerate(specs))

    async def worker() -> None:
        for index, spec in pending:
            try:
                statuses[index] = await client.get_budget(spec.agent_id)
            except GatewayError as exc:
                errors[spec.agent_id] = f"cannot read budget: {exc}"

    await asyncio.gather(*(worker() for _ in range(min(client.concurrency, len(specs)))))
    readings = [_reading(spec, statuses[i]) for i, spec in enumerate(specs) if i in statuses]
    return readings, errors


async def check_alerts(
    client: GatewayClient,
    desired: DesiredState,
    state_path: Path | StateLocation,
    *,
    now: Clock,
    transport: httpx.AsyncBaseTransport | None = None,
    held: frozenset[str] = frozenset(),
    policy: DeliveryPolicy = DEFAULT_POLICY,
    sleep: Sleep = asyncio.sleep,
    resolver: Resolver = system_resolver,
    fence: Callable[[], None] | None = None,
    ladder: Ladder | None = None,
    signals: SignalCache | None = None,
    moved: frozenset[str] | None = None,
    shared: SharedRead | None = None,
) -> AlertCheckResult:
    """Evaluate every declared agent's thresholds and deliver due alerts (module doc).

    Held agents (``finops freeze``: caps 0) are not read or evaluated; their slots keep
    their state, and alerts queued before the hold are still delivered. Amounts are in
    gateway credits, the unit caps are enforced in. ``transport`` is the receivers' httpx
    transport (tests inject faults there); the gateway is reached through ``client``.
    ``fence`` (the writer lock's check) runs before crossings are decided and before every
    delivery attempt: a finops that lost the lock decides and sends nothing more.
    ``ladder`` (``controller.alerting.ladder``) decides escalations with the slots and
    executes them before the alerts are delivered.

    Forecast and anomaly alerts (``budget.forecast``, ``budget.anomaly``) are decided in the
    same transaction from the same budget reads, plus each declaring agent's usage history
    from ``signals`` (``controller.alerting.signals``: the daemon passes one cache for its
    lifetime; without one, every declaring agent's history is read). ``moved``: the agents
    the change feed saw spend since the last check (``None``: unknown).

    ``shared`` (the daemon): budgets come from the shared observation store, read only
    where stale (the change feed and the rolling resync mark them).
    """
    specs = {a.agent_id: a for a in desired.agents()}
    to_read = [s for s in specs.values() if s.agent_id not in held]
    readings, agent_errors = await _read_budgets(client, to_read, shared)
    if ladder is not None:
        readings, ladder_errors = await ladder.prepare(readings)
        agent_errors.update(ladder_errors)
    result = AlertCheckResult(
        evaluated=len(readings), held=tuple(sorted(held & specs.keys())), agent_errors=agent_errors
    )
    at = now()
    collected = await collect_signals(
        client,
        specs,
        readings,
        signals if signals is not None else SignalCache(),
        now=at,
        moved=moved,
        currencies={f.name: f.currency for f in desired.fleets},
    )
    result.agent_errors.update(collected.errors)
    result.history_reads = collected.history_reads
    result.forecasts = tuple(collected.forecasts)
    if fence is not None:
        await asyncio.to_thread(fence)
    with AlertStore(state_path) as store:
        with store.decide(at) as tx:
            before = tx.slots()
            evaluation = evaluate(readings, before, now=at)
            tx.save_slots(evaluation.changed(before), evaluation.dropped(before))
            tx.forget_agents_except(specs)
            events = ladder.decide(tx, evaluation, at) if ladder is not None else evaluation.events
            for event in events:
                routes = routes_for(event, specs[event.agent_id].alert_routes)
                _enqueue(tx, result, event.id, event.agent_id, event.type, event.body(), [
                    (route, render_url(route, event)) for route in routes
                ])  # fmt: skip
            before_signals = tx.signal_slots()
            signal_eval = evaluate_signals(
                collected.forecasts, collected.anomalies, before_signals, declared=collected.declared, now=at
            )
            tx.save_signal_slots(signal_eval.changed(before_signals), signal_eval.dropped(before_signals))
            for signal in signal_eval.events:
                _enqueue_signal(tx, result, signal, specs[signal.agent_id].alert_routes)
        for signal in signal_eval.events:
            logger.info("%s %s: agent %s %s %s", signal.type, signal.id, signal.agent_id, signal.window, signal.details)
        result.signal_events = signal_eval.events
        result.forecasts_fired = sum(1 for e in signal_eval.events if e.type == ALERT_EVENT_FORECAST)
        result.anomalies_fired = sum(1 for e in signal_eval.events if e.type == ALERT_EVENT_ANOMALY)
        for event in events:
            logger.info(
                "%s %s: agent %s %s %s%% of cap (threshold %s%%)",
                event.type, event.id, event.agent_id, event.window, event.percent, event.threshold,
            )  # fmt: skip
        result.events = events
        result.fired = sum(1 for e in events if e.type == ALERT_EVENT_THRESHOLD)
        result.recovered = sum(1 for e in events if e.type == ALERT_EVENT_RECOVERED)
        if ladder is not None:
            result.ladder = await ladder.execute()  # stopping spend comes before telling about it
        store.prune(at - policy.retention)
        report = await deliver_pending(
            store, now=now, transport=transport, policy=policy, sleep=sleep, resolver=resolver, fence=fence
        )
        result.pending = store.count(PENDING)
    result.delivered = report.delivered
    result.failed = report.failed
    result.gave_up = report.gave_up
    result.refused += report.refused
    result.deferred = report.deferred
    result.delivery_errors.extend(report.errors)
    return result


def _enqueue_signal(tx: AlertTx, result: AlertCheckResult, signal: SignalEvent, routes: tuple[AlertRoute, ...]) -> None:
    """Queue a forecast or anomaly alert to the routes that list its type."""
    targets = [(route, render_signal_url(route, signal)) for route in signal_routes(signal, routes)]
    _enqueue(tx, result, signal.id, signal.agent_id, signal.type, signal.body(), targets)


def _enqueue(
    tx: AlertTx,
    result: AlertCheckResult,
    alert_id: str,
    agent_id: str,
    event_type: str,
    body: bytes,
    targets: list[tuple[AlertRoute, str]],
) -> None:
    """Queue one alert to each (route, rendered URL): a URL the rules refuse is recorded as
    refused, never sent."""
    for route, url in targets:
        problem = check_url_safety(url, allow_insecure=route.allow_insecure)
        refusal = f"refused: {problem}" if problem else None
        row = tx.enqueue(
            alert_id=alert_id,
            agent_id=agent_id,
            event_type=event_type,
            route=redact_url(route.url),
            url=url,
            allow_insecure=route.allow_insecure,
            secret=route.secret,
            body=body,
            refused=refusal,
        )
        if row is None:
            continue
        if refusal:
            result.refused += 1
            result.delivery_errors.append(f"{agent_id}: alert {alert_id} to {redact_url(url)}: {refusal}")
        else:
            result.queued += 1


def _by_agent(items: list[T]) -> dict[str, list[T]]:
    out: dict[str, list[T]] = {}
    for item in items:
        out.setdefault(item.agent_id, []).append(item)
    return out


def delivery_status(state_path: Path | StateLocation) -> Mapping[str, list[RouteStatus]]:
    """Per agent, each alert route's last attempt, consecutive failed attempts and queue
    counts. Reads only; an absent state file means nothing was ever sent."""
    if not as_location(state_path).exists():
        return {}
    with AlertStore(state_path) as store:
        return _by_agent(store.route_statuses())


def alert_state(state_path: Path | StateLocation) -> Mapping[str, list[FiredAlert]]:
    """Per agent, the (window, threshold) slots currently fired, with their alert ids."""
    if not as_location(state_path).exists():
        return {}
    with AlertStore(state_path) as store:
        return _by_agent(store.fired())


def delivery_log(state_path: Path | StateLocation, alert_id: str | None = None) -> list[Attempt]:
    """Every delivery attempt (URLs redacted), oldest first."""
    if not as_location(state_path).exists():
        return []
    with AlertStore(state_path) as store:
        return store.log(alert_id)
