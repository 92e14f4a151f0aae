"""Which agents a gateway request may change (``controller.observation.watch.written_agents``):
the write watch invalidates exactly those, and everything when it cannot tell."""

from __future__ import annotations

import pytest

from controller.observation.watch import written_agents


@pytest.mark.parametrize(
    ("method", "path", "body", "agents"),
    [
        ("GET", "/v1/billing/wallets/bot-1/balance", None, ()),
        ("GET", "/v1/billing/leaderboard?metric=calls", None, ()),
        ("PUT", "/v1/billing/wallets/bot-1/budget", b"{}", ("bot-1",)),
        ("POST", "/v1/billing/wallets/bot-1/deposit", b'{"amount": "5.00"}', ("bot-1",)),
        ("POST", "/v1/billing/wallets/bot-1/withdraw", b"{}", ("bot-1",)),
        ("POST", "/v1/billing/wallets/bot-1/freeze", None, ("bot-1",)),
        ("POST", "/v1/register", b'{"agent_id": "bot-2"}', ("bot-2",)),
        ("POST", "/v1/billing/wallets", b'{"agent_id": "bot-3"}', ("bot-3",)),
        ("POST", "/v1/register", b"not json", None),
        ("POST", "/v1/register", b'{"agent_id": 7}', None),
        ("POST", "/v1/batch", b'{"calls": []}', None),
        ("POST", "/v1/infra/keys/rotate", b"{}", ()),
        ("DELETE", "/v1/infra/webhooks/12", None, ()),
    ],
)
def test_written_agents(method: str, path: str, body: bytes | None, agents: tuple[str, ...] | None) -> None:
    assert written_agents(method, path, body) == agents
