"""Counting what a pass applied from the applier's per-agent result."""

from __future__ import annotations

from decimal import Decimal

from controller.apply import AgentResult
from controller.daemon.passes import PassResult, applied_kinds
from controller.plan import Change, ChangeArgs, ChangeKind, RegisterArgs, SetBudgetArgs, TopUpArgs

D = Decimal
ARGS: dict[ChangeKind, ChangeArgs] = {
    ChangeKind.REGISTER: RegisterArgs(D("500.00")),
    ChangeKind.TOP_UP: TopUpArgs(D("10.00"), D("0.00"), D("5.00"), D("10.00"), "finops-topup-x"),
    ChangeKind.SET_BUDGET: SetBudgetArgs(D("1.00"), D("2.00"), D("0.8")),
}


def change(kind: ChangeKind) -> Change:
    return Change(kind=kind, fleet="research", agent_id="res-01", reason="", diff=(), args=ARGS[kind])


ALL = [change(ChangeKind.REGISTER), change(ChangeKind.TOP_UP), change(ChangeKind.SET_BUDGET)]


def test_every_change_of_a_successful_agent_counts() -> None:
    outcome = AgentResult("res-01", applied=["registered", "deposited", "budget set"])
    assert applied_kinds(ALL, outcome) == ["register", "top_up", "set_budget"]


def test_a_top_up_found_unneeded_does_not_count() -> None:
    outcome = AgentResult("res-01", applied=["registered", "budget set"], skipped=["skipped top-up: balance is now 80"])
    assert applied_kinds(ALL, outcome) == ["register", "set_budget"]


def test_changes_after_a_failure_do_not_count() -> None:
    outcome = AgentResult(
        "res-01",
        applied=["registered"],
        skipped=["set_budget (not attempted after the failure)"],
        error="top_up: gateway 403 forbidden",
    )
    assert applied_kinds(ALL, outcome) == ["register"]


def test_a_failure_on_the_first_change_counts_nothing() -> None:
    outcome = AgentResult("res-01", skipped=["top_up (not attempted after the failure)"], error="register: lost")
    assert applied_kinds(ALL[:2], outcome) == []


def test_the_job_result_carries_what_an_operator_needs() -> None:
    result = PassResult(
        result="partial",
        message="3 change(s) planned, 2 applied, 1 agent(s) failed",
        revision="abc",
        seen_revision="def",
        manifest_valid=False,
        planned=3,
        applied={"set_budget": 2},
        failed_agents={"res-01": "top_up: gateway 403"},
    )
    job = result.to_job_result()
    assert job.result == "partial" and job.message.startswith("3 change(s)")
    assert job.fields["seen_revision"] == "def" and job.fields["applied"] == 2
    assert job.fields["failed_agents"] == ["res-01"]
    assert result.completed and result.applied_total == 2
