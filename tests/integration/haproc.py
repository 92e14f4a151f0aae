"""Real ``finops run`` replicas sharing one PostgreSQL state, for the HA tests and
``bench/failover.py``: each replica is a subprocess with its own working and state
directory (as on its own machine), its own metrics port, and its log in a file.

Nothing here sleeps to race a scheduler: callers wait on conditions (a process's metrics,
the sandbox's own state, PostgreSQL's lock table) with a deadline.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from controller.state.db import LOCK_NAMESPACE, LOCK_WRITER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def forward(handler: http.server.BaseHTTPRequestHandler, upstream: str, body: bytes) -> None:
    """Send ``handler``'s request (with ``body``) to ``upstream`` and copy the answer back:
    the test proxies' one forwarding step."""
    skip = {"host", "content-length", "connection"}
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
    with httpx.Client(base_url=upstream) as client:
        resp = client.request(handler.command, handler.path, content=body, headers=headers)
    handler.send_response(resp.status_code)
    for key, value in resp.headers.items():
        if key.lower() not in {"content-length", "connection", "transfer-encoding", "content-encoding"}:
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(resp.content)))
    handler.end_headers()
    handler.wfile.write(resp.content)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}


@dataclass
class ReplicaProcess:
    """One ``finops run`` replica (``start()`` launches it; ``log`` is its stderr file)."""

    name: str
    workdir: Path
    gateway: str
    api_key_file: Path
    state_url: str
    manifests: Path
    secrets_dir: Path
    interval: float = 3600.0
    poll: float = 0.5
    env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ReplicaProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = clean_env() | {
            "FINOPS_STATE_DIR": str(self.workdir / "state"),
            "FINOPS_STATE_URL": self.state_url,
            # The replicas share one secrets directory (a shared volume); the database key store
            # (the default with shared state) is exercised by tests/integration/test_sealed_keys.py.
            "FINOPS_KEY_STORE": "directory",
            "GREENHELIX_URL": self.gateway,
            "GREENHELIX_API_KEY_FILE": str(self.api_key_file),
            **self.env,
        }
        args = [
            sys.executable, "-m", "controller.cli", "run", str(self.manifests),
            "--interval", str(self.interval), "--standby-poll", str(self.poll),
            "--metrics-port", str(self.port), "--log-format", "json", "--secrets-dir", str(self.secrets_dir),
            *self.extra,
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, cwd=self.workdir, env=env, stdout=log, stderr=log)
        return self

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2)
        except httpx.HTTPError:
            return None

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples by name (``{}`` while the endpoint is not up)."""
        resp = self.get("/metrics")
        if resp is None or resp.status_code != 200:
            return {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                if not sample.labels:
                    samples[sample.name] = sample.value
        return samples

    def leader(self) -> float | None:
        return self.metrics().get("finops_leader")

    def readyz(self) -> tuple[int, str] | None:
        resp = self.get("/readyz")
        return None if resp is None else (resp.status_code, resp.text)

    def logs(self) -> list[dict[str, Any]]:
        docs = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    docs.append(json.loads(line))
                except ValueError:
                    continue
        return docs

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def lock_holder_pid(pg_url: str) -> int | None:
    """The pid (in its application name) of the finops process holding the writer lock."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted",
            (LOCK_NAMESPACE, LOCK_WRITER),
        ).fetchone()
    if row is None:
        return None
    found = re.search(r"\bpid (\d+)", row[0] or "")
    return int(found.group(1)) if found else None


def terminate_lock_session(pg_url: str) -> int:
    """``pg_terminate_backend`` on the session holding the writer lock (as an operator, or a
    network failure, would end it); the number of sessions ended."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.classid = %s "
            "AND l.objid = %s AND l.objsubid = 2 AND l.granted",
            (LOCK_NAMESPACE, LOCK_WRITER),
        ).fetchall()
    return sum(1 for r in rows if r[0])


class LeaderKiller:
    """A sandbox tripwire action: SIGKILLs whichever replica holds the writer lock when it
    fires (read from PostgreSQL's lock table), and notes when."""

    def __init__(self, pg_url: str, replicas: Iterable[ReplicaProcess]) -> None:
        self.pg_url = pg_url
        self.replicas = list(replicas)
        self.killed: ReplicaProcess | None = None
        self.at: float | None = None
        self.fired = threading.Event()

    def __call__(self) -> None:
        pid = lock_holder_pid(self.pg_url)
        for replica in self.replicas:
            if replica.proc is not None and replica.pid == pid:
                os.kill(pid, signal.SIGKILL)
                self.at = time.time()
                self.killed = replica
                break
        self.fired.set()


class WriteProxy:
    """A pass-through proxy to the gateway that records when each write arrives and can hold
    writes: while ``holding``, a write waits until ``release()``; released writes are answered
    503 without being forwarded (they never reached the gateway)."""

    def __init__(self, upstream: str) -> None:
        self.writes: list[tuple[float, str, str]] = []
        self.holding = False
        self.held = 0
        self._release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command != "GET":
                    proxy.writes.append((time.time(), self.command, self.path))
                    if proxy.holding:
                        proxy.held += 1
                        proxy._release.wait(120)
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                forward(self, upstream, body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def release(self) -> None:
        self.holding = False
        self._release.set()

    def __enter__(self) -> WriteProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
