"""The key ledger's bookkeeping for interrupted rotations, and the status flag built on it."""

from __future__ import annotations

from pathlib import Path

from controller.keys.rotate import HeldKeyHealth
from controller.keys.store import KeyLedger
from policies.rotation import GRACE_SECONDS


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rotation_sent_keeps_the_earliest_send_until_proven_not_landed(tmp_path: Path) -> None:
    clock = Clock(1_000.0)
    ledger = KeyLedger(tmp_path / "state.db", clock=clock)
    assert ledger.rotation_sent_at("a", "k0") is None
    assert ledger.record_rotation_sent("a", "k0") == 1_000.0
    clock.now = 1_100.0
    assert ledger.record_rotation_sent("a", "k0") == 1_000.0  # a retry does not move the bound
    ledger.forget_rotation_sent("a", "k0")
    assert ledger.record_rotation_sent("a", "k0") == 1_100.0
    ledger.close()


def test_late_watches_intersect_explain_and_expire(tmp_path: Path) -> None:
    clock = Clock(0.0)
    ledger = KeyLedger(tmp_path / "state.db", clock=clock)
    ledger.watch_late("a", "rotate:1", {"k0", "o1"}, until=600)
    clock.now = 100
    ledger.watch_late("a", "rotate:2", {"k0", "o1", "late"}, until=700)  # saw a late landing
    assert ledger.late_watches() == {"a": {"k0", "o1"}}  # so "late" stays suspect
    ledger.explain("a", "k1")  # the key finops minted and holds
    assert ledger.late_watches("a") == {"a": {"k0", "o1", "k1"}}
    clock.now = 650
    # Expired, but no look at the gateway since: a watch ends only with a look after its end.
    assert ledger.late_watches() == {"a": {"k0", "o1", "k1"}}
    ledger.end_late_watches("a", looked_at=650)
    assert ledger.late_watches() == {"a": {"k0", "o1", "late", "k1"}}  # the first watch is done
    clock.now = 5_000  # finops was down long past the second watch's end
    assert ledger.late_watches() == {"a": {"k0", "o1", "late", "k1"}}
    ledger.end_late_watches("b", looked_at=5_000)  # another agent's look ends nothing of a's
    assert ledger.late_watches("a") == {"a": {"k0", "o1", "late", "k1"}}
    ledger.end_late_watches("a", looked_at=5_000)
    assert ledger.late_watches() == {}
    ledger.close()


def test_held_key_flag_says_what_is_wrong_and_when() -> None:
    ok = HeldKeyHealth("a", "sha3:0000aaaa", listed=True, revoked=False, authenticates=True, expires_in=None)
    assert ok.flag is None
    dying = HeldKeyHealth("a", "sha3:0000aaaa", listed=True, revoked=True, authenticates=True, expires_in=42)
    assert dying.flag is not None
    assert "held key sha3:0000aaaa expires in 42 s and no successor is held" in dying.flag
    foreign = HeldKeyHealth("a", "sha3:0000aaaa", listed=True, revoked=True, authenticates=True, expires_in=None)
    assert foreign.flag is not None and f"at most {GRACE_SECONDS} s" in foreign.flag
    dead = HeldKeyHealth("a", "sha3:0000aaaa", listed=True, revoked=True, authenticates=False, expires_in=0)
    assert dead.flag is not None and dead.flag.startswith("NO WORKING KEY HELD")
    unknown = HeldKeyHealth(
        "a", "sha3:0000aaaa", listed=True, revoked=True, authenticates=None, expires_in=10, error="503"
    )
    assert unknown.flag is not None and "expires in 10 s" in unknown.flag and "could not test it: 503" in unknown.flag
