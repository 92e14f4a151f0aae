"""The escalation ladder's shell: the pause or freeze an alert crossing triggers, executed
at most once per crossing and resumed after a crash (decisions: ``policies.escalation``).

One alert check runs, around the alert engine's own steps:

1. ``prepare``: for agents with a ladder or an unfinished escalation, the caps the
   evaluation judges are the *declared* ones (manifest plus today's rebalancing, in credits
   at the gateway's rate), not the live ones: a paused window's live cap equals its spend,
   which would read as 100 % and fire every threshold up to it, and a cap the agent raised
   itself would let it spend past its ladder.
2. ``decide`` (inside the alert engine's state transaction, with the slots): new
   escalations for crossings with a rule, releases of auto pauses below their re-arm level;
   the alert events get their ``action``.
3. ``execute`` (after the transaction, before alerts are delivered: stopping spend comes
   first): every unfinished escalation is converged. A pending freeze runs
   ``controller.reconcile.holds.freeze`` (hold recorded first, caps 0, wallet frozen, key
   quarantined; each step idempotent), and becomes ``active`` once the hold and the zero
   caps are in place. A paused agent's budget is read afresh (one read per escalated agent)
   and its caps are written only if they differ from what the ladder wants (declared caps,
   paused windows lowered by the ratchet), so a second check with nothing new writes
   nothing. A release restores the declared caps exactly.

Writes go through the gateway client (fenced by the writer lock when there is one). A
failure leaves the row as it was, to be converged again by the next check; a crash between
``decide`` and ``execute`` leaves ``pending`` rows that the next check executes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal

from controller.alerting.store import AlertTx
from controller.gateway.client import GatewayClient
from controller.gateway.errors import GatewayError
from controller.reconcile.approval import judge
from controller.reconcile.holds import QuarantineKeys, freeze
from controller.state import BudgetWrite, StateStore
from policies.alerts import AlertEvent, BudgetReading, Evaluation, WindowReading
from policies.currency import to_credits
from policies.escalation import (
    ACTIVE,
    OPEN,
    PENDING,
    RELEASED,
    RELEASING,
    SUPERSEDED,
    UNFINISHED,
    Caps,
    Escalation,
    Spend,
    decide,
    wanted_caps,
)
from policies.planner import Memory, desired_alert_threshold, live_adjustment
from policies.spec import ESCALATE_FREEZE, ESCALATE_PAUSE, AgentSpec, DesiredState

logger = logging.getLogger("finops.alerts")

CREDITS = "CREDITS"


@dataclass
class LadderReport:
    """What the ladder did in one check (counts are for this check)."""

    started: dict[str, int] = field(default_factory=dict)
    """Escalations decided, by action (superseded ones not counted)."""
    executed: dict[str, int] = field(default_factory=dict)
    """Escalations that became active, by action."""
    released: int = 0
    cap_writes: int = 0
    waiting: int = 0
    """Unfinished escalations left for a check that may write (no writer lock here)."""
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "started": dict(sorted(self.started.items())),
            "executed": dict(sorted(self.executed.items())),
            "released": self.released,
            "cap_writes": self.cap_writes,
            "waiting": self.waiting,
            "problems": list(self.problems),
        }


class Ladder:
    """The ladder for one alert check. ``execute=False`` (a check that does not hold the
    writer lock) decides and records, and leaves execution to the writer."""

    def __init__(
        self,
        client: GatewayClient,
        store: StateStore,
        keys: QuarantineKeys | None,
        desired: DesiredState,
        *,
        now: Callable[[], float],
        execute: bool = True,
    ) -> None:
        self._client = client
        self._store = store
        self._keys = keys
        self._desired = desired
        self._now = now
        self._execute = execute
        self._specs = {a.agent_id: a for a in desired.agents()}
        self._live: dict[str, BudgetReading] = {}
        self._declared: dict[str, Caps] = {}
        self.report = LadderReport()
        self._approval: bool | None = None

    async def prepare(self, readings: Sequence[BudgetReading]) -> tuple[list[BudgetReading], dict[str, str]]:
        """The readings to evaluate and per-agent errors. An agent with a ladder (or an
        unfinished escalation) is judged against its declared caps, the ones finops enforces:
        the crossing and the release use the same yardstick, and an agent that raised its own
        cap on the gateway (API.md §4) cannot outrun its ladder. One whose declared caps
        cannot be computed (the rate unreadable) is not evaluated."""
        self._live = {r.agent_id: r for r in readings}
        escalated = {e.agent_id for e in self._store.escalations(statuses=UNFINISHED)}
        errors: dict[str, str] = {}
        rates: dict[str, Decimal] = {}
        memory = Memory(adjustments=self._store.adjustments())
        out: list[BudgetReading] = []
        for reading in readings:
            spec = self._specs.get(reading.agent_id)
            if spec is None or (reading.agent_id not in escalated and not spec.escalation):
                out.append(reading)
                continue
            currency = self._desired.fleet(spec.fleet).currency
            if currency not in rates:
                try:
                    rates[currency] = await self._client.exchange_rate(currency, CREDITS)
                except GatewayError as exc:
                    errors[reading.agent_id] = f"cannot read the {currency} rate for its declared caps: {exc}"
                    continue
            caps = declared_caps(spec, memory, rates[currency], self._now())
            self._declared[reading.agent_id] = caps
            out.append(
                replace(
                    reading,
                    daily=WindowReading(reading.daily.spend, caps.daily),
                    monthly=WindowReading(reading.monthly.spend, caps.monthly),
                )
            )
        return out, errors

    def decide(self, tx: AlertTx, evaluation: Evaluation, at: float) -> tuple[AlertEvent, ...]:
        """Record the ladder's decision in the alert transaction; the events with actions."""
        rules = {a.agent_id: a.escalation for a in self._specs.values() if a.escalation}
        spend = {a: Spend(r.daily.spend, r.monthly.spend) for a, r in self._live.items() if a in self._declared}
        decision = decide(evaluation.events, rules, tx.escalations(), spend, self._declared, now=at)
        tx.record_escalations(decision)
        for row in decision.started:
            if row.status != SUPERSEDED:
                self.report.started[row.action] = self.report.started.get(row.action, 0) + 1
                logger.warning("escalation %s %s: %s (%s)", row.action, row.agent_id, row.reason, row.alert_id)
        for row in decision.releasing:
            logger.info("escalation %s %s: release decided (%s)", row.action, row.agent_id, row.reason)
        return tuple(
            replace(e, action=decision.actions[e.id]) if e.id in decision.actions else e for e in evaluation.events
        )

    async def execute(self) -> LadderReport:
        """Converge every unfinished escalation of a declared agent (module doc)."""
        rows = self._store.escalations(statuses=UNFINISHED)
        if not self._execute:
            self.report.waiting = len(rows)
            return self.report
        by_agent: dict[str, list[Escalation]] = {}
        for row in rows:
            by_agent.setdefault(row.agent_id, []).append(row)
        for agent_id, agent_rows in sorted(by_agent.items()):
            spec = self._specs.get(agent_id)
            if spec is None:
                continue  # no longer declared: finops acts only on declared agents
            try:
                await self._converge(spec, agent_rows)
            except GatewayError as exc:
                self.report.problems.append(f"{agent_id}: escalation not converged: {exc}; retried next check")
        return self.report

    async def _converge(self, spec: AgentSpec, rows: list[Escalation]) -> None:
        agent_id = spec.agent_id
        for row in rows:
            if row.action == ESCALATE_FREEZE and row.status == PENDING:
                await self._freeze(spec, row)
        if agent_id in self._store.holds():
            # Held (this ladder's freeze or an operator's): caps stay at 0 until `finops
            # unfreeze`, which releases every escalation of the agent; a release decided
            # meanwhile has nothing to restore.
            for row in rows:
                if row.action == ESCALATE_PAUSE and row.status == RELEASING:
                    self._finish(row, RELEASED, "released while held: the hold keeps caps at 0")
            return
        pauses = [r for r in rows if r.action == ESCALATE_PAUSE]
        declared = self._declared.get(agent_id)
        if not pauses or declared is None:
            return  # not read in this check (error, or frozen before it): the next check converges
        # A fresh read, whatever the evaluation read from (a shared, age-stamped observation
        # may predate the last cap write): the writes below depend on the caps as they are.
        budget = await self._client.get_budget(agent_id)
        open_pauses = [r for r in pauses if r.status in OPEN]
        releasing = [r for r in pauses if r.status == RELEASING]
        spend = Spend(budget.daily_spend, budget.monthly_spend)
        live = Caps(budget.daily_cap, budget.monthly_cap)
        want, lowered = wanted_caps(declared, spend, open_pauses)
        if releasing and _raises(live, want) and not self._approved():
            # The restore would raise caps beyond what a person approved: every pause stays in
            # force (and keeps ratcheting) until the manifests are approved.
            self.report.problems.append(
                f"{agent_id}: restoring its caps waits: the manifests' spending authority is above what was "
                "approved (`finops approve`); the pause stays"
            )
            open_pauses += [replace(r, status=ACTIVE) for r in releasing]
            want, lowered = wanted_caps(declared, spend, open_pauses)
            releasing = []
        for row in open_pauses:
            if row.cap != lowered[row.window]:
                # Recorded before the write: the planner keeps the lower cap even if we crash now.
                self._store.update_escalation(replace(row, cap=lowered[row.window]), expect=(row.status, RELEASING))
        if live != want:
            threshold = desired_alert_threshold(spec)
            await self._client.set_budget(
                agent_id, daily_cap=want.daily, monthly_cap=want.monthly, alert_threshold=threshold
            )
            self._store.record_budget_write(agent_id, BudgetWrite(want.daily, want.monthly, threshold))
            self.report.cap_writes += 1
            logger.warning(
                "escalation caps %s: daily %s, monthly %s credits (declared %s / %s)",
                agent_id, want.daily, want.monthly, declared.daily, declared.monthly,
            )  # fmt: skip
        for row in open_pauses:
            if row.status == PENDING:
                self._finish(replace(row, cap=lowered[row.window]), ACTIVE, "")
        for row in releasing:
            self._finish(row, RELEASED, "declared caps restored")

    def _approved(self) -> bool:
        """Whether caps may be raised back to the declared ones: the manifests' exposure is
        within what a person approved (nothing approved yet: the manifests are all there
        is, as for ``finops unfreeze``). The daemon's desired state is always accepted; a
        CLI check may hold a revision still awaiting ``finops approve``."""
        if self._approval is None:
            verdict = judge(self._store, self._desired)
            self._approval = verdict.bootstrap or not verdict.requires_approval
        return self._approval

    async def _freeze(self, spec: AgentSpec, row: Escalation) -> None:
        result = await freeze(self._client, self._store, self._keys, spec, row.reason)
        detail = "; ".join(result.problems)
        if result.caps_zeroed and spec.agent_id in self._store.holds():
            self._finish(row, ACTIVE, detail)
            for problem in result.problems:
                self.report.problems.append(f"{spec.agent_id}: freeze: {problem}")
        else:
            self._store.update_escalation(replace(row, detail=detail), expect=(PENDING,))
            self.report.problems.append(f"{spec.agent_id}: freeze not complete ({detail}); retried next check")

    def _finish(self, row: Escalation, status: str, detail: str) -> None:
        at = self._now()
        if status == ACTIVE:
            done = replace(row, status=ACTIVE, executed_at=row.executed_at or at, detail=detail)
            if self._store.update_escalation(done, expect=(PENDING,)):
                self.report.executed[row.action] = self.report.executed.get(row.action, 0) + 1
        else:
            done = replace(row, status=status, released_at=row.released_at or at, detail=detail)
            if self._store.update_escalation(done, expect=(RELEASING,)):
                self.report.released += 1


def declared_caps(spec: AgentSpec, memory: Memory, rate: Decimal, now: float) -> Caps:
    """The caps the reconcile pass writes for an agent that is not held: the manifest's,
    plus today's rebalancing adjustment, in credits (``policies.planner``)."""
    adj = live_adjustment(spec, memory, now)
    daily = spec.daily_cap + (adj.amount if adj else 0)
    return Caps(to_credits(daily, rate), to_credits(spec.monthly_cap, rate))


def _raises(live: Caps, want: Caps) -> bool:
    """Whether writing ``want`` raises a window's cap (``None`` live = no cap: not raised)."""
    for before, after in ((live.daily, want.daily), (live.monthly, want.monthly)):
        if before is not None and (after is None or after > before):
            return True
    return False


def active_by_action(rows: Sequence[Escalation]) -> Mapping[str, int]:
    out: dict[str, int] = {ESCALATE_PAUSE: 0, ESCALATE_FREEZE: 0}
    for row in rows:
        if row.status in OPEN:
            out[row.action] = out.get(row.action, 0) + 1
    return out
