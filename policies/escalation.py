"""The escalation ladder: what finops *does* when an alert threshold is crossed.

A manifest may attach an action to a threshold (``alerts.escalation``): ``pause`` (lower the
window's cap to what was already spent in it, so the gateway answers 402 to the next paid
call) or ``freeze`` (the emergency stop of ``finops freeze``). Each is released ``auto``
(pause only: when utilization of the *declared* cap falls below the threshold's re-arm level
as the rolling window decays) or ``manual`` (``finops unfreeze``).

This module decides, as pure functions of (alert events, rules, open escalations, budget
readings, clock):

- **start**: one escalation per ``budget.threshold`` event whose (window, threshold) has a
  rule. It is keyed by the alert's id, which is unique per crossing (episode), so an action
  is decided at most once per crossing, in the same state transaction as the alert slot.
  When one check starts a freeze, the agent's pauses decided in that check are recorded as
  ``superseded`` (never executed): the freeze is the stronger stop.
- **release**: an open auto-release pause whose window's utilization against the declared
  cap is below ``rearm_below(threshold)``.
- **caps**: the caps the gateway must hold for a paused agent: the declared caps, with each
  paused window lowered to min(pause cap, spend, declared cap). The pause cap only ever
  goes down (the *ratchet*): as old spend ages out of the rolling window, a cap equal to the
  spend at pause time would let the agent spend again, so it follows the spend down. It is
  never ``None`` (the gateway's "no cap"): at worst 0.00, which the gateway enforces (a call
  is refused when spend + price > cap).

Statuses: ``pending`` (decided; caps not yet known to be written) → ``active`` (executed) →
``releasing`` (release decided; declared caps not yet known to be restored) → ``released``.
A crash between any two is resumed by the next check, which converges the caps again: a cap
write is idempotent, a freeze follows ``controller.reconcile.holds`` (hold recorded first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal

from policies.alerts import DAILY, MONTHLY, WINDOWS, AlertEvent, rearm_below, recovery_id, utilization
from policies.money import CENT
from policies.spec import (
    ALERT_EVENT_THRESHOLD,
    ESCALATE_FREEZE,
    ESCALATE_PAUSE,
    RELEASE_AUTO,
    EscalationRule,
)

PENDING = "pending"
ACTIVE = "active"
RELEASING = "releasing"
RELEASED = "released"
SUPERSEDED = "superseded"
OPEN = (PENDING, ACTIVE)
"""The escalation is in force: the planner keeps the pause, the runner converges to it."""
UNFINISHED = (PENDING, ACTIVE, RELEASING)
"""The runner still has work to do (execute, ratchet or restore)."""

ACTION_RELEASE = "release"
"""The ``action`` of the ``budget.recovered`` alert whose re-arming released a pause."""

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class Escalation:
    """One action decided for one crossing. ``alert_id`` is the crossing's
    ``budget.threshold`` alert id (the episode), which makes it unique per crossing.
    ``cap`` (pause only) is the cap finops holds the window at, in credits."""

    alert_id: str
    agent_id: str
    window: str
    threshold: int
    action: str
    release: str
    status: str
    reason: str
    decided_at: float
    cap: Decimal | None = None
    executed_at: float | None = None
    released_at: float | None = None
    detail: str = ""

    @property
    def is_pause(self) -> bool:
        return self.action == ESCALATE_PAUSE

    @property
    def open(self) -> bool:
        return self.status in OPEN

    def release_hint(self, margin: Decimal | None = None) -> str:
        """How this escalation ends, for ``plan`` and ``status``."""
        if self.action == ESCALATE_PAUSE and self.release == RELEASE_AUTO:
            below = rearm_below(self.threshold) if margin is None else rearm_below(self.threshold, margin)
            return f"released automatically below {_pct(below)} % of the declared {self.window} cap"
        return f"release with `finops unfreeze {self.agent_id}`"


def _pct(value: Decimal) -> str:
    return format(value.normalize(), "f")


def reason_for(threshold: int, window: str) -> str:
    """The hold reason recorded and shown everywhere: ``auto: 90 % of daily cap``."""
    return f"auto: {threshold} % of {window} cap"


@dataclass(frozen=True)
class Caps:
    """Daily and monthly caps in credits (``None``: no cap)."""

    daily: Decimal | None
    monthly: Decimal | None

    def window(self, name: str) -> Decimal | None:
        return self.daily if name == DAILY else self.monthly

    def with_window(self, name: str, value: Decimal | None) -> Caps:
        return replace(self, daily=value) if name == DAILY else replace(self, monthly=value)


@dataclass(frozen=True)
class Spend:
    daily: Decimal
    monthly: Decimal

    def window(self, name: str) -> Decimal:
        return self.daily if name == DAILY else self.monthly


@dataclass(frozen=True)
class LadderDecision:
    """``started``: new rows (``pending``, or ``superseded`` when a freeze of the same check
    outranks them); ``releasing``: open rows whose release was decided; ``actions``: alert id
    → the action its payload carries."""

    started: tuple[Escalation, ...] = ()
    releasing: tuple[Escalation, ...] = ()
    actions: Mapping[str, str] = field(default_factory=dict)


def rule_for(rules: Iterable[EscalationRule], window: str, threshold: int) -> EscalationRule | None:
    for rule in rules:
        if rule.window == window and rule.threshold == threshold:
            return rule
    return None


def decide(
    events: Sequence[AlertEvent],
    rules: Mapping[str, Sequence[EscalationRule]],
    existing: Sequence[Escalation],
    spend: Mapping[str, Spend],
    declared: Mapping[str, Caps],
    *,
    now: float,
    margin: Decimal | None = None,
) -> LadderDecision:
    """Start and release decisions for one check (module doc).

    ``events`` come from ``policies.alerts.evaluate`` on readings whose caps are the declared
    ones for escalated agents; ``rules`` are the agents' ladders; ``existing`` every
    escalation row finops has (open or not: an alert id already present is never started
    again); ``spend`` and ``declared`` are per agent read in this check (an agent absent
    there is not released: its budget could not be read, or it is held).
    """
    known = {e.alert_id for e in existing}
    frozen = {e.agent_id for e in existing if e.action == ESCALATE_FREEZE and e.status in OPEN}
    candidates: dict[str, list[tuple[AlertEvent, EscalationRule]]] = {}
    actions: dict[str, str] = {}
    for event in events:
        if event.type != ALERT_EVENT_THRESHOLD or event.id in known:
            continue
        rule = rule_for(rules.get(event.agent_id, ()), event.window, event.threshold)
        if rule is None:
            continue
        candidates.setdefault(event.agent_id, []).append((event, rule))
        actions[event.id] = rule.action
    started: list[Escalation] = []
    for agent_id, found in candidates.items():
        freezes = [c for c in found if c[1].action == ESCALATE_FREEZE]
        winner = max(freezes, key=lambda c: (c[0].threshold, c[0].window)) if freezes else None
        for event, rule in found:
            superseded = agent_id in frozen or (winner is not None and (event, rule) != winner)
            started.append(
                Escalation(
                    alert_id=event.id,
                    agent_id=agent_id,
                    window=event.window,
                    threshold=event.threshold,
                    action=rule.action,
                    release=rule.release,
                    status=SUPERSEDED if superseded else PENDING,
                    reason=reason_for(event.threshold, event.window),
                    decided_at=now,
                    cap=_initial_cap(event) if rule.action == ESCALATE_PAUSE else None,
                    detail="a freeze outranks it" if superseded else "",
                )
            )
    releasing: list[Escalation] = []
    for row in existing:
        if not should_release(row, spend.get(row.agent_id), declared.get(row.agent_id), margin=margin):
            continue
        releasing.append(replace(row, status=RELEASING, released_at=now))
        actions[recovered_id(row.alert_id)] = ACTION_RELEASE
    return LadderDecision(tuple(started), tuple(releasing), actions)


def recovered_id(alert_id: str) -> str:
    """The id of the ``budget.recovered`` alert that closes the crossing ``alert_id``."""
    return recovery_id(alert_id)


def _initial_cap(event: AlertEvent) -> Decimal:
    return floor_cents(min(event.spend, event.cap))


def floor_cents(value: Decimal) -> Decimal:
    return max(ZERO, value.quantize(CENT, rounding=ROUND_FLOOR))


def should_release(
    row: Escalation, spend: Spend | None, declared: Caps | None, *, margin: Decimal | None = None
) -> bool:
    """An open, auto-release pause whose window, read this check, is below the re-arm level
    of the declared cap. A window without a declared cap (none, or 0) is not judged."""
    if row.status not in OPEN or row.action != ESCALATE_PAUSE or row.release != RELEASE_AUTO:
        return False
    if spend is None or declared is None:
        return False
    pct = utilization(spend.window(row.window), declared.window(row.window))
    if pct is None:
        return False
    below = rearm_below(row.threshold) if margin is None else rearm_below(row.threshold, margin)
    return pct < below


def pause_cap(current: Decimal | None, spend: Decimal, declared: Decimal | None) -> Decimal:
    """The ratchet: the cap a paused window is held at, never above the previous pause cap,
    the spend (to the cent, rounded down) or the declared cap, never below 0.00."""
    candidates = [floor_cents(spend)]
    if current is not None:
        candidates.append(current)
    if declared is not None:
        candidates.append(declared)
    return max(ZERO, min(candidates))


def wanted_caps(declared: Caps, spend: Spend, pauses: Iterable[Escalation]) -> tuple[Caps, dict[str, Decimal]]:
    """What the gateway must hold: the declared caps, each window with an open pause lowered
    by the ratchet. Also returns the new pause cap per paused window (to record)."""
    caps = declared
    lowered: dict[str, Decimal] = {}
    for window in WINDOWS:
        held = [p.cap for p in pauses if p.is_pause and p.open and p.window == window]
        if not held:
            continue
        current = min((c for c in held if c is not None), default=None)
        cap = pause_cap(current, spend.window(window), declared.window(window))
        lowered[window] = cap
        caps = caps.with_window(window, cap)
    return caps, lowered


def paused_windows(pauses: Iterable[Escalation]) -> dict[str, Decimal]:
    """Per window, the cap an agent's open pauses hold it at (the lowest)."""
    out: dict[str, Decimal] = {}
    for p in pauses:
        if p.is_pause and p.open and p.cap is not None:
            out[p.window] = min(out.get(p.window, p.cap), p.cap)
    return out


__all__ = [
    "ACTIVE",
    "DAILY",
    "MONTHLY",
    "OPEN",
    "PENDING",
    "RELEASED",
    "RELEASING",
    "SUPERSEDED",
    "Caps",
    "Escalation",
    "LadderDecision",
    "Spend",
    "decide",
    "pause_cap",
    "paused_windows",
    "reason_for",
    "should_release",
    "wanted_caps",
]
