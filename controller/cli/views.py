"""Pure renderers: ``Plan`` / ``ApplyResult`` → str. No I/O, no network, no key material
(plans carry fingerprints and idempotency keys only, never API keys).

The text and markdown views escape control characters and bidi overrides in every string
they show (``policies.display.escape_controls``): names, reasons, URLs and gateway error
text are data, never terminal commands. JSON is escaped by ``json.dumps``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

from controller.reconcile.apply import ApplyResult
from policies.display import escape_controls, escape_markdown
from policies.money import format_money
from policies.plan_exposure import FleetExposureChange, signed
from policies.plan_types import Change, ChangeKind, FundingWindow, Plan, TopUpArgs, plan_to_dict
from policies.units import Units, show_change

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


def _diff_text(change: Change, units: Units | None) -> str:
    """``daily_cap: 30.00 → 35.00 USD (3000.00 → 3500.00 credits); alert_threshold: 75 % → 80 %``."""
    return "; ".join(f"{d.field}: {show_change(d.unit, d.before, d.after, units)}" for d in change.diff)


def exposure_change_lines(plan: Plan) -> list[str]:
    """What applying this plan changes in spending authority, per fleet (first in text and
    markdown): caps live → planned, money put in now, funding vs the last approved revision."""
    change = plan.exposure_change()
    lines = [change.headline()] + [f"  {line}" for line in change.lines()]
    if not change.complete:
        lines.append("  (agents that could not be observed are not counted)")
    return lines


def summary_line(plan: Plan) -> str:
    s = plan.summary()
    if plan.empty and plan.deferred:
        return f"No changes now: {len(plan.deferred)} funding step(s) deferred by the funding limits (see above)."
    if plan.empty:
        return "No changes. The gateway matches the manifests."
    return (
        f"Plan: {s['changes']} change(s) for {s['agents_changed']} agent(s): {s['register']} to register, "
        f"{s['top_up']} top-up(s) totalling {_top_up_total(plan)}, {s['set_budget']} budget update(s), "
        f"{s['create_webhook']} webhook(s) to create, {s['delete_webhook']} to delete."
    )


def _top_up_total(plan: Plan) -> str:
    """In the fleets' currency when they share one (credits alongside), else in credits."""
    total = sum((c.args.amount for c in plan.changes if isinstance(c.args, TopUpArgs)), Decimal("0.00"))
    units = {(f.currency, f.rate_to_credits) for f in plan.fleets}
    if len(units) == 1:
        [(currency, rate)] = units
        return Units(currency, rate).amount(total)
    return f"{format_money(total)} credits"


def _held_lines(plan: Plan) -> list[str]:
    return [
        f"{h.agent_id}: held by finops since {h.since} ({h.reason}); no funding until its caps are in place"
        if h.auto
        else f"{h.agent_id}: held since {h.since} ({h.reason}); caps kept at 0, no funding, until `finops unfreeze`"
        for h in plan.held
    ]


def _escalated_lines(plan: Plan) -> list[str]:
    """The escalation ladder's pauses and freezes: the reconcile pass never undoes them."""
    return [
        f"{e.agent_id}: paused since {e.since} ({e.reason}); {e.window} cap held at "
        f"{format_money(e.cap) if e.cap is not None else '?'} credits, no funding; {e.how_released}"
        if e.action == "pause"
        else f"{e.agent_id}: frozen since {e.since} ({e.reason}); {e.how_released}"
        for e in plan.escalated
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
    credits = f"({format_money(w.used)} + {format_money(w.planned)} of {format_money(w.limit)} credits)"
    return (
        f"funding in the last 24 h: {format_money(w.in_currency(w.used))} used + "
        f"{format_money(w.in_currency(w.planned))} planned of {format_money(w.in_currency(w.limit))} {c}; "
        f"{format_money(w.in_currency(w.left))} {c} left"
        + ("" if Units(c, w.rate_to_credits).is_credits else f" {credits}")
    )


def _amount(plan: Plan, fleet: str, credits: Decimal) -> str:
    units = plan.units(fleet)
    return units.amount(credits) if units is not None else f"{format_money(credits)} credits"


def _outflow_lines(plan: Plan) -> list[str]:
    return [
        f"{f.agent_id}: UNEXPLAINED OUTFLOW {_amount(plan, f.fleet, f.unexplained)} in 24 h "
        f"(withdrawals, payments: not metered spend){'' if f.complete else ' (at least; ledger read in part)'}; "
        + (
            f"refunding stopped at maxUnexplainedPerDay {_amount(plan, f.fleet, f.limit)}"
            if f.refunding_stopped
            else f"refunded up to maxUnexplainedPerDay {_amount(plan, f.fleet, f.limit)}"
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
    change = exposure_change_lines(plan)
    lines.append(style(change[0], bold=True))
    lines += change[1:]
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
        lines.append(f"{head} {c.agent_id:<16} {_diff_text(c, plan.units(c.fleet))}")
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
    for esc in _escalated_lines(plan):
        lines.append(style(f"# ESCALATED {esc}", fg="magenta", bold=True))
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


DEFAULT_MAX_CHARS = 60_000
"""GitHub refuses a comment over 65,536 characters; the default leaves room for a workflow's
own text around the plan."""
MIN_MAX_CHARS = 1_000
"""Below this a plan could not even say that it was cut."""
DEFAULT_MARKER = "finops-plan"
MARKER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
"""A marker name: it goes inside an HTML comment, so it can never hold ``-->``."""
SUMMARY_LIST_LIMIT = 20
"""Items shown per list in the summary (errors, violations, fleets not shown)."""
SUMMARY_FLEET_ROWS = 50
_FOOTER_RESERVE = 3_000
"""Characters kept free for the truncation note (its lists and artifact hint are bounded)."""
FOOTER_LIST_LIMIT = 10
_PARTIAL_MIN = 600
"""Below this many characters left, a fleet is not started: it is only named as not shown."""
ARTIFACT_HINT_MAX = 500


def marker_comment(marker: str = DEFAULT_MARKER) -> str:
    """The first line of every markdown plan: a workflow finds its sticky comment by it."""
    if not MARKER_PATTERN.fullmatch(marker):
        raise ValueError(f"marker {marker!r}: 1-64 letters, digits, '.', '_', ':' or '-'")
    return f"<!-- {marker} -->"


def _md(text: object) -> str:
    return escape_markdown(str(text))


def _html(text: object) -> str:
    """For HTML context (a ``<summary>``): markdown is not parsed there, entities are."""
    return html.escape(escape_controls(str(text)), quote=True).replace("@", "&#64;")


def _capped(items: Sequence[str], limit: int = SUMMARY_LIST_LIMIT) -> list[str]:
    shown = [f"- {i}" for i in items[:limit]]
    if len(items) > limit:
        shown.append(f"- … and {len(items) - limit} more (see the full plan)")
    return shown


def _caps_cell(change: FleetExposureChange) -> tuple[str, str]:
    u = change.units

    def cell(credits: Decimal, per: str) -> str:
        if not credits:
            return "0"
        money = signed(u.in_currency(credits))
        return f"{money} credits{per}" if u.is_credits else f"{money} {u.currency}{per}"

    return cell(change.daily_caps, "/day"), cell(change.monthly_caps, "/month")


@dataclass
class _Block:
    """One ``<details>`` section: its opening, its lines (changes count), its closing."""

    head: list[str]
    lines: list[tuple[str, bool]]
    """(line, is a change row)."""

    def full(self) -> str:
        return "\n".join([*self.head, *(line for line, _ in self.lines), "", "</details>", ""])

    @property
    def changes(self) -> int:
        return sum(1 for _, is_change in self.lines if is_change)

    def partial(self, budget: int) -> tuple[str, int]:
        """As much as fits in ``budget`` characters, with a note of what was left out."""
        out = list(self.head)
        used = sum(len(line) + 1 for line in out)
        shown = kept = 0
        for line, is_change in self.lines:
            if used + len(line) + 1 + 200 > budget:
                break
            out.append(line)
            used += len(line) + 1
            kept += 1
            shown += is_change
        left_changes = self.changes - shown
        left_lines = len(self.lines) - kept - left_changes
        out += ["", f"… {left_changes} more change(s) and {left_lines} more line(s) of this fleet not shown.", ""]
        out += ["</details>", ""]
        return "\n".join(out), shown


def _fleet_blocks(plan: Plan) -> list[tuple[str, _Block]]:
    exposure = {f.fleet: f for f in plan.exposure_change().fleets}
    names = [f.name for f in plan.fleets]
    names += sorted({c.fleet for c in plan.changes} - set(names))
    blocks = []
    for name in names:
        units = plan.units(name)
        info = next((f for f in plan.fleets if f.name == name), None)
        changes = [c for c in plan.changes if c.fleet == name]
        agents = len({c.agent_id for c in changes})
        change = exposure.get(name)
        title = f"Fleet {name}: {len(changes)} change(s) for {agents} agent(s)"
        if change is not None and (change.daily_caps or change.monthly_caps):
            daily, monthly = _caps_cell(change)
            title += f"; caps {daily}, {monthly}"
        head = [f"<details><summary>{_html(title)}</summary>", ""]
        if info is not None:
            head.append(
                f"- {info.agents} agent(s), amounts in {_md(info.currency)}; gateway rate "
                f"1 {_md(info.currency)} = {_md(info.rate_to_credits)} credits"
            )
        head += [f"- {_md(funding_line(w))}" for w in plan.funding if w.fleet == name]
        if change is not None and change.changed:
            head.append(f"- exposure: {_md(change.sentence())}")
        lines: list[tuple[str, bool]] = []
        if changes:
            head += ["", "| | agent | change | before → after | why |", "|---|---|---|---|---|"]
            for c in changes:
                diff = "<br>".join(
                    f"{_md(d.field)}: {_md(show_change(d.unit, d.before, d.after, units))}" for d in c.diff
                )
                row = f"| {_SYMBOL[c.kind]} | {_md(c.agent_id)} | {_LABEL[c.kind]} | {diff or '—'} | {_md(c.reason)} |"
                lines.append((row, True))
        for title_, items in (
            (
                "Deferred funding (planned again once the window has room)",
                [f"{d.agent_id}: {d.message}" for d in plan.deferred if d.fleet == name],
            ),
            (
                "Unexplained outflow (flagged)",
                [line for f, line in zip(plan.outflow, _outflow_lines(plan), strict=True) if f.fleet == name],
            ),
            (
                "Unverified (the gateway cannot report them; not changes)",
                [line for u, line in zip(plan.unverified, _unverified_lines(plan), strict=True) if u.fleet == name],
            ),
        ):
            if items:
                lines += [("", False), (f"**{title_}**", False), ("", False)]
                lines += [(f"- {_md(item)}", False) for item in items]
        blocks.append((name, _Block(head, lines)))
    return blocks


def _other_block(plan: Plan) -> _Block | None:
    lines: list[tuple[str, bool]] = []
    for title, items in (
        ("Warnings", list(plan.warnings)),
        ("Held (emergency stop)", _held_lines(plan)),
        ("Escalated (pause or freeze by the escalation ladder)", _escalated_lines(plan)),
        ("Withheld until an unknown outcome is resolved", _blocked_lines(plan)),
        ("Rebalanced daily caps (today's adjustment on top of git's baseline)", list(plan.rebalanced)),
        ("Unmanaged webhooks (left alone)", list(plan.unmanaged_webhooks)),
        ("Unmanaged agents (left alone)", list(plan.unmanaged_agents)),
    ):
        if items:
            lines += [("", False), (f"**{title}**", False), ("", False)]
            lines += [(f"- {_md(item)}", False) for item in items]
    if not lines:
        return None
    counts = (
        f"{len(plan.warnings)} warning(s), {len(plan.held)} held, {len(plan.blocked)} withheld, "
        f"{len(plan.unmanaged_agents)} unmanaged agent(s)"
    )
    return _Block([f"<details><summary>{_html('Other: ' + counts)}</summary>"], lines)


def _summary(plan: Plan, marker: str) -> list[str]:
    s = plan.summary()
    exposure = plan.exposure_change()
    verdict = "PLAN REFUSED" if plan.violations else "ERRORS" if plan.errors else None
    title = f"### finops plan for {_md(plan.target)}" + (f": {verdict}" if verdict else "")
    lines = [marker_comment(marker), title, "", f"**{_md(summary_line(plan))}**", ""]
    lines += [
        "| fleet | agents | changes | daily caps | monthly caps | put in now |",
        "|---|---|---|---|---|---|",
    ]
    per_fleet = {f.fleet: f for f in exposure.fleets}
    for info in plan.fleets[:SUMMARY_FLEET_ROWS]:
        change = per_fleet.get(info.name)
        daily, monthly = _caps_cell(change) if change is not None else ("0", "0")
        deposits = _md(change.units.amount(change.deposits)) if change is not None and change.deposits else "0"
        count = sum(1 for c in plan.changes if c.fleet == info.name)
        lines.append(f"| {_md(info.name)} | {info.agents} | {count} | {_md(daily)} | {_md(monthly)} | {deposits} |")
    if len(plan.fleets) > SUMMARY_FLEET_ROWS:
        lines.append(f"| … {len(plan.fleets) - SUMMARY_FLEET_ROWS} more fleet(s) | | | | | |")
    lines += ["", f"**{_md(exposure.headline())}**", ""]
    lines += _capped([_md(line) for line in exposure.lines()])
    if not exposure.complete:
        lines.append("- agents that could not be observed are not counted")
    review = exposure_lines(plan)
    if review:
        lines += ["", f"**{_md(review[0])}**", "", *_capped([_md(line.strip()) for line in review[1:]])]
    lines += [
        "",
        f"Counts: {s['register']} to register, {s['set_budget']} budget update(s), {s['top_up']} top-up(s), "
        f"{s['create_webhook']} webhook(s) to create, {s['delete_webhook']} to delete; "
        f"{s['violations']} violation(s), {s['errors']} error(s), {s['deferred']} deferred, "
        f"{s['blocked']} withheld, {s['held']} held.",
        "",
    ]
    if plan.violations:
        lines += ["**Refused by guardrails (nothing is applied)**", ""]
        lines += [*_capped([_md(v) for v in plan.violations]), ""]
    if plan.errors:
        lines += ["**Errors**", "", *_capped([_md(e) for e in plan.errors]), ""]
    return lines


def render_markdown(
    plan: Plan,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    artifact_hint: str | None = None,
    marker: str = DEFAULT_MARKER,
) -> str:
    """For a PR comment or a job summary: the marker comment, a summary (fleets, exposure
    change, counts, violations, errors), then one ``<details>`` per fleet with its changes.

    At most ``max_chars`` characters (``0``: no limit): fleets that do not fit are summarised
    in one line each, and a note points to the full plan (``artifact_hint``: where a workflow
    keeps it, e.g. an artifact URL). Everything from manifests or the gateway is escaped
    (``policies.display.escape_markdown``): it can open no HTML, link, mention or column."""
    if 0 < max_chars < MIN_MAX_CHARS:
        raise ValueError(f"max_chars must be 0 (no limit) or at least {MIN_MAX_CHARS}, not {max_chars}")
    head = "\n".join(_summary(plan, marker)) + "\n"
    named = _fleet_blocks(plan)
    other = _other_block(plan)
    if other is not None:
        named.append(("other details", other))
    if max_chars <= 0:
        return head + "\n".join(b.full() for _, b in named)
    budget = max_chars - len(head) - _FOOTER_RESERVE
    out: list[str] = []
    shown = 0
    left_out: list[str] = []
    for name, block in named:
        if left_out:
            left_out.append(f"{name}: {block.changes} change(s) not shown" if block.changes else f"{name} not shown")
            continue
        text = block.full()
        if len(text) + 1 <= budget:
            out.append(text)
            budget -= len(text) + 1
            shown += block.changes
            continue
        if budget > _PARTIAL_MIN:
            part, count = block.partial(budget)
            out.append(part)
            shown += count
            left_out.append(f"{name}: {block.changes - count} of its {block.changes} change(s) not shown")
        else:
            left_out.append(f"{name}: {block.changes} change(s) not shown" if block.changes else f"{name} not shown")
    if not left_out:
        return head + "\n".join(out)
    note = [
        "",
        f"**Truncated to stay under {max_chars} characters: {shown} of {len(plan.changes)} change(s) shown.**",
        "",
        "Not shown:",
        "",
        *_capped([_md(x) for x in left_out], FOOTER_LIST_LIMIT),
        "",
        f"The full plan: {_md(artifact_hint[:ARTIFACT_HINT_MAX])}"
        if artifact_hint
        else "The full plan: `finops plan --format markdown --max-chars 0` (or `--format json`).",
        "",
    ]
    text = head + "\n".join(out) + "\n".join(note)
    if len(text) > max_chars:  # the summary alone is over a tiny --max-chars
        text = head + "\n".join(note)
    if len(text) > max_chars:
        cut = "\n… (truncated)\n"
        text = text[: max_chars - len(cut)].rsplit("\n", 1)[0] + cut
    return text


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
