"""Issue 9 item 2 through the CLI, in subprocesses against a faulting sandbox."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from controller.sandbox.server import SandboxServer
from policies.keyprint import key_prefix, secret_part
from tests.integration.conftest import CANONICAL
from tests.integration.test_cli import finops
from tests.integration.test_key_recovery import ROTATE_ONLY
from tests.integration.test_keys import assert_clean, auth_status


def test_cli_status_strict_fails_loudly_before_the_grace_ends_and_rotate_recovers(tmp_path: Path) -> None:
    """The repro through the CLI, as an operator meets it: `finops status --strict` exits 1
    naming the seconds left while the held key still works, and `finops rotate` recovers."""
    work = tmp_path / "work"
    shutil.copytree(CANONICAL, work / "manifests")
    with SandboxServer(db_path=tmp_path / "gw.db", admin_key_file=tmp_path / "admin.key") as server:
        env = {"GREENHELIX_URL": server.url, "GREENHELIX_API_KEY_FILE": str(tmp_path / "admin.key")}
        outputs: list[str] = []

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            result = finops(work, *args, env=env)
            outputs.extend([result.stdout, result.stderr])
            return result

        assert run("apply", "--auto-approve").returncode == 0
        key_file = next((work / ".finops" / "secrets").iterdir()) / "res-01.key"
        k0 = key_file.read_text().strip()
        server.faults.configure(f"seed=1,rate=1,kinds=500,{ROTATE_ONLY}")
        assert run("rotate", "--agent", "res-01", "--now").returncode == 1
        server.faults.configure(f"seed=1,rate=1,kinds=503,{ROTATE_ONLY}")
        assert run("rotate", "--agent", "res-01").returncode == 1
        assert run("rotate", "--agent", "res-01").returncode == 1  # every run retries, none gives up

        status = run("status", "--strict")
        assert status.returncode == 1
        found = re.search(r"held key sha3:(\w{8}) expires in (\d+) s and no successor is held", status.stdout)
        assert found is not None, status.stdout
        assert found[1] == key_prefix(k0) and 0 < int(found[2]) <= 300
        assert key_file.read_text().strip() == k0

        server.faults.configure(None)
        recovered = run("rotate", "--agent", "res-01")
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        held = key_file.read_text().strip()
        assert held != k0
        server.clock.advance(301)
        assert auth_status(server, held, "res-01") == 200
        status = run("status")
        assert "HELD KEY" not in status.stdout and "ORPHANED KEY" in status.stdout
        for text in outputs:
            assert_clean(text)
            assert secret_part(k0) not in text and secret_part(held) not in text
