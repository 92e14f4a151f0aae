"""Crash consistency: the real ``finops apply`` process, SIGKILLed at exact points of its run.

The sandbox runs in this process; ``finops`` runs as a subprocess pointed at it
(``GREENHELIX_URL``, ``GREENHELIX_API_KEY_FILE``, ``FINOPS_STATE_DIR``). A sandbox-side
``Tripwire`` kills the process when the sandbox receives its N-th write (N seeded), either
letting that write run (the process died after sending it) or not (it died before). So a
kill lands at a chosen count of writes, inside or between agents, not after a racy delay.

After every kill, nothing may be funded twice; after the last, one clean apply must
converge exactly once (``assert_converged``), and every key lost to a crash between
register and storing it must be on record in finops' state.

``FINOPS_STRESS=1`` runs more kills on a larger fleet.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import httpx

from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.sandbox.app import exchange_rate
from controller.sandbox.faults import FaultConfig, FaultKind, Tripwire
from controller.sandbox.server import SandboxServer
from controller.sandbox.store import from_atomic, to_atomic
from controller.state import StateStore
from policies.currency import SIGNUP_BONUS_CREDITS, to_credits
from policies.spec import DesiredState
from tests.integration.test_faults import (
    assert_converged,
    finops_deposits,
    fresh_fleet_deposits,
    ledger_problems,
    write_generated_fleet,
)

STRESS = os.environ.get("FINOPS_STRESS") == "1"
AGENTS = 200 if STRESS else 50
KILLS = 15 if STRESS else 5
SEED = 20261129


class Finops:
    """``finops apply --auto-approve`` against one sandbox, from a fixed working directory."""

    def __init__(self, workdir: Path, sandbox: SandboxServer, manifests: Path) -> None:
        assert sandbox.admin_key_file is not None
        self.workdir = workdir
        self.manifests = manifests
        self.state_dir = workdir / "state"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}
        self.env |= {
            "GREENHELIX_URL": sandbox.url,
            "GREENHELIX_API_KEY_FILE": str(sandbox.admin_key_file),
            "FINOPS_STATE_DIR": str(self.state_dir),
            # The test waits for the sandbox to be idle after every kill (no request of a
            # dead process can still land), so an unknown outcome settles at once.
            "FINOPS_SETTLE_SECONDS": "0",
        }

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "apply", "--auto-approve", str(self.manifests)],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def state(self) -> StateStore:
        [path] = self.state_dir.glob("state-*.db")  # one per gateway; ours is the only one
        return StateStore(path)

    def sink(self) -> KeyVault:
        [path] = (self.state_dir / "secrets").iterdir()
        return KeyVault(path)


class Killer:
    """SIGKILLs a process whose pid it learns only once the tripwire is armed."""

    pid: int | None = None

    def __call__(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)


def pending_writes(sandbox: SandboxServer, desired: DesiredState, rate: Decimal) -> int:
    """A lower bound on the writes the next apply makes, read from the sandbox's own
    database: where to aim a kill so that it lands inside the run."""
    writes = 0
    for spec in desired.agents():
        wallet = sandbox.store.get_wallet(spec.agent_id)
        if wallet is None:
            writes += 2  # register and budget (and a top-up unless the bonus covers the floor)
            continue
        if from_atomic(wallet.balance) < to_credits(spec.funding_floor, rate):
            writes += 1
        cap = sandbox.store.get_budget_cap(spec.agent_id)
        if cap is None or cap.daily_cap is None or from_atomic(cap.daily_cap) != to_credits(spec.daily_cap, rate):
            writes += 1
    return writes


def drift(sandbox: SandboxServer, desired: DesiredState, rate: Decimal, rng: random.Random) -> list[str]:
    """Spend a few funded wallets below their floor (each then needs one more top-up) and
    loosen a few caps, over the admin API, so the next apply has work for a kill to cut."""
    funded = [
        s
        for s in desired.agents()
        if (w := sandbox.store.get_wallet(s.agent_id)) is not None
        and from_atomic(w.balance) == to_credits(s.funding_target, rate)
        and to_credits(s.funding_floor, rate) > SIGNUP_BONUS_CREDITS
    ]
    drained = rng.sample(funded, k=min(len(funded), max(3, len(desired.agents()) // 6)))
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as admin:
        for spec in drained:
            spend = to_credits(spec.funding_target, rate) - to_credits(spec.funding_floor, rate) + 1
            # Metered spend: a withdrawal would be unexplained outflow, which finops does not refund.
            charge = to_atomic(spend)
            sandbox.store.record_usage_and_charge(spec.agent_id, "best_match", charge, None, now=sandbox.clock())
        for spec in rng.sample(list(desired.agents()), k=3):
            admin.put(f"/v1/billing/wallets/{spec.agent_id}/budget", json={"daily_cap": None, "monthly_cap": None})
    return [s.agent_id for s in drained]


def at_most_once(sandbox: SandboxServer, desired: DesiredState, rate: Decimal, due: Mapping[str, int]) -> list[str]:
    """What must hold at every instant, even mid-run: no wallet holds more finops deposits
    than funding decisions were due, none is above its target, every ledger adds up."""
    problems = ledger_problems(sandbox, desired, missing_ok=True)
    for spec in desired.agents():
        if (ours := finops_deposits(sandbox, spec.agent_id)) > due[spec.agent_id]:
            problems.append(f"{spec.agent_id}: {ours} finops deposits, at most {due[spec.agent_id]} due")
        wallet = sandbox.store.get_wallet(spec.agent_id)
        ceiling = max(to_credits(spec.funding_target, rate), SIGNUP_BONUS_CREDITS)
        if wallet is not None and from_atomic(wallet.balance) > ceiling:
            problems.append(f"{spec.agent_id}: balance {from_atomic(wallet.balance)} above target {ceiling}")
    return problems


def test_sigkilled_applies_never_fund_twice_and_a_clean_apply_converges(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    desired = load_manifests(write_generated_fleet(tmp_path / "manifests", AGENTS))
    rate = exchange_rate("USD", "CREDITS")
    due = fresh_fleet_deposits(desired, {"swarm": rate})
    with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as sandbox:
        finops = Finops(tmp_path, sandbox, tmp_path / "manifests")
        kills: list[str] = []
        for round_ in range(KILLS):
            if pending_writes(sandbox, desired, rate) < 10:
                for agent in drift(sandbox, desired, rate, rng):
                    due[agent] += 1
            at = rng.randint(1, pending_writes(sandbox, desired, rate))
            commit = round_ % 2 == 0  # alternate: the tripping write runs, then not
            killer = Killer()
            tripwire = Tripwire(at, killer, commit=commit)
            sandbox.faults.arm(tripwire)  # armed before the process exists, so it cannot write first
            process = finops.start()
            killer.pid = process.pid
            output, _ = process.communicate(timeout=120)
            sandbox.faults.disarm()
            assert process.returncode == -signal.SIGKILL, f"round {round_}: not killed at write {at}:\n{output}"
            kills.append(f"write {at} ({tripwire.fired_on}, {'ran' if commit else 'never ran'})")
            sandbox.wait_idle()  # the dead process's last requests may still be running
            problems = at_most_once(sandbox, desired, rate, due)
            assert not problems, f"after kill {round_} at {kills[-1]}: {problems}"

        final = finops.start()
        output, _ = final.communicate(timeout=120)
        assert final.returncode == 0, output
        sandbox.wait_idle()
        state = finops.state()
        try:
            convergence = asyncio.run(
                assert_converged(sandbox, desired, state=state, sink=finops.sink(), expected_deposits=due)
            )
            on_record = {i.agent_id for i in state.intents(kind="register", status="failed")}
            assert convergence.lost_keys <= on_record, "a key lost to a crash is not on record"
            assert state.intents(status="pending") == []
        finally:
            state.close()
    assert len(kills) == KILLS, kills
    print("kills:", *kills, sep="\n  ")  # shown with -s or on failure


def test_a_sigkilled_apply_whose_deposits_are_still_held_never_funds_twice(tmp_path: Path) -> None:
    """The process dies while its deposits wait in a gateway queue (``late``, held at the
    gate). The next run must not deposit again before they are resolved: it waits, with
    the real settle time; once they land, a run finds them in the ledger. Those lost in the
    queue instead are re-sent, with the same keys, only once nothing can still be running."""
    desired = load_manifests(write_generated_fleet(tmp_path / "manifests", 6))
    rate = exchange_rate("USD", "CREDITS")
    due = fresh_fleet_deposits(desired, {"swarm": rate})
    funded = sorted(a for a, n in due.items() if n)
    faults = FaultConfig(rate=1.0, kinds=(FaultKind.LATE,), hang=60, only=("/deposit",))
    with SandboxServer(
        db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key", faults=faults
    ) as sandbox:
        sandbox.faults.gate_late(True)
        finops = Finops(tmp_path, sandbox, tmp_path / "manifests")
        finops.env.pop("FINOPS_SETTLE_SECONDS")  # the real settle time: nothing may settle in this test's seconds
        process = finops.start()
        deadline = time.monotonic() + 60
        while len(sandbox.faults.held_late()) < len(funded) and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for the sandbox's own state, not racing it
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
        assert len(sandbox.faults.held_late()) == len(funded)

        again = finops.start()  # inside the settle time: every deposit is withheld
        output, _ = again.communicate(timeout=120)
        assert again.returncode == 0, output
        assert "BLOCKED" in output and len(sandbox.faults.held_late()) == len(funded)
        assert all(finops_deposits(sandbox, a) == 0 for a in funded)

        held = sorted(sandbox.faults.held_late())
        landed = held[: len(held) // 2]
        for label in landed:
            sandbox.faults.release_late(run=True, only=label)
        sandbox.faults.release_late(run=False)  # the rest were lost in the queue
        sandbox.faults.gate_late(False)
        sandbox.faults.configure(None)
        sandbox.wait_idle()

        finops.env["FINOPS_SETTLE_SECONDS"] = "0"  # the sandbox is idle: nothing can still land
        final = finops.start()
        output, _ = final.communicate(timeout=120)
        assert final.returncode == 0, output
        sandbox.wait_idle()
        state = finops.state()
        try:
            asyncio.run(assert_converged(sandbox, desired, state=state, sink=finops.sink(), expected_deposits=due))
            assert state.intents(status="pending") == []
        finally:
            state.close()
