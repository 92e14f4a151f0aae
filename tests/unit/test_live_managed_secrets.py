"""Re-deriving finops' generated webhook secret from the live webhooks (pure part)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D

from policies.keyprint import secret_fingerprint
from policies.live import BudgetStatus, LiveAgent, LiveFleet, Webhook
from policies.plan_types import Plan
from policies.planner import Memory, live_managed_secrets, make_plan
from policies.records import BudgetWrite
from policies.spec import AgentSpec, DesiredState, FleetSpec, GatewayWebhookSpec, SecretRef

WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
REF = SecretRef(managed="gateway-webhook-research")
MARK = "finops.managed/research"


def _spec(agent_id: str) -> AgentSpec:
    return AgentSpec(
        agent_id=agent_id,
        fleet="research",
        tier="researcher",
        daily_cap=D("30.00"),
        monthly_cap=D("600.00"),
        funding_floor=D("40.00"),
        funding_target=D("75.00"),
        alert_thresholds=(75,),
        gateway_webhooks=(GatewayWebhookSpec(f"https://h.example.com/{agent_id}", ("billing.deposit",), REF),),
    )


DESIRED = DesiredState(
    fleets=(
        FleetSpec(
            name="research",
            currency="USD",
            daily_total=D("200.00"),
            funding_ceiling=D("500.00"),
            agents=(_spec("a1"), _spec("a2")),
        ),
    )
)


def _hook(hid: str, agent: str, secret: str, events: tuple[str, ...] = ("billing.deposit", MARK)) -> Webhook:
    return Webhook(hid, f"https://h.example.com/{agent}", events, (agent,), secret, "2026-10-01T00:00:00Z")


def _plan(hooks: tuple[Webhook, ...]) -> Plan:
    budget = BudgetStatus(D("3000.00"), D("60000.00"), D(0), D(0), 0, 0, False, False)
    live = LiveFleet(
        target="sandbox",
        agents={a: LiveAgent(a, True, D("7500.00"), budget) for a in ("a1", "a2")},
        rates={"USD": D("100")},
        key_agents=frozenset({"a1", "a2"}),
        webhooks=hooks,
    )
    writes = {a: BudgetWrite(D("3000.00"), D("60000.00"), D("0.75")) for a in ("a1", "a2")}
    return make_plan(DESIRED, live, Memory(budget_writes=writes, secret_fingerprints={REF: None}), now=WHEN)


def test_only_finops_owned_single_agent_hooks_count() -> None:
    hooks = (
        _hook("w1", "a1", "s-one"),
        _hook("w2", "a2", "s-one"),
        _hook("w3", "a2", "s-foreign", events=("billing.deposit",)),  # no marker: not finops'
        Webhook("w4", "https://h.example.com/x", ("billing.deposit", MARK), ("a1", "a2"), "s-multi", "t"),
    )
    assert live_managed_secrets(DESIRED, hooks, {}) == {REF: frozenset({"s-one"})}


def test_agreeing_live_secret_is_the_desired_one_no_change() -> None:
    plan = _plan((_hook("w1", "a1", "s-one"), _hook("w2", "a2", "s-one")))
    assert plan.empty
    assert "s-one" not in repr(plan) and secret_fingerprint("s-one") not in repr(plan)


def test_disagreeing_live_secrets_are_not_guessed() -> None:
    plan = _plan((_hook("w1", "a1", "s-one"), _hook("w2", "a2", "s-two")))
    kinds = sorted(c.kind.value for c in plan.changes)
    assert kinds == ["create_webhook"] * 2 + ["delete_webhook"] * 2
    assert any("2 different secrets: not guessing" in w for w in plan.warnings)
    assert "s-one" not in repr(plan) and "s-two" not in repr(plan)
