"""``finops report``: chargeback and showback over a period (reads only).

Per agent, with at most ``--concurrency`` requests in flight (one worker per slot, like
observe): the period's calls, spend and spend per UTC day from
``GET …/timeseries?interval=day&since=START`` (exact at the period's boundaries, which are
UTC midnights or the time of the read), checked against ``GET …/usage?since=START`` read
before and after it, and finops' own deposits in the ledger
(``GET …/transactions``, the ``finops-topup-`` idempotency keys). From the state: the
rebalancer's current adjustments and the holds. No write to the gateway or the state, no
writer lock. A failing agent is reported (and makes the exit code 1); the others are still
reported. The figures are aggregated and rendered by ``policies.report``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import click

from controller.cli.options import DEFAULT_PATH, EXIT_ERROR, EXIT_OK, TargetOptions, load, run_command, target_options
from controller.errors import ConfigError
from controller.gateway.client import GatewayClient
from controller.gateway.errors import AuthenticationFailed, GatewayError, NotAdmin, NotFound
from controller.gateway.models import Transaction
from controller.io.secretfile import write_secret_file
from controller.io.target import Target
from controller.state import StateStore
from policies.currency import CREDITS, to_credits
from policies.funding_window import DEPOSIT_KEY_PREFIX, parse_ledger_time
from policies.money import ZERO
from policies.records import Adjustment, Hold
from policies.report import (
    DAY_SECONDS,
    RENDERERS,
    AgentUsage,
    DayUsage,
    InconsistentUsage,
    Period,
    PeriodError,
    PeriodUsage,
    UsageTotal,
    build_report,
    parse_group_by,
    parse_period,
    period_usage,
)
from policies.spec import AgentSpec, DesiredState

LEDGER_PAGE = 100
"""Ledger rows per ``transactions`` read (the gateway's default page)."""
MAX_LEDGER_ROWS = 20_000
"""The most ledger rows read per agent looking for finops' deposits in the period (every
paid call is a ledger row): past it, the top-ups are reported as incomplete (a lower
bound), never guessed."""


@dataclass(frozen=True)
class TopUps:
    credits: Decimal
    count: int
    complete: bool


class UsageMismatch(GatewayError):
    """The gateway's timeseries and usage reads of one agent disagree."""


async def read_period_usage(client: GatewayClient, agent_id: str, period: Period, now: float) -> PeriodUsage:
    """Calls, spend and spend per UTC day in the period, from the daily timeseries read
    with ``since=period.start`` (exact at the boundaries: see ``policies.report.period_usage``),
    checked against ``usage(since=period.start)`` read before and after it. The timeseries
    returns the newest ``limit`` non-empty days: asking for one per day from the period's
    first day to now returns all of them."""
    first_day = period.start - period.start % DAY_SECONDS
    limit = int((now - first_day) // DAY_SECONDS) + 2
    before = await client.usage(agent_id, since=period.start)
    buckets = await client.timeseries(agent_id, interval="day", since=period.start, limit=limit)
    after = await client.usage(agent_id, since=period.start)
    days = [DayUsage(b.start.timestamp(), b.calls, b.cost) for b in buckets]
    try:
        return period_usage(
            days,
            period,
            UsageTotal(before.total_calls, before.total_cost),
            UsageTotal(after.total_calls, after.total_cost),
        )
    except InconsistentUsage as exc:
        raise UsageMismatch(str(exc)) from None


def _is_finops_deposit(row: Transaction) -> bool:
    return row.tx_type == "deposit" and (row.idempotency_key or "").startswith(DEPOSIT_KEY_PREFIX) and row.amount > 0


async def top_ups(client: GatewayClient, agent_id: str, period: Period) -> TopUps:
    """finops' deposits (``finops-topup-`` keys) whose ledger time is within the period.
    The ledger is newest first with offset paging: a row landing meanwhile shifts the pages
    (a row read twice, deduplicated by id), never hides one. A finops deposit whose time
    cannot be read cannot be placed: the figure is then declared incomplete."""
    seen: set[int] = set()
    credits, count, offset, placed_all = ZERO, 0, 0, True
    while offset < MAX_LEDGER_ROWS:
        try:
            rows = await client.transactions(agent_id, limit=LEDGER_PAGE, offset=offset)
        except NotFound:
            return TopUps(credits, count, complete=placed_all)  # no wallet (yet): nothing deposited
        oldest: float | None = None
        for row in rows:
            at = parse_ledger_time(row.created_at)
            if at is None:
                placed_all = placed_all and not _is_finops_deposit(row)
                continue
            oldest = at if oldest is None else min(oldest, at)
            if row.id in seen or not period.start <= at < period.end:
                continue
            seen.add(row.id)
            if _is_finops_deposit(row):
                credits += row.amount
                count += 1
        if len(rows) < LEDGER_PAGE or (oldest is not None and oldest < period.start):
            return TopUps(credits, count, complete=placed_all)
        offset += LEDGER_PAGE
    return TopUps(credits, count, complete=False)


async def read_agent(
    client: GatewayClient,
    spec: AgentSpec,
    currency: str,
    rate: Decimal,
    period: Period,
    now: float,
    adjustment: Adjustment | None,
    hold: Hold | None,
) -> AgentUsage:
    """One agent's figures; a gateway failure is that agent's error, not the report's
    (authentication failures stop everything, as in observe)."""
    base = AgentUsage(
        agent_id=spec.agent_id,
        fleet=spec.fleet,
        currency=currency,
        rate=rate,
        labels=dict(spec.labels),
        daily_cap=to_credits(spec.daily_cap, rate),
        rebalanced=to_credits(adjustment.amount, rate) if adjustment is not None else ZERO,
        hold=hold.reason if hold is not None else None,
    )
    try:
        usage = await read_period_usage(client, spec.agent_id, period, now)
        deposits = await top_ups(client, spec.agent_id, period)
    except (AuthenticationFailed, NotAdmin):
        raise
    except GatewayError as exc:
        return replace(base, error=str(exc))
    return replace(
        base,
        calls=usage.calls,
        spend=usage.spend,
        daily_spend=usage.daily_spend,
        top_ups=deposits.credits,
        top_up_count=deposits.count,
        top_ups_complete=deposits.complete,
    )


async def read_fleet(
    client: GatewayClient,
    desired: DesiredState,
    period: Period,
    now: float,
    adjustments: Mapping[str, Adjustment],
    holds: Mapping[str, Hold],
) -> list[AgentUsage]:
    """Every declared agent, ``client.concurrency`` at a time (one worker per slot, not
    one task per agent). A fleet whose exchange rate cannot be read fails its agents."""
    rates: dict[str, Decimal | str] = {}
    for currency in sorted({f.currency for f in desired.fleets}):
        try:
            rates[currency] = await client.exchange_rate(currency, CREDITS)
        except (AuthenticationFailed, NotAdmin):
            raise
        except GatewayError as exc:
            rates[currency] = f"exchange rate {currency}→{CREDITS}: {exc}"
    currency_of = {f.name: f.currency for f in desired.fleets}
    specs: Sequence[AgentSpec] = desired.agents()
    results: dict[int, AgentUsage] = {}
    pending = iter(enumerate(specs))

    async def worker() -> None:
        for index, spec in pending:
            currency = currency_of[spec.fleet]
            rate = rates[currency]
            if isinstance(rate, str):
                results[index] = AgentUsage(spec.agent_id, spec.fleet, currency, Decimal(1), spec.labels, error=rate)
                continue
            results[index] = await read_agent(
                client, spec, currency, rate, period, now, adjustments.get(spec.agent_id), holds.get(spec.agent_id)
            )

    await asyncio.gather(*(worker() for _ in range(max(1, min(client.concurrency, len(specs))))))
    return [results[i] for i in range(len(specs))]


def _read(target: Target, opts: TargetOptions, desired: DesiredState, period: Period, now: float) -> list[AgentUsage]:
    """Every agent's figures. The state is read only if there is one (a report never
    creates it: no state, no adjustments and no holds); the key store is never opened; the
    client carries no writer fence (it sends no write)."""
    adjustments: dict[str, Adjustment] = {}
    holds: dict[str, Hold] = {}
    if target.state_location.exists():
        store = StateStore(target.state_location)
        try:
            adjustments, holds = store.adjustments(), store.holds()
        finally:
            store.close()

    async def go() -> list[AgentUsage]:
        async with GatewayClient(target.url, target.api_key, concurrency=opts.concurrency) as client:
            return await read_fleet(client, desired, period, now, adjustments, holds)

    return asyncio.run(go())


@click.command()
@click.argument("path", default=DEFAULT_PATH, required=False)
@click.option("--period", default=None, metavar="YYYY-MM[-DD]", help="A calendar month or day (UTC).")
@click.option(
    "--since",
    default=None,
    metavar="Nh|Nd|Nw|YYYY-MM-DD",
    help="From that long ago (or that day, UTC) until now. Neither option: the current month to date.",
)
@click.option(
    "--by",
    "by",
    default="fleet",
    show_default=True,
    metavar="fleet|agent|label:KEY",
    help="One row per fleet, per agent, or per value of a manifest label (agents without it: '(none)').",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "csv", "json", "markdown"]),
    default="text",
    show_default=True,
    help="csv: FinOps FOCUS column names (BilledCost, BillingCurrency, ChargePeriodStart/End, ResourceId, Tags) "
    "and x_ extensions, one row per group, no totals row.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report to FILE (atomically, 0600) instead of standard output.",
)
@target_options
def report(
    path: str,
    period: str | None,
    since: str | None,
    by: str,
    fmt: str,
    out: Path | None,
    opts: TargetOptions,
) -> None:
    """Spend per fleet, agent or team over a period: calls, spend, daily-cap use, finops' top-ups,
    rebalancing and holds, in the fleet's currency and in credits (reads only).

    Spend is the gateway's metered usage (what its budget caps count), start inclusive, end
    exclusive. Cap use: peak = the highest UTC-day spend / daily cap, mean = spend per day /
    daily cap (declared caps). Currency figures use the gateway's exchange rate now; a rounded
    one is marked ≈ (CSV: x_BilledCostExact=false). Exit 1 if any agent could not be read."""
    now = time.time()
    try:
        chosen = parse_period(period, since, now)
        group_by = parse_group_by(by)
    except PeriodError as exc:
        raise click.UsageError(str(exc)) from None

    def run() -> int:
        desired = load(path, opts.state_dir)

        with opts.open_target() as target:
            click.echo(target.banner(), err=fmt != "text" or out is not None)
            agents = _read(target, opts, desired, chosen, now)
        result = build_report(chosen, group_by, agents, generated_at=now)
        text = RENDERERS[fmt](result)
        if out is not None:
            try:
                write_secret_file(out, text)
            except OSError as exc:
                raise ConfigError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
            click.echo(f"finops: report written to {out}", err=True)
        else:
            click.echo(text, nl=False)
        return EXIT_OK if result.ok else EXIT_ERROR

    run_command(run)
