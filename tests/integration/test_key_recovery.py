"""Issue 9 item 2, over real HTTP with the sandbox's own fault injection: an interrupted
rotation is resolved by testing the held key and comparing live key prefixes, retried on
every run while the held key works, flagged by ``status`` before the grace ends, and a
rotate that lands late is reported by prefix. finops never gives up a key that still
authenticates."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from controller.gateway.client import GatewayClient
from controller.keys.rotate import RotationError
from controller.reconcile.status import fleet_status
from controller.state import ABANDONED, FAILED, PENDING
from policies.keyprint import key_prefix
from tests.integration.conftest import Harness
from tests.integration.test_keys import (  # noqa: F401  (fixtures: admin, no_key_material)
    admin,
    assert_clean,
    auth_status,
    desired,
    live,
    manager,
    no_key_material,
    register,
    spec,
)

ROTATE_ONLY = "only=POST /v1/infra/keys/rotate"


def rotate_faults(harness: Harness, kind: str, **extra: str) -> None:
    spec_ = ",".join([f"seed=1,rate=1,kinds={kind},{ROTATE_ONLY}", *(f"{k}={v}" for k, v in extra.items())])
    harness.sandbox.faults.configure(spec_)


def no_faults(harness: Harness) -> None:
    harness.sandbox.faults.configure(None)


async def test_rotate_500_then_recovery_503_never_abandons_a_key_that_still_authenticates(
    harness: Harness,
    admin: GatewayClient,  # noqa: F811
) -> None:
    """The issue's repro, step by step."""
    s = spec("rec-a")
    fleet = desired(s)
    k0 = await register(harness, admin, "rec-a")
    clock = harness.sandbox.clock

    # 1. rotate runs on the gateway, then the answer is a 500: an orphan is minted, the held
    #    key is revoked (listed so) but keeps its 300 s grace.
    rotate_faults(harness, "500")
    with pytest.raises(RotationError, match="unknown") as err:
        await manager(harness, admin).rotate(s, reason="scheduled")
    assert_clean(str(err.value))
    [orphan] = live(harness.sandbox, "rec-a")
    assert orphan != key_prefix(k0)

    # 2. the next run's recovery rotates again from the held key: that rotate gets a 503
    #    (never ran). The rotation is still pending, nothing given up.
    clock.advance(60)
    rotate_faults(harness, "503")
    notes = await manager(harness, admin).recover()
    [note] = notes
    assert "not resolved yet" in note and "no successor is held" in note
    assert_clean(note)
    assert harness.sink.load("rec-a") == k0
    assert [i.status for i in harness.store.intents(kind="rotate", status=PENDING)] == [PENDING]

    # 3. the next run: the held key is listed revoked, nothing new appeared. It still
    #    answers 200, so it must NOT be called "no longer live": rotate again from it.
    clock.advance(60)
    assert auth_status(harness.sandbox, k0, "rec-a") == 200
    km = manager(harness, admin)
    [note] = await km.recover()
    assert "no longer live" not in note and "LOST" not in note
    assert "no successor is held" in note
    statuses = [i.status for i in harness.store.intents(kind="rotate")]
    assert FAILED not in statuses and statuses.count(PENDING) == 1

    # status, before the grace ends: a loud flag with the seconds left (300 - 120 s).
    status = await fleet_status(admin, fleet, harness.store, km, target="sandbox")
    [row] = status.agents
    flag = next(f for f in row.flags if f.startswith("HELD KEY EXPIRES"))
    found = re.search(rf"held key sha3:{key_prefix(k0)} expires in (\d+) s and no successor is held", flag)
    assert found is not None, flag
    assert 170 <= int(found[1]) <= 180  # the sandbox clock also follows real time
    assert row in status.flagged  # `status --strict` exits 1
    assert row.key["gateway"] == {
        "fingerprint": f"sha3:{key_prefix(k0)}",
        "listed": True,
        "revoked": True,
        "authenticates": True,
        "expires_in": int(found[1]),
    }
    assert f"sha3:{orphan}" in " ".join(row.flags)

    # 4. the gateway recovers: the next run converges to one live key that finops holds.
    no_faults(harness)
    clock.advance(60)
    run = await manager(harness, admin).rotate_due(fleet)
    assert run.ok, run.failed
    held = harness.sink.load("rec-a")
    assert held is not None and held != k0
    assert live(harness.sandbox, "rec-a") == {orphan, key_prefix(held)}
    assert any("rotated again from it" in n for n in run.recovered)
    clock.advance(301)
    assert auth_status(harness.sandbox, held, "rec-a") == 200
    assert auth_status(harness.sandbox, k0, "rec-a") == 401
    status = await fleet_status(admin, fleet, harness.store, manager(harness, admin), target="sandbox")
    [row] = status.agents
    assert not any(f.startswith("HELD KEY") or f.startswith("NO WORKING KEY") for f in row.flags)
    assert not any(f.startswith("ROTATION INTERRUPTED") for f in row.flags)
    assert row.key["orphans"] == [f"sha3:{orphan}"]


async def test_past_the_grace_the_held_key_is_declared_lost_only_once_it_stops_authenticating(
    harness: Harness,
    admin: GatewayClient,  # noqa: F811
) -> None:
    s = spec("rec-b")
    k0 = await register(harness, admin, "rec-b")
    rotate_faults(harness, "500")
    with pytest.raises(RotationError):
        await manager(harness, admin).rotate(s, reason="scheduled")
    rotate_faults(harness, "503")
    [note] = await manager(harness, admin).recover()  # a retry that never ran: still pending
    assert "not resolved yet" in note
    harness.sandbox.clock.advance(301)  # finops stayed down past the grace
    assert auth_status(harness.sandbox, k0, "rec-b") == 401
    km = manager(harness, admin)
    [note] = await km.recover()
    assert "LOST KEY" in note and "no longer authenticates" in note
    status = await fleet_status(admin, desired(s), harness.store, km, target="sandbox")
    [row] = status.agents
    assert any(f.startswith("NO WORKING KEY HELD") for f in row.flags)
    assert_clean(" ".join(row.flags))


async def test_a_held_key_revoked_by_a_landed_rotate_is_rotated_from_even_without_an_orphan(
    harness: Harness,
    admin: GatewayClient,  # noqa: F811
) -> None:
    """An adversary's variant: the revoke landed, no new key is listed (as if it were already
    revoked elsewhere). The key still authenticates, so it is rotated from, not dropped."""
    k0 = await register(harness, admin, "rec-c")
    km = manager(harness, admin)
    intent_key = "rotate:rec-c:1.000000"
    harness.store.begin_intent(
        intent_key,
        "rotate",
        "rec-c",
        {
            "old_prefix": key_prefix(k0),
            "live_before": [key_prefix(k0)],
            "source": "main",
            "target": "main",
            "target_before": key_prefix(k0),
            "sink": {"kind": "directory"},
            "reason": "scheduled",
        },
    )
    harness.sandbox.store.revoke_key_by_prefix("rec-c", key_prefix(k0), now=harness.sandbox.clock())
    [note] = await km.recover()
    held = harness.sink.load("rec-c")
    assert held is not None and held != k0 and "rotated again from it" in note
    assert live(harness.sandbox, "rec-c") == {key_prefix(held)}
    assert [i.status for i in harness.store.intents(kind="rotate") if i.intent_key == intent_key] == [ABANDONED]
    harness.sandbox.clock.advance(301)
    assert auth_status(harness.sandbox, held, "rec-c") == 200


async def test_a_rotate_that_lands_late_after_a_run_saw_nothing_is_recovered_from_and_reported_by_prefix(
    harness: Harness,
) -> None:
    """Finding nothing right after giving up proves nothing (the rotate may sit in a queue):
    the run that sees nothing leaves it unresolved and refuses a new rotation (it would mint
    another key); when it lands, the next run sees the landing, rotates again from the held
    key inside its grace, and reports the key the late rotate minted by prefix.

    (This test used to have recovery conclude "never reached the gateway" at once and the
    operator rotate again: the late landing then revoked nothing finops held, but in general
    it revokes the held key, which dies 300 s later.)"""
    s = spec("rec-d")
    async with harness.client(timeout=0.5, max_attempts=1) as impatient:
        k0 = await register(harness, impatient, "rec-d")
        rotate_faults(harness, "late", hang="1.5")
        with pytest.raises(RotationError, match="unknown"):
            await manager(harness, impatient).rotate(s, reason="scheduled")
        no_faults(harness)  # the held request keeps its fate: it still lands late
        # Recovery before it lands: nothing new, the held key live and working: unresolved.
        [note] = await manager(harness, impatient).recover()
        assert "still unknown" in note
        # The operator asks for a rotation at once: refused, nothing sent.
        with pytest.raises(RotationError, match="still unknown"):
            await manager(harness, impatient).rotate(s, reason="operator request")
        assert harness.sink.load("rec-d") == k0
        # Then the first rotate lands (k0 is revoked, still inside its grace) and mints a key.
        deadline = time.monotonic() + 10
        while len(harness.sandbox.store.list_keys("rec-d")) < 2:
            assert time.monotonic() < deadline, "the late rotate never landed"
            await asyncio.sleep(0.05)
        [late] = live(harness.sandbox, "rec-d")
        km = manager(harness, impatient)
        [note] = await km.recover()
        assert "rotated again from it" in note and f"sha3:{late}" in note, note
        [status] = km.key_status(desired(s))
        assert status.orphans == (f"sha3:{late}",)
        held = harness.sink.load("rec-d")
        assert held is not None and key_prefix(held) not in {key_prefix(k0), late}
        assert live(harness.sandbox, "rec-d") == {late, key_prefix(held)}
