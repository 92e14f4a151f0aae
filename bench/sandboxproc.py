"""The sandbox in its own process, so the benchmarked controller's memory and CPU are its own.

Started exactly as an operator would (``python -m controller.cli sandbox``) on port 0, or
with a simulated round trip (``bench.latency_sandbox``); the port is read back from the
line either prints once it is listening. CPU and memory are read from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from controller.io.secretfile import read_secret_file

_LISTENING = re.compile(r"listening on (http://[^\s,]+)")
_START_TIMEOUT_S = 30.0
_REPO = Path(__file__).resolve().parent.parent


class SandboxProcess:
    """``with SandboxProcess(dir) as sb: sb.url, sb.admin_key, sb.stats(), sb.reset_stats()``"""

    def __init__(self, directory: Path, host: str = "127.0.0.1", *, rtt_ms: float = 0.0) -> None:
        self.directory = directory
        self.host = host
        self.rtt_ms = rtt_ms
        self.db = directory / "gateway.db"
        self.key_file = directory / "admin.key"
        self._proc: subprocess.Popen[str] | None = None
        self._admin: httpx.Client | None = None
        self.url = ""
        self.admin_key = ""

    def start(self) -> SandboxProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.rtt_ms > 0:
            cmd = [sys.executable, "-m", "bench.latency_sandbox", "--rtt-ms", str(self.rtt_ms)]
        else:
            cmd = [sys.executable, "-m", "controller.cli", "sandbox"]
        cmd += ["--host", self.host, "--port", "0", "--db", str(self.db), "--admin-key-file", str(self.key_file)]
        proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line.rstrip())
            match = _LISTENING.search(line)
            if match:
                self.url = match.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError("the sandbox did not start:\n" + "\n".join(seen))
        self.admin_key = read_secret_file(self.key_file)
        self._admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"})
        while time.monotonic() < deadline:
            try:
                if self._admin.get("/v1/health").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the sandbox never answered /v1/health")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU the sandbox process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stats(self) -> dict[str, object]:
        """Requests counted by the sandbox since the last reset (its own routes excluded)."""
        assert self._admin is not None
        resp = self._admin.get("/_sandbox/stats")
        resp.raise_for_status()
        data: dict[str, object] = resp.json()
        return data

    def reset_stats(self) -> None:
        assert self._admin is not None
        self._admin.post("/_sandbox/stats/reset").raise_for_status()

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        proc = self._proc
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            self._proc = None

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
