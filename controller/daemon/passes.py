"""One reconcile pass: manifests → observe → plan → apply, with the daemon's safety rules.

The same pipeline as ``finops apply --auto-approve``, plus what an unattended loop needs:

- *level-triggered*: every pass re-observes the gateway and re-plans from scratch;
- *last good revision*: a revision whose manifests are invalid is never applied; the pass
  carries on with the last valid desired state (also after a restart, for git sources,
  from the ``revisions`` table) and reports the error until a valid revision arrives;
- *one agent never blocks the fleet*: an agent that could not be observed or whose change
  failed is backed off (its changes skipped and reported) while the others converge;
- *holds*: the planner keeps held agents' caps at 0 and never funds them; the pass
  reports how many agents are held;
- *guardrails win*: a plan that breaks one is refused whole, as ``apply`` refuses it;
- *exposure needs a person*: a valid revision whose spending authority exceeds what a
  person last approved by more than ``spec.approval.maxUnattendedIncrease`` is not applied;
  the last accepted revision stays enforced (after a restart too: git checks out its commit,
  a directory is re-read from the bundle stored when it was applied) until an operator runs
  ``finops approve REVISION``. Lowering never waits.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

from controller.daemon.backoff import AgentBackoff
from controller.daemon.jobs import ERROR, OK, PARTIAL, JobResult
from controller.daemon.logs import log_event
from controller.daemon.metrics import DaemonMetrics, update_agent_metrics
from controller.daemon.revisions import RevisionLog
from controller.daemon.source import ManifestSource, SourceError
from controller.errors import FinopsError, ManifestError
from controller.gateway.client import GatewayClient
from controller.io.blocking import off_loop
from controller.keys.vault import KeyStore
from controller.manifest.loader import load_manifests
from controller.observation.feed import FeedSync
from controller.reconcile import approval
from controller.reconcile.apply import AgentResult
from controller.reconcile.decide import observe_and_plan
from controller.reconcile.pipeline import PlanRefused, apply_plan, only, plan_errors_by_agent
from controller.state import StateStore
from policies.escalation import OPEN
from policies.exposure import ExposureReview, exposure_of, review
from policies.fleet_metrics import AgentGauges, WindowGauges, fleet_gauges, hold_kind, with_forecasts
from policies.live import LiveFleet
from policies.plan_types import Plan
from policies.spec import ESCALATE_PAUSE, DesiredState

REFUSED = "refused"
INVALID = "invalid"
AWAITING = "awaiting-approval"
"""No accepted revision to enforce yet: the only one is waiting for ``finops approve``."""
COMPLETED = frozenset({OK, PARTIAL})
"""Pass results that count as a reconcile having happened (readiness, last success)."""

PlanFn = Callable[[GatewayClient, DesiredState, str, StateStore], Awaitable[Plan]]
ClientFactory = Callable[[], GatewayClient]


@dataclass(frozen=True)
class AwaitingApproval:
    """The newest revision, held back because its exposure increase needs an operator."""

    revision: str
    review: ExposureReview

    def reason(self, enforcing: str | None) -> str:
        kept = f"; enforcing {enforcing}" if enforcing else "; nothing enforced yet"
        excess = "; ".join(str(e) for e in self.review.excesses)
        return f"revision {self.revision} awaits approval ({excess}){kept}; run `finops approve {self.revision}`"

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "review": self.review.to_dict()}


@dataclass(frozen=True)
class PassResult:
    """What one pass did; feeds the metrics, the status file and the log."""

    result: str
    message: str
    revision: str | None
    """The revision whose desired state was applied (the last good one)."""
    seen_revision: str | None
    """The newest revision the source offered (differs from ``revision`` when it is invalid)."""
    manifest_valid: bool
    manifest_errors: tuple[str, ...] = ()
    planned: int | None = None
    applied: Mapping[str, int] = field(default_factory=dict)
    failed_agents: Mapping[str, str] = field(default_factory=dict)
    backoff_skipped: tuple[str, ...] = ()
    held_agents: tuple[str, ...] = ()
    backoff_agents: int = 0
    recovered: tuple[str, ...] = ()
    violations: tuple[str, ...] = ()
    duration_s: float = 0.0
    awaiting: AwaitingApproval | None = None
    gauges: tuple[AgentGauges, ...] | None = None
    """Every declared agent's snapshot for the per-agent metrics (``None``: nothing enforced)."""

    @property
    def completed(self) -> bool:
        return self.result in COMPLETED

    @property
    def applied_total(self) -> int:
        return sum(self.applied.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "message": self.message,
            "revision": self.revision,
            "seen_revision": self.seen_revision,
            "manifest_valid": self.manifest_valid,
            "manifest_errors": list(self.manifest_errors),
            "planned": self.planned,
            "applied": dict(self.applied),
            "failed_agents": dict(self.failed_agents),
            "backoff_skipped": list(self.backoff_skipped),
            "held_agents": list(self.held_agents),
            "recovered": list(self.recovered),
            "violations": list(self.violations),
            "duration_s": round(self.duration_s, 3),
            "awaiting_approval": self.awaiting.to_dict() if self.awaiting else None,
        }

    def to_job_result(self) -> JobResult:
        fields: dict[str, Any] = {
            "revision": self.revision,
            "planned": self.planned,
            "applied": self.applied_total,
            "manifest_valid": self.manifest_valid,
            "duration_s": round(self.duration_s, 3),
        }
        if self.seen_revision != self.revision:
            fields["seen_revision"] = self.seen_revision
        if self.failed_agents:
            fields["failed_agents"] = sorted(self.failed_agents)
        if self.backoff_skipped:
            fields["backoff_skipped"] = list(self.backoff_skipped)
        if self.held_agents:
            fields["held_agents"] = list(self.held_agents)
        result = self.result
        if self.awaiting is not None:
            fields["awaiting_approval"] = self.awaiting.revision
            fields["exposure_excess"] = [str(e) for e in self.awaiting.review.excesses]
            if result == OK:
                result = PARTIAL  # the newest revision was not applied: `run --once` exits 1
        return JobResult(result, self.message, fields)


def record_pass(metrics: DaemonMetrics, result: PassResult) -> None:
    metrics.reconcile_duration.observe(result.duration_s)
    metrics.reconcile_total.labels(result=result.result).inc()
    metrics.manifest_valid.set(1 if result.manifest_valid else 0)
    if result.planned is not None:
        metrics.drift_changes.set(result.planned)
    for kind, count in result.applied.items():
        if count:
            metrics.changes_applied.labels(kind=kind).inc(count)
    metrics.set_awaiting(result.awaiting.review if result.awaiting is not None else None)
    if result.completed and result.revision is not None:
        metrics.set_revision(result.revision)
        metrics.agents_held.set(len(result.held_agents))
        metrics.agents_backoff.set(result.backoff_agents)
    if result.gauges is not None:
        update_agent_metrics(metrics, with_forecasts(result.gauges, metrics.forecasts))


def applied_kinds(outcome: AgentResult) -> list[str]:
    """The kinds of an agent's changes that took effect, in plan order (from the applier's
    typed step outcomes: skipped, failed and unknown-outcome steps do not count)."""
    return [kind.value for kind in outcome.applied_kinds]


class Reconciler:
    """Holds what must survive between passes: the last good desired state and backoffs."""

    def __init__(
        self,
        *,
        target: str,
        source: ManifestSource,
        store: StateStore,
        sink: KeyStore,
        revisions: RevisionLog,
        client_factory: ClientFactory,
        backoff: AgentBackoff | None = None,
        plan_fn: PlanFn | None = None,
        prune: bool = False,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
        approver: str = "",
        observation: FeedSync | None = None,
    ) -> None:
        self.target = target
        self.source = source
        self.store = store
        self.sink = sink
        self.revisions = revisions
        self.client_factory = client_factory
        self.backoff = backoff or AgentBackoff()
        self.plan_fn: PlanFn = plan_fn or partial(observe_and_plan, prune=prune, observed=self._observed)
        self._live: tuple[LiveFleet, float] | None = None
        """The last pass's observation and its clock time (the per-agent metrics read it)."""
        self._observed_at: dict[str, float] = {}
        """When each agent was last read (kept while it cannot be: its staleness shows)."""
        self._prune = prune
        self._default_plan = plan_fn is None
        self.observation = observation
        """The daemon's shared observation (``controller.observation``): with it, the pass
        reads through the store (the change feed and the resync say what is stale)."""
        self.clock = clock
        self.log = log or logging.getLogger("finops.daemon")
        self.desired: DesiredState | None = None
        """The last valid desired state: what other jobs (alerts, rebalance) should read."""
        self.good_revision: str | None = None
        self.seen_revision: str | None = None
        self.manifest_valid = True
        self.manifest_errors: tuple[str, ...] = ()
        self._bad_revision: str | None = None
        self.approver = approver
        """The admin key (for the bootstrap approval's fingerprint); never logged."""
        self.awaiting: AwaitingApproval | None = None
        self._candidate: tuple[str, DesiredState] | None = None
        """The newest valid revision held back for approval (kept to avoid re-reading it)."""

    # ------------------------------------------------------------------ manifests

    @property
    def state_dir(self) -> Path:
        """Relative paths in manifests resolve here (``controller.manifest.paths``): the
        directory of the state file (with PostgreSQL, of its machine-local anchor)."""
        return self.store.location.file.parent

    async def _load(self, revision: str) -> DesiredState:
        """Off the event loop: the loop must stay free to handle signals and other jobs."""
        path = await self.source.checkout(revision)
        root = getattr(self.source, "manifest_root", None)  # test doubles may not have one
        return await off_loop(load_manifests, path, root=root, state_dir=self.state_dir)

    def _issues(self, exc: ManifestError) -> tuple[str, ...]:
        return tuple(self.source.shorten(str(issue)) for issue in exc.issues)

    async def _desired_for(self, revision: str) -> DesiredState | None:
        """The desired state to enforce now: ``revision``'s if it is valid and its exposure is
        approved (or within the unattended bound), else the last accepted one."""
        self.seen_revision = revision
        if revision == self.good_revision and self.desired is not None:
            self.manifest_valid, self.manifest_errors = True, ()
            self._settled(revision)
            return self.desired
        if revision != self._bad_revision:
            try:
                desired = await self._candidate_for(revision)
            except ManifestError as exc:
                self._bad_revision = revision
                self.manifest_valid, self.manifest_errors = False, self._issues(exc)
                self.revisions.record_invalid(revision, self.source.label, list(self.manifest_errors))
                log_event(
                    self.log,
                    logging.ERROR,
                    "manifest revision refused: invalid; keeping the last good revision",
                    revision=revision,
                    last_good=self.good_revision,
                    errors=list(self.manifest_errors),
                )
            else:
                self.manifest_valid, self.manifest_errors = True, ()
                if self._accept(revision, desired):
                    if self.good_revision is not None:
                        log_event(
                            self.log,
                            logging.INFO,
                            "new manifest revision",
                            revision=revision,
                            previous=self.good_revision,
                        )
                    self.desired, self.good_revision, self._bad_revision = desired, revision, None
                    self._keep_bundle(revision)
                    return desired
        if self.desired is None:
            await self._restore_last_good(exclude=revision)
        return self.desired

    async def _candidate_for(self, revision: str) -> DesiredState:
        if self._candidate is not None and self._candidate[0] == revision:
            return self._candidate[1]
        desired = await self._load(revision)
        self._candidate = (revision, desired)
        return desired

    def _settled(self, revision: str) -> None:
        """``revision`` is the one enforced: nothing newer waits."""
        if self.awaiting is not None or self._candidate is not None:
            self.store.clear_pending(except_revision=None)
        self.awaiting, self._candidate = None, None

    def _accept(self, revision: str, desired: DesiredState) -> bool:
        """Whether ``revision`` may be applied unattended; records the bootstrap approval or
        the wait. Re-judged every pass, so an approval is picked up by the next one."""
        exposure = exposure_of(desired)
        verdict = review(approval.approved_exposure(self.store), exposure)
        if not verdict.requires_approval:
            if verdict.bootstrap:
                approval.record(
                    self.store,
                    revision,
                    self.source.label,
                    exposure,
                    how=approval.BOOTSTRAP,
                    api_key=self.approver,
                    user="finops run",
                )
                log_event(
                    self.log,
                    logging.WARNING,
                    "no approval on record: this first revision, within its own unattended bound, is the baseline",
                    revision=revision,
                    exposure=verdict.lines(),
                )
            elif verdict.increases:
                log_event(
                    self.log,
                    logging.INFO,
                    "exposure increase within the unattended bound",
                    revision=revision,
                    exposure=verdict.lines(),
                )
            self._settled(revision)
            return True
        first = self.awaiting is None or self.awaiting.revision != revision
        self.awaiting = AwaitingApproval(revision, verdict)
        self.store.clear_pending(except_revision=revision)
        self.store.record_pending(revision, self.source.label, exposure, verdict)
        if first:
            log_event(
                self.log,
                logging.ERROR,
                "manifest revision held back: its exposure increase needs `finops approve`; "
                "keeping the last approved revision",
                revision=revision,
                enforcing=self.good_revision,
                exposure=verdict.lines(),
                excess=[str(e) for e in verdict.excesses],
            )
        return False

    def _keep_bundle(self, revision: str) -> None:
        """A directory cannot be checked out again: keep the accepted revision's files."""
        if self.source.versioned or self.store.bundle(revision) is not None:
            return
        files = approval.read_bundle(Path(self.source.label), revision)
        if files is None:
            log_event(
                self.log,
                logging.WARNING,
                "could not keep a copy of the applied manifests (they changed or are unreadable); "
                "a restart while a newer revision waits for approval will enforce nothing",
                revision=revision,
            )
            return
        self.store.store_bundle(revision, files)

    async def _restore_last_good(self, *, exclude: str) -> None:
        """After a restart on an invalid or unapproved revision, go back to what was last
        applied: git checks out its commit, a directory source reads its stored bundle."""
        last = self.revisions.last_applied(self.source.label)
        if last is None or last.revision == exclude:
            return
        try:
            if self.source.versioned:
                desired = await self._load(last.revision)
            else:
                files = self.store.bundle(last.revision)
                if files is None:
                    raise SourceError(f"no stored copy of {last.revision}'s manifests")
                with tempfile.TemporaryDirectory(prefix="finops-bundle-") as tmp:
                    desired = load_manifests(
                        approval.materialize(files, Path(tmp) / "manifests"), state_dir=self.state_dir
                    )
        except (ManifestError, SourceError) as exc:
            log_event(
                self.log,
                logging.ERROR,
                "cannot restore the last applied revision",
                revision=last.revision,
                error=str(exc).splitlines()[0],
            )
            return
        self.desired, self.good_revision = desired, last.revision
        log_event(self.log, logging.WARNING, "restored the last applied revision", revision=last.revision)

    # ------------------------------------------------------------------ the pass

    def _observed(self, live: LiveFleet, now: float) -> None:
        self._live = (live, now)

    def gauges(self, desired: DesiredState) -> tuple[AgentGauges, ...]:
        """A snapshot per declared agent from this pass's observation (taken before its
        changes were applied: the next pass shows their effect) and the state store's holds
        and held keys. An agent the pass could not read has no balance or window series."""
        live, observed_at = self._live if self._live is not None else (None, self.clock())
        windows: dict[str, tuple[WindowGauges, WindowGauges]] = {}
        balances: dict[str, Decimal] = {}
        declared = {a.agent_id for a in desired.agents()}
        seen = {agent: at for agent, at in self._observed_at.items() if agent in declared}
        for agent_id, agent in live.agents.items() if live is not None else ():
            if not agent.exists or agent.error is not None:
                continue
            seen[agent_id] = observed_at
            if agent.balance is not None:
                balances[agent_id] = agent.balance
            if agent.budget is not None:
                b = agent.budget
                windows[agent_id] = (
                    WindowGauges(b.daily_spend, b.daily_cap),
                    WindowGauges(b.monthly_spend, b.monthly_cap),
                )
        holds = {agent: frozenset({hold_kind(h.auto)}) for agent, h in self.store.holds().items()}
        for escalation in self.store.escalations(statuses=OPEN):  # the ladder's pauses (its freezes are holds)
            if escalation.is_pause:
                holds[escalation.agent_id] = holds.get(escalation.agent_id, frozenset()) | {ESCALATE_PAUSE}
        if self.observation is not None:  # values may come from the shared store: stamp them with their read
            for agent_id in declared:
                view = self.observation.store.view(agent_id)
                if view.budget is not None:
                    seen[agent_id] = view.budget.at
        keys = {agent: held.since for agent, held in self.store.held_keys().items()}
        self._observed_at, self._live = seen, None
        return fleet_gauges(
            desired,
            now=self.clock(),
            windows=windows,
            balances=balances,
            holds=holds,
            key_since=keys,
            observed_at=seen,
        )

    async def run(self) -> PassResult:
        started = time.perf_counter()
        try:
            result = await self._run()
        except FinopsError as exc:  # gateway down, auth, git fetch, an unreadable secret…
            result = self._result(ERROR, str(exc))
        return replace(result, duration_s=time.perf_counter() - started)

    def _result(self, result: str, message: str, **kw: Any) -> PassResult:
        return PassResult(
            result=result,
            message=message,
            revision=self.good_revision,
            seen_revision=self.seen_revision,
            manifest_valid=self.manifest_valid,
            manifest_errors=self.manifest_errors,
            awaiting=self.awaiting,
            **kw,
        )

    async def _run(self) -> PassResult:
        revision = await self.source.head() or await self.source.fetch()
        desired = await self._desired_for(revision)
        if desired is None:
            if self.awaiting is not None:
                return self._result(AWAITING, "no approved manifest revision to apply yet")
            return self._result(INVALID, "no valid manifest revision to apply yet")
        applying = self.good_revision
        now = self.clock()
        skipped_backoff: list[str] = []

        def select(plan: Plan) -> Plan:
            log_funding_limits(self.log, plan)
            skipped_backoff.extend(sorted({c.agent_id for c in plan.changes if self.backoff.active(c.agent_id, now)}))
            return only(plan, lambda c: c.agent_id not in skipped_backoff)

        def planned(plan: Plan) -> dict[str, Any]:
            return {
                "planned": len(plan.changes),
                "backoff_skipped": tuple(skipped_backoff),
                "held_agents": tuple(h.agent_id for h in plan.held),
            }

        async with self.client_factory() as client:
            plan_fn = self.plan_fn
            if self.observation is not None and self._default_plan:
                await self.observation.sync(client, [s.agent_id for s in desired.agents()])
                shared = self.observation.shared(self.observation.freshness())
                plan_fn = partial(observe_and_plan, prune=self._prune, shared=shared, observed=self._observed)
            try:
                run = await apply_plan(
                    client,
                    self.store,
                    self.sink,
                    desired,
                    target=self.target,
                    clock=self.clock,
                    plan_fn=plan_fn,
                    select=select,
                    log_fields={"revision": applying, "by": "daemon"},
                )
            except PlanRefused as exc:
                violations = tuple(str(v) for v in exc.plan.violations)
                log_event(
                    self.log,
                    logging.ERROR,
                    "plan refused: it breaks a guardrail; nothing applied",
                    violations=list(violations),
                )
                return self._result(
                    REFUSED,
                    "the plan breaks a guardrail; nothing was applied",
                    violations=violations,
                    backoff_agents=self._backoff_count(now),
                    **planned(exc.plan),
                )
        plan, outcome = run.fresh, run.result
        if self.observation is not None:  # whatever the outcome: the client's write watch may not have seen it
            for agent in {c.agent_id for c in run.chosen.changes}:
                self.observation.store.invalidate(agent)
        common = planned(plan)
        unobserved = plan_errors_by_agent(plan)
        blocked = set(skipped_backoff)
        failed = dict(unobserved)
        applied: Counter[str] = Counter()
        if outcome is not None:
            for agent_result in outcome.agents:
                applied.update(applied_kinds(agent_result))
                if agent_result.error is not None:
                    failed[agent_result.agent_id] = agent_result.error
        self._update_backoff(desired, failed, blocked, now=self.clock())
        assert applying is not None
        self.revisions.record_applied(applying, self.source.label, ok=not failed, changes=sum(applied.values()))
        kind = PARTIAL if failed or skipped_backoff else OK
        message = f"{len(plan.changes)} change(s) planned, {sum(applied.values())} applied"
        if failed:
            message += f", {len(failed)} agent(s) failed"
        if skipped_backoff:
            message += f", {len(skipped_backoff)} agent(s) in backoff"
        if plan.held:
            message += f", {len(plan.held)} agent(s) held"
        if self.awaiting is not None:
            message += f"; revision {self.awaiting.revision} awaits approval"
        return self._result(
            kind,
            message,
            applied=dict(applied),
            failed_agents=failed,
            recovered=tuple(outcome.recovered) if outcome else (),
            backoff_agents=self._backoff_count(self.clock()),
            gauges=self.gauges(desired),
            **common,
        )

    def failing(self) -> frozenset[str]:
        """Agents with failures on record (backed off or about to retry): read
        authoritatively by every daemon job until they succeed."""
        return frozenset(self.backoff.snapshot(self.clock()))

    def _backoff_count(self, now: float) -> int:
        return self.backoff.active_count(now)

    def _update_backoff(
        self, desired: DesiredState, failed: Mapping[str, str], blocked: set[str], *, now: float
    ) -> None:
        for agent, reason in sorted(failed.items()):
            state = self.backoff.failed(agent, now, reason)
            log_event(
                self.log,
                logging.WARNING,
                "agent failed; backing off",
                agent=agent,
                failures=state.failures,
                retry_in_s=round(state.retry_at - now, 1),
                error=reason,
            )
        for spec in desired.agents():
            agent = spec.agent_id
            if agent not in failed and agent not in blocked and self.backoff.succeeded(agent):
                log_event(self.log, logging.INFO, "agent recovered; backoff cleared", agent=agent)


def log_funding_limits(log: logging.Logger, plan: Plan) -> None:
    """Funding the plan holds back, and agents whose wallets leak, are said on every pass."""
    for flag in plan.outflow:
        log_event(
            log,
            logging.WARNING,
            "unexplained outflow: credits left the wallet other than as metered spend",
            agent=flag.agent_id,
            unexplained_credits=str(flag.unexplained),
            limit_credits=str(flag.limit),
            refunding_stopped=flag.refunding_stopped,
        )
    for deferred in plan.deferred:
        log_event(
            log,
            logging.WARNING,
            "funding deferred",
            agent=deferred.agent_id,
            change=deferred.kind.value,
            credits=str(deferred.credits),
            reason=deferred.reason.value,
        )
