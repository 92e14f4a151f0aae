"""The recovery registry: every kind of intent (a non-idempotent step recorded before it is
sent) and the one component that resolves it from the gateway after an interruption.

An intent of a kind nobody resolves would stay pending forever and block its agent
silently, so ``StateStore.begin_intent`` refuses a kind that is not in this table, and each
resolver takes exactly the pending intents of its own kinds (``kinds_resolved_by``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class IntentKind(StrEnum):
    """The value stored in ``intents.kind`` (the strings are the on-disk format)."""

    REGISTER = "register"
    DEPOSIT = "deposit"
    CREATE_WEBHOOK = "create_webhook"
    ROTATE = "rotate"


class Resolver(StrEnum):
    APPLY = "apply"
    """``controller.reconcile.apply.Applier.recover_intents``: ledger rows, wallets, webhooks."""
    KEYS = "keys"
    """``controller.keys.rotate.KeyManager.recover``: vault, live key list, orphans."""


RESOLVERS: Mapping[IntentKind, Resolver] = {
    IntentKind.REGISTER: Resolver.APPLY,
    IntentKind.DEPOSIT: Resolver.APPLY,
    IntentKind.CREATE_WEBHOOK: Resolver.APPLY,
    IntentKind.ROTATE: Resolver.KEYS,
}


class UnknownIntentKind(ValueError):
    """A step would be recorded that no component can resolve after a crash."""


def resolver_of(kind: str) -> Resolver | None:
    try:
        return RESOLVERS[IntentKind(kind)]
    except ValueError:
        return None


def kinds_resolved_by(resolver: Resolver) -> frozenset[str]:
    return frozenset(kind.value for kind, owner in RESOLVERS.items() if owner is resolver)


def check_kind(kind: str) -> IntentKind:
    """The kind, if some resolver owns it; else :class:`UnknownIntentKind`."""
    if resolver_of(kind) is None:
        raise UnknownIntentKind(f"intent kind {kind!r} has no resolver in controller.state.recovery")
    return IntentKind(kind)
