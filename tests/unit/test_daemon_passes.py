"""Counting what a pass applied from the applier's per-agent result."""

from __future__ import annotations

from controller.daemon.passes import PassResult, applied_kinds
from controller.reconcile.apply import AgentResult, Applied, Failed, Skipped, SkipReason, Unknown
from policies.plan_types import ChangeKind

REGISTER, TOP_UP, SET_BUDGET = ChangeKind.REGISTER, ChangeKind.TOP_UP, ChangeKind.SET_BUDGET


def test_every_change_of_a_successful_agent_counts() -> None:
    outcome = AgentResult("res-01", [Applied(REGISTER, "registered"), Applied(TOP_UP, "d"), Applied(SET_BUDGET, "b")])
    assert applied_kinds(outcome) == ["register", "top_up", "set_budget"]
    assert outcome.ok


def test_a_top_up_found_unneeded_does_not_count() -> None:
    outcome = AgentResult(
        "res-01",
        [
            Applied(REGISTER, "registered"),
            Skipped(TOP_UP, SkipReason.NO_LONGER_NEEDED, "whatever the wording"),
            Applied(SET_BUDGET, "budget set"),
        ],
    )
    assert applied_kinds(outcome) == ["register", "set_budget"]
    assert outcome.ok and outcome.skipped == ["whatever the wording"]


def test_changes_after_a_failure_do_not_count() -> None:
    outcome = AgentResult(
        "res-01",
        [
            Applied(REGISTER, "registered"),
            Failed(TOP_UP, "gateway 403 forbidden"),
            Skipped(SET_BUDGET, SkipReason.AFTER_FAILURE, "set_budget (not attempted after the failure)"),
        ],
    )
    assert applied_kinds(outcome) == ["register"]
    assert outcome.error == "top_up: gateway 403 forbidden"


def test_an_unknown_outcome_is_an_error_and_counts_nothing() -> None:
    outcome = AgentResult("res-01", [Unknown(REGISTER, "lost", "register:res-01")])
    assert applied_kinds(outcome) == []
    assert outcome.error == "register: lost" and not outcome.ok


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
