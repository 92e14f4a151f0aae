"""The controller against a sandbox that misbehaves on purpose (``controller.sandbox.faults``).

Each test applies a fleet while a seeded fraction of ``/v1`` requests fail (500, 503, 429,
hangs, resets, committed-then-dropped responses, late commits), re-applies until the plan
is empty, then checks the sandbox's own database with ``assert_converged``: every wallet
funded exactly once to its target, every ledger adding up to its balance, caps exact, a
clean plan empty and a converged re-apply free of writes.

``FINOPS_STRESS=1`` runs the generated fleet at 1,000 agents instead of 100 (CI's size,
which keeps this module within its minute on two shared cores); ``bench/chaos.py`` runs
longer and larger.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.gateway.errors import GatewayError, UnknownOutcome
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.apply import ApplyResult
from controller.sandbox.faults import ALL_KINDS, DEFAULT_KINDS, FaultConfig, FaultInjector, FaultKind, Tripwire
from controller.sandbox.server import ADMIN_AGENT_ID, SandboxServer
from controller.sandbox.store import from_atomic
from controller.state import StateStore
from policies.currency import SIGNUP_BONUS_CREDITS, to_credits
from policies.funding import top_up_amount
from policies.keyprint import key_prefix
from policies.plan_types import Plan
from policies.planner import desired_alert_threshold
from policies.spec import AgentSpec, DesiredState
from tests.integration.conftest import CANONICAL, FinopsClock, Harness

STRESS = os.environ.get("FINOPS_STRESS") == "1"
FINOPS_DEPOSIT_PREFIX = "finops-topup-"
CLIENT_TIMEOUT_S = 0.3
"""The harness client's timeout: short, so a ``hang`` costs a third of a second, not ten."""
LATE_S = 0.5
"""How long a ``late`` request is held: past the client's timeout and its ledger search."""
PROBE_TIMEOUT_S = 1.0
"""The single-request probes' timeout: roomy, so a slow box never fakes a fault."""
MAX_PASSES = 8


# --------------------------------------------------------------------------- the fault layer


def test_spec_strings_round_trip_and_nonsense_is_refused() -> None:
    config = FaultConfig.parse("seed=7, rate=0.2, kinds=500+503+429+hang+reset+drop, retry_after=1, hang=2.5")
    assert config == FaultConfig(seed=7, rate=0.2, kinds=DEFAULT_KINDS, retry_after=1.0, hang=2.5)
    assert FaultConfig.parse(config.to_spec()) == config
    assert FaultConfig.parse("rate=1,kinds=all").kinds == ALL_KINDS
    assert not FaultConfig.parse("off").enabled and not FaultConfig().enabled
    assert FaultConfig.from_env({"FINOPS_SANDBOX_FAULTS": "seed=3,rate=0.5"}) == FaultConfig(seed=3, rate=0.5)
    only = FaultConfig.parse("rate=1,only=/v1/register+POST /v1/infra")
    assert FaultConfig.parse(only.to_spec()) == only
    assert only.covers("POST", "/v1/register") and only.covers("POST", "/v1/infra/webhooks")
    assert not only.covers("GET", "/v1/infra/webhooks")
    for bad, message in [
        ("rate=2", "between 0 and 1"),
        ("rate=0.1,kinds=500+teapot", "unknown kind 'teapot'"),
        ("sede=1", "unknown key 'sede'"),
        ("seed=x", "seed='x' is not a valid value"),
        ("seed", "expected key=value"),
        ("hang=0", "hang must be > 0"),
        ("seed=1,seed=2", "given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            FaultConfig.parse(bad)


def _deposit(sandbox: SandboxServer, key: str) -> httpx.Response | str:
    """One admin deposit of 1.00 to the admin's own wallet; the transport error's name if
    no response came back."""
    try:
        return httpx.post(
            f"{sandbox.url}/v1/billing/wallets/finops-admin/deposit",
            json={"amount": "1.00"},
            headers={"Authorization": f"Bearer {sandbox.admin_key}", "Idempotency-Key": key},
            timeout=PROBE_TIMEOUT_S,
        )
    except httpx.TransportError as exc:
        return type(exc).__name__


def _ledger_keys(sandbox: SandboxServer) -> list[str | None]:
    return [t.idempotency_key for t in sandbox.store.list_transactions("finops-admin", limit=100, offset=0)]


@pytest.mark.parametrize(
    ("kind", "answer", "runs"),
    [
        (FaultKind.S500, 500, True),
        (FaultKind.S503, 503, False),
        (FaultKind.S429, 429, False),
        (FaultKind.HANG, "ReadTimeout", False),
        (FaultKind.RESET, "RemoteProtocolError", False),
        (FaultKind.DROP, "RemoteProtocolError", True),
        (FaultKind.LATE, "ReadTimeout", True),
    ],
)
def test_each_fault_kind_answers_and_commits_as_documented(kind: FaultKind, answer: int | str, runs: bool) -> None:
    with SandboxServer(faults=FaultConfig(rate=1.0, kinds=(kind,), retry_after=1, hang=1.5)) as sandbox:
        got = _deposit(sandbox, "k-fault")
        if isinstance(got, httpx.Response):
            assert got.status_code == answer
            assert got.headers["content-type"] == "application/problem+json"
            assert got.json()["status"] == answer
            if kind is FaultKind.S429:
                assert got.headers["retry-after"] == "1"
        else:
            assert got == answer
        if kind is FaultKind.LATE:
            deadline = time.monotonic() + 5
            while "k-fault" not in _ledger_keys(sandbox) and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the sandbox's own state, not racing it
        assert ("k-fault" in _ledger_keys(sandbox)) is runs
        assert sandbox.faults.injected[kind.value] == 1 and sandbox.faults.total == 1
        with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as admin:
            # /_sandbox/* is never faulted, even at rate 1.
            snapshot = admin.get("/_sandbox/faults").json()
            assert snapshot["injected"][kind.value] == 1
            assert snapshot["spec"] == sandbox.faults.config.to_spec()
            assert admin.get("/_sandbox/stats").json()["writes"] == (1 if runs else 0)


def test_faults_are_off_by_default_and_reconfigurable_over_http() -> None:
    with SandboxServer() as sandbox:
        assert isinstance(_deposit(sandbox, "k-1"), httpx.Response)
        with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {sandbox.admin_key}"}) as admin:
            on = admin.post("/_sandbox/faults", json={"spec": "seed=1,rate=1,kinds=503"})
            assert on.status_code == 200 and on.json()["enabled"]
            refused = admin.post("/_sandbox/faults", json={"spec": "rate=5"})
            assert refused.status_code == 422 and "between 0 and 1" in refused.json()["detail"]
            answer = _deposit(sandbox, "k-2")
            assert isinstance(answer, httpx.Response) and answer.status_code == 503
            with sandbox.faults.suspended():
                answer = _deposit(sandbox, "k-3")
                assert isinstance(answer, httpx.Response) and answer.status_code == 200
            assert admin.get("/_sandbox/faults").json()["injected"]["503"] == 1
            agent = httpx.post(f"{sandbox.url}/v1/register", json={"agent_id": "nobody"})
            assert agent.status_code == 503  # an unauthenticated /v1 route is faulted too


def test_the_same_seed_faults_the_same_requests_whatever_their_order() -> None:
    """Fates are drawn per (request, occurrence), not from one shared stream, so
    concurrent agents arriving in a different order still meet the same faults."""
    paths = [f"/v1/billing/wallets/agent-{i}/balance" for i in range(40)] * 3
    traces = []
    for order in (paths, paths[::-1]):
        injector = FaultInjector("seed=11,rate=0.3,kinds=all")
        for path in order:
            injector.decide("GET", path, b"")
        traces.append(sorted(injector.trace()))
    assert traces[0] == traces[1]
    assert 0 < len(traces[0]) < len(paths)
    other = FaultInjector("seed=12,rate=0.3,kinds=all")
    for path in paths:
        other.decide("GET", path, b"")
    assert sorted(other.trace()) != traces[0]


def test_a_tripwire_fires_once_on_the_nth_write_and_lets_it_run_or_not() -> None:
    with SandboxServer() as sandbox:
        for commit in (True, False):
            fired: list[str] = []
            sandbox.faults.arm(Tripwire(2, functools.partial(fired.append, "kill"), commit=commit))
            assert isinstance(_deposit(sandbox, f"k-{commit}-1"), httpx.Response)
            read = httpx.get(
                f"{sandbox.url}/v1/billing/wallets/finops-admin/balance",
                headers={"Authorization": f"Bearer {sandbox.admin_key}"},
            )
            assert read.status_code == 200 and fired == []  # reads do not count
            assert _deposit(sandbox, f"k-{commit}-2") == "RemoteProtocolError"
            assert isinstance(_deposit(sandbox, f"k-{commit}-3"), httpx.Response)  # fired once, then gone
            assert fired == ["kill"]
            assert (f"k-{commit}-2" in _ledger_keys(sandbox)) is commit


# --------------------------------------------------------------------------- the exact-once checker


@dataclass(frozen=True)
class Convergence:
    """Everything a convergence check looks at: the sandbox's own database, finops' state
    and a clean plan made with faults suspended."""

    sandbox: SandboxServer
    desired: DesiredState
    state: StateStore
    sink: KeyVault
    plan: Plan
    rates: Mapping[str, Decimal]
    """Credits per unit of each fleet's currency, by fleet name."""
    expected_deposits: Mapping[str, int]
    """finops deposits each wallet must hold (default: one if the signup bonus is below the floor)."""
    lost_keys: frozenset[str]
    """Agents registered on the gateway whose one-time key finops never stored."""

    def credits(self, spec: AgentSpec, amount: Decimal) -> Decimal:
        return to_credits(amount, self.rates[spec.fleet])


Check = Callable[[Convergence], list[str]]
"""A check returns one line per problem found; ``[]`` means it holds."""


def check_clean_plan_is_empty(c: Convergence) -> list[str]:
    problems = [f"plan error: {e}" for e in c.plan.errors]
    problems += [f"pending change: {ch.kind.value} {ch.agent_id}: {ch.reason}" for ch in c.plan.changes]
    return problems


def ledger_problems(sandbox: SandboxServer, desired: DesiredState, *, missing_ok: bool = False) -> list[str]:
    """A balance is the sum of its ledger: money never moves without a row (the gateway's
    concurrent-duplicate deposit credits N times but records one)."""
    problems = []
    for spec in desired.agents():
        wallet = sandbox.store.get_wallet(spec.agent_id)
        if wallet is None:
            if not missing_ok:
                problems.append(f"{spec.agent_id}: no wallet")
            continue
        rows = sandbox.store.list_transactions(spec.agent_id, limit=1_000_000, offset=0)
        if sum(r.amount for r in rows) != wallet.balance:
            problems.append(
                f"{spec.agent_id}: balance {from_atomic(wallet.balance)} != ledger sum "
                f"{from_atomic(sum(r.amount for r in rows))}"
            )
    return problems


def finops_deposits(sandbox: SandboxServer, agent_id: str) -> int:
    """Deposits in the wallet's ledger that carry a finops idempotency key."""
    rows = sandbox.store.list_transactions(agent_id, limit=1_000_000, offset=0)
    return sum(1 for r in rows if r.tx_type == "deposit" and _is_finops_key(r.idempotency_key))


def check_ledgers_add_up(c: Convergence) -> list[str]:
    return ledger_problems(c.sandbox, c.desired)


def _is_finops_key(key: str | None) -> bool:
    return key is not None and key.startswith(FINOPS_DEPOSIT_PREFIX)


def check_funded_exactly_once(c: Convergence) -> list[str]:
    problems = []
    for spec in c.desired.agents():
        ours = finops_deposits(c.sandbox, spec.agent_id)
        want = c.expected_deposits[spec.agent_id]
        if ours != want:
            problems.append(f"{spec.agent_id}: {ours} finops deposits, expected exactly {want}")
        wallet = c.sandbox.store.get_wallet(spec.agent_id)
        floor, target = c.credits(spec, spec.funding_floor), c.credits(spec, spec.funding_target)
        if wallet is not None and not floor <= from_atomic(wallet.balance) <= max(target, SIGNUP_BONUS_CREDITS):
            problems.append(f"{spec.agent_id}: balance {from_atomic(wallet.balance)} outside [{floor}, {target}]")
    return problems


def check_caps_exact(c: Convergence) -> list[str]:
    problems = []
    for spec in c.desired.agents():
        cap = c.sandbox.store.get_budget_cap(spec.agent_id)
        want = (
            c.credits(spec, spec.daily_cap),
            c.credits(spec, spec.monthly_cap),
            float(desired_alert_threshold(spec)),
        )
        have = (
            None if cap is None or cap.daily_cap is None else from_atomic(cap.daily_cap),
            None if cap is None or cap.monthly_cap is None else from_atomic(cap.monthly_cap),
            None if cap is None else cap.alert_threshold,
        )
        if have != want:
            problems.append(f"{spec.agent_id}: caps (daily, monthly, alert) {have} != {want}")
    return problems


def check_one_managed_key_per_agent(c: Convergence) -> list[str]:
    """Every agent whose key finops did store holds exactly one live key on the gateway, and
    it is the one in finops' key store (no orphan minted by a retried write)."""
    problems = []
    for spec in c.desired.agents():
        if spec.agent_id in c.lost_keys or not spec.keys.manage:
            continue
        held = c.sink.load(spec.agent_id)
        live = [k.key_hash_prefix for k in c.sandbox.store.list_keys(spec.agent_id) if not k.revoked]
        if held is None:
            problems.append(f"{spec.agent_id}: finops holds no key")
        elif live != [key_prefix(held)]:
            problems.append(f"{spec.agent_id}: live keys {live}, finops holds sha3:{key_prefix(held)}")
    return problems


def check_managed_webhooks_exact(c: Convergence) -> list[str]:
    """One active admin webhook per opted-in agent, at its URL, recorded as finops' own; no
    duplicates from a retried create."""
    hooks = c.sandbox.store.list_webhooks(ADMIN_AGENT_ID)
    owned = c.state.managed_webhooks()
    problems = []
    for spec in c.desired.agents():
        want = sorted(h.url for h in spec.gateway_webhooks)
        mine = [h for h in hooks if h.filter_agent_ids == (spec.agent_id,)]
        if sorted(h.url for h in mine) != want:
            problems.append(f"{spec.agent_id}: webhooks {sorted(h.url for h in mine)}, expected {want}")
        problems += [f"{spec.agent_id}: webhook {h.id} is not in finops' state" for h in mine if h.id not in owned]
    return problems


CHECKS: list[Check] = [
    check_clean_plan_is_empty,
    check_ledgers_add_up,
    check_funded_exactly_once,
    check_caps_exact,
    check_one_managed_key_per_agent,
    check_managed_webhooks_exact,
]
"""Every check ``assert_converged`` runs; append to extend (keys, webhooks, ...)."""


def fresh_fleet_deposits(desired: DesiredState, rates: Mapping[str, Decimal]) -> dict[str, int]:
    """A fleet registered from nothing and never spent: one top-up where the signup bonus
    is below the floor, none elsewhere."""
    return {
        s.agent_id: int(
            top_up_amount(
                SIGNUP_BONUS_CREDITS,
                to_credits(s.funding_floor, rates[s.fleet]),
                to_credits(s.funding_target, rates[s.fleet]),
            )
            > 0
        )
        for s in desired.agents()
    }


def lost_keys(sandbox: SandboxServer, sink: KeyVault, desired: DesiredState) -> frozenset[str]:
    """Agents with a wallet but no stored key: registered, and the one-time key never
    reached finops (a lost register response or a crash before the key was stored)."""
    return frozenset(
        a.agent_id
        for a in desired.agents()
        if sandbox.store.get_wallet(a.agent_id) is not None and sink.load(a.agent_id) is None
    )


async def assert_converged(
    sandbox: SandboxServer,
    desired: DesiredState,
    *,
    state: StateStore,
    sink: KeyVault,
    expected_deposits: Mapping[str, int] | None = None,
    checks: Sequence[Check] = (),
    skip: Sequence[Check] = (),
    zero_write_reapply: bool = True,
) -> Convergence:
    """Fail with every problem found, else return what was checked.

    Faults are suspended while it looks, so what it sees is the gateway's state, not the
    weather. ``checks`` run after ``CHECKS`` (minus ``skip``: a caller that checks the same
    thing its own way, with what the gateway makes impossible allowed for). With
    ``zero_write_reapply``, applying the clean plan (intent recovery included) must send no
    write, counted by the sandbox itself.
    """
    harness = Harness(sandbox, state, sink)
    with sandbox.faults.suspended():
        plan = await harness.plan(desired)
        rates = {f.name: f.rate_to_credits for f in plan.fleets}
        convergence = Convergence(
            sandbox=sandbox,
            desired=desired,
            state=state,
            sink=sink,
            plan=plan,
            rates=rates,
            expected_deposits=expected_deposits or fresh_fleet_deposits(desired, rates),
            lost_keys=lost_keys(sandbox, sink, desired),
        )
        problems = [p for check in (*CHECKS, *checks) if check not in skip for p in check(convergence)]
        if zero_write_reapply and not problems:
            sandbox.reset_stats()
            again = await harness.apply(plan)
            writes = sandbox.stats["writes"]
            if again.writes or writes:
                problems.append(f"a converged re-apply wrote: client {again.writes}, sandbox {writes}")
    assert not problems, f"{len(problems)} problem(s):\n  " + "\n  ".join(problems[:50])
    return convergence


# --------------------------------------------------------------------------- converging under faults


@dataclass
class FastHarness(Harness):
    """The harness with a client tuned for faults: short timeout, tiny backoff."""

    timeout: float = CLIENT_TIMEOUT_S
    concurrency: int = 32

    def client(self, transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> GatewayClient:
        # Plain HTTP to 127.0.0.1: no TLS context to build (httpx spends ~60 ms on one per
        # client, and a convergence opens a dozen clients).
        transport = transport or httpx.AsyncHTTPTransport(verify=False)
        kw.setdefault("timeout", self.timeout)
        kw.setdefault("concurrency", self.concurrency)
        # The sandbox commits before it answers, so a landed deposit is visible at once;
        # only a ``late`` one lands after the search, which is what that kind tests.
        kw.setdefault("settle_delays", (0.0, 0.02, 0.05))
        kw.setdefault("backoff_initial", 0.005)
        kw.setdefault("backoff_max", 0.02)
        return super().client(transport, **kw)


@dataclass
class Run:
    passes: int = 0
    writes: int = 0
    results: list[ApplyResult] = field(default_factory=list)
    blind_passes: list[str] = field(default_factory=list)
    """Passes that failed as a whole (a fleet-wide read or intent recovery gave up): the
    CLI reports the error and exits 1; the next run starts over."""

    def errors(self) -> list[str]:
        return [f"{a.agent_id}: {a.error}" for r in self.results for a in r.failed()]


def next_pass(harness: Harness) -> None:
    """Passes spaced more than the settle time apart: wait until the sandbox has finished
    every request (a ``late`` one included), then move finops' clock past the settle time,
    so an unknown outcome is resolved (landed, or proven not landed) by the next pass."""
    harness.sandbox.wait_idle(timeout=30)
    assert isinstance(harness.clock, FinopsClock)
    harness.clock.past_settle()


async def converge(harness: Harness, desired: DesiredState, *, max_passes: int = MAX_PASSES) -> Run:
    """Plan and apply until a plan (made under the same faults) has nothing left to do
    and nothing withheld."""
    run = Run()
    for _ in range(max_passes):
        next_pass(harness)
        try:
            plan = await harness.plan(desired)
        except GatewayError as exc:  # a fleet-wide read (keys, rates) failed every attempt
            run.blind_passes.append(str(exc))
            continue
        if plan.empty and not plan.errors and not plan.blocked:
            return run
        run.passes += 1
        try:
            result = await harness.apply(plan)
        except GatewayError as exc:  # intent recovery failed every attempt: the run stops (exit 1)
            run.blind_passes.append(str(exc))
            continue
        run.results.append(result)
        run.writes += result.writes
    raise AssertionError(
        f"not converged after {max_passes} passes; last errors: {run.errors()[-10:]} {run.blind_passes[-3:]}"
    )


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[Callable[[FaultConfig], FastHarness]]:
    """A harness over a fresh sandbox with the given faults; closed after the test."""
    opened: list[tuple[SandboxServer, StateStore]] = []

    def make(config: FaultConfig) -> FastHarness:
        n = len(opened)
        sandbox = SandboxServer(db_path=tmp_path / f"gateway-{n}.db", faults=config).start()
        state = StateStore(tmp_path / f"state-{n}" / "state.db")
        opened.append((sandbox, state))
        return FastHarness(sandbox, state, KeyVault(tmp_path / f"secrets-{n}"))

    yield make
    for sandbox, state in opened:
        sandbox.faults.release_late(run=False)  # a failed test may leave requests at the gate
        state.close()
        sandbox.stop()


async def survives(harness: FastHarness, desired: DesiredState) -> list[str]:
    """Converge under the harness's faults, then check: the problems found, ``[]`` if it survived."""
    try:
        await converge(harness, desired)
        await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)
    except AssertionError as exc:
        faults = harness.sandbox.faults
        return [f"{exc}\nunder {faults.config.to_spec()}; faults injected: {faults.trace()}"]
    return []


def faulted_deposits(injector: FaultInjector, kind: FaultKind) -> int:
    return sum(1 for _, path, k in injector.trace() if k == kind.value and path.endswith("/deposit"))


async def test_canonical_fleet_converges_exactly_once_under_each_fault_kind(
    faulty: Callable[[FaultConfig], FastHarness],
) -> None:
    """One sandbox per kind, side by side (a hang's wait overlaps the others' work)."""
    canonical = load_manifests(CANONICAL)
    runs = {kind: faulty(FaultConfig(seed=1, rate=0.2, kinds=(kind,), hang=LATE_S)) for kind in FaultKind}
    outcomes = await asyncio.gather(*(survives(h, canonical) for h in runs.values()))
    failures = {kind.value: problems for kind, problems in zip(runs, outcomes, strict=True) if problems}
    assert not failures, failures
    # The weather really was bad, and where it hurts: a deposit that ran but whose answer
    # was lost is the double-deposit case.
    assert all(h.sandbox.faults.injected[k.value] > 0 for k, h in runs.items())
    assert all(faulted_deposits(runs[k].sandbox.faults, k) > 0 for k in FaultKind if k.runs)


async def test_canonical_fleet_converges_exactly_once_under_mixed_faults(
    faulty: Callable[[FaultConfig], FastHarness],
) -> None:
    canonical = load_manifests(CANONICAL)
    runs = {seed: faulty(FaultConfig(seed=seed, rate=0.3, kinds=ALL_KINDS, hang=LATE_S)) for seed in (3, 5)}
    outcomes = await asyncio.gather(*(survives(h, canonical) for h in runs.values()))
    failures = {seed: problems for seed, problems in zip(runs, outcomes, strict=True) if problems}
    assert not failures, failures
    assert all(len({k for _, _, k in h.sandbox.faults.trace()}) >= 4 for h in runs.values())


async def test_the_checker_catches_double_deposits_phantom_credit_and_drifted_caps(
    faulty: Callable[[FaultConfig], FastHarness],
) -> None:
    """``assert_converged`` must be able to fail, or every test above proves nothing."""
    canonical = load_manifests(CANONICAL)
    harness = faulty(FaultConfig())
    await converge(harness, canonical)
    await assert_converged(harness.sandbox, canonical, state=harness.store, sink=harness.sink)
    with harness.admin() as admin:  # a second finops-keyed top-up: the double deposit
        admin.post(
            "/v1/billing/wallets/res-01/deposit",
            json={"amount": "10.00"},
            headers={"Idempotency-Key": FINOPS_DEPOSIT_PREFIX + "again"},
        ).raise_for_status()
        admin.put("/v1/billing/wallets/cls-01/budget", json={"daily_cap": "1.00", "monthly_cap": "2.00"})
    harness.sandbox.store.credit("sum-01", 100_000_000, now=time.time())  # money with no ledger row
    with pytest.raises(AssertionError) as caught:
        await assert_converged(harness.sandbox, canonical, state=harness.store, sink=harness.sink)
    report = str(caught.value)
    assert "res-01: 2 finops deposits, expected exactly 1" in report
    assert "sum-01: balance 5001.00000000 != ledger sum 5000.00000000" in report
    assert "cls-01: caps (daily, monthly, alert)" in report
    assert "pending change: set_budget cls-01" in report


async def test_a_register_that_commits_after_finops_gave_up_is_reported_as_a_lost_key(
    faulty: Callable[[FaultConfig], FastHarness],
) -> None:
    canonical = load_manifests(CANONICAL)
    agents = [a.agent_id for a in canonical.agents()]
    harness = faulty(FaultConfig(rate=1.0, kinds=(FaultKind.LATE,), hang=LATE_S, only=("/v1/register",)))
    harness.sandbox.faults.gate_late(True)  # each register lands when the test says, not on a timer
    first = await harness.apply(await harness.plan(canonical))
    # finops' run is over and every register is still held: they land strictly after it gave up
    assert sorted(harness.sandbox.faults.held_late()) == ["POST /v1/register"] * len(agents)
    assert all(harness.sandbox.store.get_wallet(a) is None for a in agents)
    harness.sandbox.faults.configure(None)
    assert harness.sandbox.faults.release_late(run=True) == len(agents)
    harness.sandbox.wait_idle()
    assert all(harness.sandbox.store.get_wallet(a) is not None for a in agents)
    run = await converge(harness, canonical)
    lost = lost_keys(harness.sandbox, harness.sink, canonical)
    assert lost == {a.agent_id for a in canonical.agents()}
    said = harness.notes + [
        line
        for result in [first, *run.results]
        for line in [*result.recovered, *(a.error or "" for a in result.agents)]
    ]
    unreported = [a for a in sorted(lost) if not any(a in line and "lost" in line.lower() for line in said)]
    assert not unreported, f"keys lost without a word: {unreported}; finops said: {said}"


async def test_a_webhook_create_that_commits_after_finops_gave_up_is_not_duplicated(
    faulty: Callable[[FaultConfig], FastHarness],
) -> None:
    canonical = load_manifests(CANONICAL)
    wanted = [h.url for a in canonical.agents() for h in a.gateway_webhooks]
    assert wanted, "the canonical fleet opts into gateway webhooks"
    harness = faulty(FaultConfig(rate=1.0, kinds=(FaultKind.LATE,), hang=LATE_S, only=("POST /v1/infra/webhooks",)))
    harness.sandbox.faults.gate_late(True)  # each create lands when the test says, not on a timer
    await harness.apply(await harness.plan(canonical))
    # finops' run is over and every create is still held: they land strictly after it gave up
    assert harness.sandbox.faults.held_late() == ["POST /v1/infra/webhooks"] * len(wanted)
    assert harness.sandbox.store.list_webhooks(ADMIN_AGENT_ID) == []
    harness.sandbox.faults.configure(None)
    assert harness.sandbox.faults.release_late(run=True) == len(wanted)
    harness.sandbox.wait_idle()
    assert len(harness.sandbox.store.list_webhooks(ADMIN_AGENT_ID)) == len(wanted)
    await converge(harness, canonical)
    live = Counter(h.url for h in harness.sandbox.store.list_webhooks(ADMIN_AGENT_ID))
    assert {url: n for url, n in live.items() if n != 1} == {}


class SimulatedCrash(BaseException):
    """Raised from an apply fault hook: like SIGKILL, nothing after it in the run happens."""


def test_one_agent_unreadable_during_intent_recovery_does_not_stop_the_others(
    faulty: Callable[[FaultConfig], FastHarness],
) -> None:
    canonical = load_manifests(CANONICAL)
    harness = faulty(FaultConfig())

    def crash(point: str, agent: str) -> None:
        if point == "before_deposit" and agent == "sum-01":
            raise SimulatedCrash(point)

    with pytest.raises(SimulatedCrash):  # leaves sum-01's deposit intent pending
        asyncio.run(harness.apply(asyncio.run(harness.plan(canonical)), fault_hook=crash))
    next_pass(harness)  # what the crash cut short elsewhere can now be resolved
    # How far the other agents got before the crash is a race; a cap raised out of band on
    # res-01 (once it has one) gives the next plan work for another agent whatever it was.
    cap = harness.sandbox.store.get_budget_cap("res-01")
    if cap is not None and cap.daily_cap is not None and cap.monthly_cap is not None:
        harness.sandbox.store.set_budget_cap(
            "res-01", cap.daily_cap * 2, cap.monthly_cap * 2, cap.alert_threshold, now=harness.sandbox.clock()
        )
    harness.sandbox.faults.configure(
        FaultConfig(rate=1.0, kinds=(FaultKind.S503,), only=("GET /v1/billing/wallets/sum-01/transactions",))
    )
    plan = asyncio.run(harness.plan(canonical))
    assert any(e.agent_id == "sum-01" for e in plan.errors) and plan.changes
    assert any(c.agent_id == "res-01" for c in plan.changes)
    result = asyncio.run(harness.apply(plan))  # today: ServerError escapes, nothing is applied
    assert all(a.ok for a in result.agents if a.agent_id != "sum-01"), result.to_dict()
    assert [i.agent_id for i in harness.store.intents(status="pending")] == ["sum-01"]


async def test_a_deposit_still_running_on_the_gateway_is_not_sent_again_in_the_same_run(tmp_path: Path) -> None:
    """The first attempt is held at the sandbox's gate past the client's timeout and its
    ledger search, and runs only once the client has given up, slowly (the gateway's window
    between moving money and writing the ledger row, widened here). Re-sending the key while
    it is held or running would be a concurrent duplicate, which the gateway credits twice;
    the client leaves the outcome unknown instead, for the next run to settle from the ledger."""
    deposit = "POST /v1/billing/wallets/finops-admin/deposit"
    key = FINOPS_DEPOSIT_PREFIX + "held"
    with SandboxServer(
        idempotency_race_window=0.4, faults=FaultConfig(rate=1.0, kinds=(FaultKind.LATE,), hang=60, only=(deposit,))
    ) as sandbox:
        sandbox.faults.gate_late(True)
        harness = FastHarness(sandbox, StateStore(tmp_path / "state.db"), KeyVault(tmp_path / "secrets"))
        try:
            async with harness.client() as client:
                attempt = asyncio.create_task(client.deposit("finops-admin", Decimal("10.00"), key))
                while not sandbox.faults.held_late():
                    await asyncio.sleep(0.01)  # the first attempt is at the gate: let anything after it through
                sandbox.faults.configure(None)
                with pytest.raises(UnknownOutcome, match="not sent again"):
                    await attempt
            assert sandbox.faults.held_late() == [deposit]  # given up on, and not landed yet
            landed = sandbox.store.list_transactions("finops-admin", limit=100, offset=0)
            assert key not in [r.idempotency_key for r in landed]
        finally:
            released = sandbox.faults.release_late(run=True)  # now it lands, late
        assert released == 1
        sandbox.wait_idle()
        wallet = sandbox.store.get_wallet("finops-admin")
        rows = sandbox.store.list_transactions("finops-admin", limit=100, offset=0)
        assert [r.idempotency_key for r in rows].count(key) == 1
        assert wallet is not None and wallet.balance == sum(r.amount for r in rows), "credited twice, recorded once"


def write_generated_fleet(directory: Path, agents: int) -> Path:
    """A one-fleet manifest of ``agents`` agents in three tiers, one of which the signup
    bonus already funds (no deposit expected there)."""
    directory.mkdir(parents=True, exist_ok=True)
    tiers = ["worker", "lead", "idle"]
    lines = [
        "apiVersion: finops.greenhelix.net/v1",
        "kind: Fleet",
        "metadata: {name: swarm}",
        "spec:",
        "  currency: USD",
        f'  dailyBudgetTotal: "{agents * 20}.00"',
        f'  funding: {{perRunCeiling: "{agents * 200}.00"}}',
        # Unattended `apply --auto-approve` (test_crash) may authorize the whole fleet at once.
        f'  approval: {{maxUnattendedIncrease: {{dailyCaps: "{agents * 20}.00", monthlyCaps: "{agents * 400}.00", '
        f'funding: "{agents * 200}.00", agents: {agents}}}}}',
        '  defaults: {funding: {floor: "10.00", target: "20.00"}}',
        "  tiers:",
        '    worker: {dailyCap: "5.00", monthlyCap: "100.00"}',
        '    lead: {dailyCap: "20.00", monthlyCap: "400.00", funding: {floor: "50.00", target: "120.00"}}',
        '    idle: {dailyCap: "1.00", monthlyCap: "10.00", funding: {floor: "2.00", target: "4.00"}}',
        "  agents:",
        *(f"    - {{id: swarm-{i:04d}, tier: {tiers[i % 3]}}}" for i in range(agents)),
    ]
    path = directory / "swarm.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


async def test_generated_fleet_converges_exactly_once_under_mixed_faults(
    faulty: Callable[[FaultConfig], FastHarness], tmp_path: Path
) -> None:
    agents = 1000 if STRESS else 100
    desired = load_manifests(write_generated_fleet(tmp_path / "swarm", agents))
    harness = faulty(FaultConfig(seed=42, rate=0.2, kinds=DEFAULT_KINDS, hang=LATE_S))
    run = await converge(harness, desired)
    injected = harness.sandbox.faults.injected
    assert all(injected[k.value] > 0 for k in DEFAULT_KINDS), injected
    convergence = await assert_converged(harness.sandbox, desired, state=harness.store, sink=harness.sink)
    assert sum(convergence.expected_deposits.values()) == agents - agents // 3  # idle agents need none
    assert run.passes <= MAX_PASSES
