"""The desired state after defaults, tiers and overrides are resolved.

These frozen dataclasses are the contract between manifest loading (controller) and every
decision (policies, planner). They carry no pydantic and no I/O so that pure functions and
property tests can build them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True)
class Source:
    """Where a declaration came from, for error messages that point at a line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class AgentSpec:
    """One agent's resolved desired state. Amounts are in the fleet's currency."""

    agent_id: str
    fleet: str
    tier: str
    daily_cap: Decimal
    monthly_cap: Decimal
    funding_floor: Decimal
    funding_target: Decimal
    alert_thresholds: tuple[int, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    source: Source | None = None


@dataclass(frozen=True)
class FleetSpec:
    """A fleet: shared currency, totals and the agents that belong to it."""

    name: str
    currency: str
    daily_total: Decimal
    funding_ceiling: Decimal
    agents: tuple[AgentSpec, ...]
    source: Source | None = None


@dataclass(frozen=True)
class DesiredState:
    """Everything the manifests declare: the inventory of managed agents."""

    fleets: tuple[FleetSpec, ...]

    def agents(self) -> tuple[AgentSpec, ...]:
        return tuple(a for f in self.fleets for a in f.agents)

    def fleet(self, name: str) -> FleetSpec:
        for f in self.fleets:
            if f.name == name:
                return f
        raise KeyError(name)
