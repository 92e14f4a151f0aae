"""Pure renderers: ``Plan`` / ``ApplyResult`` → str. No I/O, no network, no key material
(plans carry fingerprints and idempotency keys only, never API keys).

The text and markdown views escape control characters and bidi overrides in every string
they show (``policies.display.escape_controls``): names, reasons, URLs and gateway error
text are data, never terminal commands. JSON is escaped by ``json.dumps``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, TypeVar

from controller.reconcile.apply import ApplyResult
from policies.display import escape_controls
from policies.money import format_money
from policies.plan_types import Change, ChangeKind, FundingWindow, Plan, plan_to_dict

T = TypeVar("T")


def escaped(value: T) -> T:
    """A copy of a plan, result or any value built of dataclasses, tuples, lists, mappings
    and strings, with every string passed through :func:`escape_controls` (enums kept)."""
    return _escaped(value)  # type: ignore[no-any-return]


def _escaped(value: Any) -> Any:
    if isinstance(value, Enum):
        return value
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, tuple):
        return tuple(_escaped(v) for v in value)
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, Mapping):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _escaped(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


Style = Callable[..., str]


def _plain(text: str, **_: object) -> str:
    return text


_SYMBOL = {
    ChangeKind.REGISTER: "+",
    ChangeKind.TOP_UP: "~",
    ChangeKind.SET_BUDGET: "~",
    ChangeKind.CREATE_WEBHOOK: "+",
    ChangeKind.DELETE_WEBHOOK: "-",
}
_COLOUR = {
    ChangeKind.REGISTER: "green",
    ChangeKind.TOP_UP: "yellow",
    ChangeKind.SET_BUDGET: "yellow",
    ChangeKind.CREATE_WEBHOOK: "green",
    ChangeKind.DELETE_WEBHOOK: "red",
}
_LABEL = {
    ChangeKind.REGISTER: "register",
    ChangeKind.TOP_UP: "top up",
    ChangeKind.SET_BUDGET: "budget",
    ChangeKind.CREATE_WEBHOOK: "webhook",
    ChangeKind.DELETE_WEBHOOK: "webhook",
}


def _diff_text(change: Change) -> str:
    return "; ".join(f"{d.field}: {d.before if d.before is not None else '(none)'} → {d.after}" for d in change.diff)


def summary_line(plan: Plan) -> str:
    s = plan.summary()
    if plan.empty and plan.deferred:
        return f"No changes now: {len(plan.deferred)} funding step(s) deferred by the funding limits (see above)."
    if plan.empty:
        return "No changes. The gateway matches the manifests."
    return (
        f"Plan: {s['changes']} change(s) for {s['agents_changed']} agent(s): {s['register']} to register, "
        f"{s['top_up']} top-up(s) totalling {s['top_up_credits']} credits, {s['set_budget']} budget update(s), "
        f"{s['create_webhook']} webhook(s) to create, {s['delete_webhook']} to delete."
    )


def _held_lines(plan: Plan) -> list[str]:
    return [
        f"{h.agent_id}: held by finops since {h.since} ({h.reason}); no funding until its caps are in place"
        if h.auto
        else f"{h.agent_id}: held since {h.since} ({h.reason}); caps kept at 0, no funding, until `finops unfreeze`"
        for h in plan.held
    ]


def _blocked_lines(plan: Plan) -> list[str]:
    return [
        f"{b.agent_id}: {b.kind.value} withheld: an earlier attempt (sent {b.sent_at}) has an unknown outcome "
        f"and may still land; resolved from the gateway by the next apply, concluded not landed only after "
        f"{b.settles_at}"
        for b in plan.blocked
    ]


def funding_line(w: FundingWindow) -> str:
    """``used / limit, left`` of a fleet's rolling 24 h funding limit, currency and credits."""
    c = w.currency
    return (
        f"funding in the last 24 h: {format_money(w.in_currency(w.used))} used + "
        f"{format_money(w.in_currency(w.planned))} planned of {format_money(w.in_currency(w.limit))} {c}; "
        f"{format_money(w.in_currency(w.left))} {c} left "
        f"({format_money(w.used)} + {format_money(w.planned)} of {format_money(w.limit)} credits)"
    )


def _outflow_lines(plan: Plan) -> list[str]:
    return [
        f"{f.agent_id}: UNEXPLAINED OUTFLOW {format_money(f.unexplained)} credits in 24 h "
        f"(withdrawals, payments: not metered spend){'' if f.complete else ' (at least; ledger read in part)'}; "
        + (
            f"refunding stopped at maxUnexplainedPerDay {format_money(f.limit)} credits"
            if f.refunding_stopped
            else f"refunded up to maxUnexplainedPerDay {format_money(f.limit)} credits"
        )
        for f in plan.outflow
    ]


def exposure_lines(plan: Plan) -> list[str]:
    """What the plan authorizes, per fleet, against what a person last approved."""
    review = plan.exposure
    if review is None:
        return []
    base = "nothing approved yet" if review.bootstrap else "the last approved revision"
    changed = review.lines()
    if not changed:
        return [f"Exposure: unchanged from {base}."]
    out = [f"Exposure (spending authority vs {base}):"] + [f"  {line}" for line in changed]
    if review.requires_approval:
        out.append("  ABOVE the unattended bound (spec.approval.maxUnattendedIncrease): needs `finops approve`:")
        out += [f"    {e}" for e in review.excesses]
    else:
        out.append("  within the unattended bound")
    return out


def _unverified_lines(plan: Plan) -> list[str]:
    return [
        f"{u.agent_id}: {u.field} = {u.desired} (the gateway cannot report it and this state has no record of "
        "writing it; written with the agent's next budget change)"
        for u in plan.unverified
    ]


def render_text(plan: Plan, style: Style = _plain) -> str:
    plan = escaped(plan)
    lines: list[str] = []
    for f in plan.fleets:
        lines.append(
            style(f"Fleet {f.name}", bold=True)
            + f": {f.agents} agent(s), amounts in {f.currency}; gateway rate 1 {f.currency} = "
            f"{f.rate_to_credits} CREDITS"
        )
        lines += [f"  {funding_line(window)}" for window in plan.funding if window.fleet == f.name]
    exposure = exposure_lines(plan)
    if exposure:
        needs = plan.exposure is not None and plan.exposure.requires_approval
        lines.append(style(exposure[0], bold=True, fg="red" if needs else None))
        lines += exposure[1:]
    lines.append("")
    for c in plan.changes:
        head = style(f"{_SYMBOL[c.kind]} {_LABEL[c.kind]:<8}", fg=_COLOUR[c.kind])
        lines.append(f"{head} {c.agent_id:<16} {_diff_text(c)}")
        lines.append(f"{'':11}{'':16} {style(c.reason, dim=True)}")
    if plan.changes:
        lines.append("")
    for e in plan.errors:
        lines.append(style(f"! error    {e}", fg="red"))
    for v in plan.violations:
        lines.append(style(f"! refused  {v}", fg="red", bold=True))
    for o in _outflow_lines(plan):
        lines.append(style(f"! outflow  {o}", fg="red"))
    for d in plan.deferred:
        lines.append(style(f"! deferred {d.agent_id}: {d.message}", fg="yellow"))
    for w in plan.warnings:
        lines.append(style(f"! warning  {w}", fg="yellow"))
    if plan.rebalanced:
        lines.append(style("Rebalanced daily caps (today's adjustment on top of git's baseline):", bold=True))
        lines += [f"  {r}" for r in plan.rebalanced]
    for h in _held_lines(plan):
        lines.append(style(f"# HELD     {h}", fg="magenta", bold=True))
    for b in _blocked_lines(plan):
        lines.append(style(f"# BLOCKED  {b}", fg="magenta"))
    for u in _unverified_lines(plan):
        lines.append(style(f"? unverified {u}", dim=True))
    for hook in plan.unmanaged_webhooks:
        lines.append(f"Unmanaged webhook on the admin key (left alone): {hook}")
    if plan.unmanaged_agents:
        lines.append(
            "Unmanaged agents on the gateway (in no manifest; never touched): " + ", ".join(plan.unmanaged_agents)
        )
    lines.append(style(summary_line(plan), bold=True))
    return "\n".join(lines)


def render_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=False)


def render_markdown(plan: Plan) -> str:
    """For a PR comment: a summary line, then a table of changes."""
    plan = escaped(plan)
    lines = ["### finops plan", ""]
    for f in plan.fleets:
        lines.append(f"- **{f.name}**: {f.agents} agents, {f.currency} (1 {f.currency} = {f.rate_to_credits} credits)")
        lines += [f"  - {funding_line(w)}" for w in plan.funding if w.fleet == f.name]
    exposure = exposure_lines(plan)
    if exposure:
        lines += ["", f"**{exposure[0]}**", ""] + [f"- {line.strip()}" for line in exposure[1:]]
    lines += ["", f"**{summary_line(plan)}**", ""]
    if plan.changes:
        lines += ["| | agent | change | before → after | why |", "|---|---|---|---|---|"]
        for c in plan.changes:
            diff = "<br>".join(f"`{d.field}`: {d.before if d.before is not None else '—'} → {d.after}" for d in c.diff)
            row = (_cell(c.agent_id), _cell(diff), _cell(c.reason))
            lines.append(f"| {_SYMBOL[c.kind]} | `{row[0]}` | {_LABEL[c.kind]} | {row[1]} | {row[2]} |")
        lines.append("")
    for title, items in (
        ("Errors", plan.errors),
        ("Refused by guardrails", [str(v) for v in plan.violations]),
        ("Unexplained outflow (flagged)", _outflow_lines(plan)),
        (
            "Deferred funding (planned again once the window has room)",
            [f"`{d.agent_id}`: {d.message}" for d in plan.deferred],
        ),
        ("Rebalanced daily caps (today's adjustment on top of git's baseline)", list(plan.rebalanced)),
        ("Held (emergency stop)", _held_lines(plan)),
        ("Withheld until an unknown outcome is resolved", _blocked_lines(plan)),
        ("Warnings", plan.warnings),
        ("Unverified (the gateway cannot report them; not changes)", _unverified_lines(plan)),
        ("Unmanaged webhooks (left alone)", list(plan.unmanaged_webhooks)),
        ("Unmanaged agents (left alone)", [f"`{a}`" for a in plan.unmanaged_agents]),
    ):
        if items:
            lines += [f"**{title}**", ""] + [f"- {i}" for i in items] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    """A markdown table cell: a ``|`` in a value must not open a new column."""
    return text.replace("|", "\\|")


RENDERERS: dict[str, Callable[[Plan], str]] = {
    "text": render_text,
    "json": render_json,
    "markdown": render_markdown,
}


def render_apply_text(result: ApplyResult, style: Style = _plain) -> str:
    result = escaped(result)
    lines: list[str] = []
    for note in result.recovered:
        lines.append(style(f"recovered: {note}", fg="cyan"))
    for a in sorted(result.agents, key=lambda r: r.agent_id):
        mark = style("ok  ", fg="green") if a.ok else style("FAIL", fg="red", bold=True)
        for step in a.applied:
            lines.append(f"{mark} {a.agent_id:<16} {step}")
        for step in a.skipped:
            lines.append(f"{'-':<4} {a.agent_id:<16} {step}")
        if a.error:
            lines.append(f"{mark} {a.agent_id:<16} {a.error}")
    failed = result.failed()
    verdict = (
        f"Apply complete: {len(result.agents)} agent(s) changed, {result.writes} write call(s)."
        if not failed
        else f"Apply finished with failures: {len(failed)} of {len(result.agents)} agent(s) failed "
        f"({', '.join(a.agent_id for a in failed)}); the others were applied. {result.writes} write call(s)."
    )
    lines.append(style(verdict, bold=True, fg=None if not failed else "red"))
    return "\n".join(lines)
