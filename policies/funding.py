"""Funding floor/target: "when the balance is below the floor, top up to the target"."""

from __future__ import annotations

import hashlib
from decimal import Decimal

from policies.money import ZERO


def top_up_amount(balance: Decimal, floor: Decimal, target: Decimal) -> Decimal:
    """Credits to deposit now; zero unless the balance is strictly below the floor.

    Hysteresis between floor and target keeps a busy agent from being topped up by cents
    on every pass, and nothing is ever withdrawn: a balance above target is left alone.
    """
    if balance >= floor:
        return ZERO
    return max(ZERO, target - balance)


def deposit_idempotency_key(fleet: str, agent_id: str, ledger_anchor: str, amount: Decimal) -> str:
    """A deposit key that is stable for one funding decision and unique across decisions.

    The gateway's deposit key is one global namespace with no body check (API.md §9): a
    reused key silently moves no money. Anchoring it to the wallet's newest ledger row
    makes a retry or a re-run after a crash reuse the key (nothing changed in the ledger),
    while any later top-up, after spend or a deposit moved the ledger on, gets a new one.
    """
    digest = hashlib.sha256(f"{fleet}\x1f{agent_id}\x1f{ledger_anchor}\x1f{amount}".encode()).hexdigest()
    return f"finops-topup-{digest[:40]}"
