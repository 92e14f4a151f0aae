"""Per-agent exponential backoff: one failing agent is retried less and less often, alone.

A level-triggered controller retries forever by design; without backoff a broken agent
(frozen wallet, a cap the gateway refuses) would be hammered every pass and fill the log.
Its changes are skipped while its backoff runs and the pass reports it; every other agent
is reconciled as usual. Pure bookkeeping with the clock passed in, so tests step it.
Kept in memory: a restarted daemon retries everyone at once, which is what an operator
restarting it after a fix wants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    base_s: float = 30.0
    max_s: float = 1800.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1 → base)."""
        if failures <= 0:
            return 0.0
        return float(min(self.base_s * 2 ** min(failures - 1, 32), self.max_s))


@dataclass(frozen=True)
class AgentBackoffState:
    failures: int
    retry_at: float
    reason: str


class AgentBackoff:
    def __init__(self, policy: BackoffPolicy | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._agents: dict[str, AgentBackoffState] = {}

    def failed(self, agent_id: str, now: float, reason: str) -> AgentBackoffState:
        previous = self._agents.get(agent_id)
        failures = (previous.failures if previous else 0) + 1
        state = AgentBackoffState(failures, now + self.policy.delay(failures), reason)
        self._agents[agent_id] = state
        return state

    def succeeded(self, agent_id: str) -> bool:
        """Forget the agent's failures; true when it had any (worth a log line)."""
        return self._agents.pop(agent_id, None) is not None

    def active(self, agent_id: str, now: float) -> bool:
        state = self._agents.get(agent_id)
        return state is not None and now < state.retry_at

    def active_count(self, now: float) -> int:
        return sum(1 for s in self._agents.values() if now < s.retry_at)

    def get(self, agent_id: str) -> AgentBackoffState | None:
        return self._agents.get(agent_id)

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        return {
            agent: {"failures": s.failures, "retry_in_s": max(0.0, round(s.retry_at - now, 1)), "reason": s.reason}
            for agent, s in sorted(self._agents.items())
        }
