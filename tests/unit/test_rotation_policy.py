"""Rotation due-ness: weekly, daily and cron schedules (UTC), and schedule validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.rotation import next_rotation, rotation_due, validate_schedule

T0 = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)  # a Monday
times = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC))
schedules = st.sampled_from(["weekly", "daily", "0 3 * * 1", "15 */6 * * *", "0 0 1 * *", "59 23 * * 0"])


def test_weekly_is_due_seven_days_after_the_last_rotation() -> None:
    assert not rotation_due("weekly", T0, T0 + timedelta(days=7) - timedelta(seconds=1))
    assert rotation_due("weekly", T0, T0 + timedelta(days=7))
    assert next_rotation("weekly", T0, T0) == T0 + timedelta(days=7)


def test_daily_is_due_one_day_after_the_last_rotation() -> None:
    assert not rotation_due("daily", T0, T0 + timedelta(hours=23, minutes=59))
    assert rotation_due("daily", T0, T0 + timedelta(days=1))


def test_a_key_of_unknown_age_is_due_at_once() -> None:
    for schedule in ("weekly", "daily", "0 3 * * 1"):
        assert rotation_due(schedule, None, T0)
        assert next_rotation(schedule, None, T0) == T0


def test_cron_is_due_once_a_fire_time_has_passed_since_the_last_rotation() -> None:
    # Mondays 03:00 UTC; last rotated Monday 10:30, so the next fire is the following Monday.
    assert next_rotation("0 3 * * 1", T0, T0) == datetime(2026, 3, 9, 3, 0, tzinfo=UTC)
    assert not rotation_due("0 3 * * 1", T0, datetime(2026, 3, 9, 2, 59, tzinfo=UTC))
    assert rotation_due("0 3 * * 1", T0, datetime(2026, 3, 9, 3, 0, tzinfo=UTC))


def test_a_rotation_exactly_at_a_fire_time_waits_for_the_next_one() -> None:
    fired = datetime(2026, 3, 9, 3, 0, tzinfo=UTC)
    assert not rotation_due("0 3 * * 1", fired, fired)
    assert next_rotation("0 3 * * 1", fired, fired) == fired + timedelta(days=7)


def test_many_missed_fire_times_mean_one_rotation_not_a_backlog() -> None:
    long_ago = T0 - timedelta(days=60)
    assert rotation_due("0 3 * * *", long_ago, T0)
    # after the catch-up rotation at T0, the key is not due again until the next fire time
    assert not rotation_due("0 3 * * *", T0, T0 + timedelta(hours=16))
    assert rotation_due("0 3 * * *", T0, T0 + timedelta(hours=16, minutes=30))


def test_cron_is_evaluated_in_utc_whatever_zone_the_times_carry() -> None:
    plus2 = timezone(timedelta(hours=2))
    last = datetime(2026, 3, 2, 12, 30, tzinfo=plus2)  # 10:30 UTC
    assert next_rotation("0 3 * * *", last, last) == datetime(2026, 3, 3, 3, 0, tzinfo=UTC)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        rotation_due("weekly", datetime(2026, 1, 1), T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        rotation_due("weekly", T0, datetime(2026, 1, 1))


@pytest.mark.parametrize("schedule", ["weekly", "daily", "0 3 * * 1", "30 2 1 * *", "0 3 * * mon-fri", "5 0 * 1,7 *"])
def test_valid_schedules(schedule: str) -> None:
    assert validate_schedule(schedule) is None


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("", "empty"),
        ("monthly", "1 field"),
        ("@weekly", "1 field"),
        ("0 3 * * 1 2026", "6 field"),
        ("* 3 * * *", "single minute"),
        ("*/5 * * * *", "single minute"),
        ("0,30 * * * *", "single minute"),
        ("0 25 * * *", "not a valid cron expression"),
        ("0 3 * * 8", "not a valid cron expression"),
        ("0 H * * *", "not a valid cron expression"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_invalid_schedules_say_why(schedule: str, message: str) -> None:
    problem = validate_schedule(schedule)
    assert problem is not None and message in problem


def test_next_rotation_refuses_an_invalid_schedule() -> None:
    with pytest.raises(ValueError, match="single minute"):
        next_rotation("* * * * *", T0, T0)


@given(st.text(max_size=40))
def test_validation_never_raises(text: str) -> None:
    problem = validate_schedule(text)
    assert problem is None or isinstance(problem, str)


@given(schedules, times, times)
def test_due_exactly_when_next_rotation_has_come(schedule: str, last: datetime, now: datetime) -> None:
    assert rotation_due(schedule, last, now) == (next_rotation(schedule, last, now) <= now)


@given(schedules, times)
def test_never_due_right_after_a_rotation_and_always_due_eventually(schedule: str, last: datetime) -> None:
    nxt = next_rotation(schedule, last, last)
    assert last < nxt <= last + timedelta(days=31)
    assert not rotation_due(schedule, last, last)
    assert rotation_due(schedule, last, nxt)


@given(schedules, times, times, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)))
def test_once_due_stays_due_as_time_passes(schedule: str, last: datetime, now: datetime, later: timedelta) -> None:
    if rotation_due(schedule, last, now):
        assert rotation_due(schedule, last, now + later)


@given(schedules, times, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)))
def test_a_later_rotation_is_never_due_sooner(schedule: str, last: datetime, delay: timedelta) -> None:
    assert next_rotation(schedule, last + delay, last) >= next_rotation(schedule, last, last)


@given(st.sampled_from(["15 */6 * * *", "0 3 * * *", "59 23 * * 0"]), times)
def test_cron_next_rotation_is_a_fire_time_of_the_expression(schedule: str, last: datetime) -> None:
    nxt = next_rotation(schedule, last, last)
    minute, hour, _, _, dow = schedule.split()
    assert nxt.second == 0 and nxt.minute == int(minute)
    if hour.startswith("*/"):
        assert nxt.hour % int(hour[2:]) == 0
    else:
        assert nxt.hour == int(hour)
    if dow != "*":
        assert nxt.isoweekday() % 7 == int(dow)
