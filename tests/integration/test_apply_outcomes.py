"""The applier's typed step outcomes, from the real producer against the sandbox: what the
daemon counts and the renderers show comes from these types, not from their wording."""

from __future__ import annotations

from decimal import Decimal

from controller.daemon.passes import applied_kinds
from controller.reconcile.apply import Applied, Skipped, SkipReason
from controller.sandbox.store import to_atomic
from policies.plan_types import ChangeKind
from policies.spec import DesiredState
from tests.integration.conftest import Harness


async def test_a_top_up_no_longer_needed_at_apply_is_a_typed_skip_and_is_not_counted(
    harness: Harness, canonical: DesiredState
) -> None:
    assert (await harness.apply(await harness.plan(canonical))).ok
    harness.spend("res-01", Decimal("5000.00"))  # 50.00 USD: below its 40.00 USD floor
    plan = await harness.plan(canonical)
    assert [c.kind for c in plan.changes if c.agent_id == "res-01"] == [ChangeKind.TOP_UP]
    # Someone else refills the wallet between plan and apply.
    harness.sandbox.store.credit("res-01", to_atomic(Decimal("6000.00")), now=harness.sandbox.clock())

    result = await harness.apply(plan)
    [agent] = [a for a in result.agents if a.agent_id == "res-01"]
    [outcome] = agent.outcomes
    assert isinstance(outcome, Skipped) and outcome.kind is ChangeKind.TOP_UP
    assert outcome.reason is SkipReason.NO_LONGER_NEEDED
    assert agent.ok and applied_kinds(agent) == [] and result.writes == 0
    assert agent.skipped == [outcome.note]  # the renderers' line is the outcome's own note
    [as_json] = [a for a in result.to_dict()["agents"] if a["agent_id"] == "res-01"]
    assert as_json["outcomes"] == [{"kind": "top_up", "status": "skipped", "reason": "no-longer-needed"}]


async def test_every_applied_change_is_a_typed_applied_outcome_in_plan_order(
    harness: Harness, canonical: DesiredState
) -> None:
    plan = await harness.plan(canonical)
    result = await harness.apply(plan)
    assert result.ok
    for agent in result.agents:
        planned = [c.kind for c in plan.changes if c.agent_id == agent.agent_id]
        assert all(isinstance(o, Applied) for o in agent.outcomes)
        assert agent.applied_kinds == planned
        assert applied_kinds(agent) == [k.value for k in planned]
