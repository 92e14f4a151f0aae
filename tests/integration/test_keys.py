"""Managed keys against the real sandbox over HTTP: rotation with the 300 s grace, crash
recovery at every step, import, command sinks, quarantine, due-ness, and no key material
anywhere it must not be (exceptions, logs, the state database)."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.keys.rotate import ImportRefused, KeyManagementError, KeyManager, RotationError
from controller.keys.vault import QUARANTINE, KeyVault
from controller.reconcile.holds import freeze, unfreeze
from controller.sandbox.server import SandboxServer
from controller.state import DONE, FAILED, PENDING
from policies.keyprint import contains_key_material, fingerprint, key_prefix, redact_keys
from policies.spec import AgentSpec, DesiredState, FleetSpec, KeyPolicy, KeySinkSpec
from tests.integration.conftest import Harness, state_rows

DAY = 86_400

RECEIVER = """
import json, os, sys
key = sys.stdin.read().strip()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    json.dump({"key": key, "fingerprint": os.environ["FINOPS_KEY_FINGERPRINT"],
               "agent": os.environ["FINOPS_AGENT_ID"]}, fh)
"""

ECHO_AND_FAIL = """
import sys
key = sys.stdin.read().strip()
print(key)
print("vault write failed for", key, file=sys.stderr)
sys.exit(3)
"""


class SimulatedCrash(BaseException):
    """Raised from a fault hook: like SIGKILL, nothing after it in the process runs."""


def assert_clean(text: str) -> None:
    assert not contains_key_material(text), f"key material in: {redact_keys(text)}"


@pytest.fixture(autouse=True)
def no_key_material(harness: Harness, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test here ends by proving no raw key reached a log record or the state DB."""
    caplog.set_level(logging.DEBUG)
    yield
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    assert records, "nothing was logged: the check below would prove nothing"
    for record in records:
        assert_clean(record.getMessage())
    rows = list(state_rows(harness.store))
    assert rows, "the state database is empty: the scan below would prove nothing"
    for _, row in rows:
        assert_clean(repr(row))
    for path in harness.store.path.parent.iterdir():
        assert not contains_key_material(path.read_bytes().decode("latin-1")), path.name


@pytest.fixture
async def admin(harness: Harness) -> AsyncIterator[GatewayClient]:
    async with harness.client() as client:
        yield client


def manager(harness: Harness, client: GatewayClient, hook: Callable[[str, str], None] | None = None) -> KeyManager:
    """A KeyManager as a fresh process would build it (nothing in memory)."""
    return KeyManager(
        client,
        harness.store,
        KeyVault(harness.sink.directory),
        state_path=harness.store.location,
        clock=harness.sandbox.clock,
        fault_hook=hook,
    )


def spec(agent: str, sink: KeySinkSpec | None = None, rotation: str = "weekly", manage: bool = True) -> AgentSpec:
    return AgentSpec(
        agent_id=agent,
        fleet="keys",
        tier="worker",
        daily_cap=Decimal("10"),
        monthly_cap=Decimal("100"),
        funding_floor=Decimal("0"),
        funding_target=Decimal("0"),
        alert_thresholds=(100,),
        keys=KeyPolicy(manage=manage, rotation=rotation, sink=sink or KeySinkSpec()),
    )


def desired(*specs: AgentSpec) -> DesiredState:
    return DesiredState((FleetSpec("keys", "CREDITS", Decimal("1000"), Decimal("1000"), tuple(specs)),))


async def register(harness: Harness, client: GatewayClient, agent: str) -> str:
    """As ``apply`` registers: the key goes to the vault and its prefix to the state DB."""
    key = (await client.register(agent)).api_key
    harness.store.record_key(agent, harness.sink.store(agent, key), "register")
    return key


def auth_status(sandbox: SandboxServer, raw: str, agent: str) -> int:
    resp = httpx.get(f"{sandbox.url}/v1/billing/wallets/{agent}/balance", headers={"Authorization": f"Bearer {raw}"})
    return resp.status_code


def live(sandbox: SandboxServer, agent: str) -> set[str]:
    return {k.key_hash_prefix for k in sandbox.store.list_keys(agent) if not k.revoked}


def minted(sandbox: SandboxServer, agent: str) -> int:
    return len(sandbox.store.list_keys(agent))


def crash_at(point: str) -> Callable[[str, str], None]:
    def hook(at: str, agent: str) -> None:
        if at == point:
            raise SimulatedCrash(at)

    return hook


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------- rotation


async def test_rotation_delivers_a_new_key_and_the_old_one_dies_after_the_grace(
    harness: Harness, admin: GatewayClient, tmp_path: Path
) -> None:
    agent_dir = tmp_path / "agent-keys"
    s = spec("rot-a", KeySinkSpec(kind="directory", path=str(agent_dir)))
    old = await register(harness, admin, "rot-a")
    km = manager(harness, admin)

    outcome = await km.rotate(s, reason="test")

    new = harness.sink.load("rot-a")
    assert new is not None and new != old
    assert (agent_dir / "rot-a.key").read_text() == new + "\n" and mode(agent_dir / "rot-a.key") == 0o600
    assert (outcome.old_fingerprint, outcome.new_fingerprint) == (fingerprint(old), fingerprint(new))
    assert outcome.grace_expires_at is not None and not outcome.orphans
    assert_clean(outcome.describe())
    assert harness.store.key_prefixes()["rot-a"] == key_prefix(new)
    assert [i.status for i in harness.store.intents(kind="rotate")] == [DONE]

    assert auth_status(harness.sandbox, old, "rot-a") == 200  # zero downtime: both work in the grace
    assert auth_status(harness.sandbox, new, "rot-a") == 200
    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, old, "rot-a") == 401
    assert auth_status(harness.sandbox, new, "rot-a") == 200

    [status] = km.key_status(desired(s))
    assert status.fingerprint == fingerprint(new) and status.last_rotation is not None
    assert status.next_due is not None and (status.next_due - status.last_rotation).days == 7
    assert not status.due and not status.quarantined and status.orphans == ()


async def test_rotations_of_one_agent_never_run_concurrently(harness: Harness, admin: GatewayClient) -> None:
    s = spec("rot-b")
    await register(harness, admin, "rot-b")
    km = manager(harness, admin)
    first, second = await asyncio.gather(km.rotate(s, reason="a"), km.rotate(s, reason="b"))
    assert second.old_fingerprint == first.new_fingerprint  # the second waited for the first
    held = harness.sink.load("rot-b")
    assert held is not None and fingerprint(held) == second.new_fingerprint
    assert minted(harness.sandbox, "rot-b") == 3 and live(harness.sandbox, "rot-b") == {key_prefix(held)}


@pytest.mark.parametrize("point", ["after_rotate", "after_vault", "after_deliver"])
async def test_a_kill_at_any_step_converges_to_exactly_one_working_key(
    harness: Harness, admin: GatewayClient, tmp_path: Path, point: str
) -> None:
    agent_dir = tmp_path / "agent-keys"
    s = spec("crash-a", KeySinkSpec(kind="directory", path=str(agent_dir)))
    old = await register(harness, admin, "crash-a")

    with pytest.raises(SimulatedCrash):
        await manager(harness, admin, crash_at(point)).rotate(s, reason="scheduled")
    assert [i.agent_id for i in harness.store.intents(status=PENDING, kind="rotate")] == ["crash-a"]

    km = manager(harness, admin)  # the next run
    notes = await km.recover()
    assert len(notes) == 1
    assert_clean(notes[0])
    assert harness.store.intents(status=PENDING, kind="rotate") == []
    held = harness.sink.load("crash-a")
    assert held is not None and held != old
    assert not (harness.sink.directory / QUARANTINE / "crash-a.key").exists()
    assert (agent_dir / "crash-a.key").read_text() == held + "\n"  # delivered
    assert harness.store.key_prefixes()["crash-a"] == key_prefix(held)

    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, held, "crash-a") == 200
    assert auth_status(harness.sandbox, old, "crash-a") == 401
    [status] = km.key_status(desired(s))
    if point == "after_rotate":
        # The first new key was lost with the process: it is an orphan, reported by prefix,
        # and finops rotated again from the old key while it was still in its grace.
        [orphan] = live(harness.sandbox, "crash-a") - {key_prefix(held)}
        assert f"ORPHANED sha3:{orphan}" in notes[0] and "rotated again" in notes[0]
        assert status.orphans == (f"sha3:{orphan}",)
        assert minted(harness.sandbox, "crash-a") == 3
    else:
        # The new key reached the vault: recovery only finished delivery and verification.
        assert "finished an interrupted rotation" in notes[0]
        assert live(harness.sandbox, "crash-a") == {key_prefix(held)}
        assert minted(harness.sandbox, "crash-a") == 2 and status.orphans == ()
    assert status.last_rotation is not None and not status.pending_rotation


async def test_kill_after_rotate_found_past_the_grace_is_reported_as_lost(
    harness: Harness, admin: GatewayClient
) -> None:
    s = spec("crash-b")
    old = await register(harness, admin, "crash-b")
    with pytest.raises(SimulatedCrash):
        await manager(harness, admin, crash_at("after_rotate")).rotate(s, reason="scheduled")
    harness.sandbox.clock.advance(301)  # finops stayed down past the grace

    km = manager(harness, admin)
    [note] = await km.recover()
    [orphan] = live(harness.sandbox, "crash-b")
    assert "LOST KEY" in note and f"sha3:{orphan}" in note and "finops keys import crash-b" in note
    assert "cannot revoke another agent's key over REST" in note
    assert_clean(note)
    assert [i.status for i in harness.store.intents(kind="rotate")] == [FAILED]
    assert minted(harness.sandbox, "crash-b") == 2  # nothing rotated blindly
    assert harness.sink.load("crash-b") == old
    [status] = km.key_status(desired(s))
    assert status.orphans == (f"sha3:{orphan}",)
    with pytest.raises(RotationError) as err:  # a rotation attempt says why, without a key
        await km.rotate(s, reason="again")
    assert_clean(str(err.value))


class LoseRotateResponse(httpx.AsyncBaseTransport):
    """The sandbox commits the rotation; the client is told the connection dropped."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.rotate_requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/v1/infra/keys/rotate":
            self.rotate_requests += 1
            await response.aread()
            raise httpx.ReadError("connection reset after the server committed", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_unknown_rotate_outcome_is_never_retried_and_is_resolved_by_looking(
    harness: Harness, admin: GatewayClient
) -> None:
    s = spec("lost-resp")
    old = await register(harness, admin, "lost-resp")
    transport = LoseRotateResponse()
    async with harness.client(transport) as flaky:
        with pytest.raises(RotationError, match="not retried") as err:
            await manager(harness, flaky).rotate(s, reason="scheduled")
    assert_clean(str(err.value))
    assert transport.rotate_requests == 1
    assert minted(harness.sandbox, "lost-resp") == 2
    assert harness.sink.load("lost-resp") == old

    outcome = await manager(harness, admin).rotate(s, reason="scheduled")  # the next run
    [orphan] = live(harness.sandbox, "lost-resp") - {outcome.new_fingerprint.removeprefix("sha3:")}
    assert outcome.recovered and outcome.orphans == (f"sha3:{orphan}",)
    held = harness.sink.load("lost-resp")
    assert held is not None and fingerprint(held) == outcome.new_fingerprint
    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, held, "lost-resp") == 200
    assert minted(harness.sandbox, "lost-resp") == 3


# ---------------------------------------------------------------------------- sinks


async def test_command_sink_gets_the_key_on_stdin_and_a_failure_is_finished_later(
    harness: Harness, admin: GatewayClient, tmp_path: Path
) -> None:
    received = tmp_path / "received.json"
    receiver = tmp_path / "receiver.py"
    receiver.write_text(RECEIVER)
    failing = tmp_path / "failing.py"
    failing.write_text(ECHO_AND_FAIL)
    good = spec("cmd-a", KeySinkSpec(kind="command", command=(sys.executable, str(receiver), str(received))))
    bad = spec("cmd-a", KeySinkSpec(kind="command", command=(sys.executable, str(failing))))
    old = await register(harness, admin, "cmd-a")
    km = manager(harness, admin)

    outcome = await km.rotate(good, reason="test")
    got = json.loads(received.read_text())
    assert got["key"] == harness.sink.load("cmd-a") != old
    assert got["fingerprint"] == outcome.new_fingerprint and got["agent"] == "cmd-a"
    assert mode(received) == 0o600

    with pytest.raises(RotationError) as err:
        await km.rotate(bad, reason="test")
    message = str(err.value)
    assert "NOT delivered" in message and "exited with status 3" in message
    # A stderr that echoes the key (in any form) is withheld whole, not just redacted.
    assert "stderr withheld: it contained part of the key" in message and "vault write failed" not in message
    assert_clean(message)
    assert [i.agent_id for i in harness.store.intents(status=PENDING, kind="rotate")] == ["cmd-a"]
    before = minted(harness.sandbox, "cmd-a")

    fixed = await km.rotate(good, reason="test")  # delivers the held key, no new rotation
    assert fixed.recovered and minted(harness.sandbox, "cmd-a") == before
    assert json.loads(received.read_text())["key"] == harness.sink.load("cmd-a")
    assert harness.store.intents(status=PENDING, kind="rotate") == []


# ---------------------------------------------------------------------------- import


async def test_import_accepts_only_a_live_key_of_that_agent(harness: Harness, admin: GatewayClient) -> None:
    own = await register(harness, admin, "imp-a")
    other = await register(harness, admin, "imp-b")
    harness.sink.path_for("imp-a").unlink()  # finops lost its copy
    km = manager(harness, admin)
    clock = harness.sandbox.clock

    refusals = []
    with pytest.raises(ImportRefused, match="not one of imp-a's keys") as err:
        await km.import_key("imp-a", other)
    refusals.append(str(err.value))
    with pytest.raises(ImportRefused, match="not a GreenHelix API key") as err:
        await km.import_key("imp-a", "hunter2")
    refusals.append(str(err.value))
    revoked, _ = harness.sandbox.store.create_key("imp-a", "free", now=clock())
    await admin.rotate_key(revoked)  # now revoked, though still inside its grace
    assert auth_status(harness.sandbox, revoked, "imp-a") == 200
    with pytest.raises(ImportRefused, match="revoked") as err:
        await km.import_key("imp-a", revoked)
    refusals.append(str(err.value))
    for message in refusals:
        assert_clean(message)
    assert harness.sink.load("imp-a") is None

    note = await km.import_key("imp-a", own + "\n")
    assert_clean(note)
    assert harness.sink.load("imp-a") == own
    assert harness.store.key_prefixes()["imp-a"] == key_prefix(own)
    [status] = km.key_status(desired(spec("imp-a")))
    assert status.fingerprint == fingerprint(own) and status.key_since is not None and status.last_rotation is None

    # a key finops never saw, minted elsewhere for the agent, is adopted too
    extra, _ = harness.sandbox.store.create_key("imp-a", "free", now=clock())
    await km.import_key("imp-a", extra)
    assert harness.sink.load("imp-a") == extra
    await km.rotate(spec("imp-a"), reason="after import")  # and finops can rotate it


# ---------------------------------------------------------------------------- quarantine


async def test_freeze_quarantines_the_key_and_unfreeze_releases_a_fresh_one(
    harness: Harness, admin: GatewayClient
) -> None:
    s = spec("hold-a")
    old = await register(harness, admin, "hold-a")
    km = manager(harness, admin)

    held = await freeze(admin, harness.store, km, s, "runaway loop")
    assert held.ok, held.problems
    quarantined = (harness.sink.directory / QUARANTINE / "hold-a.key").read_text().strip()
    assert quarantined != old and harness.sink.load("hold-a") == old  # not delivered
    assert harness.store.key_prefixes()["hold-a"] == key_prefix(quarantined)
    for step in held.steps:
        assert_clean(step)
    assert (await km.rotate(s, reason="freeze again", quarantine=True)).changed is False
    with pytest.raises(KeyManagementError, match="quarantine"):
        await km.rotate(s, reason="scheduled")
    [status] = km.key_status(desired(s))
    assert status.quarantined and status.fingerprint == fingerprint(quarantined)
    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, old, "hold-a") == 401  # the agent is locked out
    assert auth_status(harness.sandbox, quarantined, "hold-a") == 200  # finops still holds a key
    far = datetime.fromtimestamp(harness.sandbox.clock() + 30 * DAY, UTC)
    assert km.due(desired(s), far) == []

    released = await unfreeze(admin, harness.store, km, s, Decimal("1"))
    assert released.ok, released.problems
    fresh = harness.sink.load("hold-a")
    assert fresh is not None and fresh not in {old, quarantined}
    assert not (harness.sink.directory / QUARANTINE / "hold-a.key").exists()
    assert any("released from quarantine" in step for step in released.steps)
    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, fresh, "hold-a") == 200
    assert auth_status(harness.sandbox, quarantined, "hold-a") == 401
    assert await km.release_quarantine(s) == "hold-a: no key in quarantine; nothing to release"


@pytest.mark.parametrize("point", ["after_rotate", "after_vault"])
async def test_a_kill_during_release_converges_to_a_delivered_key(
    harness: Harness, admin: GatewayClient, point: str
) -> None:
    s = spec("hold-b")
    await register(harness, admin, "hold-b")
    await manager(harness, admin).quarantine(s, reason="test")
    with pytest.raises(SimulatedCrash):
        await manager(harness, admin, crash_at(point)).release_quarantine(s)
    km = manager(harness, admin)
    [note] = await km.recover()
    assert_clean(note)
    fresh = harness.sink.load("hold-b")
    assert fresh is not None and not km.vault.is_quarantined("hold-b")
    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, fresh, "hold-b") == 200


# ---------------------------------------------------------------------------- due-ness


async def test_rotate_due_rotates_only_due_keys_and_isolates_failures(
    harness: Harness, admin: GatewayClient, tmp_path: Path
) -> None:
    failing = tmp_path / "failing.py"
    failing.write_text(ECHO_AND_FAIL)
    specs = (
        spec("due-daily", rotation="daily"),
        spec("due-weekly", rotation="weekly"),
        spec("due-cron", rotation="0 3 * * *"),
        spec("due-broken", KeySinkSpec(kind="command", command=(sys.executable, str(failing))), rotation="daily"),
        spec("due-nokey", rotation="daily"),
        spec("due-unmanaged", manage=False),
    )
    fleet = desired(*specs)
    for agent in ("due-daily", "due-weekly", "due-cron", "due-broken", "due-unmanaged"):
        await register(harness, admin, agent)
    km = manager(harness, admin)
    now = datetime.fromtimestamp(harness.sandbox.clock(), UTC)
    assert km.due(fleet, now) == []  # registered just now: nothing is due yet

    harness.sandbox.clock.advance(2 * DAY)
    later = datetime.fromtimestamp(harness.sandbox.clock(), UTC)
    assert sorted(d.agent_id for d in km.due(fleet, later)) == ["due-broken", "due-cron", "due-daily"]

    run = await km.rotate_due(fleet)
    assert sorted(o.agent_id for o in run.rotated) == ["due-cron", "due-daily"]
    assert list(run.failed) == ["due-broken"] and "exited with status 3" in run.failed["due-broken"]
    assert "not due" in run.skipped["due-weekly"] and "holds no key" in run.skipped["due-nokey"]
    assert "due-unmanaged" not in run.skipped and not run.ok
    assert_clean(json.dumps(run.to_dict()))
    assert km.due(fleet, later) == []  # the broken one is pending, the others are fresh

    forced = await km.rotate_due(fleet, agents=["due-weekly", "nope"], force=True)
    assert [o.agent_id for o in forced.rotated] == ["due-weekly"]
    assert forced.failed == {"nope": "not declared in the manifests"}
    assert any("due-broken" in note for note in forced.recovered)  # still failing: reported again

    statuses = {st.agent_id: st for st in km.key_status(fleet)}
    assert statuses["due-broken"].pending_rotation
    assert statuses["due-unmanaged"].describe() == "due-unmanaged: key not managed by finops"
    assert statuses["due-nokey"].fingerprint is None
    for st in statuses.values():
        assert_clean(st.describe())
        assert_clean(json.dumps(st.to_dict()))
