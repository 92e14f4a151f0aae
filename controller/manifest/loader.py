"""Loading a manifest directory into the resolved desired state.

The imperative shell around ``policies.tiers``: find files, read them safely, check each
document's shape, point every problem at a file, line and field, then hand plain
declarations to the pure resolver. Every problem is collected before raising, so one run of
``finops validate`` shows the whole list instead of one error per commit.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from yaml.nodes import ScalarNode

from controller.errors import ManifestError, ManifestIssue
from controller.io import safefile
from controller.manifest import keyscan
from controller.manifest.messages import allowed_fields, message_for, show
from controller.manifest.nodes import Document, Loc, dotted, line_of, locate, parse_yaml
from controller.manifest.paths import anchor_relative_paths
from controller.manifest.schema import (
    API_VERSION,
    KINDS,
    MODEL_BY_KIND,
    Agent,
    AgentGroupManifest,
    AlertRoute,
    Anomaly,
    Approval,
    EscalationStep,
    FleetManifest,
    Keys,
    KeySink,
    RebalanceBounds,
    Rebalancing,
    SecretRef,
    kind_of,
    span_seconds,
)
from policies.spec import AnomalySpec, ApprovalPolicy, DesiredState, EscalationRule, KeySinkSpec
from policies.spec import SecretRef as SecretRefSpec
from policies.tiers import (
    AgentDecl,
    BoundsDecl,
    FleetDecl,
    FundingDecl,
    GroupDecl,
    KeysDecl,
    Origin,
    RebalanceDecl,
    RouteDecl,
    TierDecl,
    WebhookDecl,
    did_you_mean,
    resolve,
)

#: Far above any real fleet manifest; the cap bounds memory and time for hostile input.
MAX_FILE_BYTES = 1024 * 1024
_TOO_LARGE = "file is larger than the 1 MiB limit for manifests; split it into several files"
SUFFIXES = (".yaml", ".yml")
#: How much of an oversized manifest is still scanned for pasted API keys (time and memory
#: stay bounded whatever the file's size).
KEY_SCAN_BYTES = 64 * 1024 * 1024

_FUNDING_FIELDS = ("funding", "funding.floor", "funding.target")


@dataclass
class _Collected:
    """What all files declared so far, ready for the resolver."""

    fleets: list[FleetDecl] = field(default_factory=list)
    groups: list[GroupDecl] = field(default_factory=list)
    unchecked_fleets: set[str] = field(default_factory=set)
    complete: bool = True
    documents: int = 0
    issues: list[ManifestIssue] = field(default_factory=list)


def load_manifests(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> DesiredState:
    """Read, validate and resolve the manifests at ``path`` (a directory or one file).

    With ``state_dir`` (every command that acts on a gateway), relative secret files and
    sink directories are made absolute under it (``controller.manifest.paths``); without it
    (``validate``, offline) they stay as written.

    File names in errors are ``path`` joined with the file's place under it, so a relative
    ``path`` gives paths relative to the working directory, as the user typed them.
    Symbolic links are followed only while they stay inside ``root`` (default: ``path``
    itself when it is a directory; the repository checkout for a git source); one that
    leads elsewhere is an error, never a silent skip.
    Raises :class:`ManifestError` listing every problem found.
    """
    files, walk_issues = manifest_files(path, root=root)
    seen = _Collected()
    if walk_issues:
        seen.complete = False
        seen.issues.extend(walk_issues)
    base = _containment_root(path, root)
    for label, file in files:
        _load_file(label, file, base, seen)
    if seen.documents == 0 and not seen.issues:
        raise ManifestError(
            [ManifestIssue(os.fspath(path), None, "", f"no manifests found in {os.fspath(path)} (all files are empty)")]
        )

    resolution = resolve(
        seen.fleets, seen.groups, unchecked_fleets=frozenset(seen.unchecked_fleets), complete=seen.complete
    )
    issues = seen.issues + list(resolution.issues)
    if issues:
        raise ManifestError(_ordered(issues, [label for label, _ in files]))
    if state_dir is not None:
        return anchor_relative_paths(resolution.state, Path(state_dir))
    return resolution.state


def _containment_root(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str | None:
    """Where symlinks must stay: ``root`` if given, else the manifest directory (a single
    file named on the command line is read wherever it is, but must be a regular file)."""
    if root is not None:
        return os.path.realpath(root)
    return os.path.realpath(path) if os.path.isdir(path) else None


def manifest_files(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> tuple[list[tuple[str, Path]], list[ManifestIssue]]:
    """The files to read, sorted, with the label to show for each, and the problems found
    while looking (links leading outside the root, a directory reached twice).

    Hidden files and directories (``.git``) are skipped, as are files without a YAML suffix.
    A symlinked directory inside the root is followed; one outside is reported. Nothing is
    opened here: only ``stat``, so a FIFO or device found by name is refused when read.
    """
    given = os.fspath(path)
    root_path = Path(path)
    if not os.path.lexists(root_path):
        raise ManifestError([ManifestIssue(given, None, "", "no such file or directory")])
    base = _containment_root(path, root)
    if base is not None and not safefile.inside(root_path, base):
        raise ManifestError([ManifestIssue(given, None, "", _outside(base, root_path))])
    try:
        mode = os.stat(root_path).st_mode
    except OSError as exc:
        raise ManifestError([ManifestIssue(given, None, "", _unreadable(exc))]) from None
    if stat.S_ISREG(mode):
        return [(given, root_path)], []
    if not stat.S_ISDIR(mode):
        kind = safefile.kind_of_mode(mode)
        raise ManifestError([ManifestIssue(given, None, "", f"is {kind}, not a manifest file or directory")])
    assert base is not None
    found: list[tuple[str, Path]] = []
    issues: list[ManifestIssue] = []
    visited = {os.path.realpath(root_path)}
    pending = [root_path]
    links: list[Path] = []
    # Real directories first, symlinked ones after: a link to a directory that is read anyway
    # is then the one reported, whatever the names sort like.
    while pending or links:
        if not pending:
            link = links.pop(0)
            real = os.path.realpath(link)
            if real in visited:
                issues.append(
                    ManifestIssue(
                        str(link), None, "", f"symbolic link to a directory that is already read ({real}); remove it"
                    )
                )
                continue
            visited.add(real)
            pending.append(link)
            continue
        directory = pending.pop(0)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            issues.append(ManifestIssue(str(directory), None, "", _unreadable(exc)))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            item = Path(directory) / entry.name
            label = str(item)
            wanted = entry.name.lower().endswith(SUFFIXES)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                linked = entry.is_symlink()
            except OSError:
                is_dir, linked = False, False
            if linked and (is_dir or wanted) and not safefile.inside(item, base):
                issues.append(ManifestIssue(label, None, "", _outside(base, item)))
            elif is_dir and linked:
                links.append(item)
            elif is_dir:
                visited.add(os.path.realpath(item))
                pending.append(item)
            elif wanted:
                found.append((label, item))
    if not found and not issues:
        raise ManifestError(
            [ManifestIssue(given, None, "", f"no manifests found in {given} (looked for *.yaml and *.yml files)")]
        )
    return sorted(found, key=lambda item: item[1].relative_to(root_path).parts), issues


def _outside(base: str, item: Path) -> str:
    return (
        f"symbolic link leads outside {base} (to {os.path.realpath(item)}); "
        "links are followed only while they stay inside the manifests"
    )


def _unreadable(exc: OSError) -> str:
    return f"cannot read: {exc.strerror or exc}"


def _read_text(label: str, file: Path, root: str | None, seen: _Collected) -> str | None:
    """The file's text, or ``None`` after reporting why it cannot be used.

    Only regular files are read (a FIFO, device or directory is refused without blocking),
    at most ``MAX_FILE_BYTES + 1`` bytes of them. A file refused for its size or encoding is
    still scanned for API keys (up to ``KEY_SCAN_BYTES``): it is about to be committed
    either way.
    """

    def fail(raw: bytes, line: int | None, message: str) -> None:
        seen.complete = False
        seen.issues.append(ManifestIssue(label, line, "", message))
        _scan_for_keys(label, raw.decode("utf-8", "replace"), [], seen)

    try:
        raw = safefile.read_bounded(file, MAX_FILE_BYTES, root=root)
    except safefile.TooLarge:
        seen.complete = False
        seen.issues.append(ManifestIssue(label, None, "", _TOO_LARGE))
        # Scanned in bounded chunks: a key past the first MiB is still a key.
        try:
            chunks = safefile.iter_chunks(file, KEY_SCAN_BYTES, root=root)
            for line in keyscan.key_lines_in_chunks(chunks):
                seen.issues.append(ManifestIssue(label, line, "", keyscan.KEY_MESSAGE))
        except OSError:
            pass  # replaced while being read; the size error above already refuses it
        return None
    except safefile.UnsafeFile as exc:
        seen.complete = False
        seen.issues.append(ManifestIssue(label, None, "", _refusal(exc)))
        return None
    except OSError as exc:
        seen.complete = False
        seen.issues.append(ManifestIssue(label, None, "", f"cannot read file: {exc.strerror or exc}"))
        return None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        fail(raw, 1, "file is encoded as UTF-16; save it as UTF-8")
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        fail(raw, raw.count(b"\n", 0, exc.start) + 1, "file is not valid UTF-8")
        return None


def _refusal(exc: safefile.UnsafeFile) -> str:
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP):
        return f"cannot read file: {exc.reason}"
    if exc.reason.startswith("is "):
        return f"{exc.reason}; manifests are read only from regular files"
    return exc.reason


def _load_file(label: str, file: Path, root: str | None, seen: _Collected) -> None:
    text = _read_text(label, file, root, seen)
    if text is None:
        return
    parsed = parse_yaml(text)
    seen.complete = seen.complete and parsed.complete
    for problem in parsed.problems:
        seen.issues.append(ManifestIssue(label, problem.line, dotted(problem.loc), problem.message))
    _scan_for_keys(label, text, parsed.documents, seen)
    for doc in parsed.documents:
        seen.documents += 1
        if doc.usable:
            _load_document(label, doc, seen)
        else:
            _not_resolved(doc.data, seen)


def _scan_for_keys(label: str, text: str, documents: Sequence[Document], seen: _Collected) -> None:
    """Keys in the raw text (comments included), and keys that only appear once YAML has
    decoded a value (``"a2a_free_\\x66…"`` escapes, a double-quoted string continued on the
    next line)."""
    lines = keyscan.key_lines(text)
    for line in lines:
        seen.issues.append(ManifestIssue(label, line, _key_field(documents, line), keyscan.KEY_MESSAGE))
    for doc in documents:
        for loc, node in doc.scalars:
            first, last = line_of(node), _last_line(node)
            if keyscan.looks_like_key(str(node.value)) and not any(first <= n <= last for n in lines):
                seen.issues.append(ManifestIssue(label, first, dotted(loc), keyscan.KEY_MESSAGE))


def _key_field(documents: Sequence[Document], line: int) -> str:
    """The field holding a key-shaped string on ``line``; empty for comments and broken files."""
    for doc in documents:
        for loc, node in doc.scalars:
            first, last = line_of(node), _last_line(node)
            if first <= line <= last and keyscan.looks_like_key(str(node.value)):
                return dotted(loc)
    return ""


def _last_line(node: ScalarNode) -> int:
    """1-based last line of a scalar; a block scalar's end mark sits at column 0 of the next line."""
    end = node.end_mark
    return int(end.line) + (1 if end.column > 0 else 0) if end.line > node.start_mark.line else line_of(node)


def _load_document(label: str, doc: Document, seen: _Collected) -> None:
    """Check one document's identity and shape, then turn it into a declaration."""

    def report(loc: Loc, message: str) -> None:
        seen.issues.append(ManifestIssue(label, locate(doc.root, loc)[0], dotted(loc), message))

    data = doc.data
    if not isinstance(data, dict):
        report(
            (), f"a manifest document must be a mapping with apiVersion, kind, metadata and spec; got {kind_of(data)}"
        )
        _not_resolved(data, seen)
        return
    api_version = data.get("apiVersion")
    kind = data.get("kind")
    model = MODEL_BY_KIND.get(kind) if isinstance(kind, str) else None
    if api_version != API_VERSION:
        if api_version is None:
            report(("apiVersion",), f"required field is missing (expected apiVersion: {API_VERSION})")
        else:
            report(("apiVersion",), f"unsupported apiVersion {show(api_version)}; expected '{API_VERSION}'")
        _not_resolved(data, seen)
        return
    if model is None:
        valid = ", ".join(KINDS)
        if kind is None:
            report(("kind",), f"required field is missing (expected one of: {valid})")
        else:
            hint = did_you_mean(str(kind), KINDS)
            suggestion = f"; did you mean '{hint}'?" if hint else ""
            report(("kind",), f"unknown kind {show(kind)}{suggestion} (expected one of: {valid})")
        _not_resolved(data, seen)
        return

    try:
        manifest = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        misspelt, merged = _explained_gaps(model, errors)
        for error in errors:
            loc = tuple(part for part in error["loc"] if part != "[key]")
            if error["type"] == "missing" and (loc in misspelt or loc[:-1] in merged):
                continue  # the unknown-field error next to it already says why it is missing
            report(loc, message_for(model, error))
        _not_resolved(data, seen)
        return

    if isinstance(manifest, FleetManifest):
        seen.fleets.append(_fleet_decl(label, doc, manifest))
    elif isinstance(manifest, AgentGroupManifest):
        seen.groups.append(_group_decl(label, doc, manifest))


def _explained_gaps(model: type[BaseModel], errors: Sequence[ErrorDetails]) -> tuple[set[Loc], set[Loc]]:
    """Missing fields that another error already explains: the fields misspelt next to them
    (``dailycap`` for ``dailyCap``), and the mappings whose fields came from a refused
    ``<<`` merge key."""
    misspelt: set[Loc] = set()
    merged: set[Loc] = set()
    for error in errors:
        if error["type"] != "extra_forbidden" or not error["loc"]:
            continue
        parent, name = tuple(error["loc"][:-1]), str(error["loc"][-1])
        if name == "<<":
            merged.add(parent)
            continue
        hint = did_you_mean(name, allowed_fields(model, parent))
        if hint is not None:
            misspelt.add((*parent, hint))
    return misspelt, merged


def _not_resolved(data: object, seen: _Collected) -> None:
    """Record that a document will not take part in resolution.

    If it may declare a fleet, an AgentGroup naming that fleet must not also be reported as
    pointing at an unknown fleet: the user would chase a second error that is not real.
    """
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "AgentGroup":
        return
    metadata = data.get("metadata") if isinstance(data, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if kind == "Fleet" and isinstance(name, str):
        seen.unchecked_fleets.add(name)
    else:
        seen.complete = False  # could have been any fleet


def _origin(label: str, doc: Document, base: Loc, rels: Sequence[str], anchor: Loc | None = None) -> Origin:
    """Pre-compute the lines the resolver may need to point at, for a declaration at ``base``."""
    line, _ = locate(doc.root, anchor if anchor is not None else base)
    lines: dict[str, int] = {}
    for rel in rels:
        rel_line, found = locate(doc.root, (*base, *rel.split(".")))
        if found:
            lines[rel] = rel_line
    return Origin(label, dotted(base), line, lines)


def _secret(ref: SecretRef | None) -> SecretRefSpec | None:
    return None if ref is None else SecretRefSpec(env=ref.env, file=ref.file, generate=ref.generate)


def _routes(routes: Sequence[AlertRoute], rel: str) -> tuple[RouteDecl, ...]:
    return tuple(
        RouteDecl(
            url=r.url,
            thresholds=tuple(r.thresholds) if r.thresholds is not None else None,
            events=tuple(r.events),
            secret=_secret(r.signing_secret),
            rel=f"{rel}[{i}]",
        )
        for i, r in enumerate(routes)
    )


def _ladder(steps: Sequence[EscalationStep]) -> tuple[EscalationRule, ...]:
    """As written; the resolver fills in the release defaults (pause: auto, freeze: manual)."""
    return tuple(EscalationRule(s.threshold, s.window, s.action, s.release or "") for s in steps)


def _ladder_lines(base: Loc, rel: str, count: int) -> list[tuple[str, Loc]]:
    out: list[tuple[str, Loc]] = []
    for i in range(count):
        out.append((f"{rel}[{i}].threshold", (*base, *rel.split("."), i, "threshold")))
    return out


def _route_lines(doc: Document, base: Loc, rel: str, count: int) -> list[tuple[str, Loc]]:
    """Lines of each route's fields, keyed the way ``RouteDecl.rel`` names them."""
    out: list[tuple[str, Loc]] = []
    for i in range(count):
        for sub in ("url", "thresholds", "signingSecret"):
            out.append((f"{rel}[{i}].{sub}", (*base, *rel.split("."), i, sub)))
        out.append((f"{rel}[{i}]", (*base, *rel.split("."), i)))
    return out


def _bounds(bounds: RebalanceBounds | None) -> BoundsDecl:
    return BoundsDecl() if bounds is None else BoundsDecl(bounds.min_daily_cap, bounds.max_daily_cap)


def _rebalancing(policy: Rebalancing | None) -> RebalanceDecl | None:
    if policy is None:
        return None
    unit = {"s": 1, "m": 60, "h": 3600}[policy.interval[-1]]
    return RebalanceDecl(
        enabled=policy.enabled,
        interval_seconds=int(policy.interval[:-1]) * unit,
        donor_below=policy.donor_below_percent,
        receiver_above=policy.receiver_above_percent,
        share=policy.share_percent,
        min_percent=policy.min_daily_cap_percent,
        max_percent=policy.max_daily_cap_percent,
    )


def _horizon(text: str | None) -> int | None:
    return None if text is None else span_seconds(text)


def _anomaly(rule: Anomaly | None) -> AnomalySpec | None:
    if rule is None:
        return None
    return AnomalySpec(span_seconds(rule.window), span_seconds(rule.baseline), rule.multiple, rule.min_spend)


def _approval(approval: Approval) -> ApprovalPolicy:
    bound = approval.max_unattended_increase
    return ApprovalPolicy(bound.daily_caps, bound.monthly_caps, bound.funding, bound.agents)


def _sink(sink: KeySink | None) -> KeySinkSpec | None:
    if sink is None:
        return None
    if sink.command is not None:
        return KeySinkSpec(kind="command", command=tuple(sink.command))
    return KeySinkSpec(kind="directory", path=sink.directory)


def _keys(keys: Keys | None) -> KeysDecl:
    if keys is None:
        return KeysDecl()
    return KeysDecl(
        manage=keys.manage,
        scopes=tuple(keys.scopes) if keys.scopes is not None else None,
        rotation=keys.rotation,
        sink=_sink(keys.sink),
    )


def _agent_decls(label: str, doc: Document, agents: Sequence[Agent]) -> tuple[AgentDecl, ...]:
    rels = ("id", "tier", "dailyCap", "monthlyCap", *_FUNDING_FIELDS, "rebalance.minDailyCap", "rebalance.maxDailyCap")
    decls = []
    for i, agent in enumerate(agents):
        base: Loc = ("spec", "agents", i)
        own_routes = agent.alerts.routes if agent.alerts is not None else None
        origin = _origin(label, doc, base, rels)
        if own_routes:
            origin = _with_lines(origin, doc, _route_lines(doc, base, "alerts.routes", len(own_routes)))
        own_ladder = agent.alerts.escalation if agent.alerts is not None else None
        if own_ladder:
            origin = _with_lines(origin, doc, _ladder_lines(base, "alerts.escalation", len(own_ladder)))
        thresholds = agent.alerts.thresholds if agent.alerts is not None else None
        decls.append(
            AgentDecl(
                agent_id=agent.id,
                tier=agent.tier,
                daily_cap=agent.daily_cap,
                monthly_cap=agent.monthly_cap,
                funding=FundingDecl(agent.funding.floor, agent.funding.target, agent.funding.max_unexplained_per_day),
                thresholds=tuple(thresholds) if thresholds is not None else None,
                labels=dict(agent.labels),
                origin=origin,
                routes=_routes(own_routes, "alerts.routes") if own_routes is not None else None,
                keys=_keys(agent.keys),
                bounds=_bounds(agent.rebalance),
                escalation=_ladder(own_ladder) if own_ladder is not None else None,
                forecast_horizon=_horizon(agent.alerts.forecast_horizon) if agent.alerts is not None else None,
                anomaly=_anomaly(agent.alerts.anomaly) if agent.alerts is not None else None,
            )
        )
    return tuple(decls)


def _with_lines(origin: Origin, doc: Document, extra: Sequence[tuple[str, Loc]]) -> Origin:
    """``origin`` knowing the lines of ``extra`` fields; a field that was not written maps to
    the nearest enclosing block (a route without ``signingSecret`` points at that route)."""
    lines = dict(origin.lines)
    for rel, loc in extra:
        lines[rel], _ = locate(doc.root, loc)
    return Origin(origin.file, origin.path, origin.line, lines)


def _fleet_decl(label: str, doc: Document, manifest: FleetManifest) -> FleetDecl:
    spec = manifest.spec
    tier_rels = ("dailyCap", "monthlyCap", *_FUNDING_FIELDS, "rebalance.minDailyCap", "rebalance.maxDailyCap")
    tiers = {
        name: TierDecl(
            name=name,
            daily_cap=tier.daily_cap,
            monthly_cap=tier.monthly_cap,
            funding=FundingDecl(tier.funding.floor, tier.funding.target, tier.funding.max_unexplained_per_day),
            origin=_origin(label, doc, ("spec", "tiers", name), tier_rels),
            bounds=_bounds(tier.rebalance),
        )
        for name, tier in spec.tiers.items()
    }
    fleet_rels = (
        "metadata.name",
        "spec.dailyBudgetTotal",
        "spec.defaults.funding.floor",
        "spec.defaults.funding.target",
    )
    alerts = spec.alerts
    hooks = alerts.gateway_webhooks
    origin = _origin(label, doc, (), fleet_rels, anchor=("metadata", "name"))
    origin = _with_lines(
        origin,
        doc,
        [
            *_route_lines(doc, (), "spec.alerts.routes", len(alerts.routes)),
            *_ladder_lines((), "spec.alerts.escalation", len(alerts.escalation)),
            ("spec.alerts.gatewayWebhooks.url", ("spec", "alerts", "gatewayWebhooks", "url")),
            ("spec.alerts.gatewayWebhooks.signingSecret", ("spec", "alerts", "gatewayWebhooks", "signingSecret")),
        ],
    )
    return FleetDecl(
        routes=_routes(alerts.routes, "spec.alerts.routes"),
        signing_secret=_secret(alerts.signing_secret),
        allow_insecure=alerts.allow_insecure,
        gateway_webhooks=(
            WebhookDecl(
                hooks.enabled,
                hooks.url,
                tuple(hooks.events),
                _secret(hooks.signing_secret),
                allow_referenced_secret=hooks.allow_referenced_secret,
            )
            if hooks is not None
            else None
        ),
        keys=_keys(spec.keys),
        forecast_horizon=_horizon(alerts.forecast_horizon),
        anomaly=_anomaly(alerts.anomaly),
        rebalancing=_rebalancing(spec.rebalancing),
        approval=_approval(spec.approval),
        metric_labels=tuple(spec.metrics.labels),
        name=manifest.metadata.name,
        currency=spec.currency,
        daily_total=spec.daily_budget_total,
        funding_ceiling=spec.funding.per_run_ceiling,
        funding_daily_limit=spec.funding.daily_limit,
        tiers=tiers,
        agents=_agent_decls(label, doc, spec.agents),
        thresholds=tuple(spec.alerts.thresholds),
        escalation=_ladder(alerts.escalation),
        default_funding=FundingDecl(
            spec.defaults.funding.floor, spec.defaults.funding.target, spec.defaults.funding.max_unexplained_per_day
        ),
        default_labels=dict(spec.defaults.labels),
        origin=origin,
    )


def _group_decl(label: str, doc: Document, manifest: AgentGroupManifest) -> GroupDecl:
    return GroupDecl(
        name=manifest.metadata.name,
        fleet=manifest.spec.fleet,
        agents=_agent_decls(label, doc, manifest.spec.agents),
        origin=_origin(label, doc, (), ("metadata.name", "spec.fleet"), anchor=("metadata", "name")),
    )


def _ordered(issues: Sequence[ManifestIssue], labels: Sequence[str]) -> list[ManifestIssue]:
    """Redacted, de-duplicated, in file order then line order, so output reads like the files."""
    rank = {label: i for i, label in enumerate(labels)}
    cleaned = {
        ManifestIssue(keyscan.redact(i.file), i.line, keyscan.redact(i.field), keyscan.redact(i.message)): None
        for i in issues
    }
    return sorted(cleaned, key=lambda i: (rank.get(i.file, len(rank)), i.line or 0, i.field))
