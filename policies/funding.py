"""Funding floor/target: "when the balance is below the floor, top up to the target"."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from decimal import Decimal

from policies.currency import to_credits
from policies.money import ZERO
from policies.spec import AgentSpec

DEPOSIT_KEY_PREFIX = "finops-topup-"
"""Every deposit finops makes carries an ``Idempotency-Key`` with this prefix; the gateway
ledger therefore shows which rows are finops' own top-ups."""

NO_DEPOSIT_EPOCH = "none"
"""The funding epoch of a wallet on which finops never landed a deposit (new wallets too)."""


def top_up_amount(balance: Decimal, floor: Decimal, target: Decimal) -> Decimal:
    """Credits to deposit now; zero unless the balance is strictly below the floor.

    Hysteresis between floor and target keeps a busy agent from being topped up by cents
    on every pass, and nothing is ever withdrawn: a balance above target is left alone.
    """
    if balance >= floor:
        return ZERO
    return max(ZERO, target - balance)


def wanted_top_up(spec: AgentSpec, balance: Decimal, rate: Decimal) -> Decimal:
    """Credits an agent's declared floor and target call for at this balance (``rate``:
    credits per unit of the fleet currency). The one place "needs a top-up" is decided:
    observe reads the ledger exactly when this is positive, and the planner deposits it
    (bounded further by the funding window)."""
    return top_up_amount(balance, to_credits(spec.funding_floor, rate), to_credits(spec.funding_target, rate))


def needs_top_up(spec: AgentSpec, balance: Decimal, rate: Decimal) -> bool:
    return wanted_top_up(spec, balance, rate) > 0


def funding_epoch(last_deposit_ids: Iterable[int | None]) -> str:
    """The funding epoch of a wallet: the ledger id of finops' newest *landed* deposit to it
    (``NO_DEPOSIT_EPOCH`` if none), given every witness of it (the gateway ledger's newest
    finops-keyed row, finops' own record of its last landed deposit).

    Only a landed finops deposit starts a new epoch. Spend rows, the signup bonus landing,
    someone else's deposit, a deposit that never landed: none of them change it. So every
    decision within one epoch (a retry, a re-run after a crash or an unknown outcome, a
    re-plan after the balance moved) maps to one key, and the gateway lands at most one of
    them."""
    ids = [i for i in last_deposit_ids if i is not None]
    return str(max(ids)) if ids else NO_DEPOSIT_EPOCH


def deposit_idempotency_key(fleet: str, agent_id: str, epoch: str) -> str:
    """The deposit key of one funding epoch (see ``funding_epoch``).

    The gateway's deposit key is one global namespace with no body check (API.md §9): a
    reused key silently moves no money. The key deliberately leaves the amount out: if the
    amount is recomputed within an epoch (spend moved the balance), the key stays the same,
    so two decisions of one epoch can never both land. The cost of that is the safe side: a
    deposit of the epoch that already landed makes a re-sent one a no-op (under-funding
    until the next epoch, never over-funding).
    """
    digest = hashlib.sha256(f"{fleet}\x1f{agent_id}\x1f{epoch}".encode()).hexdigest()
    return f"{DEPOSIT_KEY_PREFIX}{digest[:40]}"
