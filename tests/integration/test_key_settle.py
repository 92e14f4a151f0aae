"""A rotate whose outcome is unknown follows the settle rule (``policies.settle``), over real
HTTP against the sandbox with its ``late`` gate (a request held in a queue runs after finops
gave up on it, or is lost): each variant of when it lands, against the 300 s grace.

finops' clock is the sandbox's clock plus an offset, so a test can move finops past the settle
time without moving the gateway past a key's grace (and vice versa). No sleeps: the gate holds
the request until the test releases it.
"""

from __future__ import annotations

import httpx
import pytest

from controller.gateway.client import GatewayClient
from controller.keys.rotate import KeyManager, RotationError
from controller.keys.vault import QUARANTINE, KeyVault
from controller.reconcile.holds import freeze
from controller.sandbox.server import SandboxServer
from controller.state import ABANDONED, PENDING
from policies.keyprint import key_prefix
from policies.settle import SETTLE_SECONDS
from tests.integration.conftest import Harness
from tests.integration.test_key_recovery import no_faults, rotate_faults
from tests.integration.test_keys import (  # noqa: F401  (fixtures: no_key_material)
    assert_clean,
    auth_status,
    desired,
    live,
    minted,
    no_key_material,
    register,
    spec,
)

GRACE_S = 300


class FinopsClock:
    """finops' clock: the sandbox's injectable clock plus an offset only finops sees (finops
    was down, or the gateway's clock is behind)."""

    def __init__(self, sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        self.offset = 0.0

    def __call__(self) -> float:
        return self.sandbox.clock() + self.offset


def impatient(harness: Harness) -> GatewayClient:
    """Gives up after 0.5 s, one attempt; no kept-alive connection, so the sandbox can be
    waited on to be idle after a held request is released."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
    return harness.client(transport, timeout=0.5, max_attempts=1)


def manager(harness: Harness, client: GatewayClient, clock: FinopsClock) -> KeyManager:
    """A KeyManager as a fresh process builds it, with the default settle time."""
    return KeyManager(
        client,
        harness.store,
        KeyVault(harness.sink.directory),
        state_path=harness.store.path,
        clock=clock,
        settle_seconds=SETTLE_SECONDS,
    )


async def rotate_held_in_queue(harness: Harness, km: KeyManager, agent: str) -> None:
    """A rotate that the gateway holds in its queue: finops gives up (unknown outcome)."""
    harness.sandbox.faults.gate_late(True)
    rotate_faults(harness, "late")
    with pytest.raises(RotationError, match="unknown") as err:
        await km.rotate(spec(agent), reason="scheduled")
    assert_clean(str(err.value))
    no_faults(harness)  # the held request keeps its fate
    assert any("/v1/infra/keys/rotate" in label for label in harness.sandbox.faults.held_late())


def release(harness: Harness, *, run: bool) -> None:
    assert harness.sandbox.faults.release_late(run=run) == 1
    harness.sandbox.wait_idle(timeout=10)


def pending(harness: Harness, agent: str) -> list[str]:
    return [i.intent_key for i in harness.store.intents(kind="rotate", status=PENDING) if i.agent_id == agent]


async def test_an_unknown_rotate_blocks_new_rotations_until_settled_and_looked_at_again(harness: Harness) -> None:
    """The rotate truly never ran: no conclusion (and no new rotation) inside the settle time;
    after it, a fresh look that still shows nothing concludes it, and rotation resumes."""
    s, clock = spec("set-a"), FinopsClock(harness.sandbox)
    fleet = desired(s)
    async with impatient(harness) as client:
        k0 = await register(harness, client, "set-a")
        await rotate_held_in_queue(harness, manager(harness, client, clock), "set-a")
        keys_before = minted(harness.sandbox, "set-a")

        clock.offset += SETTLE_SECONDS - 60  # the next runs, still inside the settle time
        km = manager(harness, client, clock)
        [note] = await km.recover()
        assert "still unknown" in note and "No new rotation" in note
        assert_clean(note)
        assert len(pending(harness, "set-a")) == 1
        with pytest.raises(RotationError, match="still unknown"):
            await km.rotate(s, reason="operator request")
        run = await km.rotate_due(fleet, force=True)
        assert not run.rotated and not run.failed and "still unknown" in run.skipped["set-a"]
        assert minted(harness.sandbox, "set-a") == keys_before  # no rotate was sent
        assert harness.sink.load("set-a") == k0 and live(harness.sandbox, "set-a") == {key_prefix(k0)}
        assert (await km.held_key_health(fleet))["set-a"].flag is None  # live, unrevoked, works
        [status] = km.key_status(fleet)
        assert status.pending_rotation and "outcome is unknown" in status.describe()

        release(harness, run=False)  # lost in the queue: it never runs
        clock.offset += 61  # past the settle time of the rotate
        [note] = await km.recover()
        assert "never reached the gateway" in note and "settle time has passed" in note
        intents = harness.store.intents(kind="rotate")
        assert [i.status for i in intents] == [ABANDONED]
        outcome = await km.rotate(s, reason="operator request")
        held = harness.sink.load("set-a")
        assert held is not None and outcome.new_fingerprint == f"sha3:{key_prefix(held)}"
        assert live(harness.sandbox, "set-a") == {key_prefix(held)}
        assert not km.ledger.orphans()


async def test_a_late_landing_before_the_next_run_is_recovered_from_at_once(harness: Harness) -> None:
    """It lands (k0 revoked, a key nobody holds minted) before the next run, well inside the
    settle time: the landing is proven, so the next run rotates again from k0 while it is in
    its grace, without waiting for the settle time; ``status --strict`` flags k0 until then."""
    s, clock = spec("set-b"), FinopsClock(harness.sandbox)
    fleet = desired(s)
    async with impatient(harness) as client:
        k0 = await register(harness, client, "set-b")
        await rotate_held_in_queue(harness, manager(harness, client, clock), "set-b")
        release(harness, run=True)
        [late] = live(harness.sandbox, "set-b")
        assert late != key_prefix(k0)

        km = manager(harness, client, clock)
        flag = (await km.held_key_health(fleet))["set-b"].flag
        assert flag is not None and flag.startswith("HELD KEY EXPIRES") and "no successor is held" in flag

        harness.sandbox.clock.advance(60)  # inside the grace and inside the settle time
        [note] = await km.recover()
        assert "rotated again from it" in note and f"sha3:{late}" in note
        assert_clean(note)
        held = harness.sink.load("set-b")
        assert held is not None and key_prefix(held) not in {key_prefix(k0), late}
        assert not pending(harness, "set-b")
        [status] = km.key_status(fleet)
        assert status.orphans == (f"sha3:{late}",)

        harness.sandbox.clock.advance(GRACE_S + 1)
        assert auth_status(harness.sandbox, k0, "set-b") == 401
        assert auth_status(harness.sandbox, held, "set-b") == 200
        assert live(harness.sandbox, "set-b") == {key_prefix(held), late}  # the orphan: reported, not revocable
        assert (await km.held_key_health(fleet))["set-b"].flag is None


async def test_a_late_landing_after_the_grace_is_reported_lost_with_its_orphan(harness: Harness) -> None:
    """It lands and finops stays down past k0's grace: nothing can regain a key (the gateway
    made that impossible), and finops says so, naming the orphan."""
    s, clock = spec("set-c"), FinopsClock(harness.sandbox)
    fleet = desired(s)
    async with impatient(harness) as client:
        k0 = await register(harness, client, "set-c")
        await rotate_held_in_queue(harness, manager(harness, client, clock), "set-c")
        release(harness, run=True)
        [late] = live(harness.sandbox, "set-c")
        harness.sandbox.clock.advance(GRACE_S + 1)
        assert auth_status(harness.sandbox, k0, "set-c") == 401
        km = manager(harness, client, clock)
        [note] = await km.recover()
        assert "LOST KEY" in note and f"sha3:{late}" in note
        flag = (await km.held_key_health(fleet))["set-c"].flag
        assert flag is not None and flag.startswith("NO WORKING KEY HELD")
        assert [o.key_prefix for o in km.ledger.orphans()["set-c"]] == [late]


async def test_a_rotation_from_a_dying_key_never_waits_and_its_own_late_landing_is_reported(
    harness: Harness,
) -> None:
    """k0 is revoked (a rotate landed, its answer lost) and the recovery's rotate from k0 is
    itself held in a queue. Waiting for its settle time would outlive k0's grace, so the next
    run rotates again from k0 at once; when the held rotate lands later, the key it mints is
    reported by prefix, even if finops was down long past every watch's end."""
    s, clock = spec("set-d"), FinopsClock(harness.sandbox)
    async with impatient(harness) as client:
        k0 = await register(harness, client, "set-d")
        rotate_faults(harness, "500")  # runs, answer lost: an orphan, k0 revoked
        with pytest.raises(RotationError, match="unknown"):
            await manager(harness, client, clock).rotate(s, reason="scheduled")
        [first] = live(harness.sandbox, "set-d")
        harness.sandbox.faults.gate_late(True)
        rotate_faults(harness, "late")
        [note] = await manager(harness, client, clock).recover()  # its rotate is held in a queue
        assert "not resolved yet" in note and "no successor is held" in note
        no_faults(harness)
        assert len(pending(harness, "set-d")) == 1 and harness.sink.load("set-d") == k0

        harness.sandbox.clock.advance(30)  # inside the settle time of the held rotate
        km = manager(harness, client, clock)
        [note] = await km.recover()
        assert "rotated again from it" in note and "already listed revoked" in note
        held = harness.sink.load("set-d")
        assert held is not None and held != k0

        release(harness, run=True)  # the held rotate lands (k0 is still in its grace)
        [second] = live(harness.sandbox, "set-d") - {first, key_prefix(held)}
        clock.offset += 2 * 3600  # finops was down long past the watch's end
        notes = await km.recover()
        assert any("landed late" in n and f"sha3:{second}" in n for n in notes), notes
        assert {o.key_prefix for o in km.ledger.orphans()["set-d"]} == {first, second}
        assert await km.recover() == []  # seen once, then the watch is done
        harness.sandbox.clock.advance(GRACE_S + 1)
        assert auth_status(harness.sandbox, held, "set-d") == 200
        assert harness.sink.load("set-d") == held


async def test_an_emergency_stop_does_not_wait_for_an_unknown_rotate(harness: Harness) -> None:
    """``freeze`` must stop the agent now: it rotates into quarantine despite the unresolved
    rotate (superseded and watched); if that rotate lands later, its key is reported."""
    s, clock = spec("set-e"), FinopsClock(harness.sandbox)
    async with impatient(harness) as client:
        k0 = await register(harness, client, "set-e")
        await rotate_held_in_queue(harness, manager(harness, client, clock), "set-e")
        km = manager(harness, client, clock)
        result = await freeze(client, harness.store, km, s, "runaway loop")
        assert result.ok, result.problems
        quarantined = (harness.sink.directory / QUARANTINE / "set-e.key").read_text().strip()
        assert quarantined != k0 and not pending(harness, "set-e")

        release(harness, run=True)  # the superseded rotate lands inside k0's grace
        [late] = live(harness.sandbox, "set-e") - {key_prefix(quarantined)}
        notes = await km.recover()
        assert any("landed late" in n and f"sha3:{late}" in n for n in notes), notes
        harness.sandbox.clock.advance(GRACE_S + 1)
        assert auth_status(harness.sandbox, k0, "set-e") == 401  # the agent is stopped
        assert [o.key_prefix for o in km.ledger.orphans()["set-e"]] == [late]
