"""Chargeback and showback: what each agent, fleet or team spent over a period, and the
views of it (text, markdown, JSON, FOCUS-style CSV). Pure: the CLI reads the gateway and
the state and hands in one ``AgentUsage`` per agent; the clock is passed in.

Every amount is kept in gateway credits (exact ``Decimal``) and converted to a group's
currency only when shown, with the rounding declared (``≈`` in text and markdown,
``x_BilledCostExact=false`` in CSV, ``*_exact: false`` in JSON), never silently.

Periods follow FOCUS: ``ChargePeriodStart`` inclusive, ``ChargePeriodEnd`` exclusive,
ISO 8601 UTC (``2026-11-01T00:00:00Z``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

from policies.currency import CREDITS
from policies.display import escape_controls, escape_markdown
from policies.money import CENT, ZERO
from policies.units import APPROX, Units

FORMAT_VERSION = 1
"""``report --format json``'s schema version."""

DAY_SECONDS = 86_400
MAX_PERIOD_DAYS = 400
"""The longest period (and the oldest start) a report reads: the daily timeseries read asks
for one bucket per day from the period's start to now, so this bounds every read."""

NO_LABEL = "(none)"
"""The group of agents that do not carry the ``--by label:KEY`` label."""
TOTAL = "(total)"

RATIO_PLACES = Decimal("0.0001")
"""Utilization ratios are shown to 4 decimals (half-even); they are not money."""

CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""A text cell starting with one of these is a formula to a spreadsheet (CSV injection):
text columns get a leading ``'`` (numeric columns never start with these but ``-``)."""


class PeriodError(ValueError):
    """A ``--period``/``--since`` that cannot be reported on; the message says why."""


@dataclass(frozen=True)
class Period:
    """``[start, end)`` in unix seconds; ``partial`` when ``end`` was clipped to now."""

    start: float
    end: float
    label: str
    partial: bool = False

    @property
    def days(self) -> Decimal:
        """The period's length in days (a fraction for partial days)."""
        return Decimal(str(self.end - self.start)) / DAY_SECONDS

    @property
    def start_iso(self) -> str:
        return iso_utc(self.start)

    @property
    def end_iso(self) -> str:
        return iso_utc(self.end)


def iso_utc(ts: float) -> str:
    """``2026-11-01T00:00:00Z`` (FOCUS Date/Time Format: ISO 8601, UTC, ``Z``)."""
    moment = datetime.fromtimestamp(ts, UTC)
    if moment.microsecond:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_SINCE = re.compile(r"^(\d{1,6})([hdw])$")
_SINCE_UNITS = {"h": 3600, "d": DAY_SECONDS, "w": 7 * DAY_SECONDS}


def parse_period(period: str | None, since: str | None, now: float) -> Period:
    """``--period YYYY-MM|YYYY-MM-DD`` (a calendar month or day, UTC) or ``--since Nh|Nd|Nw``
    (up to now) or ``--since YYYY-MM-DD`` (from that day, UTC, up to now); neither: the
    current month to date. A period that has not ended yet ends now (``partial``); one that
    starts in the future, or longer/older than ``MAX_PERIOD_DAYS``, is refused."""
    if period is not None and since is not None:
        raise PeriodError("give --period or --since, not both")
    if period is None and since is None:
        today = datetime.fromtimestamp(now, UTC)
        period = f"{today.year:04d}-{today.month:02d}"
    if period is not None:
        start, end, label = _calendar(period.strip())
    else:
        assert since is not None
        start, end, label = _since(since.strip(), now)
    if start >= now:
        raise PeriodError(f"period {label} starts in the future ({iso_utc(start)}; now is {iso_utc(now)})")
    partial = end > now
    end = min(end, now)
    oldest = now - MAX_PERIOD_DAYS * DAY_SECONDS
    if start < oldest:
        raise PeriodError(
            f"period {label} starts {iso_utc(start)}, more than {MAX_PERIOD_DAYS} days ago: finops reads at most "
            f"{MAX_PERIOD_DAYS} daily buckets per agent (the gateway documents no retention for usage records; "
            "its budget windows only cover the last 30 days)"
        )
    return Period(start, end, label, partial)


def _calendar(text: str) -> tuple[float, float, str]:
    month = _MONTH.match(text)
    day = _DAY.match(text)
    try:
        if month:
            first = datetime(int(month[1]), int(month[2]), 1, tzinfo=UTC)
            following = datetime(first.year + first.month // 12, first.month % 12 + 1, 1, tzinfo=UTC)
            return first.timestamp(), following.timestamp(), text
        if day:
            first = datetime(int(day[1]), int(day[2]), int(day[3]), tzinfo=UTC)
            return first.timestamp(), (first + timedelta(days=1)).timestamp(), text
    except ValueError as exc:
        raise PeriodError(f"--period {text!r} is not a valid date ({exc})") from None
    raise PeriodError(f"--period {text!r}: expected a month (2026-11) or a day (2026-11-05), UTC")


def _since(text: str, now: float) -> tuple[float, float, str]:
    relative = _SINCE.match(text)
    if relative:
        amount = int(relative[1])
        if amount == 0:
            raise PeriodError("--since must be longer than 0")
        seconds = amount * _SINCE_UNITS[relative[2]]
        if seconds > MAX_PERIOD_DAYS * DAY_SECONDS:
            raise PeriodError(f"--since {text}: longer than {MAX_PERIOD_DAYS} days, the longest report finops reads")
        return now - seconds, now, f"last {text}"
    if _DAY.match(text):
        start, _, _ = _calendar(text)
        return start, now, f"since {text}"
    raise PeriodError(f"--since {text!r}: expected a duration (12h, 30d, 2w) or a day (2026-11-05), UTC")


# --------------------------------------------------------------------------- reading a period


@dataclass(frozen=True)
class DayUsage:
    """One UTC day's usage as the gateway's daily timeseries reports it (records at or
    after the read's ``since`` only): its start (unix seconds), calls and cost (credits)."""

    start: float
    calls: int
    cost: Decimal


@dataclass(frozen=True)
class UsageTotal:
    """``GET …/usage?since=``: calls and cost (credits) of every record at or after ``since``."""

    calls: int
    cost: Decimal


class InconsistentUsage(ValueError):
    """The gateway's daily timeseries does not add up to its own usage total."""


@dataclass(frozen=True)
class PeriodUsage:
    calls: int
    spend: Decimal
    daily_spend: dict[float, Decimal]


def period_usage(days: Sequence[DayUsage], period: Period, before: UsageTotal, after: UsageTotal) -> PeriodUsage:
    """The period's calls and spend from the daily buckets read with ``since=period.start``:
    the days that start before ``period.end`` (a period's end is a UTC midnight, or the time
    of the read for a period that has not ended). Exact: whole days are whole buckets, and
    the first day holds only the records at or after the start.

    ``before`` and ``after`` are ``usage(since=period.start)`` read just before and just
    after the buckets: usage only grows, so every bucket total must lie between them. One
    outside means the buckets are not the whole story (a capped ``limit``, a dropped day)
    and no figure is guessed from them."""
    calls = sum(d.calls for d in days)
    cost = sum((d.cost for d in days), ZERO)
    if not (before.calls <= calls <= after.calls and before.cost <= cost <= after.cost):
        raise InconsistentUsage(
            f"the gateway's daily timeseries ({calls} calls, {cost} credits since {iso_utc(period.start)}) does "
            f"not add up to its usage total ({before.calls}..{after.calls} calls, {before.cost}..{after.cost} "
            "credits): refusing to report figures that may be incomplete"
        )
    inside = [d for d in days if d.start < period.end]
    daily: dict[float, Decimal] = {}
    for d in inside:
        if d.cost:
            daily[d.start] = daily.get(d.start, ZERO) + d.cost
    return PeriodUsage(sum(d.calls for d in inside), sum((d.cost for d in inside), ZERO), daily)


# --------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class GroupBy:
    """``fleet``, ``agent`` or ``label:KEY``."""

    kind: str
    label: str | None = None

    def __str__(self) -> str:
        return f"label:{self.label}" if self.kind == "label" else self.kind

    def key(self, agent: AgentUsage) -> str | None:
        """The agent's group; ``None``: it lacks the label (shown as ``(none)``, kept apart
        from a label whose value happens to be that text)."""
        if self.kind == "agent":
            return agent.agent_id
        if self.kind == "fleet":
            return agent.fleet
        assert self.label is not None
        return agent.labels.get(self.label)


_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$")


def parse_group_by(text: str) -> GroupBy:
    if text in ("fleet", "agent"):
        return GroupBy(text)
    if text.startswith("label:"):
        key = text[len("label:") :]
        if not _LABEL_KEY.match(key):
            raise PeriodError(f"--by {text!r}: the label key must be a manifest label name (e.g. label:team)")
        return GroupBy("label", key)
    raise PeriodError(f"--by {text!r}: expected fleet, agent or label:KEY")


# --------------------------------------------------------------------------- inputs and rows


@dataclass(frozen=True)
class AgentUsage:
    """What the CLI read for one agent over the period; every amount in credits.

    ``daily_spend`` maps the start of each UTC day (unix seconds) within the period to the
    spend of that day (the first and last day may be partial days of the period)."""

    agent_id: str
    fleet: str
    currency: str
    rate: Decimal
    """Credits per unit of ``currency`` (the gateway's exchange rate at report time)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    daily_cap: Decimal = ZERO
    calls: int = 0
    spend: Decimal = ZERO
    daily_spend: Mapping[float, Decimal] = field(default_factory=dict)
    top_ups: Decimal = ZERO
    top_up_count: int = 0
    top_ups_complete: bool = True
    """False when the ledger was too long to read back to the period's start: ``top_ups``
    is then a lower bound."""
    rebalanced: Decimal = ZERO
    """The rebalancer's current adjustment of the daily cap (credits; negative: given away)."""
    hold: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class GroupRow:
    """One group's figures (or the total). Amounts in credits; ``currency`` is the group's
    fleet currency, or CREDITS when its agents' fleets use different currencies."""

    key: str
    agents: tuple[str, ...]
    fleets: tuple[str, ...]
    currency: str
    rate: Decimal
    tags: Mapping[str, str]
    calls: int
    spend: Decimal
    daily_cap: Decimal
    peak_utilization: Decimal | None
    mean_utilization: Decimal | None
    top_ups: Decimal
    top_up_count: int
    top_ups_complete: bool
    rebalanced: Decimal
    holds: tuple[str, ...]
    failed: tuple[str, ...]

    @property
    def units(self) -> Units:
        return Units(self.currency, self.rate)


@dataclass(frozen=True)
class Report:
    period: Period
    by: GroupBy
    groups: tuple[GroupRow, ...]
    total: GroupRow
    errors: Mapping[str, str]
    generated_at: float

    @property
    def ok(self) -> bool:
        return not self.errors


def build_report(period: Period, by: GroupBy, agents: Sequence[AgentUsage], *, generated_at: float) -> Report:
    """Group ``agents`` (sorted by key; the ``(none)`` group last) and total them. An agent
    whose reads failed is listed in ``errors`` and in its group's ``failed``; its figures
    count nowhere."""
    grouped: dict[str | None, list[AgentUsage]] = {}
    for agent in agents:
        grouped.setdefault(by.key(agent), []).append(agent)
    order = sorted(grouped, key=lambda k: (k is None, k or ""))
    groups = tuple(_group(NO_LABEL if key is None else key, grouped[key], period) for key in order)
    total = _group(TOTAL, list(agents), period)
    errors = {a.agent_id: a.error for a in agents if a.error is not None}
    return Report(period, by, groups, total, dict(sorted(errors.items())), generated_at)


def _group(key: str, members: list[AgentUsage], period: Period) -> GroupRow:
    ok = [a for a in members if a.error is None]
    currencies = {(a.currency.upper(), a.rate) for a in (ok or members)}  # a failed read may lack the rate
    currency, rate = next(iter(currencies)) if len(currencies) == 1 else (CREDITS, Decimal(1))
    spend = sum((a.spend for a in ok), ZERO)
    cap = sum((a.daily_cap for a in ok), ZERO)
    days: dict[float, Decimal] = {}
    for agent in ok:
        for day, amount in agent.daily_spend.items():
            days[day] = days.get(day, ZERO) + amount
    peak = mean = None
    if cap > 0 and ok:
        peak = max(days.values(), default=ZERO) / cap
        mean = spend / period.days / cap if period.days > 0 else None
    return GroupRow(
        key=key,
        agents=tuple(sorted(a.agent_id for a in members)),
        fleets=tuple(sorted({a.fleet for a in members})),
        currency=currency,
        rate=rate,
        tags=_common_labels(members),
        calls=sum(a.calls for a in ok),
        spend=spend,
        daily_cap=cap,
        peak_utilization=peak,
        mean_utilization=mean,
        top_ups=sum((a.top_ups for a in ok), ZERO),
        top_up_count=sum(a.top_up_count for a in ok),
        top_ups_complete=all(a.top_ups_complete for a in ok),
        rebalanced=sum((a.rebalanced for a in ok), ZERO),
        holds=tuple(sorted(a.agent_id for a in members if a.hold is not None)),
        failed=tuple(sorted(a.agent_id for a in members if a.error is not None)),
    )


def _common_labels(members: Iterable[AgentUsage]) -> dict[str, str]:
    """The labels every member carries with the same value (an agent row: its labels)."""
    common: dict[str, str] | None = None
    for agent in members:
        labels = dict(agent.labels)
        common = labels if common is None else {k: v for k, v in common.items() if labels.get(k) == v}
    return dict(sorted((common or {}).items()))


# --------------------------------------------------------------------------- figures


def money_text(value: Decimal) -> tuple[str, bool]:
    """A 2-decimal string and whether it is exact (sub-cent spend is possible: the
    gateway prices some tools at 0.005 credits)."""
    shown = value.quantize(CENT, rounding=ROUND_HALF_EVEN)
    return str(shown), shown == value


def currency_value(units: Units, credits: Decimal) -> tuple[str, bool]:
    """``credits`` in ``units``' currency as a 2-decimal string, and whether exact."""
    if units.is_credits:
        return money_text(credits)
    value = units.in_currency(credits)
    if not value.is_finite():
        return "", False
    return str(value), units.exact(credits)


def ratio_text(value: Decimal | None) -> str:
    """A utilization ratio to 4 decimals; empty when there is no cap to measure against."""
    if value is None:
        return ""
    with localcontext() as ctx:
        ctx.prec = 60
        return str(value.quantize(RATIO_PLACES, rounding=ROUND_HALF_EVEN))


def _declared(text: str, exact: bool) -> str:
    return text if exact else APPROX + text


def _amount(row: GroupRow, credits: Decimal) -> str:
    """``30.00 USD (3000.00 credits)`` with ``≈`` on any figure that is rounded."""
    credit_text = _declared(*money_text(credits))
    if row.units.is_credits:
        return f"{credit_text} credits"
    shown, exact = currency_value(row.units, credits)
    return f"{_declared(shown, exact)} {row.currency} ({credit_text} credits)"


# --------------------------------------------------------------------------- CSV (FOCUS)

CSV_COLUMNS = (
    "BilledCost",
    "BillingCurrency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "PricingCurrency",
    "PricingCurrencyEffectiveCost",
    "ResourceId",
    "ResourceName",
    "Tags",
    "x_GroupBy",
    "x_Group",
    "x_Fleet",
    "x_Agents",
    "x_Calls",
    "x_BilledCostExact",
    "x_BilledCostCredits",
    "x_BilledCostCreditsExact",
    "x_ExchangeRate",
    "x_DailyCapCredits",
    "x_DailyCapUtilization",
    "x_DailyCapUtilizationMean",
    "x_TopUps",
    "x_TopUpsCredits",
    "x_TopUpCount",
    "x_TopUpsComplete",
    "x_Rebalanced",
    "x_RebalancedCredits",
    "x_Holds",
    "x_FailedAgents",
)
"""FOCUS 1.x columns where they fit, ``x_`` extensions for the rest. One row per group; no
totals row (a FOCUS consumer sums rows: a totals row would count everything twice).
Gateway credits are the virtual currency FOCUS 1.2 calls the pricing currency:
``PricingCurrency`` = ``CREDITS``, ``PricingCurrencyEffectiveCost`` = the spend in credits
(the same figure as ``x_BilledCostCredits``), ``BillingCurrency`` = the fleet's currency."""


def _csv_text(value: str) -> str:
    return "'" + value if value.startswith(CSV_FORMULA_START) else value


def csv_row(report: Report, row: GroupRow) -> dict[str, str]:
    billed, billed_exact = currency_value(row.units, row.spend)
    credits, credits_exact = money_text(row.spend)
    top_ups, _ = currency_value(row.units, row.top_ups)
    rebalanced, _ = currency_value(row.units, row.rebalanced)
    per_agent = report.by.kind == "agent"
    return {
        "BilledCost": billed,
        "BillingCurrency": row.currency,
        "ChargePeriodStart": report.period.start_iso,
        "ChargePeriodEnd": report.period.end_iso,
        "ChargeCategory": "Usage",
        "PricingCurrency": CREDITS,
        "PricingCurrencyEffectiveCost": credits,
        "ResourceId": _csv_text(row.key) if per_agent else "",
        "ResourceName": _csv_text(row.key) if per_agent else "",
        "Tags": json.dumps(dict(row.tags), sort_keys=True, ensure_ascii=False),
        "x_GroupBy": str(report.by),
        "x_Group": _csv_text(row.key),
        "x_Fleet": _csv_text(",".join(row.fleets)),
        "x_Agents": str(len(row.agents)),
        "x_Calls": str(row.calls),
        "x_BilledCostExact": "true" if billed_exact else "false",
        "x_BilledCostCredits": credits,
        "x_BilledCostCreditsExact": "true" if credits_exact else "false",
        "x_ExchangeRate": str(row.rate),
        "x_DailyCapCredits": money_text(row.daily_cap)[0],
        "x_DailyCapUtilization": ratio_text(row.peak_utilization),
        "x_DailyCapUtilizationMean": ratio_text(row.mean_utilization),
        "x_TopUps": top_ups,
        "x_TopUpsCredits": money_text(row.top_ups)[0],
        "x_TopUpCount": str(row.top_up_count),
        "x_TopUpsComplete": "true" if row.top_ups_complete else "false",
        "x_Rebalanced": rebalanced,
        "x_RebalancedCredits": money_text(row.rebalanced)[0],
        "x_Holds": str(len(row.holds)),
        "x_FailedAgents": _csv_text(",".join(row.failed)),
    }


def render_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in report.groups:
        writer.writerow(csv_row(report, row))
    return out.getvalue()


# --------------------------------------------------------------------------- JSON


def _row_dict(row: GroupRow) -> dict[str, Any]:
    billed, billed_exact = currency_value(row.units, row.spend)
    credits, credits_exact = money_text(row.spend)
    top_ups, top_ups_exact = currency_value(row.units, row.top_ups)
    rebalanced, rebalanced_exact = currency_value(row.units, row.rebalanced)
    return {
        "group": row.key,
        "agents": list(row.agents),
        "fleets": list(row.fleets),
        "tags": dict(row.tags),
        "currency": row.currency,
        "exchange_rate": str(row.rate),
        "calls": row.calls,
        "spend": billed,
        "spend_exact": billed_exact,
        "spend_credits": credits,
        "spend_credits_exact": credits_exact,
        "daily_cap_credits": money_text(row.daily_cap)[0],
        "daily_cap_utilization_peak": ratio_text(row.peak_utilization) or None,
        "daily_cap_utilization_mean": ratio_text(row.mean_utilization) or None,
        "top_ups": top_ups,
        "top_ups_exact": top_ups_exact,
        "top_ups_credits": money_text(row.top_ups)[0],
        "top_up_count": row.top_up_count,
        "top_ups_complete": row.top_ups_complete,
        "rebalanced": rebalanced,
        "rebalanced_exact": rebalanced_exact,
        "rebalanced_credits": money_text(row.rebalanced)[0],
        "holds": list(row.holds),
        "failed": list(row.failed),
    }


def report_to_dict(report: Report) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "period": {
            "label": report.period.label,
            "start": report.period.start_iso,
            "end": report.period.end_iso,
            "partial": report.period.partial,
        },
        "by": str(report.by),
        "generated_at": iso_utc(report.generated_at),
        "groups": [_row_dict(g) for g in report.groups],
        "total": _row_dict(report.total),
        "errors": dict(report.errors),
        "ok": report.ok,
    }


def render_json(report: Report) -> str:
    return json.dumps(report_to_dict(report), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- text and markdown

_HEADERS = ("Group", "Agents", "Calls", "Spend", "Cap use peak/mean", "Top-ups", "Rebalanced", "Holds")


def _cells(row: GroupRow) -> tuple[str, ...]:
    if len(row.failed) == len(row.agents):
        use = "n/a"
    elif row.peak_utilization is None:
        use = "no cap"
    else:
        use = f"{_pct(row.peak_utilization)} / {_pct(row.mean_utilization)}"
    failed = f" ({len(row.failed)} failed)" if row.failed else ""
    return (
        row.key,
        f"{len(row.agents)}{failed}",
        str(row.calls),
        _amount(row, row.spend),
        use,
        ("" if row.top_ups_complete else "≥ ") + f"{_amount(row, row.top_ups)} in {row.top_up_count}",
        _amount(row, row.rebalanced),
        str(len(row.holds)),
    )


def _pct(ratio: Decimal | None) -> str:
    """A ratio as a percentage to 2 decimals (``≈`` when that rounds it)."""
    if ratio is None:
        return "-"
    with localcontext() as ctx:
        ctx.prec = 60
        shown = (ratio * 100).quantize(CENT, rounding=ROUND_HALF_EVEN)
        return _declared(f"{shown} %", shown == ratio * 100)


def _title(report: Report) -> str:
    period = report.period
    partial = " (to date)" if period.partial else ""
    return f"Spend report {period.label}{partial}: [{period.start_iso}, {period.end_iso}) by {report.by}"


_NOTES = (
    "Spend: metered gateway fees (the usage the gateway's budget caps count), period start inclusive, end exclusive.",
    "Cap use: peak = the highest UTC-day spend / daily cap; mean = spend per day of the period / daily cap "
    "(caps as declared in the manifests, at report time).",
    "Top-ups: finops' deposits in the ledger within the period. Rebalanced: the rebalancer's current daily-cap "
    "adjustment. Holds: agents held now. ≥: the ledger was too long to read back to the period's start.",
    "Currency figures use the gateway's exchange rate at report time; ≈ marks a figure that is rounded.",
)


def render_text(report: Report) -> str:
    rows = [_HEADERS, *(_cells(g) for g in report.groups), _cells(report.total)]
    rows = [tuple(escape_controls(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
    lines = [_title(report), ""]
    for index, row in enumerate(rows):
        if index == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    for agent, error in report.errors.items():
        lines.append(escape_controls(f"FAILED {agent}: {error}"))
    lines.extend(_NOTES)
    return "\n".join(lines) + "\n"


def render_markdown(report: Report) -> str:
    lines = [f"### {escape_markdown(_title(report))}", ""]
    lines.append("| " + " | ".join(_HEADERS) + " |")
    lines.append("|" + "|".join("---" for _ in _HEADERS) + "|")
    for row in report.groups:
        lines.append("| " + " | ".join(escape_markdown(c) for c in _cells(row)) + " |")
    lines.append("| " + " | ".join(f"**{escape_markdown(c)}**" for c in _cells(report.total)) + " |")
    lines.append("")
    for agent, error in report.errors.items():
        lines.append(f"- **FAILED** {escape_markdown(agent)}: {escape_markdown(error)}")
    lines.extend(f"> {escape_markdown(note)}  " for note in _NOTES)
    return "\n".join(lines) + "\n"


RENDERERS = {"text": render_text, "markdown": render_markdown, "json": render_json, "csv": render_csv}
