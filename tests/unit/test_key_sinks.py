"""finops' key vault and the delivery sinks (real files, real subprocesses)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from controller.keys.sinks import CommandSink, DeliveryError, DirectorySink, sink_for
from controller.keys.vault import MAIN, QUARANTINE, KeyVault
from policies.keyprint import fingerprint, key_prefix
from policies.spec import KeySinkSpec

KEY = "a2a_free_0123456789abcdef01234567"
OTHER = "a2a_free_fedcba9876543210fedcba98"

RECEIVER = """
import json, os, sys
key = sys.stdin.read()
out = sys.argv[1]
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    json.dump({"stdin": key, "argv": sys.argv, "env": dict(os.environ)}, fh)
"""

ECHOER = """
import sys
key = sys.stdin.read().strip()
print("got", key)
print("cannot store", key, "for", sys.argv[1], file=sys.stderr)
sys.exit(3)
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


# -- vault -----------------------------------------------------------------------------


def test_vault_keeps_the_historical_layout_and_interface(tmp_path: Path) -> None:
    sink = KeyVault(tmp_path / "secrets")
    assert sink.store("res-01", KEY) == key_prefix(KEY)
    assert sink.path_for("res-01") == tmp_path / "secrets" / "res-01.key"
    assert sink.path_for("res-01").read_text() == KEY + "\n"
    assert mode(sink.path_for("res-01")) == 0o600
    assert sink.load("res-01") == KEY
    assert sink.load("res-02") is None


def test_quarantine_is_a_separate_slot_that_wins_as_the_held_key(tmp_path: Path) -> None:
    vault = KeyVault(tmp_path)
    vault.write("a", KEY)
    assert vault.held("a") == (KEY, MAIN) and not vault.is_quarantined("a")
    vault.write("a", OTHER, QUARANTINE)
    assert vault.quarantine_path_for("a") == tmp_path / "quarantine" / "a.key"
    assert mode(vault.quarantine_path_for("a")) == 0o600
    assert vault.is_quarantined("a") and vault.held("a") == (OTHER, QUARANTINE)
    assert vault.load("a") == KEY  # the delivered key is untouched
    assert vault.clear("a", QUARANTINE) and not vault.clear("a", QUARANTINE)
    assert vault.held("a") == (KEY, MAIN)


def test_vault_refuses_unsafe_names_and_non_keys_without_echoing_them(tmp_path: Path) -> None:
    vault = KeyVault(tmp_path)
    for bad in ("../x", ".", "a/b", ""):
        with pytest.raises(ValueError, match="file name"):
            vault.path_for(bad)
    with pytest.raises(ValueError) as err:
        vault.write("a", "not-a-key secret-value")
    assert "secret-value" not in str(err.value)
    with pytest.raises(ValueError, match="slot"):
        vault.path_for("a", "elsewhere")


# -- directory sink --------------------------------------------------------------------


async def test_directory_sink_without_a_path_is_the_vault_itself(tmp_path: Path) -> None:
    vault = KeyVault(tmp_path / "vault")
    vault.write("a", KEY)
    where = await sink_for(KeySinkSpec(kind="directory"), vault).deliver("a", KEY)
    assert "finops' key store" in where
    assert sorted(p.name for p in (tmp_path / "vault").iterdir()) == ["a.key"]


async def test_directory_sink_with_a_path_writes_a_private_atomic_copy(tmp_path: Path) -> None:
    vault = KeyVault(tmp_path / "vault")
    sink = sink_for(KeySinkSpec(kind="directory", path=str(tmp_path / "agents")), vault)
    assert isinstance(sink, DirectorySink)
    where = await sink.deliver("a", KEY)
    target = tmp_path / "agents" / "a.key"
    assert where == str(target) and target.read_text() == KEY + "\n" and mode(target) == 0o600
    await sink.deliver("a", OTHER)  # replaced, no temp files left behind
    assert target.read_text() == OTHER + "\n"
    assert [p.name for p in (tmp_path / "agents").iterdir()] == ["a.key"]


async def test_directory_sink_that_cannot_write_says_where(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = DirectorySink(KeyVault(tmp_path / "vault"), blocker / "sub")
    with pytest.raises(DeliveryError, match="cannot write") as err:
        await sink.deliver("a", KEY)
    assert KEY not in str(err.value)


# -- command sink ----------------------------------------------------------------------


async def test_command_sink_gets_the_key_on_stdin_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREENHELIX_API_KEY", "a2a_enterprise_00112233445566778899aabb")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    out = tmp_path / "received.json"
    argv = (sys.executable, script(tmp_path, "recv.py", RECEIVER), str(out))
    where = await CommandSink(argv).deliver("res-01", KEY)
    assert where.startswith("command ")
    got = json.loads(out.read_text())
    assert got["stdin"] == KEY + "\n"
    assert not any(KEY in arg for arg in got["argv"])
    assert not any(KEY in value for value in got["env"].values())
    assert got["env"]["FINOPS_AGENT_ID"] == "res-01"
    assert got["env"]["FINOPS_KEY_FINGERPRINT"] == fingerprint(KEY)
    assert got["env"]["SOMETHING_ELSE"] == "kept"
    assert "GREENHELIX_API_KEY" not in got["env"]  # the admin key never reaches a sink
    assert mode(out) == 0o600


async def test_failing_command_is_reported_without_the_key_or_its_stdout(tmp_path: Path) -> None:
    argv = (sys.executable, script(tmp_path, "echo.py", ECHOER), "res-01")
    with pytest.raises(DeliveryError) as err:
        await CommandSink(argv).deliver("res-01", KEY)
    message = str(err.value)
    assert "exited with status 3" in message
    # stderr that echoes the key (in any form) is withheld whole; other stderr is kept
    assert "stderr withheld: it contained part of the key" in message
    assert KEY not in message and "got" not in message and "cannot store" not in message


async def test_failing_command_stderr_without_the_key_is_kept(tmp_path: Path) -> None:
    body = "import sys; sys.stdin.read(); print('vault is sealed', file=sys.stderr); sys.exit(4)"
    with pytest.raises(DeliveryError) as err:
        await CommandSink((sys.executable, "-c", body)).deliver("a", KEY)
    assert str(err.value).endswith("exited with status 4; stderr: vault is sealed")


async def test_failing_command_redacts_even_a_key_the_pattern_would_miss(tmp_path: Path) -> None:
    odd = "a2a_custom_NOT-HEX-KEY-MATERIAL"
    argv = (sys.executable, script(tmp_path, "echo.py", ECHOER), "x")
    with pytest.raises(DeliveryError) as err:
        await CommandSink(argv).deliver("x", odd)
    assert odd not in str(err.value)


async def test_stderr_is_truncated(tmp_path: Path) -> None:
    body = "import sys; sys.stdin.read(); sys.stderr.write('x' * 5000 + 'END'); sys.exit(1)"
    with pytest.raises(DeliveryError) as err:
        await CommandSink((sys.executable, "-c", body)).deliver("a", KEY)
    assert str(err.value).endswith("END") and len(str(err.value)) < 700


async def test_command_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    body = "import time; time.sleep(30)"
    with pytest.raises(DeliveryError, match=r"did not finish within 0\.3 s"):
        await CommandSink((sys.executable, "-c", body), timeout=0.3).deliver("a", KEY)


async def test_command_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError, match="cannot start command"):
        await CommandSink((str(tmp_path / "missing-binary"),)).deliver("a", KEY)


async def test_command_that_ignores_stdin_and_succeeds_is_delivered(tmp_path: Path) -> None:
    # The command exits without reading its stdin (a closed pipe for the writer): that is a
    # successful delivery, not an error, and the command did run.
    marker = tmp_path / "ran"
    body = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('ran')"
    where = await CommandSink((sys.executable, "-c", body, str(marker))).deliver("a", KEY)
    assert where.startswith("command ") and KEY not in where
    assert marker.read_text() == "ran"


def test_unknown_sink_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError, match="unknown key sink kind"):
        sink_for(KeySinkSpec(kind="s3"), KeyVault(tmp_path))
