"""Daemon benchmark (issue 14): the change feed against today's design, side by side, same run.

Run from the repository root::

    .venv/bin/python -m bench.feed --quick      # 1,000 agents (under ~2 minutes)
    .venv/bin/python -m bench.feed              # 1,000 and 10,000 agents (many minutes)

Per fleet size, the sandbox runs in its own process (``bench.sandboxproc``) and the fleet
(``bench.fleetgen``, plus a ``canary`` tier with a 1-credit daily cap on every 25th agent) is
applied once in a child process. Then each *design* runs in a fresh child process of its own,
so its peak RSS is the daemon's alone: an in-process daemon (``Reconciler`` + the alerts job,
as ``finops run`` wires them, stepped by hand on a stepped clock, one step = one daemon pass:
the reconcile pass then the alerts run) against that sandbox, with alerts delivered to a
loopback HTTP receiver. The designs:

- ``today``: no shared observation: every pass observes every agent (balance + budget) and
  the alerts job reads every budget again (``--no-change-feed``);
- ``feed``: the shared observation store, the leaderboard change feed and the rolling
  resync at the default period (600 s);
- ``feed@P``: the same with the resync period P that meets 0.05 requests per agent per pass
  (computed from the ``feed`` run's figures).

In each pass, 1 % of the agents spend first, as the agents themselves (their own keys, the
sandbox's paid route ``GET /v1/marketplace/match``): one call each, and one canary makes
eight (0.80 of its 1.00 daily cap: a 75 % crossing). Requests are counted by the sandbox
(``/_sandbox/stats``, reset after the spend), so only the daemon's own requests count.

Alert latency: in the daemon the alerts job runs every interval, so a crossing waits at most
one interval (``--interval``) for the next run, plus the time that run takes to read and
deliver. The benchmark measures the second part (wall time from the start of the pass to
the receiver's answer) and reports the worst case, interval + that.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.fleetgen import fleet_documents
from bench.sandboxproc import SandboxProcess
from controller.daemon.command import DaemonContext
from controller.daemon.logs import configure_logging
from controller.daemon.metrics import DaemonMetrics, GatewayErrorCounter
from controller.daemon.passes import Reconciler
from controller.daemon.revisions import RevisionLog
from controller.daemon.scheduled import alerts_job
from controller.daemon.scheduler import Daemon
from controller.daemon.source import DirectorySource
from controller.gateway.client import GatewayClient
from controller.io.target import Target
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.observation.feed import DEFAULT_RESYNC_PERIOD_S, FeedSync
from controller.observation.store import ObservationStore
from controller.observation.watch import WriteWatch
from controller.reconcile.apply import Applier
from controller.reconcile.decide import observe_and_plan
from controller.state import PENDING, StateStore
from policies.feed import resync_count

REPO = Path(__file__).resolve().parent.parent
TARGET_REQUESTS_PER_AGENT = 0.05
TARGET_LATENCY_SLACK_S = 5.0
TARGET_RSS_MB = 250.0
CANARY_EVERY = 25
CANARY_CALLS = 8
"""0.80 credits of a 1.00-credit daily cap: past the 75 % threshold."""
SPEND_SHARE = 0.01
READS_PER_RESYNCED = 2
"""A resynced agent's balance and budget."""


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_manifests(directory: Path, size: int, receiver_port: int, secret: Path) -> list[str]:
    """``bench.fleetgen``'s fleet with alert routes to the receiver and a canary tier."""
    docs = fleet_documents("feed", size)
    spec = docs[0]["spec"]
    assert isinstance(spec, dict)
    spec["alerts"] = {
        "thresholds": [75, 90, 100],
        "signingSecret": {"file": str(secret), "generate": True},
        "allowInsecure": True,
        "routes": [{"url": f"http://127.0.0.1:{receiver_port}/hooks/{{agent}}/{{window}}/{{threshold}}"}],
    }
    spec["tiers"]["canary"] = {
        "dailyCap": "0.01",  # USD: 1.00 credit at the sandbox's 100 credits per USD
        "monthlyCap": "1.00",
        "funding": {"floor": "0.00", "target": "0.00"},
    }
    big = f"{1000 * size}.00"
    bound = {"dailyCaps": big, "monthlyCaps": big, "funding": big, "agents": 2 * size}
    spec["approval"] = {"maxUnattendedIncrease": bound}
    ids: list[str] = []
    for doc in docs[1:]:
        group = doc["spec"]
        assert isinstance(group, dict)
        for agent in group["agents"]:
            index = int(agent["id"].rsplit("-", 1)[1])
            if index % CANARY_EVERY == 7:
                agent["tier"] = "canary"
            ids.append(agent["id"])
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"{i:03d}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return ids


def canaries(ids: Sequence[str]) -> list[str]:
    return [a for a in ids if int(a.rsplit("-", 1)[1]) % CANARY_EVERY == 7]


# ----------------------------------------------------------------------------- children


async def _apply(url: str, key: str, manifests: Path, state: Path) -> None:
    desired = load_manifests(manifests)
    store = StateStore(state / "state-sandbox.db")
    try:
        async with GatewayClient(url, key) as client:
            plan = await observe_and_plan(client, desired, "sandbox", store)
            if plan.errors or plan.violations:
                raise RuntimeError(f"plan refused: {plan.errors[:3]} {plan.violations[:3]}")
            result = await Applier(client, store, KeyVault(state / "secrets")).apply(plan)
            if not result.ok:
                raise RuntimeError("the fleet's apply failed")
    finally:
        store.close()


class _Receiver:
    def __init__(self, port: int) -> None:
        self.arrived: dict[str, float] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.arrived.setdefault(self.path, time.perf_counter())
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class DesignResult:
    design: str
    agents: int
    resync_period_s: float | None
    passes: int
    requests: list[int] = field(default_factory=list)
    by_route: dict[str, int] = field(default_factory=dict)
    pass_seconds: list[float] = field(default_factory=list)
    delivery_seconds: list[float] = field(default_factory=list)
    missed_alerts: int = 0
    rss_peak_mb: float = 0.0
    resynced_per_pass: float = 0.0
    moved_per_pass: float = 0.0

    @property
    def per_agent(self) -> float:
        return sum(self.requests) / len(self.requests) / self.agents if self.requests else math.nan


async def _daemon(args: argparse.Namespace) -> DesignResult:
    root = Path(args.root)
    meta = json.loads((root / "meta.json").read_text())
    url, key, ids = meta["url"], meta["admin_key"], meta["ids"]
    feed_on = args.design != "today"
    result = DesignResult(args.design, len(ids), args.resync_period if feed_on else None, args.passes)
    state = StateStore(root / "state" / "state-sandbox.db")
    vault = KeyVault(root / "state" / "secrets")
    receiver = _Receiver(meta["receiver_port"])
    clock = _Clock()
    metrics = DaemonMetrics()
    log = configure_logging("json", stream=io.StringIO(), secrets=[key])
    revisions = RevisionLog(state.path, clock=clock)
    observations = ObservationStore(clock)
    feed = FeedSync(observations, interval_s=args.interval, resync_period_s=args.resync_period)

    def client() -> GatewayClient:
        watch = WriteWatch(observations, [GatewayErrorCounter(metrics.gateway_errors)])
        return GatewayClient(url, key, observer=watch)

    reconciler = Reconciler(
        target="sandbox", source=DirectorySource(root / "manifests"), store=state, sink=vault, revisions=revisions,
        client_factory=client, clock=clock, log=log, observation=feed if feed_on else None,
    )  # fmt: skip
    feed.authoritative = lambda: (
        frozenset([*state.holds(), *(i.agent_id for i in state.intents(status=PENDING))]) | reconciler.failing()
    )
    daemon = Daemon(
        reconciler, metrics=metrics, interval_s=args.interval, jitter_s=0, git_poll_s=3600, clock=clock,
        rng=random.Random(1), log=log, status_file=root / "state" / f"status-{args.design}.json",
    )  # fmt: skip
    target = Target("sandbox", url, key, embedded=False, state_dir=root / "state")
    ctx = DaemonContext(daemon, target, state, vault, metrics, client, clock, None, None, feed if feed_on else None)

    async def no_backoff(seconds: float) -> None:
        pass

    daemon.add_job("alerts", alerts_job(ctx, now=clock, sleep=no_backoff), interval_s=args.interval, jitter_s=0,
                   exclusive=False)  # fmt: skip
    rng = random.Random(args.seed)
    spenders = [a for a in ids if a not in set(canaries(ids))]
    own_canaries = canaries(ids)[args.canary_offset : args.canary_offset + args.passes]
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
    agents_http = httpx.Client(base_url=url)

    def spend(agent: str, calls: int) -> None:
        agent_key = vault.load(agent)
        assert agent_key is not None, agent
        for _ in range(calls):
            agents_http.get(
                "/v1/marketplace/match", params={"query": "x"}, headers={"Authorization": f"Bearer {agent_key}"}
            ).raise_for_status()

    async def step(advance: float) -> None:
        clock.now += advance
        for name, job in (await daemon.step()).items():
            if not job.ok:
                raise RuntimeError(f"{args.design}: {name} failed: {job.message}")

    try:
        _log(f"{args.design}: warming up (the first pass reads everything)")
        await step(0)
        await step(args.interval)
        warm = math.ceil(args.resync_period / args.interval) if feed_on else 0
        for _ in range(min(warm, args.warm_passes)):  # let the resync's spread settle
            await step(args.interval)
        moved = resynced = 0
        for n in range(args.passes):
            for agent in rng.sample(spenders, max(1, round(SPEND_SHARE * len(ids))) - 1):
                spend(agent, 1)
            canary = own_canaries[n]
            spend(canary, CANARY_CALLS)
            admin.post("/_sandbox/stats/reset").raise_for_status()
            started = time.perf_counter()
            await step(args.interval)
            result.pass_seconds.append(time.perf_counter() - started)
            stats = admin.get("/_sandbox/stats").json()
            result.requests.append(int(stats["requests"]))
            for route, count in stats["by_route"].items():
                result.by_route[route] = result.by_route.get(route, 0) + int(count)
            arrived = receiver.arrived.get(f"/hooks/{canary}/daily/75")
            if arrived is None:
                result.missed_alerts += 1
            else:
                result.delivery_seconds.append(arrived - started)
            if feed_on and feed.last is not None:
                moved += len(feed.last.moved or ids)
                resynced += len(feed.last.resynced)
            _log(f"{args.design}: pass {n + 1}: {stats['requests']} requests, {result.pass_seconds[-1]:.2f}s")
        result.moved_per_pass = moved / args.passes
        result.resynced_per_pass = resynced / args.passes
    finally:
        admin.close()
        agents_http.close()
        receiver.close()
        revisions.close()
        state.close()
    result.rss_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----------------------------------------------------------------------------- parent


def _child(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bench.feed", *argv], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {argv[:2]} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def period_for_target(feed: DesignResult, interval: float) -> float | None:
    """The shortest resync period (whole minutes) at which the feed run's requests per pass
    would meet the target with 5 % to spare: what is not the resync (the feed poll, the
    moved agents, fleet-wide reads) stays, the resync reads ceil(N x interval / period)
    agents, two reads each (balance and budget)."""
    per_pass = sum(feed.requests) / len(feed.requests)
    rest = per_pass - READS_PER_RESYNCED * feed.resynced_per_pass
    budget = 0.95 * TARGET_REQUESTS_PER_AGENT * feed.agents
    for minutes in range(1, 24 * 60 + 1):
        period = 60.0 * minutes
        if rest + READS_PER_RESYNCED * resync_count(feed.agents, interval, period) <= budget:
            return period
    return None


def run_size(size: int, args: argparse.Namespace) -> list[DesignResult]:
    with tempfile.TemporaryDirectory(prefix=f"finops-feed-{size}-") as tmp:
        root = Path(tmp)
        port = _free_port()
        ids = write_manifests(root / "manifests", size, port, root / "alert-signing.secret")
        with SandboxProcess(root / "sandbox") as sb:
            _log(f"{size}: sandbox at {sb.url}; applying the fleet")
            (root / "state").mkdir()
            meta = {"url": sb.url, "admin_key": sb.admin_key, "ids": ids, "receiver_port": port}
            (root / "meta.json").write_text(json.dumps(meta))
            started = time.perf_counter()
            _child("--apply", str(root))
            _log(f"{size}: applied in {time.perf_counter() - started:.1f}s")
            common = ["--interval", str(args.interval), "--passes", str(args.passes)]
            common += ["--warm-passes", str(args.warm_passes)]
            results: list[DesignResult] = []
            designs = [("today", DEFAULT_RESYNC_PERIOD_S), ("feed", args.resync_period)]
            for offset, (design, period) in enumerate(designs):
                out = _child("--design", design, str(root), "--resync-period", str(period),
                             "--canary-offset", str(offset * args.passes), *common)  # fmt: skip
                results.append(DesignResult(**json.loads(out)))
            target = period_for_target(results[-1], args.interval)
            if target is not None and target != args.resync_period:
                out = _child("--design", f"feed@{target:g}", str(root), "--resync-period", str(target),
                             "--canary-offset", str(2 * args.passes), *common)  # fmt: skip
                results.append(DesignResult(**json.loads(out)))
    return results


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(results: Sequence[DesignResult], interval: float) -> str:
    rows = []
    for r in results:
        worst = max(r.delivery_seconds) if r.delivery_seconds else math.nan
        rows.append([
            f"{r.agents:,}", r.design, f"{r.resync_period_s:g}" if r.resync_period_s else "-",
            f"{r.per_agent:.3f}", f"{sum(r.requests) / len(r.requests):,.0f}",
            f"{r.moved_per_pass:.0f} / {r.resynced_per_pass:.0f}" if r.resync_period_s else "all / -",
            f"{sum(r.pass_seconds) / len(r.pass_seconds):.2f} / {max(r.pass_seconds):.2f}",
            f"{worst:.2f}", f"{interval + worst:.1f}", str(r.missed_alerts), f"{r.rss_peak_mb:.0f}",
        ])  # fmt: skip
    out = [
        f"finops daemon benchmark: in-process daemon (reconcile pass + alerts job, stepped), sandbox in its own "
        f"process; {SPEND_SHARE:.0%} of agents spend per {interval:g} s pass; {results[0].passes} passes per design",
        "",
        _table(
            [
                "agents",
                "design",
                "resync s",
                "req/agent/pass",
                "req/pass",
                "moved/resynced",
                "pass s mean/max",
                "deliver s",
                "worst latency s",
                "missed",
                "RSS MB",
            ],
            rows,
        ),
        "",
        "Requests by route per pass (mean)",
    ]
    for r in results:
        parts = ", ".join(f"{k} {v / r.passes:,.1f}" for k, v in sorted(r.by_route.items()))
        out.append(f"  {r.agents:,} {r.design}: {parts}")
    out += ["", "Targets"]
    for r in results:
        if r.design == "today":
            continue
        worst = interval + (max(r.delivery_seconds) if r.delivery_seconds else math.inf)
        checks = [
            (r.per_agent <= TARGET_REQUESTS_PER_AGENT, f"requests/agent/pass <= {TARGET_REQUESTS_PER_AGENT}: "
             f"{r.per_agent:.3f}"),
            (worst <= interval + TARGET_LATENCY_SLACK_S and not r.missed_alerts,
             f"alert latency <= interval + {TARGET_LATENCY_SLACK_S:g} s: {worst:.1f} s, {r.missed_alerts} missed"),
            (r.rss_peak_mb <= TARGET_RSS_MB, f"daemon peak RSS <= {TARGET_RSS_MB:g} MB: {r.rss_peak_mb:.0f} MB"),
            (max(r.pass_seconds) < interval / 2, f"pass well inside its interval: max {max(r.pass_seconds):.2f} s"),
        ]  # fmt: skip
        for ok, text in checks:
            out.append(f"  {'PASS' if ok else 'MISS'}  {r.agents:,} {r.design}: {text}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="finops daemon benchmark (issue 14)")
    parser.add_argument("--quick", action="store_true", help="1,000 agents only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per daemon pass (alerts interval)")
    parser.add_argument("--resync-period", type=float, default=DEFAULT_RESYNC_PERIOD_S)
    parser.add_argument("--passes", type=int, default=None, help="measured passes per design (8; --quick: 3)")
    parser.add_argument("--warm-passes", type=int, default=None, help="passes before measuring (3; --quick: 1)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--apply", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--design", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--canary-offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.passes is None:
        args.passes = 3 if args.quick else 8
    if args.warm_passes is None:
        args.warm_passes = 1 if args.quick else 3
    if args.apply:
        meta = json.loads((Path(args.apply) / "meta.json").read_text())
        root = Path(args.apply)
        asyncio.run(_apply(meta["url"], meta["admin_key"], root / "manifests", root / "state"))
        return
    if args.design:
        args.design, args.root = args.design
        print(json.dumps(asdict(asyncio.run(_daemon(args)))))
        return
    sizes = [1000] if args.quick else sorted(args.sizes)
    results = [r for size in sizes for r in run_size(size, args)]
    print(render(results, args.interval))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
