"""``import controller.cli`` (every ``finops`` invocation) loads only what the command line
needs: the daemon's scheduler and metrics server stack and the sandbox load with the
commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("uvicorn", "starlette", "apscheduler", "prometheus_client", "controller.sandbox", "controller.daemon.command")


def _loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    modules: list[str] = json.loads(out.stdout.splitlines()[-1])
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_importing_the_cli_loads_no_server_scheduler_or_sandbox() -> None:
    assert _loaded_after("import controller.cli") == []


def test_the_probe_sees_them_when_a_command_that_uses_them_is_resolved() -> None:
    """The check above is not vacuous: resolving ``run`` loads the daemon's stack."""
    loaded = _loaded_after(
        "import click, controller.cli.app as app\napp.cli.get_command(click.Context(app.cli), 'run')"
    )
    assert "apscheduler" in loaded and "controller.daemon.command" in loaded


def test_every_lazy_command_resolves_to_the_command_of_that_name() -> None:
    import click

    from controller.cli.app import LazyGroup, cli

    ctx = click.Context(cli)
    for name in LazyGroup.LAZY:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
