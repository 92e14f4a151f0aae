"""Shared fixtures: a real sandbox on 127.0.0.1, real HTTP, real SQLite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.apply import ApplyResult, FaultHook
from controller.reconcile.decide import observe_and_plan
from controller.reconcile.pipeline import applier_for, execute
from controller.sandbox.server import SandboxServer
from controller.sandbox.store import to_atomic
from controller.state import StateStore
from policies.plan_types import Plan
from policies.settle import SETTLE_SECONDS
from policies.spec import DesiredState

REPO = Path(__file__).resolve().parents[2]
CANONICAL = REPO / "manifests"


def run_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None, umask: int = 0o022
) -> subprocess.CompletedProcess[str]:
    """The real ``finops`` CLI in a subprocess, without the caller's gateway or finops
    environment (``env`` adds to it)."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GREENHELIX_", "FINOPS_")) and k != "GITHUB_STEP_SUMMARY"  # not the CI job's own
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        umask=umask,
        check=False,
    )


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests name relative paths (the generated alert-signing secret): keep them in tmp."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=tmp_path / "admin.key") as server:
        yield server


@pytest.fixture
def manifests_dir(tmp_path: Path) -> Path:
    """A private copy of the canonical fleet that a test may edit."""
    target = tmp_path / "manifests"
    shutil.copytree(CANONICAL, target)
    return target


class FinopsClock:
    """finops' clock in tests: real time plus an offset a test moves forward (to cross the
    settle time of an unknown outcome without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def past_settle(self) -> None:
        """Move past the settle time of every request sent so far."""
        self.advance(SETTLE_SECONDS + 1)


@dataclass
class Harness:
    """The controller's real parts wired to a sandbox, as the CLI wires them."""

    sandbox: SandboxServer
    store: StateStore
    sink: KeyVault
    clock: Callable[[], float] = field(default_factory=FinopsClock)
    notes: list[str] = field(default_factory=list)
    """What every ``prepare`` before a plan reported (the CLI prints these with the apply)."""

    def client(self, transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> GatewayClient:
        kw.setdefault("settle_delays", (0.0, 0.05, 0.2))
        kw.setdefault("backoff_initial", 0.01)
        kw.setdefault("backoff_max", 0.05)
        return GatewayClient(self.sandbox.url, self.sandbox.admin_key, transport=transport, **kw)

    desired: DesiredState | None = None
    """The desired state of the last ``plan``: ``apply`` delivers new keys to its sinks."""

    async def plan(self, desired: DesiredState, *, prune: bool = False, prepare: bool = True) -> Plan:
        """As ``finops apply`` plans: known outcomes resolved and marked webhooks adopted
        first (``Applier.prepare``), unless ``prepare=False`` (``finops plan``: read-only)."""
        self.desired = desired
        async with self.client() as client:
            if prepare:
                self.notes += await applier_for(client, self.store, self.sink, desired, clock=self.clock).prepare(
                    desired
                )
            return await observe_and_plan(client, desired, "sandbox", self.store, prune=prune)

    async def apply(
        self,
        plan: Plan,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        fault_hook: FaultHook | None = None,
    ) -> ApplyResult:
        """As ``finops apply`` applies (``pipeline.execute``): guardrails checked, new keys
        delivered to the sinks of the last planned desired state, the run in the apply log."""
        async with self.client(transport) as client:
            applier = applier_for(client, self.store, self.sink, self.desired, clock=self.clock, fault_hook=fault_hook)
            return await execute(applier, self.store, plan, clock=self.clock)

    def spend(self, agent: str, credits: Decimal) -> None:
        """Metered gateway spend (a ``charge`` row and the budget's usage), as an agent's
        paid tool calls make it. A withdrawal is not spend: finops flags it as unexplained
        outflow and does not refund it (``maxUnexplainedPerDay``)."""
        self.sandbox.store.record_usage_and_charge(
            agent, "best_match", to_atomic(credits), None, now=self.sandbox.clock()
        )

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.sandbox.url, headers={"Authorization": f"Bearer {self.sandbox.admin_key}"})

    def stats(self) -> dict[str, Any]:
        with self.admin() as http:
            data: dict[str, Any] = http.get("/_sandbox/stats").json()
            return data

    def reset_stats(self) -> None:
        with self.admin() as http:
            http.post("/_sandbox/stats/reset").raise_for_status()


def state_rows(store: StateStore) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every row of every table of finops' state database, on either backend (for scans
    that prove no key material was stored)."""
    db = store._db
    if db.dialect == "postgresql":
        query = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    else:
        query = "SELECT name FROM sqlite_master WHERE type='table'"
    for (table,) in db.execute(query).fetchall():
        for row in db.execute(f"SELECT * FROM {table}").fetchall():  # names come from the catalogue
            yield table, tuple(row)


@pytest.fixture
def harness(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Harness]:
    store = StateStore(tmp_path / "state" / "state-sandbox.db")
    yield Harness(sandbox, store, KeyVault(tmp_path / "secrets"))
    store.close()


@pytest.fixture
def canonical() -> DesiredState:
    return load_manifests(CANONICAL)
