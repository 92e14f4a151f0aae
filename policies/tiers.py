"""Resolving fleet declarations (tiers, defaults, per-agent overrides) into desired state.

This is the decision half of manifest loading: the controller parses YAML and validates its
shape, then hands plain declarations to :func:`resolve`. Keeping the precedence rules and
the budget arithmetic here, free of YAML and pydantic, lets property tests drive them with
generated fleets and lets every caller (CLI, planner, tests) agree on one answer.

Precedence, most specific first:

* caps: agent override, else tier;
* funding floor / target: agent field, else tier field, else fleet defaults field;
* labels: fleet default labels overlaid with the agent's (the agent wins);
* alert thresholds, forecast horizon and anomaly rule: agent override, else the fleet's.

Problems are returned, never raised, so the loader can report all of them in one go.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TypeVar

from policies.fleet_metrics import MAX_LABEL_VALUE
from policies.issues import ManifestIssue
from policies.money import format_money
from policies.spec import (
    RELEASE_AUTO,
    RELEASE_MANUAL,
    WEEKLY,
    AgentSpec,
    AlertRoute,
    AnomalySpec,
    ApprovalPolicy,
    DesiredState,
    EscalationRule,
    FleetSpec,
    GatewayWebhookSpec,
    KeyPolicy,
    KeySinkSpec,
    RebalanceSettings,
    SecretRef,
    Source,
)
from policies.urls import check_url_safety

DEFAULT_THRESHOLDS: tuple[int, ...] = (75, 90, 100)
T = TypeVar("T")


@dataclass(frozen=True)
class Origin:
    """Where a declaration sits, so pure checks can point at a line without knowing YAML.

    ``path`` is the declaration's dotted field path inside its document (``spec.agents[2]``);
    ``lines`` maps field paths relative to it (``dailyCap``, ``funding.floor``) to the line
    they were written on. A field that was not written falls back to the declaration's line,
    which is where a user would add it.
    """

    file: str
    path: str
    line: int
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, hash=False)

    def field_path(self, rel: str) -> str:
        if not rel:
            return self.path
        if not self.path:
            return rel
        return f"{self.path}.{rel}"

    def issue(self, rel: str, message: str) -> ManifestIssue:
        return ManifestIssue(self.file, self.lines.get(rel, self.line), self.field_path(rel), message)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class FundingDecl:
    """A possibly partial funding declaration; ``None`` means "inherit"."""

    floor: Decimal | None = None
    target: Decimal | None = None
    max_unexplained: Decimal | None = None
    """``maxUnexplainedPerDay``; resolved like floor and target (agent, tier, defaults)."""


@dataclass(frozen=True)
class BoundsDecl:
    """Rebalancing bounds for a daily cap; ``None`` inherits."""

    minimum: Decimal | None = None
    maximum: Decimal | None = None


@dataclass(frozen=True)
class RebalanceDecl:
    """``spec.rebalancing`` as written (percent values, interval in seconds)."""

    enabled: bool = True
    interval_seconds: int = 900
    donor_below: int = 30
    receiver_above: int = 80
    share: int = 50
    min_percent: int = 50
    max_percent: int = 200


@dataclass(frozen=True)
class TierDecl:
    """A role's caps and funding as declared under ``spec.tiers``."""

    name: str
    daily_cap: Decimal
    monthly_cap: Decimal
    funding: FundingDecl = FundingDecl()
    origin: Origin = Origin("", "", 0)
    bounds: BoundsDecl = BoundsDecl()


@dataclass(frozen=True)
class RouteDecl:
    """An alert route as written; ``None`` thresholds/secret inherit the agent's/fleet's."""

    url: str
    thresholds: tuple[int, ...] | None = None
    events: tuple[str, ...] = ("budget.threshold",)
    secret: SecretRef | None = None
    rel: str = ""
    """Where it sits relative to its origin (``alerts.routes[0]``), for messages."""


@dataclass(frozen=True)
class WebhookDecl:
    """``spec.alerts.gatewayWebhooks`` as written."""

    enabled: bool
    url: str
    events: tuple[str, ...]
    secret: SecretRef | None = None
    allow_referenced_secret: bool = False


@dataclass(frozen=True)
class KeysDecl:
    """Key management as written at one level; ``None`` inherits."""

    manage: bool | None = None
    scopes: tuple[str, ...] | None = None
    rotation: str | None = None
    sink: KeySinkSpec | None = None


@dataclass(frozen=True)
class AgentDecl:
    """One agent as written, before inheritance; ``None`` fields inherit."""

    agent_id: str
    tier: str
    daily_cap: Decimal | None = None
    monthly_cap: Decimal | None = None
    funding: FundingDecl = FundingDecl()
    thresholds: tuple[int, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    origin: Origin = Origin("", "", 0)
    routes: tuple[RouteDecl, ...] | None = None
    keys: KeysDecl = KeysDecl()
    bounds: BoundsDecl = BoundsDecl()
    escalation: tuple[EscalationRule, ...] | None = None
    """``alerts.escalation`` (``None``: the fleet's ladder)."""
    forecast_horizon: int | None = None
    """``alerts.forecastHorizon`` in seconds; ``None`` inherits the fleet's."""
    anomaly: AnomalySpec | None = None
    """``alerts.anomaly``; ``None`` inherits the fleet's."""


@dataclass(frozen=True)
class FleetDecl:
    """A Fleet document: totals, defaults, tiers and the agents declared inline."""

    name: str
    currency: str
    daily_total: Decimal
    funding_ceiling: Decimal
    tiers: Mapping[str, TierDecl]
    agents: tuple[AgentDecl, ...] = ()
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    default_funding: FundingDecl = FundingDecl()
    default_labels: Mapping[str, str] = field(default_factory=dict)
    origin: Origin = Origin("", "", 0)
    routes: tuple[RouteDecl, ...] = ()
    signing_secret: SecretRef | None = None
    allow_insecure: bool = False
    gateway_webhooks: WebhookDecl | None = None
    keys: KeysDecl = KeysDecl()
    rebalancing: RebalanceDecl | None = None
    funding_daily_limit: Decimal | None = None
    """``spec.funding.dailyLimit`` as written (``None``: the default)."""
    approval: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    metric_labels: tuple[str, ...] = ()
    """``spec.metrics.labels``: agent label keys exported on the per-agent metrics."""
    escalation: tuple[EscalationRule, ...] = ()
    """``spec.alerts.escalation``: the ladder every agent inherits unless it has its own."""
    forecast_horizon: int | None = None
    anomaly: AnomalySpec | None = None


@dataclass(frozen=True)
class GroupDecl:
    """An AgentGroup document: more agents for a fleet declared elsewhere."""

    name: str
    fleet: str
    agents: tuple[AgentDecl, ...]
    origin: Origin = Origin("", "", 0)


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`. ``state`` holds only what resolved cleanly and must
    not be acted on unless ``issues`` is empty."""

    state: DesiredState
    issues: tuple[ManifestIssue, ...]

    @property
    def ok(self) -> bool:
        return not self.issues


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate, so an error can suggest the fix for a typo."""
    options = list(candidates)
    lowered = {c.lower(): c for c in options}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return close[0] if close else None


def _money(value: Decimal) -> str:
    return format_money(value)


def _pick(
    agent_value: Decimal | None,
    tier_value: Decimal | None,
    default_value: Decimal | None,
    tier_name: str,
) -> tuple[Decimal | None, str]:
    """The effective value and a phrase saying which level supplied it (for messages)."""
    if agent_value is not None:
        return agent_value, "the agent"
    if tier_value is not None:
        return tier_value, f"tier '{tier_name}'"
    if default_value is not None:
        return default_value, "spec.defaults"
    return None, ""


def check_tier(fleet: FleetDecl, tier: TierDecl) -> list[ManifestIssue]:
    """Problems a tier has on its own, reported once at the tier rather than per agent."""
    issues: list[ManifestIssue] = []
    if tier.daily_cap > fleet.daily_total:
        issues.append(
            tier.origin.issue(
                "dailyCap",
                f"dailyCap {_money(tier.daily_cap)} exceeds the fleet's dailyBudgetTotal {_money(fleet.daily_total)}",
            )
        )
    if tier.monthly_cap < tier.daily_cap:
        issues.append(
            tier.origin.issue(
                "monthlyCap",
                f"monthlyCap {_money(tier.monthly_cap)} is below dailyCap {_money(tier.daily_cap)}",
            )
        )
    floor = tier.funding.floor if tier.funding.floor is not None else fleet.default_funding.floor
    target = tier.funding.target if tier.funding.target is not None else fleet.default_funding.target
    touched = tier.funding.floor is not None or tier.funding.target is not None
    if touched and floor is not None and target is not None and floor > target:
        rel = "funding.floor" if tier.funding.floor is not None else "funding.target"
        issues.append(tier.origin.issue(rel, f"funding floor {_money(floor)} is above funding target {_money(target)}"))
    return issues


def check_defaults(fleet: FleetDecl) -> list[ManifestIssue]:
    """Fleet-wide defaults that contradict themselves, reported once at spec.defaults."""
    floor, target = fleet.default_funding.floor, fleet.default_funding.target
    if floor is not None and target is not None and floor > target:
        return [
            fleet.origin.issue(
                "spec.defaults.funding.floor",
                f"funding floor {_money(floor)} is above funding target {_money(target)}",
            )
        ]
    return []


def resolve_agent(fleet: FleetDecl, agent: AgentDecl) -> tuple[AgentSpec | None, list[ManifestIssue]]:
    """Apply the precedence rules to one agent.

    Only problems that involve the agent's own overrides (or a value nothing supplied) are
    reported here; a tier or defaults problem is reported once by :func:`check_tier` or
    :func:`check_defaults` instead of once per agent that inherits it.
    """
    origin = agent.origin
    tier = fleet.tiers.get(agent.tier)
    if tier is None:
        hint = did_you_mean(agent.tier, fleet.tiers)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        declared = ", ".join(sorted(fleet.tiers)) or "none"
        return None, [
            origin.issue(
                "tier",
                f"unknown tier '{agent.tier}' in fleet '{fleet.name}'{suggestion} (declared tiers: {declared})",
            )
        ]

    issues: list[ManifestIssue] = []
    daily = agent.daily_cap if agent.daily_cap is not None else tier.daily_cap
    monthly = agent.monthly_cap if agent.monthly_cap is not None else tier.monthly_cap
    if agent.daily_cap is not None and agent.daily_cap > fleet.daily_total:
        issues.append(
            origin.issue(
                "dailyCap",
                f"dailyCap {_money(daily)} exceeds the fleet's dailyBudgetTotal {_money(fleet.daily_total)}",
            )
        )
    if (agent.daily_cap is not None or agent.monthly_cap is not None) and monthly < daily:
        rel = "monthlyCap" if agent.monthly_cap is not None else "dailyCap"
        issues.append(origin.issue(rel, f"monthlyCap {_money(monthly)} is below dailyCap {_money(daily)}"))

    floor, floor_from = _pick(agent.funding.floor, tier.funding.floor, fleet.default_funding.floor, tier.name)
    target, target_from = _pick(agent.funding.target, tier.funding.target, fleet.default_funding.target, tier.name)
    for name, value in (("floor", floor), ("target", target)):
        if value is None:
            issues.append(
                ManifestIssue(
                    origin.file,
                    origin.line,
                    origin.field_path(f"funding.{name}"),
                    f"funding {name} is not set for agent '{agent.agent_id}': set it on the agent, "
                    f"on tier '{tier.name}' or in spec.defaults.funding",
                )
            )
    agent_touched = agent.funding.floor is not None or agent.funding.target is not None
    if agent_touched and floor is not None and target is not None and floor > target:
        rel = "funding.floor" if agent.funding.floor is not None else "funding.target"
        issues.append(
            origin.issue(
                rel,
                f"funding floor {_money(floor)} (from {floor_from}) is above funding target "
                f"{_money(target)} (from {target_from})",
            )
        )
    if issues or floor is None or target is None:
        return None, issues

    labels = {**fleet.default_labels, **agent.labels}
    for key in fleet.metric_labels:
        if len(labels.get(key, "")) > MAX_LABEL_VALUE:
            issues.append(
                origin.issue(
                    "id",
                    f"label {key!r} is exported as a metric label (spec.metrics.labels) and must be at most "
                    f"{MAX_LABEL_VALUE} characters, got {len(labels[key])}",
                )
            )
    if issues:
        return None, issues
    max_unexplained, _ = _pick(
        agent.funding.max_unexplained,
        tier.funding.max_unexplained,
        fleet.default_funding.max_unexplained,
        tier.name,
    )
    thresholds = agent.thresholds if agent.thresholds is not None else fleet.thresholds
    routes, route_issues = _resolve_routes(fleet, agent, tuple(thresholds))
    ladder, ladder_issues = _resolve_escalation(fleet, agent, tuple(thresholds))
    route_issues += ladder_issues
    bounds, bound_issues = _resolve_bounds(fleet, tier, agent, daily)
    hook_issue = _rendered_webhook_problem(fleet, agent)
    route_issues += [hook_issue] if hook_issue else []
    if route_issues or bound_issues:
        return None, route_issues + bound_issues
    return (
        AgentSpec(
            agent_id=agent.agent_id,
            fleet=fleet.name,
            tier=tier.name,
            daily_cap=daily,
            monthly_cap=monthly,
            funding_floor=floor,
            funding_target=target,
            alert_thresholds=tuple(thresholds),
            labels=labels,
            source=Source(origin.file, origin.line),
            alert_routes=routes,
            gateway_webhooks=_gateway_webhooks(fleet, agent),
            keys=_key_policy(fleet.keys, agent.keys),
            daily_cap_min=bounds[0] if bounds else None,
            daily_cap_max=bounds[1] if bounds else None,
            max_unexplained_per_day=max_unexplained if max_unexplained is not None else Decimal("0.00"),
            escalation=ladder,
            forecast_horizon=agent.forecast_horizon if agent.forecast_horizon is not None else fleet.forecast_horizon,
            anomaly=agent.anomaly if agent.anomaly is not None else fleet.anomaly,
        ),
        [],
    )


def _resolve_escalation(
    fleet: FleetDecl, agent: AgentDecl, thresholds: tuple[int, ...]
) -> tuple[tuple[EscalationRule, ...], list[ManifestIssue]]:
    """The agent's ladder (its own, else the fleet's) with release defaults filled in
    (pause: auto, freeze: manual). Every step's threshold must be one the agent alerts on:
    the action rides on that threshold's alert, once per crossing."""
    own = agent.escalation is not None
    steps = agent.escalation if agent.escalation is not None else fleet.escalation
    where = agent.origin if own else fleet.origin
    rel = "alerts.escalation" if own else "spec.alerts.escalation"
    issues: list[ManifestIssue] = []
    ladder: list[EscalationRule] = []
    for i, step in enumerate(steps):
        if step.threshold not in thresholds:
            issues.append(
                where.issue(
                    f"{rel}[{i}].threshold",
                    f"escalation threshold {step.threshold} is not among agent '{agent.agent_id}' thresholds "
                    f"{list(thresholds)}: add it to alerts.thresholds (the {step.action} rides on that alert)",
                )
            )
            continue
        release = step.release or (RELEASE_AUTO if step.action == "pause" else RELEASE_MANUAL)
        ladder.append(EscalationRule(step.threshold, step.window, step.action, release))
    return tuple(ladder), issues


def _resolve_bounds(
    fleet: FleetDecl, tier: TierDecl, agent: AgentDecl, daily: Decimal
) -> tuple[tuple[Decimal, Decimal] | None, list[ManifestIssue]]:
    """Rebalancing bounds: agent, else tier, else the fleet's percent of the baseline cap
    (rounded inward to the cent, and never above the fleet's daily total)."""
    policy = fleet.rebalancing
    if policy is None or not policy.enabled:
        return None, []
    cent = Decimal("0.01")
    default_min = (daily * policy.min_percent / 100).quantize(cent, rounding=ROUND_CEILING)
    default_max = min((daily * policy.max_percent / 100).quantize(cent, rounding=ROUND_FLOOR), fleet.daily_total)
    minimum = _first(agent.bounds.minimum, tier.bounds.minimum, default_min)
    maximum = _first(agent.bounds.maximum, tier.bounds.maximum, default_max)
    where = agent.origin if agent.bounds != BoundsDecl() else tier.origin
    rel = "rebalance"
    issues = []
    if minimum > daily:
        issues.append(
            where.issue(f"{rel}.minDailyCap", f"minDailyCap {_money(minimum)} is above the daily cap {_money(daily)}")
        )
    if maximum < daily:
        issues.append(
            where.issue(f"{rel}.maxDailyCap", f"maxDailyCap {_money(maximum)} is below the daily cap {_money(daily)}")
        )
    if maximum > fleet.daily_total:
        issues.append(
            where.issue(
                f"{rel}.maxDailyCap",
                f"maxDailyCap {_money(maximum)} exceeds the fleet's dailyBudgetTotal {_money(fleet.daily_total)}",
            )
        )
    return (minimum, maximum), issues


def _resolve_routes(
    fleet: FleetDecl, agent: AgentDecl, thresholds: tuple[int, ...]
) -> tuple[tuple[AlertRoute, ...], list[ManifestIssue]]:
    """The agent's routes (its own, else the fleet's) with thresholds and secret filled in.

    Reported at the agent when the routes are its own, at the fleet otherwise (once per
    fleet route, not once per inheriting agent: the caller de-duplicates identical issues).
    """
    own = agent.routes is not None
    decls = agent.routes if agent.routes is not None else fleet.routes
    where = agent.origin if own else fleet.origin
    issues: list[ManifestIssue] = []
    routes: list[AlertRoute] = []
    for decl in decls:
        chosen = decl.thresholds if decl.thresholds is not None else thresholds
        unknown = [t for t in chosen if t not in thresholds]
        if unknown:
            issues.append(
                where.issue(
                    f"{decl.rel}.thresholds",
                    f"route thresholds {list(unknown)} are not among agent '{agent.agent_id}' "
                    f"thresholds {list(thresholds)}",
                )
            )
            continue
        secret = decl.secret or fleet.signing_secret
        if secret is None:
            issues.append(
                where.issue(
                    f"{decl.rel}.signingSecret",
                    "alerts are signed: set spec.alerts.signingSecret (env or file) or the route's signingSecret",
                )
            )
            continue
        problem = _template_problem(decl.url, fleet.allow_insecure) or _rendered_route_problem(
            decl.url, fleet, agent.agent_id, chosen
        )
        if problem:
            issues.append(where.issue(f"{decl.rel}.url", problem))
            continue
        routes.append(AlertRoute(decl.url, tuple(chosen), decl.events, secret, fleet.allow_insecure))
    return tuple(routes), issues


ALERT_WINDOWS = ("daily", "monthly")


def _placeholder_in_host(url: str) -> bool:
    """Whether a placeholder sits in the URL's host: then only the rendered URLs can be judged
    (``https://{agent}/`` is a valid template whose hosts are the agent ids)."""
    return "{" in url.partition("://")[2].partition("/")[0]


def _template_problem(url: str, allow_insecure: bool) -> str | None:
    """The URL rules on the template itself, unless its host is made of placeholders."""
    if _placeholder_in_host(url):
        return None
    return check_url_safety(re.sub(r"\{[a-z]+\}", "x", url), allow_insecure=allow_insecure)


def _rendered_route_problem(url: str, fleet: FleetDecl, agent_id: str, thresholds: Sequence[int]) -> str | None:
    """The URL rules on every URL the template renders to, not just on the template: an
    agent id or a threshold placed in the host can make an IP literal (``https://{agent}/``
    with agent ``10.0.0.1``, ``https://10.0.0.{threshold}/``). Checked here, before any
    request, not at delivery. A problem that any agent would have is reported without
    naming the agent, so a fleet route is reported once, not once per agent."""
    if "{" not in url:
        return None
    samples = (agent_id,) if "{agent}" in url.partition("://")[2].partition("/")[0] else ("agent", agent_id)
    for sample in samples:
        for threshold in thresholds:
            for window in ALERT_WINDOWS:
                rendered = (
                    url.replace("{agent}", sample)
                    .replace("{fleet}", fleet.name)
                    .replace("{threshold}", str(threshold))
                    .replace("{window}", window)
                )
                problem = check_url_safety(rendered, allow_insecure=fleet.allow_insecure)
                if problem:
                    who = f"for agent '{agent_id}' " if sample == agent_id else ""
                    return f"renders {who}as {rendered}: {problem}"
    return None


def _rendered_webhook_problem(fleet: FleetDecl, agent: AgentDecl) -> ManifestIssue | None:
    """A gateway webhook URL rendered for this agent must pass the gateway's own rules, or
    creating it fails at apply, after other writes (the template itself is checked once per
    fleet by :func:`check_gateway_webhooks`)."""
    hooks = fleet.gateway_webhooks
    if hooks is None or not hooks.enabled or "{agent}" not in hooks.url:
        return None
    if _template_problem(hooks.url.replace("{fleet}", fleet.name), allow_insecure=False):
        return None  # the template itself is refused, once, by check_gateway_webhooks
    rendered = hooks.url.replace("{agent}", agent.agent_id).replace("{fleet}", fleet.name)
    problem = check_url_safety(rendered, allow_insecure=False)
    if problem is None:
        return None
    reason = problem.split(" (set allowInsecure")[0]
    return agent.origin.issue(
        "id",
        f"spec.alerts.gatewayWebhooks.url renders for agent '{agent.agent_id}' as {rendered}: {reason}; "
        "the gateway refuses such webhook URLs",
    )


def _gateway_webhooks(fleet: FleetDecl, agent: AgentDecl) -> tuple[GatewayWebhookSpec, ...]:
    hooks = fleet.gateway_webhooks
    if hooks is None or not hooks.enabled:
        return ()
    secret = gateway_webhook_secret(fleet)
    if secret is None:
        return ()  # reported once per fleet by check_gateway_webhooks
    url = hooks.url.replace("{agent}", agent.agent_id).replace("{fleet}", fleet.name)
    return (GatewayWebhookSpec(url, hooks.events, secret),)


GATEWAY_WEBHOOK_SECRET_PREFIX = "gateway-webhook-"


def gateway_webhook_secret(fleet: FleetDecl) -> SecretRef | None:
    """The secret a fleet's gateway webhooks are registered with. The gateway lists webhook
    secrets in clear (API.md §7), so by default it is one finops generates for this purpose
    only (``SecretRef(managed=...)``), never a secret that also signs something else; only
    ``allowReferencedSecret: true`` sends the referenced one (the hook's, else the fleet's)."""
    hooks = fleet.gateway_webhooks
    if hooks is None:
        return None
    if hooks.allow_referenced_secret:
        return hooks.secret or fleet.signing_secret
    return SecretRef(managed=f"{GATEWAY_WEBHOOK_SECRET_PREFIX}{fleet.name}")


def check_gateway_webhooks(fleet: FleetDecl) -> list[ManifestIssue]:
    """Gateway webhooks must satisfy the gateway itself: https, public host, a secret that
    is fit to be listed in clear."""
    hooks = fleet.gateway_webhooks
    if hooks is None or not hooks.enabled:
        return []
    issues: list[ManifestIssue] = []
    if hooks.allow_referenced_secret and hooks.secret is None and fleet.signing_secret is None:
        issues.append(
            fleet.origin.issue(
                "spec.alerts.gatewayWebhooks.signingSecret",
                "allowReferencedSecret is true but no secret is referenced: set this field or "
                "spec.alerts.signingSecret, or drop allowReferencedSecret to have finops generate one",
            )
        )
    if hooks.secret is not None and not hooks.allow_referenced_secret:
        issues.append(
            fleet.origin.issue(
                "spec.alerts.gatewayWebhooks.signingSecret",
                "the gateway lists webhook secrets in clear to anyone with the admin key, so finops generates "
                "gateway webhook secrets itself; remove signingSecret, or set allowReferencedSecret: true to "
                "send this referenced secret to the gateway",
            )
        )
    problem = _template_problem(hooks.url.replace("{fleet}", fleet.name), allow_insecure=False)
    if problem:
        # The allowInsecure hint check_url_safety gives for alert routes does not apply here.
        reason = problem.split(" (set allowInsecure")[0]
        issues.append(
            fleet.origin.issue(
                "spec.alerts.gatewayWebhooks.url",
                f"{reason}; the gateway refuses such webhook URLs (allowInsecure does not apply to gateway webhooks)",
            )
        )
    return issues


def _key_policy(fleet: KeysDecl, agent: KeysDecl) -> KeyPolicy:
    """Field by field: the agent's value, else the fleet's, else the default."""
    base = KeyPolicy()
    return KeyPolicy(
        manage=_first(agent.manage, fleet.manage, base.manage),
        scopes=_first(agent.scopes, fleet.scopes, base.scopes),
        rotation=_first(agent.rotation, fleet.rotation, WEEKLY),
        sink=_first(agent.sink, fleet.sink, base.sink),
    )


def _first(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    raise ValueError("no value")  # pragma: no cover - the last candidate is a default


def resolve(
    fleets: Sequence[FleetDecl],
    groups: Sequence[GroupDecl] = (),
    *,
    unchecked_fleets: Set[str] = frozenset(),
    complete: bool = True,
) -> Resolution:
    """Resolve every fleet and agent group, collecting every problem.

    ``unchecked_fleets`` names fleets whose document exists but failed schema validation, and
    ``complete=False`` says some file could not be parsed at all. In both cases an AgentGroup
    pointing at a fleet we cannot see may well be right, so it is not reported as unknown
    (its agent ids still take part in the global uniqueness check).
    """
    issues: list[ManifestIssue] = []
    by_name: dict[str, FleetDecl] = {}
    for fleet in fleets:
        first = by_name.get(fleet.name)
        if first is not None:
            issues.append(
                fleet.origin.issue(
                    "metadata.name",
                    f"duplicate fleet name '{fleet.name}': already declared at {first.origin.where()}",
                )
            )
            continue
        by_name[fleet.name] = fleet

    # Agents grouped under the fleet they belong to, in declaration order.
    members: dict[str, list[AgentDecl]] = {name: list(f.agents) for name, f in by_name.items()}
    seen_groups: dict[str, GroupDecl] = {}
    orphans: list[AgentDecl] = []
    for group in groups:
        first_group = seen_groups.get(group.name)
        if first_group is not None:
            issues.append(
                group.origin.issue(
                    "metadata.name",
                    f"duplicate AgentGroup name '{group.name}': already declared at {first_group.origin.where()}",
                )
            )
        else:
            seen_groups[group.name] = group
        if group.fleet in members:
            members[group.fleet].extend(group.agents)
            continue
        orphans.extend(group.agents)
        if group.fleet in unchecked_fleets or not complete:
            continue
        hint = did_you_mean(group.fleet, by_name)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        declared = ", ".join(sorted(by_name)) or "none"
        issues.append(
            group.origin.issue(
                "spec.fleet",
                f"unknown fleet '{group.fleet}'{suggestion} (declared fleets: {declared})",
            )
        )

    # Agent ids are global on the gateway, so uniqueness spans every fleet and file.
    first_seen: dict[str, AgentDecl] = {}
    duplicates: set[int] = set()
    all_agents = [a for name in by_name for a in members[name]] + orphans
    for agent in sorted(all_agents, key=lambda a: (a.origin.file, a.origin.line)):
        first_agent = first_seen.get(agent.agent_id)
        if first_agent is None:
            first_seen[agent.agent_id] = agent
            continue
        duplicates.add(id(agent))
        issues.append(
            agent.origin.issue(
                "id",
                f"duplicate agent id '{agent.agent_id}': already declared at {first_agent.origin.where()} "
                "(agent ids are global on the gateway, across all fleets)",
            )
        )

    resolved: list[FleetSpec] = []
    for name, fleet in by_name.items():
        issues.extend(check_defaults(fleet))
        issues.extend(check_gateway_webhooks(fleet))
        for tier in fleet.tiers.values():
            issues.extend(check_tier(fleet, tier))
        specs: list[AgentSpec] = []
        for agent in members[name]:
            if id(agent) in duplicates:
                continue
            spec, problems = resolve_agent(fleet, agent)
            issues.extend(problems)
            if spec is not None:
                specs.append(spec)
        total = sum((s.daily_cap for s in specs), Decimal("0.00"))
        if total > fleet.daily_total:
            issues.append(
                fleet.origin.issue(
                    "spec.dailyBudgetTotal",
                    f"agents' daily caps sum to {_money(total)} {fleet.currency}, "
                    f"{_money(total - fleet.daily_total)} over dailyBudgetTotal {_money(fleet.daily_total)}",
                )
            )
        resolved.append(
            FleetSpec(
                name=fleet.name,
                currency=fleet.currency,
                daily_total=fleet.daily_total,
                funding_ceiling=fleet.funding_ceiling,
                agents=tuple(specs),
                source=Source(fleet.origin.file, fleet.origin.line),
                rebalancing=_rebalance_settings(fleet.rebalancing),
                daily_funding_limit=fleet.funding_daily_limit,
                approval=fleet.approval,
                metric_labels=fleet.metric_labels,
            )
        )

    unique = list(dict.fromkeys(issues))
    return Resolution(DesiredState(tuple(resolved)), tuple(unique))


def _rebalance_settings(decl: RebalanceDecl | None) -> RebalanceSettings | None:
    if decl is None:
        return None
    return RebalanceSettings(
        enabled=decl.enabled,
        interval_seconds=decl.interval_seconds,
        donor_below=Decimal(decl.donor_below) / 100,
        receiver_above=Decimal(decl.receiver_above) / 100,
        share=Decimal(decl.share) / 100,
    )
