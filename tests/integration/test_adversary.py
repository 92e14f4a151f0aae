"""The gateway as the controller's adversary: answers no honest gateway would give.

Every read the controller uses (balance, budget, ledger, key listing, exchange rate) and
every write it makes (register, deposit, budget) gets, in turn: malformed JSON, a JSON
value that is not an object, missing fields, wrong types, a redirect carrying a plausible
body, a 418, a 204 with no body, and a body over ``MAX_RESPONSE_BYTES``. The controller
must answer each with a clear error (the agent is reported unobservable, or the run stops
with a ``GatewayError``), never crash, and never write anything on the strength of a bad
read. ``test_client.py`` covers the client's own parsing of the balance read; this module
drives the whole observe → plan → apply loop.

Each fleet-wide scenario runs once per module (one agent per case, side by side), and the
parametrized tests then look at their own agent, so the matrix stays fast.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.gateway.client import MAX_RESPONSE_BYTES, GatewayClient
from controller.gateway.errors import GatewayError
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.apply import ApplyResult
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from policies.plan_types import ChangeKind, Plan, PlanErrorKind
from policies.spec import DesiredState
from tests.integration.conftest import Harness
from tests.integration.test_faults import assert_converged, converge

Answer = Callable[[], httpx.Response]

PLAUSIBLE: dict[str, dict[str, Any]] = {
    "balance": {"balance": "99999.00"},
    "budget": {
        "agent_id": "x",
        "daily_cap": 3000,
        "monthly_cap": 60000,
        "daily_spend": 0,
        "daily_pct": 0,
        "monthly_spend": 0,
        "monthly_pct": 0,
        "alert_triggered": False,
        "cap_exceeded": False,
    },
    "transactions": {"transactions": []},
    "keys": {"keys": []},
    "rates": {"from_currency": "USD", "to_currency": "CREDITS", "rate": "100"},
    "deposit": {"new_balance": "7500.00", "transaction_id": 1},
    "set_budget": {"agent_id": "x", "daily_cap": 3000, "monthly_cap": 60000, "alert_threshold": 0.75},
    "register": {"agent_id": "x", "api_key": "a2a_free_" + "0" * 24, "tier": "free", "balance": 500.0},
}
"""What an honest answer looks like, per route: the body a lying redirect carries."""

WRONG_TYPES: dict[str, object] = {
    "balance": {"balance": ["1.00"]},
    "budget": {**PLAUSIBLE["budget"], "daily_cap": {"amount": 3000}},
    "transactions": {"transactions": [{"id": "7", "amount": "1.00"}]},
    "keys": {"keys": "all of them"},
    "rates": {"rate": [100]},
    "deposit": {"new_balance": None, "transaction_id": "one"},
    "set_budget": ["daily_cap", 3000],
    "register": {"agent_id": "x", "api_key": 12345, "balance": "500.00"},
}


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})}
    )


def answers(route: str) -> dict[str, Answer]:
    """Every bad answer for one route, by name."""
    padding = "x" * (MAX_RESPONSE_BYTES + 1024)
    return {
        "malformed-json": lambda: httpx.Response(
            200, content=b'{"balance": 12', headers={"content-type": "application/json"}
        ),
        "not-an-object": lambda: _json(200, [PLAUSIBLE[route]]),
        "missing-fields": lambda: _json(200, {}),
        "wrong-types": lambda: _json(200, WRONG_TYPES[route]),
        "redirect": lambda: _json(302, PLAUSIBLE[route], {"location": "https://elsewhere.example/v1/"}),
        "teapot": lambda: httpx.Response(418, text="I'm a teapot", headers={"content-type": "text/plain"}),
        "no-content": lambda: httpx.Response(204),
        "oversized": lambda: _json(200, {**PLAUSIBLE[route], "padding": padding}),
    }


ANSWER_NAMES = list(answers("balance"))

# Type confusions the client does not validate today: a crash, not a clear error.
CRASHES = {
    ("budget", "pct-as-text"): {**PLAUSIBLE["budget"], "daily_pct": "a lot"},
    ("keys", "scopes-as-number"): {"keys": [{"key_hash_prefix": "0123abcd", "agent_id": "x", "scopes": 5}]},
}
KNOWN_BUGS: dict[tuple[str, str], str] = {}
"""Cases the controller gets wrong today, as strict xfails (a fix turns them into failures
that ask for the mark to go). Empty: redirects, missing budget fields, an unconfirmed budget
PUT and mistyped fields were all fixed in the client after this suite found them."""


def cases(table: Mapping[str, tuple[str, str]]) -> list[Any]:
    return [
        pytest.param(agent, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case]))
        if case in KNOWN_BUGS
        else agent
        for agent, case in table.items()
    ]




class Adversary(httpx.AsyncBaseTransport):
    """The real sandbox behind a liar: ``choose(request)`` names a bad answer (or ``None``
    to pass the request through). With ``commit_first`` the request still reaches the
    sandbox and runs before its answer is replaced: a write that happened, badly reported."""

    def __init__(self, choose: Callable[[httpx.Request], Answer | None], *, commit_first: bool = False) -> None:
        self.inner = httpx.AsyncHTTPTransport(verify=False)  # plain HTTP to 127.0.0.1: skip the TLS setup
        self.choose = choose
        self.commit_first = commit_first
        self.sent: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        answer = self.choose(request)
        if answer is None:
            return await self.inner.handle_async_request(request)
        if self.commit_first:
            real = await self.inner.handle_async_request(request)
            await real.aread()
            await real.aclose()
        return answer()

    def writes_for(self, agent: str) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.sent if m != "GET" and f"/{agent}/" in p]

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class LyingHarness(Harness):
    """The harness, every client of which talks through ``adversary`` when one is set."""

    adversary: Adversary | None = None

    def client(self, transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> GatewayClient:
        kw.setdefault("max_attempts", 2)
        return super().client(transport or self.adversary or httpx.AsyncHTTPTransport(verify=False), **kw)


def write_fleet(directory: Path, agents: list[str]) -> DesiredState:
    """A USD fleet whose every agent needs funding beyond the signup bonus."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "apiVersion: finops.greenhelix.net/v1",
        "kind: Fleet",
        "metadata: {name: prey}",
        "spec:",
        "  currency: USD",
        f'  dailyBudgetTotal: "{30 * len(agents)}.00"',
        f'  funding: {{perRunCeiling: "{100 * len(agents)}.00"}}',
        "  tiers:",
        '    worker: {dailyCap: "30.00", monthlyCap: "600.00", funding: {floor: "40.00", target: "75.00"}}',
        "  agents:",
        *(f"    - {{id: {a}, tier: worker}}" for a in agents),
    ]
    (directory / "prey.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_manifests(directory)


def _wallet_route(request: httpx.Request) -> tuple[str, str] | None:
    """``(agent, route)`` for the wallet routes the controller uses, else ``None``."""
    parts = request.url.path.strip("/").split("/")
    if len(parts) != 5 or parts[:3] != ["v1", "billing", "wallets"]:
        return None
    route = {
        ("GET", "balance"): "balance",
        ("GET", "budget"): "budget",
        ("GET", "transactions"): "transactions",
        ("POST", "deposit"): "deposit",
        ("PUT", "budget"): "set_budget",
    }.get((request.method, parts[4]))
    return None if route is None else (parts[3], route)


# --------------------------------------------------------------------------- bad reads, per agent

AGENT_READS = ["balance", "budget", "transactions"]
READ_CASES = {f"r-{route}-{name}": (route, name) for route in AGENT_READS for name in ANSWER_NAMES}
READ_CRASHES = {f"r-{route}-{name}": (route, name) for (route, name) in CRASHES if route in AGENT_READS}


@dataclass
class ReadScenario:
    plan: Plan
    result: ApplyResult
    adversary: Adversary
    sandbox_writes: int
    crashes: dict[str, str] = field(default_factory=dict)


def _drift(harness: Harness, agents: list[str]) -> None:
    """Spend every wallet below its floor and loosen every cap: a plan that trusted a bad
    read would now top up and rewrite the budget of the agent it could not see."""
    with harness.admin() as admin:
        for agent in agents:
            harness.spend(agent, Decimal("6000.00"))  # metered: a withdrawal would not be refunded
            admin.put(
                f"/v1/billing/wallets/{agent}/budget", json={"daily_cap": "99999.00", "monthly_cap": "99999.00"}
            ).raise_for_status()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxServer, StateStore, KeyVault]]:
    tmp = tmp_path_factory.mktemp("adversary")
    with SandboxServer(db_path=tmp / "gateway.db") as sandbox:
        state = StateStore(tmp / "state.db")
        yield sandbox, state, KeyVault(tmp / "secrets")
        state.close()


@pytest.fixture(scope="module")
def read_scenario(
    world: tuple[SandboxServer, StateStore, KeyVault], tmp_path_factory: pytest.TempPathFactory
) -> ReadScenario:
    sandbox, state, sink = world
    agents = [*READ_CASES, *READ_CRASHES, "bystander"]
    desired = write_fleet(tmp_path_factory.mktemp("reads"), agents)
    harness = LyingHarness(sandbox, state, sink)
    asyncio.run(converge(harness, desired))
    _drift(harness, agents)

    def choose(request: httpx.Request) -> Answer | None:
        hit = _wallet_route(request)
        if hit is None:
            return None
        agent, route = hit
        if agent in READ_CASES and READ_CASES[agent][0] == route:
            return answers(route)[READ_CASES[agent][1]]
        if agent in READ_CRASHES and READ_CRASHES[agent][0] == route:
            body = CRASHES[READ_CRASHES[agent]]
            return lambda: _json(200, body)
        return None

    # The crash cases would take the whole observation down with them: run them alone.
    crashes: dict[str, str] = {}
    for agent in READ_CRASHES:
        solo = desired_only(desired, agent)
        harness.adversary = Adversary(choose)
        try:
            asyncio.run(harness.plan(solo))
        except GatewayError:
            pass
        except Exception as exc:  # the bug under test
            crashes[agent] = f"{type(exc).__name__}: {exc}"
    sane = desired_without(desired, set(READ_CRASHES))
    adversary = Adversary(choose)
    harness.adversary = adversary
    sandbox.reset_stats()
    plan = asyncio.run(harness.plan(sane))
    result = asyncio.run(harness.apply(plan))
    return ReadScenario(plan, result, adversary, int(str(sandbox.stats["writes"])), crashes)


def desired_only(desired: DesiredState, agent: str) -> DesiredState:
    return desired_without(desired, {a.agent_id for a in desired.agents()} - {agent})


def desired_without(desired: DesiredState, agents: set[str]) -> DesiredState:
    return DesiredState(
        fleets=tuple(replace(f, agents=tuple(a for a in f.agents if a.agent_id not in agents)) for f in desired.fleets)
    )


@pytest.mark.parametrize("agent", cases(READ_CASES))
def test_a_bad_read_makes_the_agent_unobservable_and_nothing_is_written_for_it(
    read_scenario: ReadScenario, agent: str
) -> None:
    route, _ = READ_CASES[agent]
    errors = [e for e in read_scenario.plan.errors if e.agent_id == agent]
    assert len(errors) == 1, read_scenario.plan.errors
    assert errors[0].kind is PlanErrorKind.UNOBSERVED
    assert errors[0].detail.startswith("gateway") and f"/{agent}/{route}" in errors[0].detail
    assert not [c for c in read_scenario.plan.changes if c.agent_id == agent]
    assert read_scenario.adversary.writes_for(agent) == []


def test_bad_reads_leave_the_rest_of_the_fleet_planned_and_write_nothing(read_scenario: ReadScenario) -> None:
    assert not [e for e in read_scenario.plan.errors if e.agent_id == "bystander"]
    kinds = {c.kind for c in read_scenario.plan.changes if c.agent_id == "bystander"}
    assert kinds == {ChangeKind.TOP_UP, ChangeKind.SET_BUDGET}
    assert read_scenario.result.ok, read_scenario.result.to_dict()
    writes = [(m, p) for m, p in read_scenario.adversary.sent if m != "GET"]
    assert {w for w in writes if "/bystander/" in w[1]} == {
        ("POST", "/v1/billing/wallets/bystander/deposit"),
        ("PUT", "/v1/billing/wallets/bystander/budget"),
    }
    known_bugs = [a for a, case in READ_CASES.items() if case in KNOWN_BUGS]
    assert [w for w in writes if "/bystander/" not in w[1] and not any(f"/{a}/" in w[1] for a in known_bugs)] == []
    assert read_scenario.sandbox_writes == len(writes)  # nothing reached the sandbox that we did not see


@pytest.mark.parametrize("agent", list(READ_CRASHES))
def test_a_mistyped_budget_field_is_a_clear_error_not_a_crash(read_scenario: ReadScenario, agent: str) -> None:
    assert agent not in read_scenario.crashes, read_scenario.crashes[agent]


# --------------------------------------------------------------------------- bad fleet-wide reads


@pytest.mark.parametrize(
    ("route", "name"),
    [
        pytest.param(route, name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(route, name)]))
        if (route, name) in KNOWN_BUGS
        else (route, name)
        for route in ("keys", "rates")
        for name in ANSWER_NAMES
    ],
)
def test_a_bad_fleet_wide_read_stops_the_run_with_a_clear_error_before_any_write(
    world: tuple[SandboxServer, StateStore, KeyVault], tmp_path: Path, route: str, name: str
) -> None:
    sandbox, state, sink = world
    path = {"keys": "/v1/infra/keys", "rates": "/v1/billing/exchange-rates"}[route]
    adversary = Adversary(lambda r: answers(route)[name] if r.url.path == path else None)
    harness = LyingHarness(sandbox, state, sink, adversary=adversary)
    desired = write_fleet(tmp_path / "m", ["lone-01"])
    with pytest.raises(GatewayError) as caught:
        asyncio.run(harness.plan(desired))
    assert path in str(caught.value)
    assert [m for m, _ in adversary.sent if m != "GET"] == []


def test_a_mistyped_key_listing_is_a_clear_error_not_a_crash(
    world: tuple[SandboxServer, StateStore, KeyVault], tmp_path: Path
) -> None:
    sandbox, state, sink = world
    body = CRASHES[("keys", "scopes-as-number")]
    adversary = Adversary(lambda r: (lambda: _json(200, body)) if r.url.path == "/v1/infra/keys" else None)
    harness = LyingHarness(sandbox, state, sink, adversary=adversary)
    with pytest.raises(GatewayError):
        asyncio.run(harness.plan(write_fleet(tmp_path / "m", ["lone-01"])))


# --------------------------------------------------------------------------- bad answers to writes

WRITE_ROUTES = ["register", "deposit", "set_budget"]
WRITE_CASES = {f"w-{route}-{name}": (route, name) for route in WRITE_ROUTES for name in ANSWER_NAMES}


@dataclass
class WriteScenario:
    desired: DesiredState
    result: ApplyResult
    adversary: Adversary
    recovered: list[str]
    lost_keys: frozenset[str]


@pytest.fixture(scope="module")
def write_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WriteScenario]:
    tmp = tmp_path_factory.mktemp("writes")
    desired = write_fleet(tmp / "m", list(WRITE_CASES))
    with SandboxServer(db_path=tmp / "gateway.db") as sandbox:
        state = StateStore(tmp / "state.db")
        sink = KeyVault(tmp / "secrets")
        harness = LyingHarness(sandbox, state, sink)
        registered_first = [a for a, (route, _) in WRITE_CASES.items() if route != "register"]
        asyncio.run(harness.apply(asyncio.run(harness.plan(desired_only_many(desired, registered_first)))))
        _drift(harness, registered_first)

        def choose(request: httpx.Request) -> Answer | None:
            if request.method == "POST" and request.url.path == "/v1/register":
                agent, route = json.loads(request.content)["agent_id"], "register"
            else:
                hit = _wallet_route(request)
                if hit is None:
                    return None
                agent, route = hit
            case = WRITE_CASES.get(agent)
            return answers(route)[case[1]] if case is not None and case[0] == route else None

        adversary = Adversary(choose, commit_first=True)
        harness.adversary = adversary
        result = asyncio.run(harness.apply(asyncio.run(harness.plan(desired))))
        harness.adversary = None
        run = asyncio.run(converge(harness, desired))
        said_at_once = [a.error for a in result.agents if a.error]
        recovered = harness.notes + said_at_once + [note for r in run.results for note in r.recovered]
        # Funded once on first sight, and once more after the drift: two top-ups each.
        deposits = {a: 2 if a in registered_first else 1 for a in WRITE_CASES}
        convergence = asyncio.run(
            assert_converged(sandbox, desired, state=state, sink=sink, expected_deposits=deposits)
        )
        yield WriteScenario(desired, result, adversary, recovered, convergence.lost_keys)
        state.close()


def desired_only_many(desired: DesiredState, agents: list[str]) -> DesiredState:
    return desired_without(desired, {a.agent_id for a in desired.agents()} - set(agents))


@pytest.mark.parametrize("agent", cases(WRITE_CASES))
def test_a_bad_answer_to_a_write_is_an_error_for_that_agent_and_never_a_repeat(
    write_scenario: WriteScenario, agent: str
) -> None:
    route, name = WRITE_CASES[agent]
    [outcome] = [a for a in write_scenario.result.agents if a.agent_id == agent]
    assert outcome.error is not None, f"{name} answer to {route} was taken as success: {outcome.applied}"
    assert "gateway" in outcome.error
    sent = write_scenario.adversary.writes_for(agent) if route != "register" else []
    if route == "deposit":
        assert sent.count(("POST", f"/v1/billing/wallets/{agent}/deposit")) == 1  # never re-sent blindly
    if route == "register":
        # The key was in the answer we could not read: it is lost, and finops says so.
        assert agent in write_scenario.lost_keys
        assert any(agent in note and "LOST KEY" in note for note in write_scenario.recovered)


def test_after_bad_write_answers_a_clean_run_converges_with_every_wallet_funded_once(
    write_scenario: WriteScenario,
) -> None:
    # assert_converged ran in the fixture (exactly one deposit per wallet, ledgers that add
    # up, exact caps, a clean plan with nothing to do); only the unreadable keys are gone.
    assert {a.agent_id for a in write_scenario.result.agents} == set(WRITE_CASES)
    known_bugs = {a for a, case in WRITE_CASES.items() if case in KNOWN_BUGS}
    registered = {a for a, (route, _) in WRITE_CASES.items() if route == "register"}
    assert write_scenario.lost_keys - known_bugs == registered - known_bugs
