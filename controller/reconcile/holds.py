"""Emergency stop: ``finops freeze`` / ``finops unfreeze``.

On GreenHelix 1.4.8 no single call stops an agent (API.md §0.4, §0.5, §0.11): freezing a
wallet blocks deposits and withdrawals but not metered spend; a cap of 0 refuses paid REST
calls (402) but not ``/v1/batch``; revoked and rotated keys live 300 s more. So a freeze
does all three and says what is left: caps to 0, wallet frozen, key rotated into
quarantine (finops keeps the new key and does not deliver it, so the agent's key dies when
the grace ends). The hold is recorded *first*, so a crash part-way leaves the agent held and
the next reconcile keeps its caps at 0 instead of restoring them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from controller.gateway.client import GatewayClient
from controller.gateway.errors import GatewayError
from controller.state import BudgetWrite, StateStore
from policies.currency import to_credits
from policies.escalation import UNFINISHED
from policies.planner import desired_alert_threshold
from policies.rotation import GRACE_SECONDS
from policies.spec import AgentSpec

RESIDUAL_EXPOSURE = (
    "Residual exposure on GreenHelix 1.4.8: the agent's current key keeps authenticating for up to "
    f"{GRACE_SECONDS} s (the gateway's rotation grace; there is no instant revoke), and /v1/batch "
    "does not check budget caps, so batch calls can still spend until the key expires."
)


class QuarantineKeys(Protocol):
    """What a hold needs from key management (``controller.keys``)."""

    async def quarantine(self, spec: AgentSpec, *, reason: str) -> str: ...

    async def release_quarantine(self, spec: AgentSpec) -> str: ...


@dataclass
class HoldResult:
    agent_id: str
    steps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    caps_zeroed: bool = False
    """``freeze``: the hold is recorded and both caps were written as 0 (the lever that stops
    REST spend): the escalation ladder counts its freeze as executed from here."""

    @property
    def ok(self) -> bool:
        return not self.problems


async def freeze(
    client: GatewayClient, store: StateStore, keys: QuarantineKeys | None, spec: AgentSpec, reason: str
) -> HoldResult:
    """Every lever that exists, each attempted even if another fails (reported, not hidden)."""
    result = HoldResult(spec.agent_id)
    store.set_hold(spec.agent_id, reason)
    result.steps.append("operator hold recorded: reconcile keeps caps at 0 and never funds this agent")
    threshold = desired_alert_threshold(spec)
    try:
        await client.set_budget(
            spec.agent_id, daily_cap=Decimal("0"), monthly_cap=Decimal("0"), alert_threshold=threshold
        )
        store.record_budget_write(spec.agent_id, BudgetWrite(Decimal("0.00"), Decimal("0.00"), threshold))
        result.caps_zeroed = True
        result.steps.append("daily and monthly caps set to 0.00: paid REST calls now get 402 budget_exceeded")
    except GatewayError as exc:
        result.problems.append(f"setting caps to 0 failed: {exc}")
    try:
        await client.set_frozen(spec.agent_id, True)
        result.steps.append("wallet frozen: deposits, withdrawals and conversions are refused")
    except GatewayError as exc:
        result.problems.append(f"freezing the wallet failed: {exc}")
    if keys is None or not spec.keys.manage:
        result.problems.append("key not rotated: finops does not manage this agent's key")
    else:
        try:
            note = await keys.quarantine(spec, reason=reason)
            result.steps.append(note)
        except Exception as exc:
            result.problems.append(f"rotating the key into quarantine failed: {exc}")
    return result


async def unfreeze(
    client: GatewayClient, store: StateStore, keys: QuarantineKeys | None, spec: AgentSpec, rate: Decimal
) -> HoldResult:
    """Reverse a freeze: a fresh key to the sink, wallet unfrozen, manifest caps restored;
    the hold is lifted only when all of that worked, so a failure leaves the agent held.
    Also releases the escalation ladder's pauses (``release: manual``, or any not yet
    released): for an agent that is only paused, the manifest caps are restored."""
    result = HoldResult(spec.agent_id)
    if spec.agent_id not in store.holds():
        if not store.escalations(statuses=UNFINISHED, agent_id=spec.agent_id):
            result.problems.append(f"{spec.agent_id} is not held or paused")
            return result
        try:
            await _restore_caps(client, store, spec, rate, result)
        except GatewayError as exc:
            result.problems.append(f"{exc}; the agent stays paused")
            return result
        store.release_escalations(spec.agent_id, "released by `finops unfreeze`")
        result.steps.append("escalation pause released")
        return result
    if keys is not None and spec.keys.manage:
        try:
            result.steps.append(await keys.release_quarantine(spec))
        except Exception as exc:
            result.problems.append(f"delivering a fresh key failed: {exc}")
            return result
    try:
        await client.set_frozen(spec.agent_id, False)
        result.steps.append("wallet unfrozen")
        await _restore_caps(client, store, spec, rate, result)
    except GatewayError as exc:
        result.problems.append(f"{exc}; the agent stays held")
        return result
    # Escalations first: a crash between the two leaves the hold, which keeps caps at 0.
    if store.release_escalations(spec.agent_id, "released by `finops unfreeze`"):
        result.steps.append("escalation ladder's pause/freeze released")
    store.clear_hold(spec.agent_id)
    result.steps.append("operator hold lifted")
    return result


async def _restore_caps(
    client: GatewayClient, store: StateStore, spec: AgentSpec, rate: Decimal, result: HoldResult
) -> None:
    daily, monthly = to_credits(spec.daily_cap, rate), to_credits(spec.monthly_cap, rate)
    threshold = desired_alert_threshold(spec)
    await client.set_budget(spec.agent_id, daily_cap=daily, monthly_cap=monthly, alert_threshold=threshold)
    store.record_budget_write(spec.agent_id, BudgetWrite(daily, monthly, threshold))
    result.steps.append(f"caps restored from the manifest: daily {daily}, monthly {monthly} credits")
