"""Apply a plan: the imperative shell around the planner's decisions.

Each agent's changes run in plan order; agents run concurrently and independently, so one
agent's failure is reported and the others still converge. Non-idempotent steps (register,
deposit, webhook create) write a durable intent first and re-observe the wallet right
before acting.

Unknown outcomes are a state (``policies.settle``): an intent moves pending → (landed |
not landed); "not landed" is concluded only after the settle time, by a fresh look at the
gateway. Until then its kind of change is withheld for that agent (the planner withholds
it too, ``Plan.blocked``). ``prepare`` resolves what it can and adopts finops-marked
webhooks *before* the plan is made, so a plan never races an outcome that is already known.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from controller.errors import ConfigError
from controller.gateway.client import GatewayClient
from controller.gateway.errors import Conflict, GatewayError, ProtocolViolation, UnknownOutcome, Unreachable
from controller.gateway.models import Webhook
from controller.io.secretref import (
    SecretUnavailable,
    adopt_managed_secret,
    managed_secret_dir,
    managed_secret_missing,
    resolve_secret,
)
from controller.keys.sinks import DeliveryError, KeySink
from controller.keys.vault import KeyStore
from controller.state import ABANDONED, DONE, FAILED, PENDING, BudgetWrite, Intent, ManagedWebhook, StateStore
from controller.state.recovery import Resolver, resolver_of
from policies.currency import CREDITS, SIGNUP_BONUS_CREDITS
from policies.funding import top_up_amount
from policies.funding_window import FundingKind, bonus_ref
from policies.keyprint import secret_fingerprint
from policies.money import format_money
from policies.plan_types import (
    INTENT_BLOCKS,
    Change,
    ChangeKind,
    CreateWebhookArgs,
    DeleteWebhookArgs,
    Plan,
    SetBudgetArgs,
    TopUpArgs,
)
from policies.planner import live_managed_secrets, marked_owner, webhook_owners
from policies.settle import SETTLE_SECONDS, is_settled, parse_settle_seconds, settles_at
from policies.spec import DesiredState
from policies.units import Units, show_change

SETTLE_ENV_VAR = "FINOPS_SETTLE_SECONDS"


def configured_settle_seconds(environ: Mapping[str, str] | None = None) -> float:
    """The settle time in force: ``FINOPS_SETTLE_SECONDS`` if set (a gateway behind slower
    queues needs more; a test that has proven the gateway idle may use less), else
    ``policies.settle.SETTLE_SECONDS``."""
    raw = (os.environ if environ is None else environ).get(SETTLE_ENV_VAR)
    if raw is None or not raw.strip():
        return SETTLE_SECONDS
    try:
        return parse_settle_seconds(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


AUTO_HOLD_REASON = "auto: caps could not be set after registration"
"""Reason of finops' own hold on a newly registered agent whose caps it could not set."""

FaultHook = Callable[[str, str], None]
"""Called as ``hook(point, agent_id)`` at crash-relevant points; tests raise from it."""


class AgentStepError(Exception):
    """A change for one agent could not be made; the message is user-facing."""


def refused(exc: GatewayError) -> bool:
    """Whether a failed write provably did not run: the gateway's own refusal (a 4xx with
    its problem+json body, which names a problem type), or no connection at all (the client
    repeats a write only after those, so every attempt failed that way). Anything else (no
    answer, 5xx, an answer finops cannot read or that is not the gateway's) may have run."""
    if isinstance(exc, Unreachable):
        return True
    return (
        exc.status is not None
        and 400 <= exc.status < 500
        and bool(exc.code)
        and not isinstance(exc, ProtocolViolation | UnknownOutcome)
    )


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


class SkipReason(Enum):
    """Why a planned change was not made (a typed code: callers switch on it, never on prose)."""

    NO_LONGER_NEEDED = "no-longer-needed"
    """Re-observed right before acting: the change is no longer needed (e.g. a top-up whose
    wallet is no longer below the floor)."""
    UNKNOWN_OUTCOME_PENDING = "unknown-outcome-pending"
    """An earlier attempt of this kind of change has an unknown outcome and may still land."""
    AFTER_FAILURE = "after-failure"
    """An earlier change of the same agent failed in this run: not attempted."""


@dataclass(frozen=True)
class Applied:
    """The change took effect on the gateway (or was found to have, e.g. adopted)."""

    kind: ChangeKind
    note: str


@dataclass(frozen=True)
class Skipped:
    """The change was not attempted; ``reason`` says why, ``note`` says it to a person."""

    kind: ChangeKind
    reason: SkipReason
    note: str


@dataclass(frozen=True)
class Failed:
    """The change provably did not take effect (or cannot be retried safely): an error."""

    kind: ChangeKind
    error: str


@dataclass(frozen=True)
class Unknown:
    """The change may or may not have landed: its intent (``intent_key``) stays pending and
    withholds its kind of change until it is resolved from the gateway."""

    kind: ChangeKind
    error: str
    intent_key: str | None


StepOutcome = Applied | Skipped | Failed | Unknown
"""What happened to one planned change, in plan order."""


def outcome_to_dict(outcome: StepOutcome) -> dict[str, Any]:
    """The machine-readable form (``apply --format json``): kind, status and, for a skip,
    its reason code; for an unknown outcome, the pending intent's key."""
    out: dict[str, Any] = {"kind": outcome.kind.value}
    if isinstance(outcome, Applied):
        out["status"] = "applied"
    elif isinstance(outcome, Skipped):
        out |= {"status": "skipped", "reason": outcome.reason.value}
    elif isinstance(outcome, Failed):
        out["status"] = "failed"
    else:
        out |= {"status": "unknown-outcome", "intent_key": outcome.intent_key}
    return out


class StepUnknown(Exception):
    """A step's outcome is unknown: its intent stays pending (raised inside the applier)."""

    def __init__(self, message: str, intent_key: str | None) -> None:
        super().__init__(message)
        self.intent_key = intent_key


@dataclass
class AgentResult:
    agent_id: str
    outcomes: list[StepOutcome] = field(default_factory=list)
    extra_errors: list[str] = field(default_factory=list)
    """Errors not tied to one change (e.g. the automatic hold of a capless new agent)."""

    @property
    def applied(self) -> list[str]:
        return [o.note for o in self.outcomes if isinstance(o, Applied)]

    @property
    def skipped(self) -> list[str]:
        return [o.note for o in self.outcomes if isinstance(o, Skipped)]

    @property
    def applied_kinds(self) -> list[ChangeKind]:
        """The kinds of the changes that took effect, in plan order."""
        return [o.kind for o in self.outcomes if isinstance(o, Applied)]

    @property
    def error(self) -> str | None:
        errors = [f"{o.kind.value}: {o.error}" for o in self.outcomes if isinstance(o, Failed | Unknown)]
        errors += self.extra_errors
        return "; ".join(errors) if errors else None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ApplyResult:
    agents: list[AgentResult]
    writes: int
    reads: int
    recovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.agents)

    def failed(self) -> list[AgentResult]:
        return [a for a in self.agents if not a.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "writes": self.writes,
            "reads": self.reads,
            "recovered": list(self.recovered),
            "agents": [
                {
                    "agent_id": a.agent_id,
                    "ok": a.ok,
                    "applied": a.applied,
                    "skipped": a.skipped,
                    "error": a.error,
                    "outcomes": [outcome_to_dict(o) for o in a.outcomes],
                }
                for a in self.agents
            ],
        }


class Applier:
    def __init__(
        self,
        client: GatewayClient,
        store: StateStore,
        sink: KeyStore,
        *,
        fault_hook: FaultHook | None = None,
        clock: Callable[[], float] = time.time,
        key_sink: Callable[[str], KeySink | None] | None = None,
        settle_seconds: float | None = None,
        on_agent_done: Callable[[AgentResult], None] | None = None,
    ) -> None:
        self.client = client
        self._on_agent_done = on_agent_done or (lambda result: None)
        """Told each agent's result as soon as it is done (a progress bar counts them)."""
        self.store = store
        self.sink = sink
        self._key_sink = key_sink or (lambda agent: None)
        """The agent's configured sink (manifest ``keys.sink``), given each new key after it
        is safely in finops' key store."""
        self._hook = fault_hook or (lambda point, agent: None)
        self._clock = clock
        self._settle = configured_settle_seconds() if settle_seconds is None else settle_seconds
        self._adopted: set[tuple[str, str]] = set()
        """(agent, url) of webhooks that intent recovery adopted in this run."""
        self._withheld: dict[tuple[str, ChangeKind], Intent] = {}
        """(agent, change kind) withheld because an intent of that kind is unresolved."""
        self._registered: set[str] = set()
        """Agents this run registered (or whose lost registration it found): they must end
        the run capped, or held."""
        self._recovered: list[str] | None = None
        """Notes of ``prepare``/``recover_intents`` once run (each runs once per Applier)."""
        self._units: dict[str, Units] = {}
        """Each fleet's currency and rate, from the plan being applied (for people's notes)."""

    # ------------------------------------------------------------------ recovery

    async def prepare(self, desired: DesiredState | None = None) -> list[str]:
        """Before planning: resolve unknown outcomes from the gateway, then adopt webhooks
        that carry finops' marker for a declared agent but are missing from its state."""
        notes = await self.recover_intents()
        if desired is not None:
            notes += await self.adopt_webhooks(desired)
            notes += await self.adopt_managed_secrets(desired)
        self._recovered = notes
        return notes

    async def recover_intents(self) -> list[str]:
        """Resolve unresolved intents (a crashed run's, or an unknown outcome's) by looking
        at the gateway; one that cannot be resolved yet withholds its kind of change."""
        if self._recovered is not None:
            return list(self._recovered)
        notes: list[str] = []
        for intent in self.store.intents(status=PENDING):
            if resolver_of(intent.kind) is not Resolver.APPLY:
                continue  # rotations: resolved by the key manager (controller.state.recovery)
            try:
                await self._recover_one(intent, notes)
            except GatewayError as exc:
                # One agent's unreadable ledger must not stop the fleet: its intent stays
                # pending and that kind of change sits this run out (it could repeat it).
                notes.append(
                    f"{intent.agent_id}: an interrupted {intent.kind} could not be resolved yet ({exc}); "
                    "it is not repeated until it can be"
                )
        unresolved = [i for i in self.store.intents(status=PENDING) if i.kind in INTENT_BLOCKS]
        self._withheld = {(i.agent_id, INTENT_BLOCKS[i.kind]): i for i in unresolved}
        self._recovered = notes
        return list(notes)

    def _settled(self, intent: Intent) -> bool:
        sent = intent.sent_at if intent.sent_at is not None else intent.created_at
        return is_settled(sent, self._clock(), self._settle)

    def _settles_at(self, intent: Intent) -> str:
        sent = intent.sent_at if intent.sent_at is not None else intent.created_at
        return _when(settles_at(sent, self._settle))

    async def _recover_one(self, intent: Intent, notes: list[str]) -> None:
        agent = intent.agent_id
        settled = self._settled(intent)  # decided before looking: the look must come after
        if intent.kind == "deposit":
            tx = await self.client.find_transaction(agent, intent.intent_key)
            amount = intent.payload.get("amount")
            if tx is not None:
                self.store.note_funding(
                    intent.intent_key,
                    agent,
                    str(intent.payload.get("fleet", "")),
                    FundingKind.DEPOSIT,
                    tx.amount,
                    landed=True,
                )
                self.store.finish_intent(intent.intent_key, DONE, f"landed as transaction {tx.id}", ref=str(tx.id))
                notes.append(
                    f"{agent}: deposit of {amount} credits with an unknown outcome had landed "
                    f"(transaction {tx.id}); not repeated"
                )
            elif settled:
                self.store.release_funding(intent.intent_key)
                self.store.finish_intent(intent.intent_key, ABANDONED, "not in the ledger after the settle time")
                notes.append(
                    f"{agent}: deposit of {amount} credits with an unknown outcome never landed "
                    "(ledger checked after the settle time); the plan decides afresh"
                )
            else:
                notes.append(
                    f"{agent}: deposit of {amount} credits has an unknown outcome and is not in the ledger "
                    f"yet; no new deposit before it lands or {self._settles_at(intent)}"
                )
        elif intent.kind == "create_webhook":
            notes.append((await self._recover_webhook(intent, settled=settled))[1])
        elif intent.kind == "register":
            exists = await self.client.get_balance(agent) is not None
            stored = self.sink.load(agent) is not None
            fleet = str(intent.payload.get("fleet", ""))
            if exists:
                self._bonus(agent, fleet, landed=True)
            if exists and not stored:
                self.store.finish_intent(intent.intent_key, FAILED, "registered but the key was lost")
                notes.append(
                    f"{agent}: LOST KEY: a registration whose answer was lost created the agent, but its key "
                    "never reached finops; the gateway shows a key only once. Recover it with "
                    "`finops keys import` from wherever the agent has it, or treat the key as orphaned."
                )
            elif exists:
                self.store.finish_intent(intent.intent_key, DONE, "registered; key stored (recovered)")
            elif settled:
                self._bonus(agent, fleet, landed=False)
                self.store.finish_intent(intent.intent_key, ABANDONED, "no wallet after the settle time")
                notes.append(f"{agent}: registration with an unknown outcome never landed; the plan decides afresh")
            else:
                notes.append(
                    f"{agent}: registration has an unknown outcome and no wallet yet; "
                    f"not registered again before it lands or {self._settles_at(intent)}"
                )

    async def _recover_webhook(self, intent: Intent, *, settled: bool) -> tuple[bool, str]:
        """A webhook create whose outcome is unknown: adopt it if it is on the gateway (it
        carries our marker and matches the intent exactly). A miss proves "not landed"
        only after the settle time; before, the intent stays pending."""
        agent, payload = intent.agent_id, intent.payload
        match = self._find_created(await self.client.list_webhooks(), agent, payload)
        if match is None:
            if not settled:
                return False, (
                    f"{agent}: webhook creation has an unknown outcome and is not on the gateway yet; "
                    f"not created again before it lands or {self._settles_at(intent)}"
                )
            self.store.finish_intent(intent.intent_key, ABANDONED, "not on the gateway after the settle time")
            return False, f"{agent}: webhook creation with an unknown outcome never landed; the plan decides afresh"
        self._adopted.add((agent, match.url))
        self.store.record_webhook(ManagedWebhook(match.id, agent, str(payload["fleet"]), match.url))
        self.store.finish_intent(intent.intent_key, DONE, f"adopted {match.id}", ref=match.id)
        return (
            True,
            f"{agent}: webhook creation with an unknown outcome had landed as {match.id}; adopted, not repeated",
        )

    async def adopt_webhooks(self, desired: DesiredState) -> list[str]:
        """Record in state every live webhook that is provably finops' own
        (``plan.marked_owner``) but missing from it, so it is managed (and prunable) like
        any other; duplicates among them are then removed by the plan."""
        if not self.store.managed_webhooks() and not any(s.gateway_webhooks for s in desired.agents()):
            return []
        fleet_of = {spec.agent_id: fleet.name for fleet in desired.fleets for spec in fleet.agents}
        known = self.store.managed_webhooks()
        notes = []
        for hook_id, record in webhook_owners(await self.client.list_webhooks(), known, fleet_of).items():
            if hook_id not in known:
                self.store.record_webhook(record)
                notes.append(
                    f"{record.agent_id}: webhook {hook_id} carries finops' marker but was not in finops' state; adopted"
                )
        return notes

    async def adopt_managed_secrets(self, desired: DesiredState) -> list[str]:
        """Re-derive each finops-generated webhook secret whose file is missing (a fresh
        state directory) from finops' own live webhooks, when they all carry one secret
        (``plan.live_managed_secrets``): stored (atomic, 0600) so the plan keeps those
        webhooks instead of generating a new secret and replacing every one. Disagreeing
        webhooks are left to the plan (it warns, and generates)."""
        managed_dir = managed_secret_dir(self.store.path)
        refs = {h.secret for s in desired.agents() for h in s.gateway_webhooks}
        if not any(managed_secret_missing(ref, managed_dir) for ref in refs):
            return []
        live = live_managed_secrets(desired, await self.client.list_webhooks(), self.store.managed_webhooks())
        notes = []
        for ref, values in sorted(live.items(), key=lambda item: str(item[0].managed)):
            if len(values) != 1 or not managed_secret_missing(ref, managed_dir):
                continue
            try:
                adopted = adopt_managed_secret(ref, next(iter(values)), managed_dir)
            except SecretUnavailable as exc:
                notes.append(f"{ref.describe()}: not adopted from the gateway ({exc})")
                continue
            if adopted:
                notes.append(
                    f"{ref.describe()}: was not in finops' state; adopted from finops' own webhooks on the gateway "
                    f"(fingerprint {secret_fingerprint(next(iter(values)))})"
                )
        return notes

    def _find_created(self, hooks: list[Webhook], agent: str, payload: Mapping[str, Any]) -> Webhook | None:
        known = self.store.managed_webhooks()
        events = sorted(str(payload["events"]).split(","))
        for hook in hooks:
            if (
                hook.id not in known
                and hook.url == payload["url"]
                and sorted(hook.event_types) == events
                and hook.filter_agent_ids == (agent,)
            ):
                return hook
        return None

    # ------------------------------------------------------------------ apply

    async def apply(self, plan: Plan) -> ApplyResult:
        self._units = {f.name: Units(f.currency, f.rate_to_credits) for f in plan.fleets}
        before = dict(self.client.calls)
        recovered = await self.recover_intents()
        by_agent: dict[str, list[Change]] = {}
        for change in plan.changes:
            args = change.args
            if isinstance(args, CreateWebhookArgs) and (change.agent_id, args.url) in self._adopted:
                continue  # the plan predates recovery, which found this webhook on the gateway
            by_agent.setdefault(change.agent_id, []).append(change)
        results = await self._apply_agents(list(by_agent.items()))
        return ApplyResult(
            agents=list(results),
            writes=self.client.calls["write"] - before.get("write", 0),
            reads=self.client.calls["read"] - before.get("read", 0),
            recovered=recovered,
        )

    async def _apply_agents(self, work: list[tuple[str, list[Change]]]) -> list[AgentResult]:
        """As many workers as the client has requests in flight, not one task per agent: a
        waiting task costs memory and only ``client.concurrency`` of them can progress."""
        done: dict[int, AgentResult] = {}
        pending = iter(enumerate(work))

        async def worker() -> None:
            for index, (agent, changes) in pending:
                done[index] = await self._apply_agent(agent, changes)
                self._on_agent_done(done[index])

        await asyncio.gather(*(worker() for _ in range(min(self.client.concurrency, len(work)))))
        return [done[i] for i in range(len(work))]

    async def _apply_agent(self, agent_id: str, changes: list[Change]) -> AgentResult:
        """The agent's changes in plan order; after a failure the rest are skipped, except
        caps on a wallet that exists (caps are the brake, and always safe to write). A
        newly registered agent ends the run capped or under finops' automatic hold."""
        result = AgentResult(agent_id)
        outcomes = result.outcomes
        failed = False
        capped = False
        for change in changes:
            kind = change.kind
            wallet_known = agent_id in self._registered or not any(c.kind is ChangeKind.REGISTER for c in changes)
            if failed and not (kind is ChangeKind.SET_BUDGET and wallet_known):
                outcomes.append(
                    Skipped(kind, SkipReason.AFTER_FAILURE, f"{kind.value} (not attempted after the failure)")
                )
                continue
            withheld = self._withheld.get((agent_id, kind))
            if withheld is not None:
                outcomes.append(
                    Skipped(
                        kind,
                        SkipReason.UNKNOWN_OUTCOME_PENDING,
                        f"skipped {kind.value}: an earlier attempt has an unknown outcome and may still land; "
                        f"not repeated before it is resolved (at the latest {self._settles_at(withheld)})",
                    )
                )
                continue
            try:
                outcome = await self._apply_change(change)
            except StepUnknown as exc:
                outcomes.append(Unknown(kind, str(exc), exc.intent_key))
                failed = True
                continue
            except (AgentStepError, GatewayError) as exc:
                outcomes.append(Failed(kind, str(exc)))
                failed = True
                continue
            if kind is ChangeKind.SET_BUDGET:
                capped = True
            outcomes.append(outcome)
        if agent_id in self._registered and not capped:
            self.store.set_hold(agent_id, AUTO_HOLD_REASON, auto=True)
            result.extra_errors.append(
                "HELD: registered but its caps could not be set; finops holds it (no funding) and sets its caps "
                "on the next run, then lifts the hold"
            )
        return result

    async def _apply_change(self, change: Change) -> Applied | Skipped:
        kind = change.kind
        if kind is ChangeKind.REGISTER:
            return Applied(kind, await self._register(change))
        if kind is ChangeKind.TOP_UP:
            return await self._top_up(change)
        if kind is ChangeKind.SET_BUDGET:
            return Applied(kind, await self._set_budget(change))
        if kind is ChangeKind.CREATE_WEBHOOK:
            return Applied(kind, await self._create_webhook(change))
        if kind is ChangeKind.DELETE_WEBHOOK:
            return Applied(kind, await self._delete_webhook(change))
        raise AgentStepError(f"unknown change kind {kind!r}")  # pragma: no cover

    async def _register(self, change: Change) -> str:
        agent = change.agent_id
        intent_key = f"register:{agent}"
        self.store.begin_intent(intent_key, "register", agent, {"fleet": change.fleet}, sent_at=self._clock())
        self._bonus(agent, change.fleet, landed=None)
        try:
            registration = await self.client.register(agent)
        except Conflict:
            self._bonus(agent, change.fleet, landed=False)  # someone else's registration, not our credit
            self._registered.add(agent)  # the wallet exists: it is capped in this run, or held
            self.store.finish_intent(intent_key, ABANDONED, "already registered")
            raise AgentStepError(
                f"{agent} was registered by someone else since the plan was made; re-plan to adopt it"
            ) from None
        except GatewayError as exc:
            if refused(exc):
                self._bonus(agent, change.fleet, landed=False)
                self.store.finish_intent(intent_key, ABANDONED, "refused by the gateway")
                raise
            self.store.mark_sent(intent_key, self._clock())
            if await self.client.get_balance(agent) is not None:
                self._registered.add(agent)
                self._bonus(agent, change.fleet, landed=True)
                self.store.finish_intent(intent_key, FAILED, "unknown outcome")
                raise AgentStepError(
                    f"LOST KEY: {agent} was registered but the response (with its one-time key) was lost ({exc}); "
                    "the key cannot be recovered over the API"
                ) from None
            # Not visible yet, but a gateway can still commit a request it holds after we
            # gave up: the intent stays pending, and no run registers again before it is
            # seen or the settle time has passed.
            raise StepUnknown(
                f"registering {agent}: no usable answer ({exc}) and no wallet yet; not registered again before "
                f"it lands or {_when(settles_at(self._clock(), self._settle))}",
                intent_key,
            ) from None
        self._registered.add(agent)
        self._hook("after_register", agent)
        self._bonus(agent, change.fleet, landed=True)
        prefix = self.sink.store(agent, registration.api_key)
        self.store.record_key(agent, prefix, "register")
        self.store.finish_intent(intent_key, DONE, f"key sha3:{prefix}", ref=prefix)
        delivered = ""
        target = self._key_sink(agent)
        if target is not None:
            try:
                delivered = f", delivered to {await target.deliver(agent, registration.api_key)}"
            except DeliveryError as exc:
                raise AgentStepError(
                    f"registered and the key (sha3:{prefix}) is safe in finops' key store, but delivering it "
                    f"failed: {exc}; once the sink works, `finops rotate --agent {agent} --now` delivers a fresh key"
                ) from None
        return f"registered (key sha3:{prefix} stored{delivered}, balance {format_money(registration.balance)})"

    async def _top_up(self, change: Change) -> Applied | Skipped:
        """Deposit with the plan's key: one key per funding epoch (``policies.funding``),
        whatever the balance did since the plan, so no two decisions of an epoch can land."""
        agent = change.agent_id
        args = change.args_as(TopUpArgs)
        planned = args.amount
        expected = args.expected_balance
        key = args.idempotency_key
        balance = await self.client.get_balance(agent)  # re-observe right before moving money
        if balance is None:
            raise AgentStepError(f"{agent} has no wallet; cannot top up")
        if balance == expected:
            amount, adjusted = planned, ""
        else:
            amount = min(top_up_amount(balance, args.floor, args.target), planned)
            if amount <= 0:
                return Skipped(
                    change.kind,
                    SkipReason.NO_LONGER_NEEDED,
                    f"skipped top-up: balance is now {self._units_of(change.fleet).amount(balance)}, "
                    "no longer below the floor",
                )
            moved = self._units_of(change.fleet).change(expected, balance)
            adjusted = f" (balance moved {moved} since the plan)"
        payload = {"amount": format_money(amount), "fleet": change.fleet}
        self.store.begin_intent(key, "deposit", agent, payload, sent_at=self._clock())
        self._hook("before_deposit", agent)
        # Counted against the fleet's rolling funding limit before it is sent: an unknown
        # outcome keeps counting until the ledger proves it never landed.
        self.store.note_funding(key, agent, change.fleet, FundingKind.DEPOSIT, amount, landed=False)
        try:
            deposit = await self.client.deposit(agent, amount, key, description="finops top-up")
        except GatewayError as exc:
            if not refused(exc):
                # It may still land: it stays unresolved, counted from now (finops gave up now).
                self.store.mark_sent(key, self._clock())
                raise StepUnknown(str(exc), key) from exc
            # Refused. A fresh ledger look decides (an earlier attempt of this call may have
            # run); the key stays the epoch's either way.
            tx = await self.client.find_transaction(agent, key)
            if tx is not None:
                self.store.note_funding(key, agent, change.fleet, FundingKind.DEPOSIT, tx.amount, landed=True)
                self.store.finish_intent(key, DONE, f"landed as transaction {tx.id}", ref=str(tx.id))
            else:
                self.store.release_funding(key)
                self.store.finish_intent(key, ABANDONED, "refused by the gateway")
            raise
        self.store.note_funding(key, agent, change.fleet, FundingKind.DEPOSIT, amount, landed=True)
        self._hook("after_deposit", agent)
        ref = str(deposit.transaction_id) if deposit.transaction_id is not None else None
        self.store.finish_intent(key, DONE, f"transaction {deposit.transaction_id}", ref=ref)
        how = " (recovered from the ledger after a lost response)" if deposit.recovered else ""
        units = self._units_of(change.fleet)
        return Applied(
            change.kind,
            f"deposited {units.amount(amount)} → balance {units.amount(deposit.new_balance)}{adjusted}{how}",
        )

    def _units_of(self, fleet: str) -> Units:
        """The fleet's currency for people's notes (credits alone when the plan lacks it)."""
        return self._units.get(fleet) or Units(CREDITS, Decimal(1))

    def _bonus(self, agent: str, fleet: str, *, landed: bool | None) -> None:
        """The signup bonus of a registration finops makes counts as finops' credit:
        ``None`` before sending (it counts from then), ``True`` once the wallet exists,
        ``False`` when the registration was proven not ours."""
        if landed is False:
            self.store.release_funding(bonus_ref(agent))
        else:
            self.store.note_funding(
                bonus_ref(agent), agent, fleet, FundingKind.SIGNUP_BONUS, SIGNUP_BONUS_CREDITS, landed=bool(landed)
            )

    async def _set_budget(self, change: Change) -> str:
        args = change.args_as(SetBudgetArgs)
        daily, monthly, threshold = args.daily_cap, args.monthly_cap, args.alert_threshold
        await self.client.set_budget(change.agent_id, daily_cap=daily, monthly_cap=monthly, alert_threshold=threshold)
        self.store.record_budget_write(
            change.agent_id, BudgetWrite(daily_cap=daily, monthly_cap=monthly, alert_threshold=threshold)
        )
        lifted = "; finops' automatic hold lifted" if self.store.clear_auto_hold(change.agent_id) else ""
        units = self._units_of(change.fleet)
        fields = ", ".join(f"{d.field} {show_change(d.unit, d.before, d.after, units)}" for d in change.diff)
        fields = fields or "confirmed"
        return f"budget set: {fields}{lifted}"

    async def _create_webhook(self, change: Change) -> str:
        args = change.args_as(CreateWebhookArgs)
        agent = change.agent_id
        try:
            secret = resolve_secret(args.secret, managed_dir=managed_secret_dir(self.store.path))
        except SecretUnavailable as exc:
            raise AgentStepError(str(exc)) from None
        payload = {"fleet": change.fleet, "url": args.url, "events": ",".join(args.events)}
        intent_key = f"create_webhook:{agent}:{args.url}"
        self.store.begin_intent(intent_key, "create_webhook", agent, payload, sent_at=self._clock())
        try:
            hook = await self.client.create_webhook(args.url, list(args.events), secret, [agent])
        except GatewayError as exc:
            if refused(exc):
                self.store.finish_intent(intent_key, FAILED, "refused by the gateway")
                raise
            self.store.mark_sent(intent_key, self._clock())
            pending = self.store.intents(status=PENDING, kind="create_webhook")
            intent = next(i for i in pending if i.intent_key == intent_key)
            adopted, _ = await self._recover_webhook(intent, settled=False)
            if adopted:
                return "webhook created (response lost; found on the gateway and adopted)"
            raise StepUnknown(
                "creating the webhook has an unknown outcome; not created again before it is seen on the "
                f"gateway or {self._settles_at(intent)}",
                intent_key,
            ) from None
        self._hook("after_create_webhook", agent)
        self.store.record_webhook(ManagedWebhook(hook.id, agent, change.fleet, hook.url))
        self.store.finish_intent(intent_key, DONE, hook.id, ref=hook.id)
        return f"webhook {hook.id} created for {hook.url}"

    async def _delete_webhook(self, change: Change) -> str:
        hook_id = change.args_as(DeleteWebhookArgs).webhook_id
        if hook_id not in self.store.managed_webhooks():
            # Not in state: delete only what the live gateway object proves is finops'
            # (marked for this agent's fleet, filtered to exactly this agent).
            live = next((w for w in await self.client.list_webhooks() if w.id == hook_id), None)
            if live is None:
                return f"webhook {hook_id} was already gone"
            if marked_owner(live, {change.agent_id: change.fleet}) != change.agent_id:
                raise AgentStepError(f"refusing to delete {hook_id}: it is not provably finops' own")
        deleted = await self.client.delete_webhook(hook_id)
        self.store.forget_webhook(hook_id)
        return f"webhook {hook_id} deleted" if deleted else f"webhook {hook_id} was already gone"
