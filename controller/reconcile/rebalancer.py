"""The rebalancing reconciler: read spend, decide (``policies.rebalance``), remember, apply.

The decision is recomputed from git's baselines and the gateway's rolling 24 h spend on
every run; the result is stored as per-agent *adjustments* that the planner adds to the
baselines, so the ordinary reconcile loop enforces the rebalanced caps instead of fighting
them. Adjustments expire on their own: the next run recomputes them (an agent whose spend
recovered returns to baseline), and the planner ignores any adjustment older than 24 h.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin
from controller.keys.vault import KeyStore
from controller.observation.store import SharedRead
from controller.reconcile.apply import ApplyResult
from controller.reconcile.decide import observe_and_plan
from controller.reconcile.pipeline import apply_plan, only
from controller.state import Adjustment, StateStore
from policies.currency import CREDITS, from_credits
from policies.escalation import OPEN
from policies.plan_types import ChangeKind, Plan
from policies.rebalance import AgentBudget, Rebalance, RebalancePolicy, rebalance
from policies.spec import DesiredState, FleetSpec


@dataclass
class FleetRebalance:
    fleet: str
    currency: str
    decision: Rebalance | None
    errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.decision is None:
            return [f"{self.fleet}: not rebalanced: {'; '.join(self.errors)}"]
        out = [f"{self.fleet}: " + note for note in self.decision.notes]
        out += [
            self.decision.explain(a, self.currency) for a, amount in sorted(self.decision.adjustments.items()) if amount
        ]
        out += [f"{self.fleet}: skipped {e}" for e in self.errors]
        return out


async def _spend(client: GatewayClient, agent_id: str) -> Decimal:
    return (await client.get_budget(agent_id)).daily_spend


async def decide(
    client: GatewayClient, desired: DesiredState, holds: frozenset[str], shared: SharedRead | None = None
) -> list[FleetRebalance]:
    """Read each rebalanced fleet's rolling 24 h spend and decide its caps (no writes).
    ``shared`` (the daemon): spend comes from the shared observation store."""
    out: list[FleetRebalance] = []
    for fleet in desired.fleets:
        settings = fleet.rebalancing
        if settings is None or not settings.enabled:
            continue
        out.append(await _decide_fleet(client, fleet, holds, shared))
    return out


async def _shared_spends(client: GatewayClient, fleet: FleetSpec, shared: SharedRead) -> list[Decimal | BaseException]:
    ids = [a.agent_id for a in fleet.agents]
    ensured = await shared.store.ensure(client, ids, shared.freshness, authoritative=shared.authoritative)
    out: list[Decimal | BaseException] = []
    for agent in ids:
        view = shared.store.view(agent)
        if agent in ensured.errors or view.budget is None:
            out.append(GatewayError(ensured.errors.get(agent, "budget not read")))
        else:
            out.append(view.budget.value.daily_spend)
    return out


async def _decide_fleet(
    client: GatewayClient, fleet: FleetSpec, holds: frozenset[str], shared: SharedRead | None = None
) -> FleetRebalance:
    assert fleet.rebalancing is not None
    rate = await client.exchange_rate(fleet.currency, CREDITS)
    spends: list[Decimal | BaseException]
    if shared is not None:
        spends = await _shared_spends(client, fleet, shared)
    else:
        spends = list(await asyncio.gather(*(_spend(client, a.agent_id) for a in fleet.agents), return_exceptions=True))
    budgets: list[AgentBudget] = []
    errors: list[str] = []
    for spec, spend in zip(fleet.agents, spends, strict=True):
        if isinstance(spend, (AuthenticationFailed, NotAdmin)):
            raise spend
        if isinstance(spend, BaseException):
            if not isinstance(spend, GatewayError):
                raise spend
            # Unobservable spend: the agent keeps its baseline and neither gives nor takes.
            errors.append(f"{spec.agent_id} (spend unreadable: {spend})")
            held = True
            spent = Decimal("0.00")
        else:
            held = spec.agent_id in holds
            spent = from_credits(spend, rate)
        assert spec.daily_cap_min is not None and spec.daily_cap_max is not None
        budgets.append(AgentBudget(spec.agent_id, spec.daily_cap, spent, spec.daily_cap_min, spec.daily_cap_max, held))
    settings = fleet.rebalancing
    policy = RebalancePolicy(True, settings.donor_below, settings.receiver_above, settings.share)
    return FleetRebalance(fleet.name, fleet.currency, rebalance(budgets, policy, fleet.daily_total), errors)


def proposed_adjustments(results: list[FleetRebalance], now: float) -> dict[str, list[Adjustment]]:
    """Each decided fleet's new adjustments (zero adjustments are dropped: the agent is back
    at its baseline)."""
    out: dict[str, list[Adjustment]] = {}
    for result in results:
        if result.decision is None:
            continue
        decision = result.decision
        out[result.fleet] = [
            Adjustment(agent, result.fleet, amount, decision.explain(agent, result.currency), now)
            for agent, amount in sorted(decision.adjustments.items())
            if amount
        ]
    return out


def remember(store: StateStore, results: list[FleetRebalance], now: Callable[[], float]) -> None:
    """Replace each fleet's adjustments with the new decision."""
    for fleet, adjustments in proposed_adjustments(results, now()).items():
        store.replace_adjustments(fleet, adjustments)


def adjustments_after(store: StateStore, proposed: dict[str, list[Adjustment]]) -> dict[str, Adjustment]:
    """The adjustments in force once ``proposed`` replaces its fleets' (what the planner
    would read after ``remember``), without writing them."""
    kept = {agent: adj for agent, adj in store.adjustments().items() if adj.fleet not in proposed}
    return kept | {a.agent_id: a for adjustments in proposed.values() for a in adjustments}


@dataclass
class RebalanceRun:
    fleets: list[FleetRebalance]
    applied: ApplyResult | None
    moved: Decimal

    def lines(self) -> list[str]:
        return [line for f in self.fleets for line in f.lines()]


async def run_rebalance(
    client: GatewayClient,
    desired: DesiredState,
    store: StateStore,
    sink: KeyStore,
    target: str,
    *,
    dry_run: bool,
    now: Callable[[], float],
    shared: SharedRead | None = None,
) -> RebalanceRun:
    """Decide, remember and write only the rebalanced caps (other drift is the reconcile
    loop's business, so an on-demand rebalance never funds or registers anything).

    The rebalanced caps are planned from the proposed adjustments *before* they are stored:
    a decision whose caps break a guardrail is refused with nothing written (no adjustment
    either, so the reconcile loop does not enforce it later). ``shared`` (the daemon): reads
    through the shared observation store."""
    # Held and paused agents (the escalation ladder) are not rebalanced: their caps are not theirs to lend.
    paused = {e.agent_id for e in store.escalations(statuses=OPEN)}
    results = await decide(client, desired, frozenset(store.holds()) | paused, shared)
    moved = sum((r.decision.moved for r in results if r.decision is not None), Decimal("0.00"))
    if dry_run:
        return RebalanceRun(results, None, moved)
    proposed = proposed_adjustments(results, now())
    in_force = adjustments_after(store, proposed)
    fleets = {r.fleet for r in results}

    async def plan_fn(c: GatewayClient, d: DesiredState, t: str, s: StateStore) -> Plan:
        return await observe_and_plan(c, d, t, s, adjustments=in_force, shared=shared)

    def gate(fresh: Plan, chosen: Plan) -> None:
        for fleet, adjustments in proposed.items():
            store.replace_adjustments(fleet, adjustments)

    run = await apply_plan(
        client,
        store,
        sink,
        desired,
        target=target,
        clock=now,
        plan_fn=plan_fn,
        select=lambda plan: only(plan, lambda c: c.kind is ChangeKind.SET_BUDGET and c.fleet in fleets),
        gate=gate,
        refusal="the rebalanced caps break a guardrail; nothing was written",
        log_fields={"by": "rebalance"},
    )
    applied = run.result if run.result is not None and run.result.agents else None
    return RebalanceRun(results, applied, moved)
