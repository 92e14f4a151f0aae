"""``finops run`` against a real sandbox: drift correction, git revisions (new, invalid,
fixed), per-agent backoff, one writer, metrics and readiness over HTTP, and a graceful
SIGTERM in the middle of a pass (a real subprocess). Time is an injected clock stepped by
hand; the subprocess test waits on events and log lines, never on sleeps."""

from __future__ import annotations

import http.server
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import Any

import httpx
import pytest

from controller.daemon.backoff import AgentBackoff, BackoffPolicy
from controller.daemon.lock import writer_lock
from controller.daemon.logs import configure_logging
from controller.daemon.metrics import DaemonMetrics, GatewayErrorCounter, MetricsServer
from controller.daemon.passes import PassResult, Reconciler
from controller.daemon.revisions import RevisionLog
from controller.daemon.scheduler import Daemon
from controller.daemon.source import DirectorySource, GitSource, ManifestSource, SourceError
from controller.sandbox.server import SandboxServer
from policies.keyprint import contains_key_material
from tests.integration.conftest import CANONICAL, Harness
from tests.integration.haproc import forward

WORKERS = "research-workers.yaml"
RES01 = re.compile(r"^(?P<indent> *)- id: res-01\n", re.MULTILINE)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Rig:
    daemon: Daemon
    reconciler: Reconciler
    clock: FakeClock
    metrics: DaemonMetrics
    revisions: RevisionLog
    logs: io.StringIO
    harness: Harness

    async def step(self, advance: float = 0.0) -> dict[str, Any]:
        self.clock.advance(advance)
        return dict(await self.daemon.step())

    @property
    def last(self) -> PassResult:
        assert self.daemon.last_pass is not None
        return self.daemon.last_pass

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines()]


@pytest.fixture
def rig_factory(harness: Harness, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    opened: list[RevisionLog] = []

    def build(source: ManifestSource, *, backoff: AgentBackoff | None = None) -> Rig:
        clock = FakeClock()
        metrics = DaemonMetrics()
        stream = io.StringIO()
        log = configure_logging("json", stream=stream, secrets=[harness.sandbox.admin_key])
        revisions = RevisionLog(harness.store.path, clock=clock)
        opened.append(revisions)

        def client() -> Any:
            return harness.client(observer=GatewayErrorCounter(metrics.gateway_errors))

        reconciler = Reconciler(
            target="sandbox",
            source=source,
            store=harness.store,
            sink=harness.sink,
            revisions=revisions,
            client_factory=client,
            backoff=backoff,
            clock=clock,
            log=log,
        )
        daemon = Daemon(
            reconciler,
            metrics=metrics,
            interval_s=60,
            jitter_s=0,
            git_poll_s=30,
            clock=clock,
            rng=Random(1),
            log=log,
            status_file=tmp_path / "state" / "daemon-status.json",
        )
        return Rig(daemon, reconciler, clock, metrics, revisions, stream, harness)

    yield build
    for revisions in opened:
        revisions.close()


def budget(harness: Harness, agent: str) -> Decimal:
    with harness.admin() as http:
        return Decimal(str(http.get(f"/v1/billing/wallets/{agent}/budget").json()["daily_cap"]))


def balance(harness: Harness, agent: str) -> Decimal:
    with harness.admin() as http:
        return Decimal(str(http.get(f"/v1/billing/wallets/{agent}/balance").json()["balance"]))


def drift(harness: Harness, agent: str) -> None:
    with harness.admin() as http:
        http.put(f"/v1/billing/wallets/{agent}/budget", json={"daily_cap": "99999", "monthly_cap": "60000.00"})


def assert_no_key_material(text: str, harness: Harness) -> None:
    assert not contains_key_material(text)
    assert harness.sandbox.admin_key not in text
    for key_file in Path(harness.sink.directory).rglob("*.key"):
        assert key_file.read_text().strip() not in text


# ---------------------------------------------------------------------- git helpers


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=finops-test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    return subprocess.run([*cmd, "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def override_res01(manifests: Path, line: str) -> None:
    """Add ``line`` (e.g. ``dailyCap: "25.00"``) to res-01's entry, right under its id."""
    workers = manifests / WORKERS
    text, count = RES01.subn(lambda m: f"{m.group(0)}{m.group('indent')}  {line}\n", workers.read_text())
    assert count == 1
    workers.write_text(text)


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    shutil.copytree(CANONICAL, repo / "manifests")
    commit(repo, "the research fleet")
    return repo


def git_source(upstream: Path, tmp_path: Path) -> GitSource:
    return GitSource(str(upstream), "main", "manifests", tmp_path / "state" / "git" / "clone")


# ---------------------------------------------------------------------- in-process daemon


async def test_drift_made_on_the_gateway_is_corrected_by_the_next_pass(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness
) -> None:
    rig = rig_factory(DirectorySource(manifests_dir))
    first = (await rig.step())["reconcile"]
    assert first.ok and first.fields["applied"] > 0
    drift(harness, "res-01")
    assert budget(harness, "res-01") == Decimal("99999")

    await rig.step(60)
    assert rig.last.result == "ok" and rig.last.planned == 1
    assert rig.last.applied == {"set_budget": 1}
    assert budget(harness, "res-01") == Decimal("3000.00")

    harness.reset_stats()
    await rig.step(60)
    assert rig.last.planned == 0 and harness.stats()["writes"] == 0
    assert rig.sample("finops_reconcile_total", result="ok") == 3
    assert rig.sample("finops_drift_changes") == 0
    assert rig.sample("finops_changes_applied_total", kind="set_budget") >= 6  # 5 initial + the correction
    assert rig.sample("finops_manifest_valid") == 1
    assert rig.sample("finops_last_applied_revision_info", revision=rig.last.revision or "") == 1
    assert any(line["msg"].startswith("reconcile finished") for line in rig.log_lines())
    assert_no_key_material(rig.logs.getvalue(), harness)


async def test_a_new_commit_is_applied_at_once_and_its_revision_recorded(
    rig_factory: Callable[..., Rig], upstream: Path, tmp_path: Path, harness: Harness
) -> None:
    rig = rig_factory(git_source(upstream, tmp_path))
    first_sha = git(upstream, "rev-parse", "HEAD")
    assert list(await rig.step()) == ["git-poll", "reconcile"]
    assert rig.last.revision == first_sha
    assert rig.revisions.last_applied() is not None and rig.revisions.last_applied().revision == first_sha  # type: ignore[union-attr]

    override_res01(upstream / "manifests", 'dailyCap: "25.00"')
    second_sha = commit(upstream, "res-01: lower its daily cap")
    ran = await rig.step(30)  # only the git poll is due; the new commit brings the pass forward
    assert list(ran) == ["git-poll", "reconcile"]
    assert ran["git-poll"].fields["new_revision"] is True
    assert rig.last.revision == second_sha and rig.last.applied == {"set_budget": 1}
    assert budget(harness, "res-01") == Decimal("2500.00")
    record = rig.revisions.get(second_sha)
    assert record is not None and record.status == "applied" and record.last_changes == 1 and record.last_ok
    assert rig.sample("finops_last_applied_revision_info", revision=second_sha) == 1
    assert rig.sample("finops_last_applied_revision_info", revision=first_sha) == 0

    assert list(await rig.step(30)) == ["git-poll", "reconcile"]  # the regular slot, nothing new
    assert rig.last.planned == 0
    assert rig.revisions.get(second_sha).passes == 2  # type: ignore[union-attr]
    assert list(await rig.step(30)) == ["git-poll"]


async def test_an_invalid_commit_is_refused_the_last_good_state_kept_and_the_next_valid_one_applied(
    rig_factory: Callable[..., Rig], upstream: Path, tmp_path: Path, harness: Harness
) -> None:
    rig = rig_factory(git_source(upstream, tmp_path))
    good_sha = git(upstream, "rev-parse", "HEAD")
    await rig.step()
    assert rig.daemon.ready()[0]

    override_res01(upstream / "manifests", 'dailyCapp: "25.00"')  # a typo: must never half-apply
    bad_sha = commit(upstream, "typo")
    drift(harness, "res-01")
    await rig.step(30)
    assert rig.last.result == "ok"  # the fleet is still reconciled ...
    assert rig.last.revision == good_sha and rig.last.seen_revision == bad_sha  # ... to the last good revision
    assert budget(harness, "res-01") == Decimal("3000.00")
    assert not rig.last.manifest_valid
    assert any("research-workers.yaml" in e and "dailyCapp" in e for e in rig.last.manifest_errors)
    assert not any(str(tmp_path) in e for e in rig.last.manifest_errors)  # paths as the author knows them
    assert rig.sample("finops_manifest_valid") == 0
    ready, why = rig.daemon.ready()
    assert not ready and bad_sha in why
    refused = rig.revisions.get(bad_sha)
    assert refused is not None and refused.status == "invalid" and "dailyCapp" in refused.detail
    status = json.loads((tmp_path / "state" / "daemon-status.json").read_text())
    assert status["manifest_valid"] is False and status["applied_revision"] == good_sha
    assert any(line["msg"].startswith("manifest revision refused") for line in rig.log_lines())

    await rig.step(30)  # still refused, still enforcing, without re-reading the bad revision
    assert rig.last.revision == good_sha and not rig.last.manifest_valid

    workers = upstream / "manifests" / WORKERS
    workers.write_text(workers.read_text().replace("dailyCapp", "dailyCap"))
    fixed_sha = commit(upstream, "fix the typo")
    await rig.step(30)
    assert rig.last.revision == fixed_sha and rig.last.manifest_valid
    assert budget(harness, "res-01") == Decimal("2500.00")
    assert rig.sample("finops_manifest_valid") == 1
    assert rig.daemon.ready()[0]


async def test_a_restart_on_an_invalid_head_goes_back_to_the_last_applied_revision(
    rig_factory: Callable[..., Rig], upstream: Path, tmp_path: Path, harness: Harness
) -> None:
    good_sha = git(upstream, "rev-parse", "HEAD")
    await rig_factory(git_source(upstream, tmp_path)).step()
    override_res01(upstream / "manifests", 'dailyCapp: "25.00"')
    commit(upstream, "typo")
    drift(harness, "res-01")

    restarted = rig_factory(git_source(upstream, tmp_path))  # no memory but the state database
    await restarted.step()
    assert restarted.last.result == "ok" and restarted.last.revision == good_sha
    assert not restarted.last.manifest_valid
    assert budget(harness, "res-01") == Decimal("3000.00")
    assert any(line["msg"] == "restored the last applied revision" for line in restarted.log_lines())


async def test_one_failing_agent_is_backed_off_while_the_fleet_converges(
    rig_factory: Callable[..., Rig], manifests_dir: Path, harness: Harness
) -> None:
    rig = rig_factory(DirectorySource(manifests_dir), backoff=AgentBackoff(BackoffPolicy(base_s=100, max_s=1000)))
    await rig.step()
    harness.spend("res-01", Decimal("5000.00"))
    with harness.admin() as http:
        http.post("/v1/billing/wallets/res-01/freeze").raise_for_status()  # its top-up will be refused
    drift(harness, "res-02")

    await rig.step(60)
    assert rig.last.result == "partial"
    assert set(rig.last.failed_agents) == {"res-01"} and "top_up" in rig.last.failed_agents["res-01"]
    assert rig.last.applied == {"set_budget": 1} and budget(harness, "res-02") == Decimal("3000.00")
    assert rig.sample("finops_gateway_errors_total", status="403") >= 1

    harness.reset_stats()
    drift(harness, "res-02")
    await rig.step(60)  # res-01 is inside its 100 s backoff: skipped, reported; res-02 still corrected
    assert rig.last.result == "partial" and rig.last.backoff_skipped == ("res-01",)
    assert rig.last.applied == {"set_budget": 1}
    deposits = [r for r in harness.stats()["by_route"] if "deposit" in r]
    assert deposits == [], harness.stats()["by_route"]
    assert rig.sample("finops_agents_backoff") == 1
    assert rig.daemon.ready()[0]  # one agent's trouble does not make the controller unready

    with harness.admin() as http:
        http.post("/v1/billing/wallets/res-01/unfreeze").raise_for_status()
    await rig.step(60)  # past the backoff: retried, and it converges
    assert rig.last.result == "ok" and rig.last.applied == {"top_up": 1}
    assert balance(harness, "res-01") == Decimal("7500.00")
    assert rig.sample("finops_agents_backoff") == 0
    assert any(line["msg"] == "agent recovered; backoff cleared" for line in rig.log_lines())


async def test_metrics_healthz_and_readyz_over_http(rig_factory: Callable[..., Rig], manifests_dir: Path) -> None:
    rig = rig_factory(DirectorySource(manifests_dir))
    with MetricsServer(rig.metrics, rig.daemon.ready, port=0) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/healthz").status_code == 200
        not_yet = http.get("/readyz")
        assert not_yet.status_code == 503 and "no reconcile" in not_yet.text
        await rig.step()
        assert http.get("/readyz").status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        for name in (
            "finops_reconcile_duration_seconds_bucket",
            'finops_reconcile_total{result="ok"} 1.0',
            "finops_drift_changes",
            'finops_changes_applied_total{kind="register"} 5.0',
            "finops_gateway_errors_total",
            "finops_last_applied_revision_info{revision=",
            "finops_agents_held 0.0",
            "finops_rebalanced_amount",
            "finops_keys_due_rotation",
            "finops_manifest_valid 1.0",
            'finops_job_runs_total{job="reconcile",result="ok"} 1.0',
        ):
            assert name in metrics.text, name
        rig.clock.advance(3 * 60 + 1)  # three intervals without a completed pass
        stale = http.get("/readyz")
        assert stale.status_code == 503 and "ago" in stale.text
        await rig.step()
        assert http.get("/readyz").status_code == 200
        assert http.get("/other").status_code == 404


async def test_git_source_refuses_paths_outside_the_repository_and_hides_credentials(
    upstream: Path, tmp_path: Path
) -> None:
    escaping = GitSource(str(upstream), "main", "../..", tmp_path / "clone")
    with pytest.raises(SourceError, match="leaves the repository"):
        await escaping.checkout(await escaping.fetch())
    with pytest.raises(SourceError, match="failed"):
        await GitSource(str(upstream), "no-such-branch", "manifests", tmp_path / "clone2").fetch()
    secret_url = GitSource("https://bot:s3cret@git.example.com/org/fleet.git", "main", "manifests", tmp_path / "c3")
    assert "s3cret" not in secret_url.label and "git.example.com/org/fleet.git" in secret_url.label
    with pytest.raises(SourceError, match="must not start"):
        GitSource("--upload-pack=evil", "main", "manifests", tmp_path / "c4")


# ---------------------------------------------------------------------- the real process


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.daemon", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}


def run_once(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        daemon_cmd(*args), cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120, check=False
    )


class HoldingProxy:
    """A pass-through HTTP proxy to the sandbox that holds the first request matching
    ``hold`` until ``release`` is set, so a test can act while a pass is provably mid-apply."""

    def __init__(self, upstream: str, hold: Callable[[str, str], bool]) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hold(self.command, self.path) and not proxy.arrived.is_set():
                    proxy.arrived.set()
                    proxy.release.wait(60)
                forward(self, upstream, body)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HoldingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class LogReader:
    """Reads a subprocess's JSON log lines in a thread; ``wait_for`` blocks on a queue."""

    def __init__(self, stream: io.TextIOBase | Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("the daemon exited first:\n" + "".join(self.lines))
            self.lines.append(line)
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if predicate(doc):
                return doc

    def rest(self) -> list[dict[str, Any]]:
        self._thread.join(timeout=30)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return [json.loads(line) for line in self.lines if line.startswith("{")]


def test_sigterm_during_a_pass_lets_it_finish_then_exits_cleanly(tmp_path: Path) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    key_file = tmp_path / "admin.key"
    with (
        SandboxServer(db_path=tmp_path / "gateway.db", admin_key_file=key_file) as sandbox,
        HoldingProxy(sandbox.url, lambda method, path: method == "PUT" and path.endswith("/budget")) as proxy,
    ):
        target = ["--gateway", proxy.url, "--api-key-file", str(key_file), "--log-format", "json"]
        proc = subprocess.Popen(
            daemon_cmd("manifests", "--interval", "3600", *target),
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            logs = LogReader(proc.stderr)
            logs.wait_for(lambda d: d["msg"] == "reconcile started")
            assert proxy.arrived.wait(60), "the pass never reached its first budget write"
            proc.send_signal(signal.SIGTERM)  # the pass is mid-apply, its budget PUT held
            logs.wait_for(lambda d: d["msg"] == "waiting for in-flight jobs")

            second = run_once(tmp_path, "manifests", "--once", *target)  # a second writer meanwhile
            assert second.returncode == 1
            assert f"pid {proc.pid}" in second.stderr and "finops.lock" in second.stderr

            proxy.release.set()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = logs.rest()
        messages = [d["msg"] for d in lines]
        finished = next(d for d in lines if d["msg"].startswith("reconcile finished"))
        assert finished["result"] == "ok" and finished["applied"] == finished["planned"] > 0
        assert messages.index(finished["msg"]) < messages.index("shutdown complete")
        assert messages[-1] == "shutdown complete"
        assert messages.count("reconcile started") == 1

        again = run_once(tmp_path, "manifests", "--once", *target)
        assert again.returncode == 0, again.stderr
        converged = [json.loads(line) for line in again.stderr.splitlines() if line.startswith("{")]
        assert any(d["msg"].startswith("reconcile finished") and d["planned"] == 0 for d in converged)
        everything = "".join(logs.lines) + second.stderr + again.stderr
        assert sandbox.admin_key not in everything and not contains_key_material(everything)


def test_once_refuses_invalid_manifests_with_exit_code_1(tmp_path: Path) -> None:
    shutil.copytree(CANONICAL, tmp_path / "manifests")
    override_res01(tmp_path / "manifests", 'dailyCapp: "25.00"')
    with writer_lock(tmp_path / ".finops"):
        locked = run_once(tmp_path, "--once")
    assert locked.returncode == 1 and f"pid {os.getpid()}" in locked.stderr
    assert not (tmp_path / ".finops" / "sandbox").exists()  # refused before touching anything

    result = run_once(tmp_path, "--once", "--log-format", "json")
    assert result.returncode == 1
    docs = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    refused = next(d for d in docs if d["msg"].startswith("manifest revision refused"))
    assert any("dailyCapp" in e for e in refused["errors"])
    assert any(d["msg"].startswith("reconcile finished") and d["result"] == "invalid" for d in docs)
