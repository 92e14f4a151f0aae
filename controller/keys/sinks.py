"""Delivering a new key to the agent that uses it (``KeySinkSpec``).

- ``directory`` with no path: with the directory store, finops' own key store is the
  agent's key file, so the vault write already delivered it; with the database store (which
  has no files), an atomic 0600 copy in the secrets directory (``--secrets-dir``) of the
  machine that stored the key. With a path: an extra atomic 0600 copy ``<path>/<agent>.key``.
- ``command``: an argv that gets the key on stdin, never in argv or the environment (both
  are visible to other local users in ``/proc``). It gets ``FINOPS_AGENT_ID`` and
  ``FINOPS_KEY_FINGERPRINT``. Its stdout is discarded, since a command may echo its input;
  its stderr goes into the error message only truncated and with key-shaped text redacted.

A crashed rotation re-delivers the same key on recovery, so a sink must accept being given
the same key twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controller.errors import FinopsError
from controller.io.secretfile import write_secret_file
from controller.keys.vault import KeyStore, key_path
from controller.manifest.keyscan import REDACTED, looks_like_key, redact
from policies.keyprint import contains_secret_fragment, fingerprint, redact_keys
from policies.spec import KeySinkSpec

DEFAULT_COMMAND_TIMEOUT_S = 30.0
STDERR_LIMIT = 400
"""Characters of a failed command's stderr kept in the error (its tail, after redaction)."""

#: Never handed to a sink command: the admin key would let it manage every agent, and the
#: key-encryption key's file opens every sealed key.
_WITHHELD_ENV = frozenset({"GREENHELIX_API_KEY", "FINOPS_KEY_ENCRYPTION_KEY_FILE"})


class DeliveryError(FinopsError):
    """The sink did not accept the key; the message never contains the key."""


class KeySink(Protocol):
    def describe(self) -> str: ...

    async def deliver(self, agent_id: str, raw_key: str) -> str:
        """Hand the key over; returns where it went (for the outcome line)."""
        ...


def scrub(text: str, raw_key: str | None = None) -> str:
    """``text`` without the given key (or any run of its secret part, whatever surrounds
    it) or anything shaped like a key."""
    return redact_keys(text, [raw_key] if raw_key else (), REDACTED)


@dataclass(frozen=True)
class DirectorySink:
    """``<directory>/<agent>.key``; the vault's own file means "already delivered"."""

    vault: KeyStore
    directory: Path | None = None

    def target(self, agent_id: str) -> Path:
        return key_path(self.directory if self.directory is not None else self.vault.sink_directory, agent_id)

    def describe(self) -> str:
        return f"directory {self.directory if self.directory is not None else self.vault.sink_directory}"

    async def deliver(self, agent_id: str, raw_key: str) -> str:
        target = self.target(agent_id)
        own = self.vault.key_file(agent_id)
        if own is not None and target.resolve() == own.resolve():
            return f"{target} (finops' key store)"
        try:
            write_secret_file(target, raw_key + "\n")
        except OSError as exc:
            raise DeliveryError(f"cannot write {target}: {exc.strerror or type(exc).__name__}") from None
        return str(target)


@dataclass(frozen=True)
class CommandSink:
    """Run ``argv`` with the key on stdin; exit 0 means delivered."""

    argv: tuple[str, ...]
    timeout: float = DEFAULT_COMMAND_TIMEOUT_S

    def describe(self) -> str:
        return f"command {redact(shlex.join(self.argv))[:200]}"

    def _env(self, agent_id: str, raw_key: str) -> dict[str, str]:
        env = {
            name: value for name, value in os.environ.items() if name not in _WITHHELD_ENV and not looks_like_key(value)
        }
        env["FINOPS_AGENT_ID"] = agent_id
        env["FINOPS_KEY_FINGERPRINT"] = fingerprint(raw_key)
        return env

    async def deliver(self, agent_id: str, raw_key: str) -> str:
        what = self.describe()
        if not self.argv:
            raise DeliveryError("the sink command is empty")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(agent_id, raw_key),
                start_new_session=True,
            )
        except OSError as exc:
            raise DeliveryError(f"cannot start {what}: {exc.strerror or type(exc).__name__}") from None
        try:
            _, stderr = await asyncio.wait_for(proc.communicate((raw_key + "\n").encode()), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: take its children too
            await proc.wait()
            raise DeliveryError(f"{what} did not finish within {self.timeout:g} s and was killed") from None
        if proc.returncode != 0:
            text = stderr.decode("utf-8", "replace")
            if contains_secret_fragment(text, raw_key):
                detail = "; stderr withheld: it contained part of the key (the command echoes its input)"
            else:
                tail = scrub(text, raw_key).strip()[-STDERR_LIMIT:]
                detail = f"; stderr: {tail}" if tail else ""
            raise DeliveryError(f"{what} exited with status {proc.returncode}{detail}")
        return what


def sink_for(spec: KeySinkSpec, vault: KeyStore, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S) -> KeySink:
    if spec.kind == "command":
        return CommandSink(tuple(spec.command), timeout=command_timeout)
    if spec.kind == "directory":
        return DirectorySink(vault, Path(spec.path).expanduser() if spec.path else None)
    raise DeliveryError(f"unknown key sink kind {spec.kind!r}")
