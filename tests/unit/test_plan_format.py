"""The plan file's JSON format (format_version 1) does not change with the typed plan values.

``tests/data/plan_v1_golden.json`` was written by the planner before ``Change.args`` and the
plan errors were typed (commit 6652281), from the scenario below: every kind of change, an
unobservable agent, an operator hold, a withheld deposit, a deferral. The typed planner must
produce it byte for byte, and read it back to the same value.

Additive keys since (still format_version 1; a reader of the golden file ignores them, and
this module reads the golden file, which has none of them, as an old plan file):
``unverified`` (list, before ``summary``) and ``summary.unverified`` (count): desired values
the gateway cannot report and finops has no record of writing (issue 11). The golden file
is deliberately left as written so that it keeps proving old plan files still read back;
``v1_with_additions`` is the one place that says what was added.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from policies.live import BudgetStatus, LiveAgent, LiveFleet, Webhook
from policies.plan_types import (
    ARGS_OF,
    Change,
    ChangeKind,
    CreateWebhookArgs,
    PlanError,
    PlanErrorKind,
    RegisterArgs,
    TopUpArgs,
    plan_from_dict,
    plan_to_dict,
)
from policies.planner import Memory, make_plan
from policies.records import BudgetWrite, Hold, Intent, ManagedWebhook
from policies.spec import AgentSpec, DesiredState, FleetSpec, GatewayWebhookSpec, SecretRef

GOLDEN = Path(__file__).parent.parent / "data" / "plan_v1_golden.json"
WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
PENDING = "pending"


def budget(daily: str | None, monthly: str | None) -> BudgetStatus:
    return BudgetStatus(D(daily) if daily else None, D(monthly) if monthly else None, D(0), D(0), 0, 0, False, False)


def spec(agent_id: str, hooks: tuple[GatewayWebhookSpec, ...] = ()) -> AgentSpec:
    return AgentSpec(
        agent_id=agent_id,
        fleet="research",
        tier="researcher",
        daily_cap=D("30.00"),
        monthly_cap=D("600.00"),
        funding_floor=D("40.00"),
        funding_target=D("75.00"),
        alert_thresholds=(75, 90, 100),
        gateway_webhooks=hooks,
    )


secret = SecretRef(env="HOOK_SECRET")
generated = SecretRef(file="/tmp/finops-hook-secret", generate=True)
agents = (
    spec("res-01"),
    spec(
        "res-02",
        hooks=(
            GatewayWebhookSpec("https://hooks.example.com/a", ("budget.alert",), secret),
            GatewayWebhookSpec("https://hooks.example.com/g", ("budget.alert",), generated),
        ),
    ),
    spec("res-03"),
    spec("res-04"),
    spec("res-05"),
    spec("res-06"),
)
desired = DesiredState(
    fleets=(
        FleetSpec(
            name="research",
            currency="USD",
            daily_total=D("200.00"),
            funding_ceiling=D("500.00"),
            agents=agents,
            daily_funding_limit=D("100.00"),
        ),
    )
)
stale = Webhook(
    "whk-old",
    "https://hooks.example.com/old",
    ("budget.alert", "finops.managed/research"),
    ("res-05",),
    "s3cr3t-value-xyz",
    "2026-10-01T00:00:00Z",
)
live = LiveFleet(
    target="sandbox",
    agents={
        "res-01": LiveAgent("res-01", exists=False, ledger_anchor="none"),
        "res-02": LiveAgent(
            "res-02", True, D("100.00"), budget("9999.00", "60000.00"), ledger_anchor="none", ledger=()
        ),
        "res-03": LiveAgent("res-03", True, D("100.00"), budget("3000.00", "60000.00")),
        "res-04": LiveAgent("res-04", exists=False, error="gateway 500: boom"),
        "res-05": LiveAgent("res-05", True, D("7500.00"), budget("3000.00", "60000.00")),
        "res-06": LiveAgent(
            "res-06", True, D("100.00"), budget("3000.00", "60000.00"), ledger_anchor="none", ledger=()
        ),
    },
    rates={"USD": D("100")},
    key_agents=frozenset({"res-02", "res-03", "res-05", "res-06", "stranger"}),
    webhooks=(stale,),
)
t0 = WHEN.timestamp() - 60
memory = Memory(
    budget_writes={a: BudgetWrite(D("3000.00"), D("60000.00"), D("0.75")) for a in ("res-02", "res-05", "res-06")},
    holds={"res-03": Hold("res-03", "incident 42", t0)},
    managed_webhooks={"whk-old": ManagedWebhook("whk-old", "res-05", "research", "https://hooks.example.com/old")},
    secret_fingerprints={secret: "sha256:abcdefabcdef", generated: None},
    unresolved=(Intent("deposit:res-06", "deposit", "res-06", {}, PENDING, "timeout", t0, sent_at=t0),),
)


def v1_with_additions(golden: dict[str, Any]) -> dict[str, Any]:
    """The golden plan file plus the additive format-1 keys, where the writer puts them."""
    out: dict[str, Any] = {}
    for key, value in golden.items():
        if key == "summary":
            out["unverified"] = []
            value = {**value, "unverified": 0}
        out[key] = value
    return out


def test_the_typed_planner_writes_the_v1_plan_file_byte_for_byte() -> None:
    plan = make_plan(desired, live, memory, now=WHEN, prune=True)
    expected = json.dumps(v1_with_additions(json.loads(GOLDEN.read_text())), indent=2) + "\n"
    assert json.dumps(plan_to_dict(plan), indent=2) + "\n" == expected
    assert {c.kind for c in plan.changes} == set(ChangeKind)  # the scenario covers every kind


def test_a_v1_plan_file_reads_back_to_the_same_typed_plan_and_the_same_json() -> None:
    data = json.loads(GOLDEN.read_text())
    assert "unverified" not in data  # an old plan file: the additive key is absent
    plan = plan_from_dict(data)
    assert plan.unverified == ()
    assert plan_to_dict(plan) == v1_with_additions(data)
    assert plan_from_dict(plan_to_dict(plan)) == plan
    assert plan == make_plan(desired, live, memory, now=WHEN, prune=True)
    [register, _, top_up, *_] = plan.changes
    assert register.args == RegisterArgs(D("500.00"))
    assert isinstance(top_up.args, TopUpArgs) and top_up.args.amount == D("7000.00")
    hook = next(c.args for c in plan.changes if isinstance(c.args, CreateWebhookArgs) and c.args.secret == generated)
    assert hook.events == ("budget.alert", "finops.managed/research")
    assert plan.errors == (PlanError("res-04", PlanErrorKind.UNOBSERVED, "gateway 500: boom"),)


def test_a_change_refuses_arguments_of_another_kind() -> None:
    for kind in ChangeKind:
        wrong = RegisterArgs(D("500.00")) if kind is not ChangeKind.REGISTER else TopUpArgs(D(1), D(0), D(1), D(2), "k")
        with pytest.raises(TypeError):
            Change(kind, "research", "res-01", "", (), wrong)
        assert ARGS_OF[kind] is not type(wrong)


def test_an_unknown_plan_error_in_a_file_is_refused_not_guessed() -> None:
    data = json.loads(GOLDEN.read_text())
    data["errors"] = ["res-04 gateway said no"]
    with pytest.raises(ValueError, match="unrecognised plan error"):
        plan_from_dict(data)
