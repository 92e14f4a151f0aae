"""``finops status``: one screen that says whether the circuit breakers are in place.

Per agent: balance, spend in the rolling 24 h, the live daily cap and % used, thresholds and
which have fired, every alert endpoint's last delivery (finops' own log; the gateway's log
for opted-in gateway webhooks), the key's fingerprint and rotation, and flags for what needs
a human: cap drift (an agent can raise its own cap), failing alert endpoints (a receiver
that is down is a silent budget breach), holds, orphaned or due keys, and what finops cannot
prevent but must show (``controller.reconcile.detect``, typed ``findings``): a balance above
its target that finops' deposits do not explain, ledger deposits finops did not make, more
than one finops-marked webhook for an agent, and intents left unresolved. Reads only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from controller.alerting.engine import alert_state, delivery_status
from controller.alerting.signals import read_forecasts
from controller.gateway.client import GatewayClient
from controller.gateway.errors import GatewayError
from controller.keys.rotate import KeyManager
from controller.reconcile.apply import configured_settle_seconds
from controller.reconcile.decide import build_memory
from controller.reconcile.detect import Finding, detect
from controller.reconcile.observe import LiveFleet, observe
from controller.state import FAILED, StateStore
from policies.alerts import WindowReading, redact_url
from policies.currency import CREDITS, from_credits
from policies.detect import UnresolvedIntent
from policies.display import escape_controls
from policies.forecast import Exhaustion, InsufficientData, WindowForecast
from policies.money import format_money
from policies.plan_types import ChangeKind, Plan, funding_window_to_dict
from policies.planner import make_plan
from policies.spec import DesiredState
from policies.units import show_change

STATUS_FORMAT_VERSION = 1
"""``status --format json``'s schema version."""

SUMMARY_LINES = 36
"""``status`` without ``--all``: at most this many lines of agents (flagged first), on top
of the counts, funding, findings and verdict (a few lines each, also bounded)."""
SUMMARY_FLAGS = 3
"""Flags shown per agent in the summary (the rest are counted)."""
SUMMARY_WIDTH = 120
"""The terminal width the summary's row budget assumes."""
SUMMARY_ROWS_PER_LINE = 3
"""A summary line longer than this many terminal rows is cut (``--all`` shows it whole)."""


@dataclass
class AgentStatus:
    agent_id: str
    fleet: str
    currency: str
    exists: bool
    balance: str | None = None
    spent_today: str | None = None
    daily_cap: str | None = None
    percent_used: str | None = None
    thresholds: tuple[int, ...] = ()
    fired: list[str] = field(default_factory=list)
    alert_endpoints: list[dict[str, Any]] = field(default_factory=list)
    gateway_webhooks: list[dict[str, Any]] = field(default_factory=list)
    key: dict[str, Any] = field(default_factory=dict)
    held: str | None = None
    escalations: list[dict[str, Any]] = field(default_factory=list)
    """The escalation ladder's pauses and freezes in force, and how each is released."""
    flags: list[str] = field(default_factory=list)
    """For people: one line per thing that needs a human (findings' messages included)."""
    error: str | None = None
    credits: dict[str, str] = field(default_factory=dict)
    """``balance``, ``spent_today``, ``daily_cap`` in gateway credits (the fields above are
    in ``currency``)."""
    findings: list[Finding] = field(default_factory=list)
    """For code: what detection found (``policies.detect``), typed."""
    rate: Decimal = Decimal(1)
    """Credits per unit of the fleet's currency (findings show money in both)."""
    ledger_complete: bool | None = None
    """Whether detection read the whole lookback of the ledger (``None``: not read)."""
    forecast: dict[str, Any] = field(default_factory=dict)
    """Per window (``daily``, ``monthly``), for an agent with ``alerts.forecastHorizon``:
    ``eta_seconds`` (``null``: never at this rate; 0: at the cap), ``exhausts_at``,
    ``rate_per_hour`` (credits), ``basis``, ``within_horizon``; or ``no_cap`` /
    ``insufficient_data`` (the reason); or ``error`` when the history could not be read."""

    def add_finding(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.flags.append(finding.message(self.rate, self.currency))

    @property
    def at_cap(self) -> bool:
        """Spend has reached the daily cap (a cap of 0 included): the agent cannot spend now.
        Shown as such, never as "all clear"."""
        if self.daily_cap is not None and Decimal(self.daily_cap) == 0:
            return True
        return self.percent_used is not None and Decimal(self.percent_used) >= 100

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("findings", "rate")}
        out["findings"] = [f.to_dict(self.rate, self.currency) for f in self.findings]
        out["at_cap"] = self.at_cap
        return out


_ESCALATED = {"pause": "PAUSED", "freeze": "FROZEN"}


@dataclass
class FleetStatus:
    target: str
    agents: list[AgentStatus]
    unmanaged_agents: list[str]
    funding: list[dict[str, Any]] = field(default_factory=list)
    """Per fleet: the rolling 24 h funding limit, used and left (``funding_window_to_dict``)."""
    findings: list[Finding] = field(default_factory=list)
    """Findings of no declared agent (an undeclared agent's unresolved intent, a check that
    could not run)."""

    @property
    def flagged(self) -> list[AgentStatus]:
        return [a for a in self.agents if a.flags or a.error or a.findings]

    @property
    def needs_attention(self) -> bool:
        """What ``status --strict`` exits 1 on."""
        return bool(self.flagged or self.findings)

    @property
    def at_cap(self) -> list[AgentStatus]:
        return [a for a in self.agents if a.at_cap]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": STATUS_FORMAT_VERSION,
            "target": self.target,
            "agents": [a.to_dict() for a in self.agents],
            "unmanaged_agents": self.unmanaged_agents,
            "funding": self.funding,
            "findings": [f.to_dict(Decimal(1), CREDITS) for f in self.findings],
            "flagged": [a.agent_id for a in self.flagged],
            "at_cap": [a.agent_id for a in self.at_cap],
        }


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


async def _last_gateway_delivery(client: GatewayClient, hook_id: str) -> dict[str, Any]:
    try:
        rows = await client.webhook_deliveries(hook_id, limit=1)
    except GatewayError as exc:
        return {"webhook_id": hook_id, "error": str(exc)}
    if not rows:
        return {
            "webhook_id": hook_id,
            "last": None,
            "note": "no deliveries (the gateway's fan-out is not wired on 1.4.8)",
        }
    last = rows[0]
    return {
        "webhook_id": hook_id,
        "last": last.status,
        "event_type": last.event_type,
        "response_code": last.response_code,
        "attempts": last.attempts,
        "at": _iso(last.last_attempt_at),
    }


def _cap_drift(plan: Plan, agent_id: str) -> str | None:
    for change in plan.changes:
        if change.agent_id == agent_id and change.kind is ChangeKind.SET_BUDGET:
            caps = [d for d in change.diff if d.field in ("daily_cap", "monthly_cap")]
            if caps:
                units = plan.units(change.fleet)
                what = ", ".join(
                    f"{d.field} live → desired {show_change(d.unit, d.before, d.after, units)}" for d in caps
                )
                return f"CAP DRIFT: {what} (an agent can raise its own cap); the next reconcile restores it"
    return None


async def fleet_status(
    client: GatewayClient, desired: DesiredState, store: StateStore, keys: KeyManager, *, target: str
) -> FleetStatus:
    now = store.now()
    live: LiveFleet = await observe(
        client, desired, target=target, webhooks_owned=bool(store.managed_webhooks()), now=now
    )
    memory = build_memory(store, desired)
    plan = make_plan(desired, live, memory, now=datetime.fromtimestamp(now, UTC))
    detection = await detect(client, desired, store, live, now=now, settle_seconds=configured_settle_seconds())
    outflow = {f.agent_id: f for f in plan.outflow}
    deferred: dict[str, list[str]] = {}
    for d in plan.deferred:
        deferred.setdefault(d.agent_id, []).append(d.message)
    routes = delivery_status(store.location)
    fired = alert_state(store.location)
    forecasts = await read_forecasts(
        client,
        desired.agents(),
        {
            a.agent_id: (WindowReading(a.budget.daily_spend, a.budget.daily_cap),
                         WindowReading(a.budget.monthly_spend, a.budget.monthly_cap))
            for a in live.agents.values()
            if a.budget is not None and not a.error
        },
        now,
    )  # fmt: skip
    key_status = {k.agent_id: k for k in keys.key_status(desired)}
    try:
        key_health = await keys.held_key_health(desired)
        key_health_error: str | None = None
    except GatewayError as exc:
        key_health, key_health_error = {}, str(exc)
    lost_at_register = {i.agent_id: i.detail for i in store.intents(status=FAILED, kind="register")}
    hooks_by_agent: dict[str, list[str]] = {}
    live_hook_ids = {w.id for w in live.webhooks or ()}
    for hook in memory.managed_webhooks.values():
        if hook.webhook_id in live_hook_ids:
            hooks_by_agent.setdefault(hook.agent_id, []).append(hook.webhook_id)
    gateway_logs = await asyncio.gather(
        *(_last_gateway_delivery(client, h) for ids in hooks_by_agent.values() for h in ids)
    )
    logs_by_id = {entry["webhook_id"]: entry for entry in gateway_logs}

    out: list[AgentStatus] = []
    for fleet in desired.fleets:
        rate = live.rates[fleet.currency]
        for spec in fleet.agents:
            agent = live.agents.get(spec.agent_id)
            row = AgentStatus(spec.agent_id, fleet.name, fleet.currency, bool(agent and agent.exists), rate=rate)
            row.thresholds = spec.alert_thresholds
            for finding in detection.by_agent.get(spec.agent_id, ()):
                row.add_finding(finding)
            if agent is None or agent.error:
                row.error = agent.error if agent else "not observed"
                out.append(row)
                continue
            if not agent.exists:
                if not any(isinstance(f, UnresolvedIntent) and f.intent_kind == "register" for f in row.findings):
                    row.flags.append("NOT REGISTERED: run `finops apply`")
                out.append(row)
                continue
            assert agent.balance is not None and agent.budget is not None
            row.ledger_complete = detection.ledger_complete.get(spec.agent_id)
            budget = agent.budget
            row.balance = format_money(from_credits(agent.balance, rate))
            row.spent_today = format_money(from_credits(budget.daily_spend, rate))
            row.credits = {"balance": format_money(agent.balance), "spent_today": format_money(budget.daily_spend)}
            if budget.daily_cap is not None:
                row.daily_cap = format_money(from_credits(budget.daily_cap, rate))
                row.credits["daily_cap"] = format_money(budget.daily_cap)
                if budget.daily_cap > 0:
                    pct = (budget.daily_spend / budget.daily_cap * 100).quantize(Decimal("0.1"))
                    row.percent_used = str(pct)
            else:
                row.flags.append("NO DAILY CAP on the gateway: spend is unlimited")
            row.fired = [f"{f.window} {f.threshold}%" for f in fired.get(spec.agent_id, [])]
            _show_forecast(row, forecasts.get(spec.agent_id), spec.forecast_horizon, now)
            hold = memory.holds.get(spec.agent_id)
            if hold is not None:
                row.held = hold.reason
                row.flags.append(f"HELD since {_iso(hold.held_at)}: {hold.reason}")
            for esc in (e for e in plan.escalated if e.agent_id == spec.agent_id):
                cap = format_money(esc.cap) if esc.cap is not None else None
                row.escalations.append(
                    {"action": esc.action, "window": esc.window, "threshold": esc.threshold, "reason": esc.reason,
                     "since": esc.since, "release": esc.release, "how_released": esc.how_released, "cap_credits": cap}
                )  # fmt: skip
                held_at = f"; {esc.window} cap held at {cap} credits" if esc.action == "pause" else ""
                label = _ESCALATED.get(esc.action, esc.action.upper())
                row.flags.append(f"{label} since {esc.since} ({esc.reason}){held_at}: {esc.how_released}")
            drift = _cap_drift(plan, spec.agent_id)
            if drift:
                row.flags.append(drift)
            flow = outflow.get(spec.agent_id)
            if flow is not None:
                row.flags.append(
                    f"UNEXPLAINED OUTFLOW: {format_money(from_credits(flow.unexplained, rate))} {fleet.currency} left "
                    f"the wallet in 24 h other than as metered spend (withdrawals, payments)"
                    + ("" if flow.complete else ", at least (ledger read in part)")
                    + (
                        f"; refunding stopped at maxUnexplainedPerDay "
                        f"{format_money(from_credits(flow.limit, rate))} {fleet.currency}"
                        if flow.refunding_stopped
                        else ""
                    )
                )
            for message in deferred.get(spec.agent_id, []):
                row.flags.append(f"FUNDING DEFERRED: {message}")
            for route in routes.get(spec.agent_id, []):
                row.alert_endpoints.append(
                    {
                        "route": route.route,
                        "last_attempt_at": _iso(route.last_attempt_at),
                        "last_ok": route.last_ok,
                        "last_code": route.last_code,
                        "last_error": route.last_error,
                        "consecutive_failures": route.consecutive_failures,
                        "pending": route.pending,
                    }
                )
                if route.failing:
                    row.flags.append(
                        f"ALERT ENDPOINT FAILING: {route.route} ({route.consecutive_failures} failed attempt(s), "
                        f"last: {route.last_error or route.last_code}); alerts are not arriving"
                    )
            if not spec.alert_routes:
                row.flags.append("NO ALERT ROUTES: threshold crossings are evaluated but delivered nowhere")
            elif not row.alert_endpoints:
                row.alert_endpoints = [
                    {"route": redact_url(r.url), "last_attempt_at": None, "last_ok": None, "consecutive_failures": 0}
                    for r in spec.alert_routes
                ]  # declared, nothing sent yet: shown so a missing receiver is not invisible
            row.gateway_webhooks = [logs_by_id[h] for h in hooks_by_agent.get(spec.agent_id, [])]
            key = key_status.get(spec.agent_id)
            if key is not None:
                row.key = key.to_dict()
                if key.orphans:
                    row.flags.append(f"ORPHANED KEY(S) {', '.join(key.orphans)}: live keys finops does not hold")
                if key.managed and key.fingerprint is None:
                    lost = lost_at_register.get(spec.agent_id)
                    why = f" (LOST KEY: {lost}; the gateway showed it once)" if lost else ""
                    row.flags.append(f"NO KEY HELD{why}: run `finops keys import {spec.agent_id}`")
                if key.due:
                    row.flags.append("KEY ROTATION DUE")
                health = key_health.get(spec.agent_id)
                if health is not None:
                    row.key["gateway"] = health.to_dict()
                    if health.flag:
                        row.flags.append(health.flag)
                elif key.managed and key.fingerprint is not None and key_health_error:
                    row.flags.append(f"HELD KEY NOT CHECKED: cannot list keys on the gateway ({key_health_error})")
                # An interrupted rotation (``key.pending_rotation``) is its unresolved intent's finding.
            out.append(row)
    return FleetStatus(
        live.target,
        out,
        list(plan.unmanaged_agents),
        [funding_window_to_dict(w) for w in plan.funding],
        detection.other,
    )


def _forecast_dict(forecast: WindowForecast, horizon: int, now: float) -> dict[str, Any]:
    if isinstance(forecast, InsufficientData):
        return {"insufficient_data": forecast.reason}
    if not isinstance(forecast, Exhaustion):
        return {"no_cap": True}
    eta = forecast.eta_seconds
    return {
        "eta_seconds": eta,
        "exhausts_at": None if eta is None else _iso(now + eta),
        "rate_per_hour": format_money(forecast.rate_per_hour),
        "basis": str(forecast.basis),
        "within_horizon": forecast.within(horizon),
    }


def show_duration(seconds: int) -> str:
    """``5400`` → ``1h30m``: an ETA for people."""
    if seconds < 60:
        return f"{seconds}s"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    return "".join(f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (rest // 60, "m")) if n)


def _show_forecast(
    row: AgentStatus, forecasts: dict[str, WindowForecast] | str | None, horizon: int | None, now: float
) -> None:
    """``row.forecast`` and, when a cap is projected within the horizon, a flag."""
    if forecasts is None or horizon is None:
        return
    if isinstance(forecasts, str):
        row.forecast = {"error": forecasts}
        row.flags.append(f"NO FORECAST: {forecasts}")
        return
    row.forecast = {window: _forecast_dict(f, horizon, now) for window, f in forecasts.items()}
    for window, f in forecasts.items():
        if isinstance(f, Exhaustion) and f.within(horizon) and f.eta_seconds:
            row.flags.append(
                f"FORECAST: {window} cap reached in about {show_duration(f.eta_seconds)} at "
                f"{format_money(f.rate_per_hour)} credits/h (horizon {show_duration(horizon)})"
            )


def _forecast_line(a: AgentStatus) -> str | None:
    parts = []
    for window, f in a.forecast.items():
        if not isinstance(f, dict):
            continue
        if "eta_seconds" in f:
            eta = f["eta_seconds"]
            when = "never at this rate" if eta is None else "at the cap" if eta == 0 else f"in {show_duration(eta)}"
            parts.append(f"{window} cap {when} ({f['rate_per_hour']} credits/h)")
        elif "insufficient_data" in f:
            parts.append(f"{window}: not enough data")
    return "forecast: " + "; ".join(parts) if parts else None


def _currencies(status: FleetStatus) -> str:
    return "; ".join(
        f"{w['fleet']}: {w['currency']}"
        + ("" if w["currency"] == CREDITS else f", 1 {w['currency']} = {w['rate_to_credits']} credits")
        for w in status.funding
    )


def render_status(status: FleetStatus) -> str:
    lines = [f"{'agent':<12} {'balance':>10} {'24h spend':>10} {'daily cap':>10} {'used':>7}  thresholds  fired"]
    for a in status.agents:
        if a.error:
            lines.append(f"{a.agent_id:<12} could not observe: {a.error}")
            continue
        used = f"{a.percent_used}%" if a.percent_used is not None else "-"
        lines.append(
            f"{a.agent_id:<12} {a.balance or '-':>10} {a.spent_today or '-':>10} {a.daily_cap or '-':>10} "
            f"{used:>7}  {','.join(map(str, a.thresholds)):<10}  {', '.join(a.fired) or '-'}"
        )
        for ep in a.alert_endpoints:
            state = "ok" if ep["last_ok"] else "FAILING" if ep["consecutive_failures"] else "never sent"
            when = f" (last {ep['last_attempt_at']})" if ep["last_attempt_at"] else ""
            lines.append(f"{'':12}   alert {ep['route']}: {state}{when}")
        for hook in a.gateway_webhooks:
            lines.append(f"{'':12}   gateway webhook {hook['webhook_id']}: {hook.get('last') or hook.get('note')}")
        forecast = _forecast_line(a)
        if forecast:
            lines.append(f"{'':12}   {forecast}")
        if a.ledger_complete is False:
            lines.append(f"{'':12}   ledger: the last 24 h did not fit in the pages read; findings are a lower bound")
        if a.key:
            due = a.key.get("next_due")
            lines.append(f"{'':12}   key {a.key.get('fingerprint') or '(none held)'}; next rotation {due or '-'}")
        for flag in a.flags:
            lines.append(f"{'':12}   ! {flag}")
    for w in status.funding:
        lines.append(
            f"Fleet {w['fleet']} funding, rolling 24 h: {w['used']} of {w['limit']} {w['currency']} used, "
            f"{w['available']} left ({w['used_credits']} of {w['limit_credits']} credits); "
            f"the next reconcile would put in {w['planned']}"
        )
    if status.unmanaged_agents:
        lines.append("Unmanaged agents on the gateway: " + ", ".join(status.unmanaged_agents))
    for finding in status.findings:
        who = f"{finding.agent_id} (not declared)" if finding.agent_id else "fleet"
        lines.append(f"! {who}: {finding.message(Decimal(1), CREDITS)}")
    flagged = status.flagged
    lines.append(
        f"{len(status.agents)} agent(s); "
        + _verdict(status, ", ".join(a.agent_id for a in flagged))
        + f". Amounts in each fleet's currency ({_currencies(status)}); thresholds and use in % of the daily cap; "
        "spend is the gateway's rolling 24 h window."
    )
    return "\n".join(escape_controls(line) for line in lines)


def _verdict(status: FleetStatus, flagged_ids: str | None = None) -> str:
    """ "all clear" only when nothing is flagged or found and no agent is at its daily cap."""
    flagged, at_cap = status.flagged, [a for a in status.at_cap if a not in status.flagged]
    parts = []
    if flagged:
        parts.append(f"{len(flagged)} need attention" + (f": {flagged_ids}" if flagged_ids else ""))
    if at_cap:
        parts.append(f"{len(at_cap)} at or over the daily cap (cannot spend until the 24 h window moves)")
    if not parts and status.findings:
        parts.append("other findings above need attention")
    return "; ".join(parts) or "all clear"


def _summary_order(a: AgentStatus) -> tuple[int, Decimal, str]:
    rank = 0 if a.error else 1 if a.flags or a.findings else 2 if a.at_cap else 3 if a.fired else 4
    used = Decimal(a.percent_used) if a.percent_used is not None else Decimal(0)
    return rank, -used, a.agent_id


def _cut(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _clip(line: str) -> str:
    """A summary line, whole up to ``SUMMARY_ROWS_PER_LINE`` terminal rows."""
    return _cut(line, SUMMARY_WIDTH * SUMMARY_ROWS_PER_LINE)


def screen_rows(line: str, width: int = SUMMARY_WIDTH) -> int:
    """Terminal rows ``line`` takes on a ``width``-column terminal."""
    return max(1, -(-len(line) // width))


def render_summary(status: FleetStatus, *, limit: int = SUMMARY_LINES) -> str:
    """``finops status`` without ``--all``: one screenful whatever the fleet's size. Counts
    first, then the agents that need a look (could not be observed, flagged, at their cap,
    alerts fired; the most used first) with up to three flags each (one each when they would
    not fit), in at most ``limit`` terminal rows, then each fleet's funding and what else was
    found (a few lines each); the rest is counted with a pointer to ``--all``. No line is
    longer than ``SUMMARY_ROWS_PER_LINE`` rows (``--all`` shows them whole)."""
    agents = status.agents
    flagged, at_cap = status.flagged, status.at_cap
    errors = [a for a in agents if a.error]
    fired = [a for a in agents if a.fired]
    fleets = sorted({a.fleet for a in agents})
    notable = sorted((a for a in agents if a.error or a.flags or a.findings or a.at_cap or a.fired), key=_summary_order)
    lines = [
        f"{len(agents)} agent(s) in {len(fleets)} fleet(s) on {status.target}:",
        f"  {len(flagged)} need attention ({len(errors)} not observed), {len(at_cap)} at or over the daily cap, "
        f"{len(fired)} with alerts fired, {len(agents) - len(notable)} fine.",
    ]
    if notable:
        lines.append(f"{'agent':<12} {'balance':>10} {'24h spend':>10} {'daily cap':>10} {'used':>7}  fired")
    shown = 0
    budget = limit
    # Few agents to show: up to three flags each; many: one each, so more agents fit.
    per_agent = SUMMARY_FLAGS if sum(1 + min(len(a.flags), SUMMARY_FLAGS) for a in notable) <= limit // 2 else 1
    for a in notable:
        if a.error:
            block = [f"{a.agent_id:<12} could not observe: {a.error}"]
        else:
            used = f"{a.percent_used}%" if a.percent_used is not None else "-"
            block = [
                f"{a.agent_id:<12} {a.balance or '-':>10} {a.spent_today or '-':>10} {a.daily_cap or '-':>10} "
                f"{used:>7}  {', '.join(a.fired) or '-'}" + ("  AT CAP" if a.at_cap else "")
            ]
            flags = a.flags[:per_agent]
            for i, flag in enumerate(flags):
                more = len(a.flags) - len(flags)
                tail = f" (+{more} more: --all)" if more and i == len(flags) - 1 else ""
                block.append(_cut(f"{'':12}   ! {escape_controls(flag)}", SUMMARY_WIDTH * 2 - len(tail)) + tail)
        block = [_clip(escape_controls(line)) for line in block]
        rows = sum(map(screen_rows, block))
        if shown and rows > budget:
            break
        budget -= rows
        shown += 1
        lines += block
    if len(notable) > shown:
        lines.append(
            f"… and {len(notable) - shown} more agent(s) flagged, at their cap or with alerts fired: "
            "`finops status --all` lists every agent"
        )
    shown_funding = status.funding[:3]
    for w in shown_funding:
        lines.append(
            f"Fleet {w['fleet']} funding, rolling 24 h: {w['used']} of {w['limit']} {w['currency']} used, "
            f"{w['available']} left ({w['used_credits']} of {w['limit_credits']} credits); "
            f"the next reconcile would put in {w['planned']}"
        )
    if len(status.funding) > len(shown_funding):
        lines.append(f"… funding of {len(status.funding) - len(shown_funding)} more fleet(s): `finops status --all`")
    if status.unmanaged_agents:
        names = ", ".join(status.unmanaged_agents[:5])
        extra = f" and {len(status.unmanaged_agents) - 5} more" if len(status.unmanaged_agents) > 5 else ""
        lines.append(f"{len(status.unmanaged_agents)} unmanaged agent(s) on the gateway: {names}{extra}")
    for finding in status.findings[:2]:
        who = f"{finding.agent_id} (not declared)" if finding.agent_id else "fleet"
        lines.append(f"! {who}: {finding.message(Decimal(1), CREDITS)}")
    if len(status.findings) > 2:
        lines.append(f"… {len(status.findings) - 2} more finding(s): `finops status --all`")
    lines.append(f"{len(agents)} agent(s); {_verdict(status)}.")
    lines.append("Amounts in each fleet's currency; spend is the gateway's rolling 24 h window.")
    return "\n".join(_clip(escape_controls(line)) for line in lines)
