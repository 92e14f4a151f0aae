"""One observe → plan step, shared by the CLI and the daemon so both decide identically.

Everything finops remembers (``Memory``) is gathered here from the state store, and signing
secrets are resolved to fingerprints (read-only: a secret finops will generate is created at
apply, not at plan).
"""

from __future__ import annotations

from collections.abc import Callable

from controller.gateway.client import GatewayClient
from controller.keys.sinks import KeySink, sink_for
from controller.keys.vault import KeyVault
from controller.observe import observe
from controller.plan import Memory, Plan, make_plan
from controller.secretref import SecretUnavailable, resolve_secret, secret_fingerprint
from controller.state import StateStore
from policies.spec import DesiredState, SecretRef


def secret_fingerprints(desired: DesiredState) -> dict[SecretRef, str | None]:
    refs = {hook.secret for spec in desired.agents() for hook in spec.gateway_webhooks}
    out: dict[SecretRef, str | None] = {}
    for ref in refs:
        try:
            out[ref] = secret_fingerprint(resolve_secret(ref, create=False))
        except SecretUnavailable:
            out[ref] = None
    return out


def build_memory(store: StateStore, desired: DesiredState) -> Memory:
    return Memory(
        budget_writes=store.budget_writes(),
        holds=store.holds(),
        managed_webhooks=store.managed_webhooks(),
        secret_fingerprints=secret_fingerprints(desired),
        key_prefixes=store.key_prefixes(),
        adjustments=store.adjustments(),
        approved_exposure=approved.exposure_after if (approved := store.last_approval()) is not None else None,
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
