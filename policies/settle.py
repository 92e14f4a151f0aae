"""When an unknown outcome may be concluded "never happened".

A non-idempotent request (deposit, register, webhook create, rotate) whose answer was lost
may still run on the gateway later: a request held in a proxy or server queue runs after
the client gave up (the sandbox's ``late`` fault). Finding nothing on the gateway right
after giving up therefore proves nothing. An intent is concluded *not landed* only when
(1) more than the settle time has passed since the last moment finops may have had that
request on the wire (``sent_at``) and (2) a fresh look at the gateway, made after that,
still shows nothing. Until then the intent is unresolved and its object gets no new
non-idempotent action of that kind.
"""

from __future__ import annotations

SETTLE_SECONDS = 600.0
"""Longer than any request can take, with a wide margin: the client's worst case for one
call (5 attempts of up to 10 s each plus backoff, about 1 minute; ``sent_at`` is moved to
the moment finops gave up when it is still alive to do so), the gateway's own 30 s handler
limit (504 after that), and queueing in front of it (proxies, load balancers). An agent
whose deposit outcome is unknown waits at most this long (plus one pass) for its top-up."""


def parse_settle_seconds(raw: str) -> float:
    """An operator's override (``FINOPS_SETTLE_SECONDS``): a plain number of seconds >= 0.
    Raises ``ValueError`` naming the problem."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"FINOPS_SETTLE_SECONDS must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= 7 * 86_400 or value != value:
        raise ValueError(f"FINOPS_SETTLE_SECONDS must be between 0 and 604800 seconds, got {raw!r}")
    return value


def is_settled(sent_at: float, now: float, settle_seconds: float = SETTLE_SECONDS) -> bool:
    """Whether a request last possibly sent at ``sent_at`` can no longer land."""
    return now - sent_at > settle_seconds


def settles_at(sent_at: float, settle_seconds: float = SETTLE_SECONDS) -> float:
    return sent_at + settle_seconds
