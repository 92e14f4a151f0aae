"""When an agent's key is due for rotation: a pure function of its schedule and age.

A schedule is ``weekly`` (7 days after the last rotation), ``daily`` (1 day), or a 5-field
cron expression in UTC, due once a fire time has passed since the last rotation. A daemon
that was down across several fire times rotates once, not once per missed fire time.

``last_rotation`` is when the key's age starts: the last rotation finops made, or, for a key
finops never rotated, when finops first stored it (registration or ``finops keys import``).
The caller decides which; this module only compares times. ``None`` means the key's age is
unknown, and such a key is due at once: a key of unknown age is the one most worth replacing.

Cron expressions are parsed with ``croniter`` (pure computation, no I/O). The minute field
must be a single minute, so a schedule never rotates more than once an hour: every rotation
mints a key and leaves the old one alive for the gateway's 300 s grace, and non-admin
callers may rotate only 10 times an hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from croniter import CroniterBadDateError, CroniterError, croniter

DAILY = "daily"
WEEKLY = "weekly"
INTERVALS = {DAILY: timedelta(days=1), WEEKLY: timedelta(days=7)}
GRACE_SECONDS = 300
"""How long a rotated-away (or revoked) key keeps authenticating on GreenHelix 1.4.8
(API.md: ``grace_period_seconds``); there is no instant revoke. The sandbox keeps its own
copy of the gateway's value on purpose, so that finops is tested against the gateway's
behaviour rather than its own assumption."""

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC); got a naive datetime")
    return value.astimezone(UTC)


def validate_schedule(schedule: str) -> str | None:
    """A one-line problem with ``schedule``, or ``None`` when it is usable."""
    if schedule in INTERVALS:
        return None
    fields = schedule.split()
    if not fields:
        return "rotation schedule is empty; use 'weekly', 'daily' or a 5-field cron expression (UTC)"
    if len(fields) != 5:
        return (
            f"rotation schedule {schedule!r} is neither 'weekly', 'daily' nor a 5-field cron expression "
            f"(minute hour day-of-month month day-of-week, UTC); it has {len(fields)} field(s)"
        )
    if not fields[0].isdigit() or not 0 <= int(fields[0]) <= 59:
        return (
            f"rotation schedule {schedule!r}: the minute field must be a single minute 0-59 "
            "(finops rotates a key at most once an hour)"
        )
    try:
        croniter(schedule, _EPOCH).get_next(datetime)
    except CroniterBadDateError:
        return f"rotation schedule {schedule!r} never fires (no such date)"
    except CroniterError as exc:
        return f"rotation schedule {schedule!r} is not a valid cron expression: {exc}"
    return None


def next_rotation(schedule: str, last_rotation: datetime | None, now: datetime) -> datetime:
    """When the key is (or was) next due: ``now`` for a key of unknown age, else the first
    fire time after ``last_rotation`` (which may be in the past: the key is overdue)."""
    now = _utc(now, "now")
    if last_rotation is None:
        return now
    last = _utc(last_rotation, "last_rotation")
    interval = INTERVALS.get(schedule)
    if interval is not None:
        return last + interval
    problem = validate_schedule(schedule)
    if problem:
        raise ValueError(problem)
    fire: datetime = croniter(schedule, last).get_next(datetime)
    return fire.astimezone(UTC)


def rotation_due(schedule: str, last_rotation: datetime | None, now: datetime) -> bool:
    """Whether the key should be rotated at ``now``."""
    return next_rotation(schedule, last_rotation, now) <= _utc(now, "now")
