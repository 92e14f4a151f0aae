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

Issue 12 (units a person reads, exposure in every plan) added, still format_version 1: in
each ``diff`` entry ``unit`` (``credits`` | ``ratio`` | ``text``), with ``currency`` and
``before_in_currency``/``after_in_currency`` for credits and ``before_percent``/
``after_percent`` for a ratio; ``summary.exposure_change`` (the spending authority this plan
changes). The top-up ``reason`` text (prose for people, never read back by code) now leads
with the fleet currency: ``NEW_REASONS`` maps the golden file's sentences to today's.

Issue 13 (escalation ladder) added ``escalated`` (list, after ``held``): the ladder's pauses
and freezes in force.
"""

from __future__ import annotations

import json
from dataclasses import replace
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


NEW_REASONS = {
    "balance 500.00 < floor 4000.00 credits: top up to target 7500.00 (+70.00 USD)": (
        "balance 5.00 < floor 40.00 USD: top up to target 75.00 USD (+70.00 USD = 7000.00 credits)"
    ),
    "balance 100.00 < floor 4000.00 credits: top up to target 7500.00 (+74.00 USD); cut to 2500.00 credits "
    "(fleet-daily-limit)": (
        "balance 1.00 < floor 40.00 USD: top up to target 75.00 USD (+74.00 USD = 7400.00 credits); "
        "cut to 25.00 USD (2500.00 credits) (fleet-daily-limit)"
    ),
}

NEW_REASONS[
    "top-up of 7400.00 credits cut to 2500.00: fleet research's rolling 24 h funding limit 100.00 USD "
    "(0.00 of 10000.00 credits used before this plan)"
] = (
    "top-up of 74.00 USD (7400.00 credits) cut to 25.00 USD (2500.00 credits): fleet research's rolling 24 h "
    "funding limit 100.00 USD (0.00 of 10000.00 credits used before this plan)"
)
"""The deferral's message, prose too."""

EXPOSURE_CHANGE = {
    "basis": {"caps": "live gateway caps → planned caps", "funding_and_agents": "nothing approved yet (zero)"},
    "complete": False,  # res-04 could not be observed
    "increases": True,
    "requires_approval": True,
    "fleets": [
        {
            "fleet": "research",
            "currency": "USD",
            "rate_to_credits": "100",
            # res-01 registered and capped (+3000), res-02's drift put back (9999 → 3000),
            # res-03 held (3000 → 0): -6999.00 credits a day; monthly +60000 - 60000.
            "daily_caps": "-69.99",
            "daily_caps_credits": "-6999.00",
            "monthly_caps": "0.00",
            "monthly_caps_credits": "0.00",
            "uncapped_before": [],
            # res-01's 500 signup bonus + 7000 top-up, res-02's 2500 (cut): the funding window's 10000.
            "deposits": "100.00",
            "deposits_credits": "10000.00",
            "agents_registered": ["res-01"],
            "vs_approved": {
                "currency": "USD",
                "funding_targets": "+450.00",
                "per_run_ceiling": "+500.00",
                "daily_funding_limit": "0.00",
                "agents_added": ["res-01", "res-02", "res-03", "res-04", "res-05", "res-06"],
                "agents_removed": [],
                "currency_changed": False,
            },
            "increases": True,
            "sentence": "lowers caps by 69.99 USD/day (6999.00 credits); puts in 100.00 USD (10000.00 credits) now; "
            "registers 1 agent(s); vs the last approved revision: funding targets +450.00 USD, per-run funding "
            "ceiling +500.00 USD, +6 agent(s) declared",
        }
    ],
}


def _labelled(diff: dict[str, Any]) -> dict[str, Any]:
    """A golden diff entry with the issue-12 labels (this fleet: USD at 100 credits)."""
    out = {
        **diff,
        "unit": {"daily_cap": "credits", "monthly_cap": "credits", "balance": "credits"}.get(
            diff["field"], "ratio" if diff["field"] == "alert_threshold" else "text"
        ),
    }
    if out["unit"] == "credits":
        out["currency"] = "USD"
        for side in ("before", "after"):
            value = diff[side]
            out[f"{side}_in_currency"] = None if value is None else str((D(value) / 100).quantize(D("0.01")))
    elif out["unit"] == "ratio":
        for side in ("before", "after"):
            value = diff[side]
            out[f"{side}_percent"] = None if value is None else format((D(value) * 100).normalize(), "f")
    return out


def v1_with_additions(golden: dict[str, Any], *, new_reasons: bool = True) -> dict[str, Any]:
    """The golden plan file plus the additive format-1 keys, where the writer puts them."""
    out: dict[str, Any] = {}
    for key, value in golden.items():
        if key == "changes":
            value = [
                {
                    **c,
                    "reason": NEW_REASONS.get(c["reason"], c["reason"]) if new_reasons else c["reason"],
                    "diff": [_labelled(d) for d in c["diff"]],
                }
                for c in value
            ]
        if key == "deferred" and new_reasons:
            value = [{**d, "message": NEW_REASONS.get(d["message"], d["message"])} for d in value]
        if key == "unmanaged_webhooks":
            out["escalated"] = []
        if key == "summary":
            out["unverified"] = []
            value = {**value, "unverified": 0, "exposure_change": EXPOSURE_CHANGE}
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
    assert plan_to_dict(plan) == v1_with_additions(data, new_reasons=False)
    assert plan_from_dict(plan_to_dict(plan)) == plan
    fresh = make_plan(desired, live, memory, now=WHEN, prune=True)
    reworded = replace(
        plan,
        changes=tuple(replace(c, reason=NEW_REASONS.get(c.reason, c.reason)) for c in plan.changes),
        deferred=tuple(replace(d, message=NEW_REASONS.get(d.message, d.message)) for d in plan.deferred),
    )
    assert reworded == fresh
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
