"""The pure core (``policies/``) loads no mechanism: importing every module of it, in a fresh
interpreter, brings in nothing from ``controller``, no HTTP client and no database driver."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import policies

MECHANISM = ("controller", "httpx", "sqlite3", "_sqlite3", "uvicorn", "starlette", "apscheduler")


def test_importing_the_pure_core_loads_no_mechanism() -> None:
    modules = sorted(f"policies.{m.name}" for m in pkgutil.iter_modules(policies.__path__))
    assert {"policies.planner", "policies.plan_types", "policies.live", "policies.records"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {MECHANISM!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_mechanism_re_exports_the_same_pure_values() -> None:
    import controller.gateway.models as models
    import controller.reconcile.observe as observe
    import controller.state as state
    import policies.live as live
    import policies.records as records

    assert (models.Webhook, models.BudgetStatus, models.KeyRecord) == (live.Webhook, live.BudgetStatus, live.KeyRecord)
    assert (observe.LiveAgent, observe.LiveFleet) == (live.LiveAgent, live.LiveFleet)
    assert (state.Hold, state.Intent, state.BudgetWrite) == (records.Hold, records.Intent, records.BudgetWrite)
