"""``finops status``'s view of the state and the daemon replicas (pure parts)."""

from __future__ import annotations

from controller.cli.where import HEARD_WITHIN_S, StateStatus, _flags
from controller.daemon.replicas import ReplicaRecord, Role


def _replica(rid: str, role: Role, heard_at: float) -> ReplicaRecord:
    return ReplicaRecord(rid, "host", 1, role, 0.0, heard_at, None, None, None, None, "", {})


def test_flags_say_when_no_replica_or_two_are_active() -> None:
    now = 10_000.0
    fresh = now - 5
    assert _flags((_replica("a", Role.ACTIVE, fresh), _replica("b", Role.STANDBY, fresh)), now) == ()
    (none,) = _flags((_replica("b", Role.STANDBY, fresh),), now)
    assert none.startswith("NO ACTIVE DAEMON")
    (two,) = _flags((_replica("a", Role.ACTIVE, fresh), _replica("b", Role.ACTIVE, fresh)), now)
    assert two.startswith("MORE THAN ONE ACTIVE DAEMON")
    stale = now - HEARD_WITHIN_S - 1  # a replica not heard from is not running: no flag about it
    assert _flags((_replica("a", Role.ACTIVE, stale), _replica("b", Role.ACTIVE, fresh)), now) == ()
    assert _flags((_replica("a", Role.STOPPED, fresh),), now) == ()
    assert _flags((), now) == ()


def test_lines_and_json_name_backend_writer_and_replicas() -> None:
    now = 1_000.0
    status = StateStatus(
        "postgresql", "postgresql://finops:***@db/finops", "finops-writer: finops run pid 7 on h", (
            _replica("abcdef0123", Role.ACTIVE, now - 3),
        ), now, ("x",),
    )  # fmt: skip
    text = "\n".join(status.lines())
    assert "State: postgresql at postgresql://finops:***@db/finops; writer lock held by finops-writer" in text
    assert "replica host/1 (abcdef01): active, heard 3 s ago" in text and "! x" in text
    data = status.to_dict()
    assert data["replicas"][0]["heard_ago_seconds"] == 3.0 and data["flags"] == ["x"]
