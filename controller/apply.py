"""Apply a plan: the imperative shell around the planner's decisions.

Each agent's changes run in plan order; agents run concurrently and independently, so one
agent's failure is reported and the others still converge. Non-idempotent steps (register,
deposit) write a durable intent first and re-observe the wallet right before acting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from controller.gateway.client import GatewayClient
from controller.gateway.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    Conflict,
    Forbidden,
    GatewayError,
    InsufficientBalance,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServerError,
    UnknownOutcome,
)
from controller.gateway.models import Webhook
from controller.keys.sinks import DeliveryError, KeySink
from controller.keysink import DirectoryKeySink
from controller.plan import Change, ChangeKind, Plan, secret_ref_from_args
from controller.secretref import SecretUnavailable, resolve_secret
from controller.state import ABANDONED, DONE, FAILED, PENDING, BudgetWrite, Intent, ManagedWebhook, StateStore
from policies.currency import SIGNUP_BONUS_CREDITS
from policies.funding import deposit_idempotency_key, top_up_amount
from policies.funding_window import FundingKind, bonus_ref
from policies.money import format_money

REFUSED = (
    AuthenticationFailed,
    Forbidden,
    NotFound,
    BudgetExceeded,
    InsufficientBalance,
    Conflict,
    InvalidRequest,
    RateLimited,
)
"""Answers proving a write was refused (nothing moved); anything else may have landed."""

FaultHook = Callable[[str, str], None]
"""Called as ``hook(point, agent_id)`` at crash-relevant points; tests raise from it."""


class AgentStepError(Exception):
    """A change for one agent could not be made; the message is user-facing."""


@dataclass
class AgentResult:
    agent_id: str
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None

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
                {"agent_id": a.agent_id, "ok": a.ok, "applied": a.applied, "skipped": a.skipped, "error": a.error}
                for a in self.agents
            ],
        }


class Applier:
    def __init__(
        self,
        client: GatewayClient,
        store: StateStore,
        sink: DirectoryKeySink,
        *,
        fault_hook: FaultHook | None = None,
        clock: Callable[[], float] = time.time,
        key_sink: Callable[[str], KeySink | None] | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.sink = sink
        self._key_sink = key_sink or (lambda agent: None)
        """The agent's configured sink (manifest ``keys.sink``), given each new key after it
        is safely in finops' key store."""
        self._hook = fault_hook or (lambda point, agent: None)
        self._clock = clock
        self._adopted: set[tuple[str, str]] = set()
        """(agent, url) of webhooks that intent recovery adopted in this run."""
        self._unresolved: set[str] = set()
        """Agents with a pending intent that recovery could not resolve in this run."""

    # ------------------------------------------------------------------ recovery

    async def recover_intents(self) -> list[str]:
        """Resolve intents left pending by a crashed run, by looking at the gateway."""
        notes: list[str] = []
        for intent in self.store.intents(status=PENDING):
            try:
                await self._recover_one(intent, notes)
            except GatewayError as exc:
                # One agent's unreadable ledger must not stop the fleet: its intent stays
                # pending and the agent sits this run out (acting now could repeat the step).
                self._unresolved.add(intent.agent_id)
                notes.append(
                    f"{intent.agent_id}: an interrupted {intent.kind} could not be resolved yet ({exc}); "
                    "the agent is skipped until it can be"
                )
        return notes

    async def _recover_one(self, intent: Intent, notes: list[str]) -> None:
        if intent.kind == "deposit":
            tx = await self.client.find_transaction(intent.agent_id, intent.intent_key)
            if tx is not None:
                self.store.note_funding(
                    intent.intent_key,
                    intent.agent_id,
                    str(intent.payload.get("fleet", "")),
                    FundingKind.DEPOSIT,
                    tx.amount,
                    landed=True,
                )
                self.store.finish_intent(intent.intent_key, DONE, f"landed as transaction {tx.id} (recovered)")
                notes.append(
                    f"{intent.agent_id}: interrupted deposit of {intent.payload.get('amount')} credits "
                    f"had landed (transaction {tx.id}); not repeated"
                )
            else:
                self.store.release_funding(intent.intent_key)
                self.store.finish_intent(intent.intent_key, ABANDONED, "never reached the ledger")
                notes.append(
                    f"{intent.agent_id}: interrupted deposit of {intent.payload.get('amount')} credits "
                    "never landed; the plan decides afresh"
                )
        elif intent.kind == "create_webhook":
            notes.append(await self._recover_webhook(intent.intent_key, intent.agent_id, intent.payload))
        elif intent.kind == "register":
            exists = await self.client.get_balance(intent.agent_id) is not None
            stored = self.sink.load(intent.agent_id) is not None
            self._bonus(intent.agent_id, str(intent.payload.get("fleet", "")), landed=exists)
            if exists and not stored:
                self.store.finish_intent(intent.intent_key, FAILED, "registered but the key was lost")
                notes.append(
                    f"{intent.agent_id}: LOST KEY: a registration was interrupted after the gateway "
                    "created the agent but before its key was stored; the gateway shows a key only "
                    "once. Recover it with `finops keys import` from wherever the agent has it, or "
                    "treat the key as orphaned."
                )
            else:
                status = DONE if exists else ABANDONED
                self.store.finish_intent(intent.intent_key, status, "resolved on restart")

    async def _recover_webhook(
        self, intent_key: str, agent: str, payload: Mapping[str, Any], *, settled: bool = True
    ) -> str:
        """A webhook create whose outcome is unknown: adopt it if it is on the gateway (it
        carries our marker and matches the intent exactly), else let the plan decide.
        Right after the unknown outcome (``settled=False``) a miss proves nothing (the
        gateway may still commit a request it holds), so the intent stays pending."""
        match = self._find_created(await self.client.list_webhooks(), agent, payload)
        if match is None:
            if not settled:
                return f"{agent}: webhook creation not on the gateway yet"
            self.store.finish_intent(intent_key, ABANDONED, "not on the gateway")
            return f"{agent}: interrupted webhook creation never landed; the plan decides afresh"
        self._adopted.add((agent, match.url))
        self.store.record_webhook(ManagedWebhook(match.id, agent, str(payload["fleet"]), match.url))
        self.store.finish_intent(intent_key, DONE, f"adopted {match.id} (recovered)")
        return f"{agent}: interrupted webhook creation had landed as {match.id}; adopted, not repeated"

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
        before = dict(self.client.calls)
        recovered = await self.recover_intents()
        by_agent: dict[str, list[Change]] = {}
        for change in plan.changes:
            if change.kind is ChangeKind.CREATE_WEBHOOK and (change.agent_id, change.args["url"]) in self._adopted:
                continue  # the plan predates recovery, which found this webhook on the gateway
            by_agent.setdefault(change.agent_id, []).append(change)
        results = [
            AgentResult(a, skipped=[c.kind.value for c in cs], error="an interrupted step is unresolved; not attempted")
            for a, cs in by_agent.items()
            if a in self._unresolved
        ]
        results += await self._apply_agents([(a, cs) for a, cs in by_agent.items() if a not in self._unresolved])
        result = ApplyResult(
            agents=list(results),
            writes=self.client.calls["write"] - before.get("write", 0),
            reads=self.client.calls["read"] - before.get("read", 0),
            recovered=recovered,
        )
        return result

    async def _apply_agents(self, work: list[tuple[str, list[Change]]]) -> list[AgentResult]:
        """As many workers as the client has requests in flight, not one task per agent: a
        waiting task costs memory and only ``client.concurrency`` of them can progress."""
        done: dict[int, AgentResult] = {}
        pending = iter(enumerate(work))

        async def worker() -> None:
            for index, (agent, changes) in pending:
                done[index] = await self._apply_agent(agent, changes)

        await asyncio.gather(*(worker() for _ in range(min(self.client.concurrency, len(work)))))
        return [done[i] for i in range(len(work))]

    async def _apply_agent(self, agent_id: str, changes: list[Change]) -> AgentResult:
        result = AgentResult(agent_id)
        for change in changes:
            try:
                note = await self._apply_change(change)
            except (AgentStepError, GatewayError) as exc:
                result.error = f"{change.kind.value}: {exc}"
                remaining = changes[changes.index(change) + 1 :]
                result.skipped += [f"{c.kind.value} (not attempted after the failure)" for c in remaining]
                break
            (result.skipped if note.startswith("skipped") else result.applied).append(note)
        return result

    async def _apply_change(self, change: Change) -> str:
        if change.kind is ChangeKind.REGISTER:
            return await self._register(change)
        if change.kind is ChangeKind.TOP_UP:
            return await self._top_up(change)
        if change.kind is ChangeKind.SET_BUDGET:
            return await self._set_budget(change)
        if change.kind is ChangeKind.CREATE_WEBHOOK:
            return await self._create_webhook(change)
        if change.kind is ChangeKind.DELETE_WEBHOOK:
            return await self._delete_webhook(change)
        raise AgentStepError(f"unknown change kind {change.kind!r}")  # pragma: no cover

    async def _register(self, change: Change) -> str:
        agent = change.agent_id
        intent_key = f"register:{agent}"
        self.store.begin_intent(intent_key, "register", agent, {"fleet": change.fleet})
        self._bonus(agent, change.fleet, landed=None)
        try:
            registration = await self.client.register(agent)
        except Conflict:
            self._bonus(agent, change.fleet, landed=False)  # someone else's registration, not our credit
            self.store.finish_intent(intent_key, ABANDONED, "already registered")
            raise AgentStepError(
                f"{agent} was registered by someone else since the plan was made; re-plan to adopt it"
            ) from None
        except (UnknownOutcome, ServerError):
            if await self.client.get_balance(agent) is not None:
                self._bonus(agent, change.fleet, landed=True)
                self.store.finish_intent(intent_key, FAILED, "unknown outcome")
                raise AgentStepError(
                    f"{agent} was registered but the response (with its one-time key) was lost; "
                    "the key cannot be recovered over the API"
                ) from None
            # Not visible yet, but a gateway can still commit a request it holds after we
            # gave up: the intent stays pending, and the next run resolves it by looking.
            raise AgentStepError(
                f"registering {agent}: no answer and no wallet yet; the next run looks again before retrying"
            ) from None
        except REFUSED:
            self._bonus(agent, change.fleet, landed=False)
            raise
        self._hook("after_register", agent)
        self._bonus(agent, change.fleet, landed=True)
        prefix = self.sink.store(agent, registration.api_key)
        self.store.record_key(agent, prefix, "register")
        self.store.finish_intent(intent_key, DONE, f"key sha3:{prefix}")
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

    async def _top_up(self, change: Change) -> str:
        agent = change.agent_id
        args = change.args
        planned = Decimal(args["amount"])
        expected = Decimal(args["expected_balance"])
        balance = await self.client.get_balance(agent)  # re-observe right before moving money
        if balance is None:
            raise AgentStepError(f"{agent} has no wallet; cannot top up")
        if balance == expected:
            amount, key = planned, args["idempotency_key"]
            adjusted = ""
        else:
            amount = min(top_up_amount(balance, Decimal(args["floor"]), Decimal(args["target"])), planned)
            if amount <= 0:
                return f"skipped top-up: balance is now {format_money(balance)}, no longer below the floor"
            anchor = await self.client.latest_transaction_id(agent)
            key = deposit_idempotency_key(change.fleet, agent, str(anchor), amount)
            adjusted = f" (balance moved {format_money(expected)} → {format_money(balance)} since the plan)"
        self.store.begin_intent(key, "deposit", agent, {"amount": format_money(amount), "fleet": change.fleet})
        self._hook("before_deposit", agent)
        # Counted against the fleet's rolling funding limit before it is sent: an unknown
        # outcome keeps counting until the ledger proves it never landed.
        self.store.note_funding(key, agent, change.fleet, FundingKind.DEPOSIT, amount, landed=False)
        try:
            deposit = await self.client.deposit(agent, amount, key, description="finops top-up")
        except REFUSED:
            self.store.release_funding(key)
            raise
        self.store.note_funding(key, agent, change.fleet, FundingKind.DEPOSIT, amount, landed=True)
        self._hook("after_deposit", agent)
        self.store.finish_intent(key, DONE, f"transaction {deposit.transaction_id}")
        how = " (recovered from the ledger after a lost response)" if deposit.recovered else ""
        return f"deposited {format_money(amount)} credits → balance {format_money(deposit.new_balance)}{adjusted}{how}"

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
        args = change.args
        daily = Decimal(args["daily_cap"]) if "daily_cap" in args else None
        monthly = Decimal(args["monthly_cap"]) if "monthly_cap" in args else None
        threshold = Decimal(args["alert_threshold"])
        await self.client.set_budget(change.agent_id, daily_cap=daily, monthly_cap=monthly, alert_threshold=threshold)
        self.store.record_budget_write(
            change.agent_id, BudgetWrite(daily_cap=daily, monthly_cap=monthly, alert_threshold=threshold)
        )
        return "budget set: " + ", ".join(f"{d.field} {d.before or 'none'} → {d.after}" for d in change.diff)

    async def _create_webhook(self, change: Change) -> str:
        args = change.args
        agent = change.agent_id
        try:
            secret = resolve_secret(secret_ref_from_args(args))
        except SecretUnavailable as exc:
            raise AgentStepError(str(exc)) from None
        payload = {"fleet": change.fleet, "url": args["url"], "events": args["events"]}
        intent_key = f"create_webhook:{agent}:{args['url']}:{self._clock()}"
        self.store.begin_intent(intent_key, "create_webhook", agent, payload)
        try:
            hook = await self.client.create_webhook(args["url"], args["events"].split(","), secret, [agent])
        except (UnknownOutcome, ServerError):
            note = await self._recover_webhook(intent_key, agent, payload, settled=False)
            if "adopted" in note:
                return "webhook created (response lost; found on the gateway and adopted)"
            raise AgentStepError("creating the webhook did not complete; the next run retries") from None
        except GatewayError:
            self.store.finish_intent(intent_key, FAILED, "refused by the gateway")
            raise
        self._hook("after_create_webhook", agent)
        self.store.record_webhook(ManagedWebhook(hook.id, agent, change.fleet, hook.url))
        self.store.finish_intent(intent_key, DONE, hook.id)
        return f"webhook {hook.id} created for {hook.url}"

    async def _delete_webhook(self, change: Change) -> str:
        hook_id = change.args["webhook_id"]
        if hook_id not in self.store.managed_webhooks():
            raise AgentStepError(f"refusing to delete {hook_id}: finops' state does not record it as ours")
        deleted = await self.client.delete_webhook(hook_id)
        self.store.forget_webhook(hook_id)
        return f"webhook {hook_id} deleted" if deleted else f"webhook {hook_id} was already gone"
