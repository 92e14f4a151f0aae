"""One observe → plan step, shared by the CLI and the daemon so both decide identically.

Everything finops remembers (``Memory``) is gathered here from the state store, and signing
secrets are resolved to fingerprints (read-only: a secret finops will generate is created at
apply, not at plan).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from controller.gateway.client import GatewayClient
from controller.keys.sinks import KeySink, sink_for
from controller.keys.vault import KeyVault
from controller.observe import observe
from controller.plan import Memory, Plan, make_plan
from controller.secretref import (
    SecretRefused,
    SecretUnavailable,
    check_secret_ref,
    managed_secret_dir,
    resolve_secret,
    secret_fingerprint,
)
from controller.state import StateStore
from policies.alerts import redact_url
from policies.spec import DesiredState, SecretRef


def secret_fingerprints(desired: DesiredState, state_path: Path) -> dict[SecretRef, str | None]:
    """Fingerprints of the gateway webhooks' secrets, read-only. A reference that names
    finops' own key material (or a sink directory) is refused here, before any write."""
    refs = {hook.secret for spec in desired.agents() for hook in spec.gateway_webhooks}
    sinks = [Path(spec.keys.sink.path) for spec in desired.agents() if spec.keys.sink.path]
    for route in {r for spec in desired.agents() for r in spec.alert_routes}:
        problem = check_secret_ref(route.secret, protected=sinks)
        if problem is not None:
            raise SecretRefused(f"{problem} (alert route {redact_url(route.url)})")
    out: dict[SecretRef, str | None] = {}
    for ref in refs:
        try:
            value = resolve_secret(ref, create=False, managed_dir=managed_secret_dir(state_path), protected=sinks)
        except SecretRefused:
            raise
        except SecretUnavailable:
            out[ref] = None
        else:
            out[ref] = secret_fingerprint(value)
    return out


def build_memory(store: StateStore, desired: DesiredState) -> Memory:
    return Memory(
        budget_writes=store.budget_writes(),
        holds=store.holds(),
        managed_webhooks=store.managed_webhooks(),
        secret_fingerprints=secret_fingerprints(desired, store.path),
        key_prefixes=store.key_prefixes(),
        adjustments=store.adjustments(),
    )


async def observe_and_plan(
    client: GatewayClient, desired: DesiredState, target: str, store: StateStore, *, prune: bool = False
) -> Plan:
    live = await observe(client, desired, target=target, webhooks_owned=bool(store.managed_webhooks()))
    return make_plan(desired, live, build_memory(store, desired), prune=prune)


def key_sinks(desired: DesiredState, vault: KeyVault) -> Callable[[str], KeySink | None]:
    """Each managed agent's declared sink (manifest ``keys.sink``), for ``Applier`` to hand a
    newly registered agent's key to, after it is safe in finops' key store."""
    specs = {a.agent_id: a for a in desired.agents()}

    def lookup(agent: str) -> KeySink | None:
        spec = specs.get(agent)
        return sink_for(spec.keys.sink, vault) if spec is not None and spec.keys.manage else None

    return lookup
