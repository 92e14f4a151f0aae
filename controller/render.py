"""Pure renderers: ``Plan`` / ``ApplyResult`` → str. No I/O, no network, no key material
(plans carry fingerprints and idempotency keys only, never API keys)."""

from __future__ import annotations

import json
from collections.abc import Callable

from controller.apply import ApplyResult
from controller.plan import Change, ChangeKind, Plan, plan_to_dict

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
    if plan.empty:
        return "No changes. The gateway matches the manifests."
    return (
        f"Plan: {s['changes']} change(s) for {s['agents_changed']} agent(s): {s['register']} to register, "
        f"{s['top_up']} top-up(s) totalling {s['top_up_credits']} credits, {s['set_budget']} budget update(s), "
        f"{s['create_webhook']} webhook(s) to create, {s['delete_webhook']} to delete."
    )


def _held_lines(plan: Plan) -> list[str]:
    return [
        f"{h.agent_id}: held since {h.since} ({h.reason}); caps kept at 0, no funding, until `finops unfreeze`"
        for h in plan.held
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


def render_text(plan: Plan, style: Style = _plain) -> str:
    lines: list[str] = []
    for f in plan.fleets:
        lines.append(
            style(f"Fleet {f.name}", bold=True)
            + f": {f.agents} agent(s), amounts in {f.currency}; gateway rate 1 {f.currency} = "
            f"{f.rate_to_credits} CREDITS"
        )
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
    for w in plan.warnings:
        lines.append(style(f"! warning  {w}", fg="yellow"))
    if plan.rebalanced:
        lines.append(style("Rebalanced daily caps (today's adjustment on top of git's baseline):", bold=True))
        lines += [f"  {r}" for r in plan.rebalanced]
    for h in _held_lines(plan):
        lines.append(style(f"# HELD     {h}", fg="magenta", bold=True))
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
    lines = ["### finops plan", ""]
    for f in plan.fleets:
        lines.append(f"- **{f.name}**: {f.agents} agents, {f.currency} (1 {f.currency} = {f.rate_to_credits} credits)")
    exposure = exposure_lines(plan)
    if exposure:
        lines += ["", f"**{exposure[0]}**", ""] + [f"- {line.strip()}" for line in exposure[1:]]
    lines += ["", f"**{summary_line(plan)}**", ""]
    if plan.changes:
        lines += ["| | agent | change | before → after | why |", "|---|---|---|---|---|"]
        for c in plan.changes:
            diff = "<br>".join(f"`{d.field}`: {d.before if d.before is not None else '—'} → {d.after}" for d in c.diff)
            lines.append(f"| {_SYMBOL[c.kind]} | `{c.agent_id}` | {_LABEL[c.kind]} | {diff} | {c.reason} |")
        lines.append("")
    for title, items in (
        ("Errors", plan.errors),
        ("Refused by guardrails", [str(v) for v in plan.violations]),
        ("Rebalanced daily caps (today's adjustment on top of git's baseline)", list(plan.rebalanced)),
        ("Held by an operator (emergency stop)", _held_lines(plan)),
        ("Warnings", plan.warnings),
        ("Unmanaged webhooks (left alone)", list(plan.unmanaged_webhooks)),
        ("Unmanaged agents (left alone)", [f"`{a}`" for a in plan.unmanaged_agents]),
    ):
        if items:
            lines += [f"**{title}**", ""] + [f"- {i}" for i in items] + [""]
    return "\n".join(lines).rstrip() + "\n"


RENDERERS: dict[str, Callable[[Plan], str]] = {
    "text": render_text,
    "json": render_json,
    "markdown": render_markdown,
}


def render_apply_text(result: ApplyResult, style: Style = _plain) -> str:
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
