"""Per-agent backoff: doubling delays up to a cap, per agent, cleared by a success."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controller.daemon.backoff import AgentBackoff, BackoffPolicy


def test_delays_double_from_the_base_and_stop_at_the_cap() -> None:
    policy = BackoffPolicy(base_s=30, max_s=300)
    assert [policy.delay(n) for n in range(7)] == [0, 30, 60, 120, 240, 300, 300]


def test_one_agent_backs_off_alone_and_a_success_clears_it() -> None:
    backoff = AgentBackoff(BackoffPolicy(base_s=100, max_s=1000))
    first = backoff.failed("res-01", 0.0, "gateway 403")
    assert first.failures == 1 and first.retry_at == 100
    assert backoff.active("res-01", 99.9) and not backoff.active("res-01", 100)
    assert not backoff.active("res-02", 50)
    assert backoff.failed("res-01", 100, "gateway 403").retry_at == 300
    assert backoff.active_count(150) == 1
    assert backoff.snapshot(150) == {"res-01": {"failures": 2, "retry_in_s": 150.0, "reason": "gateway 403"}}
    assert backoff.succeeded("res-01") and not backoff.succeeded("res-01")
    assert not backoff.active("res-01", 150) and backoff.active_count(150) == 0


@given(st.floats(0.1, 600), st.floats(1, 86_400), st.integers(1, 200))
def test_delay_never_shrinks_and_never_exceeds_the_cap(base: float, cap: float, n: int) -> None:
    policy = BackoffPolicy(base_s=base, max_s=cap)
    assert policy.delay(n) <= cap
    assert policy.delay(n + 1) >= policy.delay(n)
