"""One observe → plan step, shared by the CLI and the daemon so both decide identically.

Everything finops remembers (``Memory``) is gathered here from the state store, and signing
secrets are resolved to fingerprints (read-only: a secret finops will generate is created at
apply, not at plan).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from controller.gateway.client import GatewayClient
from controller.io.blocking import off_loop
from controller.io.secretfile import why_not_writable
from controller.io.secretref import (
    SecretRefused,
    SecretUnavailable,
    check_secret_ref,
    managed_secret_dir,
    resolve_secret,
    secret_fingerprint,
)
from controller.keys.sinks import KeySink, sink_for
from controller.keys.vault import KeyStore
from controller.observation.store import SharedRead
from controller.reconcile.apply import configured_settle_seconds
from controller.reconcile.observe import observe
from controller.state import PENDING, Adjustment, StateStore
from policies.alerts import redact_url
from policies.escalation import OPEN
from policies.live import LiveFleet
from policies.plan_types import ChangeKind, Plan, PlanError, PlanErrorKind
from policies.planner import Memory, make_plan
from policies.spec import DesiredState, SecretRef


def secret_fingerprints(desired: DesiredState, state_path: Path) -> dict[SecretRef, str | None]:
    return resolve_webhook_secrets(desired, state_path)[0]


def resolve_webhook_secrets(
    desired: DesiredState, state_path: Path
) -> tuple[dict[SecretRef, str | None], dict[SecretRef, str]]:
    """Each webhook secret's fingerprint (``None``: finops will generate it at apply), and
    the secrets apply could not use, with why: checked at plan time so a bad secret (a
    directory, an unreadable file, an unset variable) never fails after other writes. A
    reference that names finops' own key material (or a sink directory) is refused here,
    before any write (``SecretRefused``)."""
    refs = {hook.secret for spec in desired.agents() for hook in spec.gateway_webhooks}
    sinks = [Path(spec.keys.sink.path) for spec in desired.agents() if spec.keys.sink.path]
    for route in {r for spec in desired.agents() for r in spec.alert_routes}:
        problem = check_secret_ref(route.secret, protected=sinks)
        if problem is not None:
            raise SecretRefused(f"{problem} (alert route {redact_url(route.url)})")
    managed_dir = managed_secret_dir(state_path)
    out: dict[SecretRef, str | None] = {}
    problems: dict[SecretRef, str] = {}
    for ref in refs:
        try:
            out[ref] = secret_fingerprint(resolve_secret(ref, create=False, managed_dir=managed_dir, protected=sinks))
        except SecretRefused:
            raise
        except SecretUnavailable as exc:
            out[ref] = None
            if ref.managed is not None:
                blocker = _cannot_create(managed_dir / f"{ref.managed}.secret")
                if blocker:
                    problems[ref] = f"signing secret: cannot generate {ref.describe()}: {blocker}"
            elif ref.file and ref.generate and not os.path.lexists(ref.file):
                blocker = _cannot_create(Path(ref.file))
                if blocker:
                    problems[ref] = f"signing secret: cannot generate {ref.file}: {blocker}"
            else:
                problems[ref] = str(exc)
    return out, problems


def _cannot_create(path: Path) -> str | None:
    """Why a file could not be created at ``path`` (its nearest existing ancestor must be a
    writable directory), or ``None``."""
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def build_memory(
    store: StateStore, desired: DesiredState, *, adjustments: Mapping[str, Adjustment] | None = None
) -> Memory:
    """What finops remembers, from the state store; ``adjustments`` replaces the stored
    rebalancing adjustments (the rebalancer plans its proposal before storing it)."""
    fingerprints, problems = resolve_webhook_secrets(desired, store.path)
    return Memory(
        budget_writes=store.budget_writes(),
        holds=store.holds(),
        managed_webhooks=store.managed_webhooks(),
        secret_fingerprints=fingerprints,
        secret_problems=problems,
        key_prefixes=store.key_prefixes(),
        adjustments=store.adjustments() if adjustments is None else adjustments,
        unresolved=tuple(store.intents(status=PENDING)),
        last_deposits=store.last_deposit_ids(),
        settle_seconds=configured_settle_seconds(),
        funding_events=tuple(store.funding_events()),
        approved_exposure=approved.exposure_after if (approved := store.last_approval()) is not None else None,
        escalations=tuple(store.escalations(statuses=OPEN)),
    )


async def observe_and_plan(
    client: GatewayClient,
    desired: DesiredState,
    target: str,
    store: StateStore,
    *,
    prune: bool = False,
    adjustments: Mapping[str, Adjustment] | None = None,
    observed: Callable[[LiveFleet, float], None] | None = None,
    shared: SharedRead | None = None,
) -> Plan:
    """``observed(live, now)`` is told the observation (the daemon's per-agent metrics).
    ``shared``: read through the daemon's observation store; agents with an unresolved
    intent (an unknown outcome) or a hold are read authoritatively all the same."""
    now = store.now()  # one clock for the funding window: the one its events are stamped with
    if shared is not None:
        shared = shared.with_authoritative([*store.holds(), *(i.agent_id for i in store.intents(status=PENDING))])
    live = await observe(
        client, desired, target=target, webhooks_owned=bool(store.managed_webhooks()), now=now, shared=shared
    )
    if observed is not None:
        observed(live, now)
    memory = build_memory(store, desired, adjustments=adjustments)
    # Pure, but CPU-bound (seconds at 10,000 agents): on a thread, so the daemon's other jobs
    # (the alerts job delivering a crossing) keep their turns on the event loop meanwhile.
    plan = await off_loop(make_plan, desired, live, memory, prune=prune, now=datetime.fromtimestamp(now, UTC))
    if store.location.shared and (local := machine_local_secrets(desired)):
        plan = dataclasses.replace(plan, warnings=(*plan.warnings, shared_state_secret_warning(local)))
    return plan


def machine_local_secrets(desired: DesiredState) -> list[str]:
    """Alert signing secrets that finops generates into a file when it is missing: on
    several machines sharing one state, each would generate its own (receivers would see
    alerts signed with another secret after a failover)."""
    found = {
        route.secret.file
        for agent in desired.agents()
        for route in agent.alert_routes
        if route.secret.generate and route.secret.file and route.secret.managed is None
    }
    return sorted(f for f in found if f)


def shared_state_secret_warning(files: list[str]) -> str:
    return (
        "the state is shared (--state-url) but alert signing secrets are generated per machine ("
        + ", ".join(files)
        + "): every machine that finds the file missing generates its own, so receivers would reject alerts "
        "after a failover; give every machine the same file (a mounted secret) or use {env: NAME}"
    )


def key_sinks(desired: DesiredState, vault: KeyStore) -> Callable[[str], KeySink | None]:
    """Each managed agent's declared sink (manifest ``keys.sink``), for ``Applier`` to hand a
    newly registered agent's key to, after it is safe in finops' key store."""
    specs = {a.agent_id: a for a in desired.agents()}

    def lookup(agent: str) -> KeySink | None:
        spec = specs.get(agent)
        return sink_for(spec.keys.sink, vault) if spec is not None and spec.keys.manage else None

    return lookup


def preflight(plan: Plan, desired: DesiredState, key_store: KeyStore) -> Plan:
    """Checks on finops' own side, after planning and before the first write.

    The gateway shows a new agent's key exactly once, in the register response: if finops'
    key store (or the agent's ``directory`` sink) cannot be written, registering would lose
    that key for good. Such agents are taken out of the plan (all their changes) and
    reported as errors; every other agent is applied as planned. With the database key
    store, a ``directory`` sink without a path delivers to ``key_store.sink_directory``
    (the store has no files), which is checked like any sink directory."""
    registering = sorted({c.agent_id for c in plan.changes if c.kind is ChangeKind.REGISTER})
    if not registering:
        return plan
    specs = {a.agent_id: a for a in desired.agents()}
    held_back: dict[str, str] = {}
    store_problem = key_store.unwritable()
    default_sink: str | None = None
    for agent in registering:
        spec = specs.get(agent)
        sink = spec.keys.sink if spec is not None else None
        sink_problem = None
        if sink and sink.kind == "directory" and sink.path:
            sink_problem = _not_writable(Path(sink.path))
            if sink_problem:
                sink_problem = f"key sink directory {sink.path}: {sink_problem}"
        elif spec is not None and spec.keys.manage and sink is not None and sink.kind == "directory":
            # The database store is not the agent's key file: the default sink writes a copy.
            if default_sink is None and key_store.key_file(agent) is None:
                problem = _not_writable(key_store.sink_directory)
                default_sink = f"key sink directory {key_store.sink_directory}: {problem}" if problem else ""
            sink_problem = default_sink or None
        if store_problem:
            held_back[agent] = store_problem
        elif sink_problem:
            held_back[agent] = sink_problem
    if not held_back:
        return plan
    return replace(
        plan,
        changes=tuple(c for c in plan.changes if c.agent_id not in held_back),
        errors=(
            *plan.errors,
            *(
                PlanError(
                    agent,
                    PlanErrorKind.NOT_REGISTERED,
                    f"{why}; the gateway shows a new agent's key only once, so registering now would lose it",
                )
                for agent, why in sorted(held_back.items())
            ),
        ),
    )


def _not_writable(directory: Path) -> str | None:
    """Why a key file could not be written in ``directory`` (created 0700 if missing)."""
    return why_not_writable(directory)
