"""The one plan → apply pipeline, shared by ``finops apply``, the daemon's reconcile pass and
the rebalancer, so all three write under the same rules in the same order:

1. resolve known outcomes and adopt marked webhooks (``Applier.prepare``), so the plan never
   races an outcome that is already known;
2. plan (``reconcile.observe_and_plan`` by default) and run the preflight checks on finops'
   own side (``reconcile.preflight``);
3. narrow the plan to what this caller applies (``select``: a saved plan, agents out of
   backoff, only the rebalanced caps);
4. refuse the whole plan if it breaks a guardrail (``PlanRefused``; nothing is written);
5. let the caller confirm or veto (``gate``: exposure review, an operator's "yes", the
   rebalancer's adjustments are remembered only here, after the guardrail check);
6. apply, with typed step outcomes and newly registered keys delivered to their sinks,
   and record the run in the apply log.

The caller holds the writer lock (``daemon.lock.writer_lock``) for the whole pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from controller.errors import GuardrailViolation
from controller.gateway.client import GatewayClient
from controller.keys.vault import KeyStore
from controller.reconcile.apply import AgentResult, Applier, ApplyResult, FaultHook
from controller.reconcile.decide import key_sinks, observe_and_plan, preflight
from controller.state import StateStore
from policies.plan_types import Plan
from policies.spec import DesiredState

PlanFn = Callable[[GatewayClient, DesiredState, str, StateStore], Awaitable[Plan]]
Select = Callable[[Plan], Plan]
Gate = Callable[[Plan, Plan], Awaitable[None] | None]
"""``gate(fresh, chosen)``: called after the guardrail check and before the first write;
raising aborts the run with nothing written."""


REFUSAL = "the plan breaks a guardrail; nothing was applied"


class PlanRefused(GuardrailViolation):
    """The plan breaks a guardrail: nothing was written. Carries the plan made (the whole
    fresh plan, before ``select``)."""

    def __init__(self, message: str, plan: Plan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class PipelineRun:
    fresh: Plan
    """The plan made now (after the preflight checks): what the caller reports as planned."""
    chosen: Plan
    """What was applied (``select(fresh)``, preflight-checked)."""
    result: ApplyResult | None
    """``None`` when nothing was written and nothing was recovered."""
    recovered: tuple[str, ...]
    """What resolving unknown outcomes before planning found."""


def plan_errors_by_agent(plan: Plan) -> dict[str, str]:
    """The agents the plan could not cover (could not be observed, held back by the
    preflight…), with why, from the typed ``PlanError`` values."""
    return {e.agent_id: f"{e.kind.value}: {e.detail}" for e in plan.errors}


def applier_for(
    client: GatewayClient,
    store: StateStore,
    vault: KeyStore,
    desired: DesiredState | None,
    *,
    clock: Callable[[], float] = time.time,
    fault_hook: FaultHook | None = None,
    on_agent_done: Callable[[AgentResult], None] | None = None,
) -> Applier:
    """The applier every caller uses: new keys go to finops' key store, then to the agent's
    declared sink (``keys.sink``)."""
    sinks = key_sinks(desired, vault) if desired is not None else None
    return Applier(
        client, store, vault, clock=clock, key_sink=sinks, fault_hook=fault_hook, on_agent_done=on_agent_done
    )


def check_guardrails(plan: Plan, *, refusal: str = REFUSAL, whole: Plan | None = None) -> None:
    """Refuse a plan that breaks a guardrail, whole (``PlanRefused``)."""
    if plan.violations:
        raise PlanRefused(refusal + ":\n  " + "\n  ".join(str(v) for v in plan.violations), whole or plan)


async def execute(
    applier: Applier,
    store: StateStore,
    chosen: Plan,
    *,
    clock: Callable[[], float] = time.time,
    refusal: str = REFUSAL,
    log_fields: Mapping[str, Any] | None = None,
) -> ApplyResult:
    """Apply a checked plan and record the run in the apply log."""
    check_guardrails(chosen, refusal=refusal)
    started = clock()
    result = await applier.apply(chosen)
    store.log_apply(
        started, result.ok, {"changes": len(chosen.changes), "writes": result.writes, **dict(log_fields or {})}
    )
    return result


async def apply_plan(
    client: GatewayClient,
    store: StateStore,
    vault: KeyStore,
    desired: DesiredState,
    *,
    target: str,
    clock: Callable[[], float] = time.time,
    prune: bool = False,
    plan_fn: PlanFn | None = None,
    select: Select | None = None,
    gate: Gate | None = None,
    refusal: str = REFUSAL,
    log_fields: Mapping[str, Any] | None = None,
    fault_hook: FaultHook | None = None,
    on_agent_done: Callable[[AgentResult], None] | None = None,
) -> PipelineRun:
    """Prepare, plan, check, apply and log (see the module docstring). ``on_agent_done`` is
    told each agent's result as it completes (progress)."""
    applier = applier_for(
        client, store, vault, desired, clock=clock, fault_hook=fault_hook, on_agent_done=on_agent_done
    )
    notes = tuple(await applier.prepare(desired))
    planner: PlanFn = plan_fn or (lambda c, d, t, s: observe_and_plan(c, d, t, s, prune=prune))
    raw = await planner(client, desired, target, store)
    fresh = preflight(raw, desired, vault)
    chosen = fresh if select is None else preflight(select(raw), desired, vault)
    check_guardrails(chosen, refusal=refusal, whole=fresh)
    if gate is not None:
        waited = gate(fresh, chosen)
        if waited is not None:
            await waited
    if chosen.empty:
        # Nothing to write, but what resolving unknown outcomes found is still said.
        empty = ApplyResult(agents=[], writes=0, reads=0, recovered=list(notes)) if notes else None
        return PipelineRun(fresh, chosen, empty, notes)
    result = await execute(applier, store, chosen, clock=clock, refusal=refusal, log_fields=log_fields)
    return PipelineRun(fresh, chosen, result, notes)


def only(plan: Plan, keep: Callable[[Any], bool]) -> Plan:
    """``plan`` with only the changes ``keep`` accepts (guardrail verdicts are kept)."""
    return replace(plan, changes=tuple(c for c in plan.changes if keep(c)))
