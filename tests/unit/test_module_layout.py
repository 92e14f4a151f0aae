"""The sandbox is split by gateway area and the key engine by concern; these tests keep it so.

An area module never imports another area or the app that combines them (shared rules live
in the gateway core), every route the app serves is handled by an area module, and no part
of the key engine imports the ``rotate`` module that combines the parts.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import controller.keys
import controller.sandbox
from controller.keys.rotate import KeyManager
from controller.sandbox.app import create_app
from controller.sandbox.store import SandboxStore

SANDBOX = Path(controller.sandbox.__file__).parent
KEYS = Path(controller.keys.__file__).parent
AREAS = {"public", "wallets", "budget", "analytics", "marketplace", "keys", "webhooks", "batch", "admin"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_sandbox_route_areas_import_neither_each_other_nor_the_app() -> None:
    areas = {p.stem: p for p in (SANDBOX / "routes").glob("*.py") if p.name != "__init__.py"}
    assert set(areas) == AREAS
    shared = [p for p in SANDBOX.glob("*.py") if p.name not in {"app.py", "server.py", "__init__.py"}]
    assert {p.name for p in shared} >= {"gateway.py", "catalog.py", "request.py", "store.py", "records.py"}
    for path in [*areas.values(), *shared]:
        upward = {
            m for m in _imports(path) if m.startswith("controller.sandbox.routes") or m == "controller.sandbox.app"
        }
        assert not upward, f"{path.relative_to(SANDBOX)} imports {sorted(upward)}"


def test_every_sandbox_route_is_handled_by_its_area_module() -> None:
    store = SandboxStore()
    try:
        app = create_app(store)
        modules: dict[str, str] = {}
        for route in app.routes:
            handler = inspect.getclosurevars(route.endpoint).nonlocals["handler"]  # type: ignore[attr-defined]
            modules[f"{sorted(route.methods or ())} {route.path}"] = handler.__func__.__module__  # type: ignore[attr-defined]
    finally:
        store.close()
    assert len(modules) >= 30
    assert {m.rsplit(".", 1)[-1] for m in modules.values()} == AREAS
    assert all(m.startswith("controller.sandbox.routes.") for m in modules.values()), modules
    assert modules["['POST'] /_sandbox/faults"] == "controller.sandbox.routes.admin"
    assert modules["['POST'] /v1/infra/keys/rotate"] == "controller.sandbox.routes.keys"


def test_key_engine_parts_do_not_import_the_manager_that_combines_them() -> None:
    parts = ["model", "core", "late", "flow", "recovery", "status"]
    for part in parts:
        assert "controller.keys.rotate" not in _imports(KEYS / f"{part}.py"), part
    combined = {
        cls.__module__.rsplit(".", 1)[-1] for cls in KeyManager.__mro__ if cls.__module__.startswith("controller.")
    }
    assert combined == {"rotate", "recovery", "flow", "status", "late", "core"}
