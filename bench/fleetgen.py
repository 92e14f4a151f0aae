"""Generate a fleet of N agents as manifests in the schema of ``manifests/``.

One Fleet document (budget, tiers, funding guardrail, no agents of its own) plus AgentGroup
documents of at most ``GROUP_SIZE`` agents each, the way a large team would split a fleet
across files. Every generated agent needs all three kinds of write on a fresh gateway
(register, top-up above the 500-credit signup bonus, budget caps), so the first apply
exercises the whole write path; the fleet's totals are sized so no guardrail refuses it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml

from policies.money import format_money

GROUP_SIZE = 500
SIGNUP_BONUS_USD = Decimal("5.00")
"""The gateway's 500-credit bonus at the sandbox's 100 credits per USD."""


@dataclass(frozen=True)
class TierShape:
    name: str
    daily_cap: Decimal
    monthly_cap: Decimal
    floor: Decimal
    target: Decimal


TIERS = (
    TierShape("orchestrator", Decimal("80.00"), Decimal("1600.00"), Decimal("100.00"), Decimal("200.00")),
    TierShape("researcher", Decimal("30.00"), Decimal("600.00"), Decimal("40.00"), Decimal("75.00")),
    TierShape("summarizer", Decimal("20.00"), Decimal("400.00"), Decimal("25.00"), Decimal("50.00")),
    TierShape("classifier", Decimal("15.00"), Decimal("300.00"), Decimal("20.00"), Decimal("40.00")),
)


def tier_of(index: int) -> TierShape:
    """One orchestrator per 20 agents, the rest spread over the worker tiers."""
    if index % 20 == 0:
        return TIERS[0]
    return TIERS[1 + index % 3]


def agent_id(fleet: str, index: int) -> str:
    return f"{fleet}-{index:05d}"


def fleet_documents(fleet: str, size: int) -> list[dict[str, object]]:
    """The Fleet document followed by its AgentGroup documents."""
    tiers = [tier_of(i) for i in range(size)]
    daily_total = sum((t.daily_cap for t in tiers), Decimal(0))
    # The first run puts in each agent's target: its signup bonus plus the top-up above it
    # (the per-run ceiling and the daily funding limit count both).
    first_run_top_up = sum((t.target for t in tiers), Decimal(0))
    docs: list[dict[str, object]] = [
        {
            "apiVersion": "finops.greenhelix.net/v1",
            "kind": "Fleet",
            "metadata": {"name": fleet, "labels": {"generated-by": "bench.fleetgen"}},
            "spec": {
                "currency": "USD",
                "dailyBudgetTotal": format_money(daily_total),
                "funding": {"perRunCeiling": format_money(first_run_top_up)},
                "alerts": {"thresholds": [75, 90, 100]},
                "defaults": {"labels": {"team": fleet}},
                "tiers": {
                    t.name: {
                        "dailyCap": format_money(t.daily_cap),
                        "monthlyCap": format_money(t.monthly_cap),
                        "funding": {"floor": format_money(t.floor), "target": format_money(t.target)},
                    }
                    for t in TIERS
                },
            },
        }
    ]
    for start in range(0, size, GROUP_SIZE):
        indexes = range(start, min(start + GROUP_SIZE, size))
        docs.append(
            {
                "apiVersion": "finops.greenhelix.net/v1",
                "kind": "AgentGroup",
                "metadata": {"name": f"{fleet}-group-{start // GROUP_SIZE:03d}"},
                "spec": {
                    "fleet": fleet,
                    "agents": [{"id": agent_id(fleet, i), "tier": tiers[i].name} for i in indexes],
                },
            }
        )
    return docs


def write_fleet(directory: Path, size: int, *, fleet: str = "scale") -> list[str]:
    """Write the manifests for ``size`` agents into ``directory``; returns the agent ids."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = fleet_documents(fleet, size)
    (directory / f"{fleet}-fleet.yaml").write_text(yaml.safe_dump(docs[0], sort_keys=False), encoding="utf-8")
    for doc in docs[1:]:
        meta = doc["metadata"]
        assert isinstance(meta, dict)
        (directory / f"{meta['name']}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return [agent_id(fleet, i) for i in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--fleet", default="scale")
    args = parser.parse_args()
    ids = write_fleet(args.directory, args.agents, fleet=args.fleet)
    print(f"wrote {len(ids)} agents to {args.directory}")


if __name__ == "__main__":
    main()
