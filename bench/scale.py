"""Scale benchmark (issue 5): how finops behaves with 100, 1,000 and 10,000 agents.

Run from the repository root::

    .venv/bin/python -m bench.scale                  # 100 and 1,000 agents
    .venv/bin/python -m bench.scale --with-10k       # also 10,000 (several minutes)
    .venv/bin/python -m bench.scale --agents 10000   # only 10,000: the issue-14 targets
    .venv/bin/python -m bench.scale --quick          # 1,000 agents, short runs (under 2 minutes)
    .venv/bin/python -m bench.scale --rtt-ms 50      # the latency phase's round trip (default 20, 0: off)

Each fleet size runs in a fresh child process (so its peak RSS is its own), which starts
the sandbox in a process of its own (``python -m controller.cli sandbox``) on 127.0.0.1 and
drives it through the same code paths as ``finops plan`` / ``finops apply``:
``load_manifests`` → ``observe_and_plan`` → ``Applier.apply``. Requests are counted by the
sandbox (``GET /_sandbox/stats``), not by the client, so nothing the client forgets to
count can flatter the figures.

Measured per size: a plan against an empty gateway, the apply of that plan, a converged
re-plan (which must make zero writes), the controller's peak RSS, a seed-style sequential
baseline (one blocking ``httpx.Client`` request at a time: balance then budget, agent by
agent), and the sandbox's own ceiling for those same reads (a near-free raw-socket client
on 64 connections), so finops' throughput can be read as a fraction of what the sandbox can
serve at all. CPU time of both processes is recorded too: the box may be shared, and CPU
per request does not move with other people's load the way wall time does.

Issue 14 adds, per size: the same converged re-plan with httpx's own transport under the
client's lanes (what the client used before its lean HTTP/1.1 transport: the CPU per request
before and after, in the same run); a real ``finops plan`` CLI process (wall time, requests/s
against the ceiling, its peak RSS, and ``--detailed-exitcode`` proving it converged); and a
latency phase: the sandbox restarted on the same database behind a simulated round trip
(``bench.latency_sandbox``), where the converged re-plan races the sequential loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from bench.fleetgen import write_fleet
from bench.rawload import encode_get, hammer
from bench.sandboxproc import SandboxProcess
from controller.gateway.client import GatewayClient
from controller.io.target import target_name
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.reconcile.apply import Applier
from controller.reconcile.decide import observe_and_plan
from controller.state import StateStore

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (100, 1000)
TARGET_SIZE = 10_000
TARGET_SPEEDUP = 20.0
TARGET_CEILING_FRACTION = 0.5
"""'Within 2x of the sandbox ceiling': at least half the ceiling's request rate."""
TARGET_REPLAN_READS_PER_AGENT = 3.0
TARGET_RSS_MB = 250.0
CEILING_CONNECTIONS = 64
# Issue 14 (full-plan part), at TARGET_SIZE agents
TARGET14_CEILING_FRACTION = 0.6
TARGET14_RTT_MS = 20.0
TARGET14_SPEEDUP = 20.0
RECORDED_BEFORE_CPU_MS = 0.53
"""CPU ms per request of the converged re-plan at 1,000 agents at e9fc396 (AsyncClient lanes
over httpcore, tenacity per call), as issue 14 recorded it: a reference, not measured here."""
QUICK_SIZES = (1000,)

T = TypeVar("T")


@dataclass(frozen=True)
class Phase:
    seconds: float
    reads: int
    writes: int
    controller_cpu: float = 0.0
    """CPU seconds used by the controller process (the load generator, for the ceiling)."""
    sandbox_cpu: float = 0.0

    @property
    def requests(self) -> int:
        return self.reads + self.writes

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def per_agent(self, agents: int) -> str:
        return f"{self.reads / agents:.2f} / {self.writes / agents:.2f}"

    def cpu_per_request(self) -> str:
        n = max(self.requests, 1)
        return f"{self.controller_cpu / n * 1000:.2f} / {self.sandbox_cpu / n * 1000:.2f}"


@dataclass(frozen=True)
class SizeResult:
    agents: int
    rtt_ms: float
    load_seconds: float
    plan: Phase
    """First plan, against a gateway that has none of the agents yet."""
    plan_changes: int
    apply: Phase
    apply_ok: bool
    replan: Phase
    """Plan again right after the apply: the converged steady state a daemon lives in."""
    replan_changes: int
    rss_start_mb: float
    rss_peak_mb: float
    sandbox_rss_mb: float
    baseline: Phase
    """Sequential reads of ``baseline_agents`` agents, scaled to the whole fleet."""
    baseline_agents: int
    ceiling_health: Phase | None
    ceiling_reads: Phase | None
    """The converged plan's own reads (balance + budget of every agent), raw client."""
    replan_httpx: Phase | None = None
    """The converged re-plan again, with httpx's own transport under the lanes."""
    cli_plan: Phase | None = None
    """A ``finops plan`` process (imports, manifests, state, observe, plan, render)."""
    cli_exit: int | None = None
    cli_rss_mb: float = 0.0
    rtt_replan: Phase | None = None
    """The converged re-plan behind a simulated ``rtt_ms`` round trip."""
    rtt_replan_changes: int = 0
    rtt_baseline: Phase | None = None
    rtt_baseline_agents: int = 0

    @property
    def speedup(self) -> float:
        return self.baseline.seconds / self.replan.seconds

    @property
    def rtt_speedup(self) -> float | None:
        if self.rtt_replan is None or self.rtt_baseline is None:
            return None
        return self.rtt_baseline.seconds / self.rtt_replan.seconds

    @property
    def ceiling_fraction(self) -> float | None:
        return self.replan.rate / self.ceiling_reads.rate if self.ceiling_reads else None

    @property
    def cli_ceiling_fraction(self) -> float | None:
        if self.cli_plan is None or self.ceiling_reads is None:
            return None
        return self.cli_plan.rate / self.ceiling_reads.rate


# ----------------------------------------------------------------------------- child


def _rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _counts(sb: SandboxProcess) -> tuple[int, int]:
    stats = sb.stats()
    reads, writes = stats["reads"], stats["writes"]
    assert isinstance(reads, int) and isinstance(writes, int)
    return reads, writes


class _Meter:
    """Wall time, CPU of both processes and the sandbox's request counts over one phase."""

    def __init__(self, sb: SandboxProcess) -> None:
        self.sb = sb

    def __enter__(self) -> _Meter:
        self.sb.reset_stats()
        self._cpu, self._sandbox_cpu = time.process_time(), self.sb.cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self._start
        cpu, sandbox_cpu = time.process_time() - self._cpu, self.sb.cpu_seconds() - self._sandbox_cpu
        reads, writes = _counts(self.sb)
        self.phase = Phase(seconds, reads, writes, cpu, sandbox_cpu)


async def _measured(sb: SandboxProcess, work: Awaitable[T]) -> tuple[T, Phase]:
    with _Meter(sb) as meter:
        value = await work
    return value, meter.phase


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _ControllerRun:
    load_seconds: float
    plan: Phase
    plan_changes: int
    apply: Phase
    apply_ok: bool
    replan: Phase
    replan_changes: int
    rss_start_mb: float
    rss_peak_mb: float


async def _controller(
    sb: SandboxProcess, manifests: Path, state: Path, agents: int, concurrency: int
) -> _ControllerRun:
    """Everything the controller does, in this process, wired as the CLI wires it."""
    rss_start = _rss_mb()
    start = time.perf_counter()
    desired = load_manifests(manifests)
    load_seconds = time.perf_counter() - start
    if len(desired.agents()) != agents:
        raise RuntimeError(f"generated {agents} agents, loaded {len(desired.agents())}")
    target = target_name(sb.url)
    store = StateStore(state / f"state-{target}.db")  # where ``finops plan --state-dir`` looks
    sink = KeyVault(state / "secrets")
    try:
        async with GatewayClient(sb.url, sb.admin_key, concurrency=concurrency) as client:
            plan, plan_phase = await _measured(sb, observe_and_plan(client, desired, target, store))
            if plan.errors or plan.violations:
                raise RuntimeError(f"plan refused: {plan.errors[:3]} {plan.violations[:3]}")
            _log(f"{agents}: plan {plan_phase.seconds:.2f}s, {len(plan.changes)} changes; applying")
            result, apply_phase = await _measured(sb, Applier(client, store, sink).apply(plan))
            _log(f"{agents}: apply {apply_phase.seconds:.2f}s, ok={result.ok}; re-planning")
            replan, replan_phase = await _measured(sb, observe_and_plan(client, desired, target, store))
    finally:
        store.close()
    return _ControllerRun(
        load_seconds=load_seconds,
        plan=plan_phase,
        plan_changes=len(plan.changes),
        apply=apply_phase,
        apply_ok=result.ok,
        replan=replan_phase,
        replan_changes=len(replan.changes),
        rss_start_mb=rss_start,
        rss_peak_mb=_rss_mb(),
    )


class _HttpxLanes(GatewayClient):
    """The client with httpx's own transport (httpcore, anyio, h11) under each lane: the
    stack it used before its lean HTTP/1.1 transport, for the before/after CPU figures."""

    def _new_lane(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


async def _replan(
    sb: SandboxProcess, manifests: Path, state: Path, concurrency: int, client_class: type[GatewayClient]
) -> tuple[int, Phase]:
    """One more converged re-plan with a fresh client: (changes planned, phase)."""
    desired = load_manifests(manifests)
    target = target_name(sb.url)
    store = StateStore(state / f"state-{target}.db")
    try:
        async with client_class(sb.url, sb.admin_key, concurrency=concurrency) as client:
            plan, phase = await _measured(sb, observe_and_plan(client, desired, target, store))
    finally:
        store.close()
    return len(plan.changes), phase


def _cli_plan(sb: SandboxProcess, manifests: Path, state: Path, concurrency: int) -> tuple[Phase, int, float]:
    """``finops plan --detailed-exitcode`` as an operator runs it: (phase, exit code, peak RSS
    in MB). Exit 0 proves it found the fleet converged (2: changes, 1: error)."""
    cmd = [sys.executable, "-m", "controller.cli", "plan", str(manifests), "--gateway", sb.url]
    cmd += ["--api-key-file", str(sb.key_file), "--state-dir", str(state), "--format", "json"]
    cmd += ["--detailed-exitcode", "--concurrency", str(concurrency)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENHELIX_", "FINOPS_"))}
    sb.reset_stats()
    sandbox_cpu = sb.cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    errors = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode not in (0, 2):
        raise RuntimeError(f"finops plan failed (exit {proc.returncode}): {errors[-2000:]}")
    reads, writes = _counts(sb)
    phase = Phase(seconds, reads, writes, usage.ru_utime + usage.ru_stime, sb.cpu_seconds() - sandbox_cpu)
    return phase, proc.returncode, usage.ru_maxrss / 1024


def _sequential_baseline(sb: SandboxProcess, agent_ids: Sequence[str], sample: int) -> Phase:
    """The seed's naive loop: one blocking request at a time, balance then budget.

    Run over the first ``sample`` agents and scaled to the whole fleet: a sequential loop's
    time is linear in the agents by construction, and with a simulated round trip the full
    loop would take many minutes."""
    measured = agent_ids[:sample]
    headers = {"Authorization": f"Bearer {sb.admin_key}"}
    with httpx.Client(base_url=sb.url, headers=headers, timeout=30.0) as http, _Meter(sb) as meter:
        for agent in measured:
            resp = http.get(f"/v1/billing/wallets/{agent}/balance")
            resp.raise_for_status()
            Decimal(resp.json()["balance"])
            resp = http.get(f"/v1/billing/wallets/{agent}/budget")
            resp.raise_for_status()
            resp.json()
    scale = len(agent_ids) / len(measured)
    p = meter.phase
    return Phase(
        p.seconds * scale,
        round(p.reads * scale),
        round(p.writes * scale),
        p.controller_cpu * scale,
        p.sandbox_cpu * scale,
    )


def _ceiling(sb: SandboxProcess, paths: Sequence[str], auth: bool, seconds: float) -> Phase:
    url = urlsplit(sb.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    key = sb.admin_key if auth else None
    requests = [encode_get(host, port, path, key) for path in paths]
    with _Meter(sb) as meter:
        result = asyncio.run(hammer(host, port, requests, concurrency=CEILING_CONNECTIONS, seconds=seconds))
    if result.failures:
        raise RuntimeError(f"the ceiling run had {result.failures} failed requests")
    return replace(meter.phase, seconds=result.seconds)


def run_size(
    agents: int,
    *,
    concurrency: int,
    ceiling_seconds: float,
    rtt_ms: float,
    baseline_agents: int | None,
    rtt_baseline_agents: int = 200,
) -> SizeResult:
    with tempfile.TemporaryDirectory(prefix=f"finops-bench-{agents}-") as tmp:
        root = Path(tmp)
        manifests, state = root / "manifests", root / "state"
        agent_ids = write_fleet(manifests, agents)
        with SandboxProcess(root / "sandbox") as sb:
            _log(f"{agents}: sandbox pid {sb.pid} at {sb.url}")
            run = asyncio.run(_controller(sb, manifests, state, agents, concurrency))
            _log(f"{agents}: re-plan {run.replan.seconds:.2f}s; again with httpx's transport")
            _, replan_httpx = asyncio.run(_replan(sb, manifests, state, concurrency, _HttpxLanes))
            _log(f"{agents}: httpx transport {replan_httpx.seconds:.2f}s; finops plan (CLI)")
            cli_plan, cli_exit, cli_rss = _cli_plan(sb, manifests, state, concurrency)
            _log(f"{agents}: CLI plan {cli_plan.seconds:.2f}s exit {cli_exit}; sequential baseline")
            baseline = _sequential_baseline(sb, agent_ids, min(agents, baseline_agents or agents))
            _log(f"{agents}: baseline {baseline.seconds:.2f}s; sandbox ceiling")
            health = _ceiling(sb, ["/v1/health"], False, ceiling_seconds)
            paths = [f"/v1/billing/wallets/{a}/{what}" for a in agent_ids for what in ("balance", "budget")]
            reads = _ceiling(sb, paths, True, ceiling_seconds)
            sandbox_rss = sb.peak_rss_mb()
        rtt_replan = rtt_baseline = None
        rtt_changes = rtt_sample = 0
        if rtt_ms > 0:  # the same gateway database, now behind a simulated round trip
            with SandboxProcess(root / "sandbox", rtt_ms=rtt_ms) as sb:
                _log(f"{agents}: sandbox with a {rtt_ms:g} ms round trip, pid {sb.pid}; converged re-plan")
                rtt_changes, rtt_replan = asyncio.run(_replan(sb, manifests, state, concurrency, GatewayClient))
                rtt_sample = min(agents, rtt_baseline_agents)
                _log(f"{agents}: re-plan {rtt_replan.seconds:.2f}s; sequential baseline over {rtt_sample} agents")
                rtt_baseline = _sequential_baseline(sb, agent_ids, rtt_sample)
    return SizeResult(
        agents=agents,
        rtt_ms=rtt_ms,
        **asdict(run),
        sandbox_rss_mb=sandbox_rss,
        baseline=baseline,
        baseline_agents=min(agents, baseline_agents or agents),
        ceiling_health=health,
        ceiling_reads=reads,
        replan_httpx=replan_httpx,
        cli_plan=cli_plan,
        cli_exit=cli_exit,
        cli_rss_mb=cli_rss,
        rtt_replan=rtt_replan,
        rtt_replan_changes=rtt_changes,
        rtt_baseline=rtt_baseline,
        rtt_baseline_agents=rtt_sample,
    )


# ----------------------------------------------------------------------------- parent


def _phase(data: Any) -> Phase | None:
    return None if data is None else Phase(**data)


def _result_from_json(data: dict[str, Any]) -> SizeResult:
    for name in (
        "plan",
        "apply",
        "replan",
        "baseline",
        "ceiling_health",
        "ceiling_reads",
        "replan_httpx",
        "cli_plan",
        "rtt_replan",
        "rtt_baseline",
    ):
        data[name] = _phase(data[name])
    return SizeResult(**data)


def _spawn(agents: int, args: argparse.Namespace) -> SizeResult:
    cmd = [sys.executable, "-m", "bench.scale", "--child", str(agents), "--concurrency", str(args.concurrency)]
    cmd += ["--ceiling-seconds", str(args.ceiling_seconds), "--rtt-ms", str(args.rtt_ms)]
    cmd += ["--rtt-baseline-agents", str(args.rtt_baseline_agents)]
    if args.baseline_agents:
        cmd += ["--baseline-agents", str(args.baseline_agents)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench for {agents} agents failed (exit {proc.returncode})")
    return _result_from_json(json.loads(proc.stdout.strip().splitlines()[-1]))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def _baseline_cell(r: SizeResult) -> str:
    scaled = "" if r.baseline_agents == r.agents else f" (from {r.baseline_agents:,})"
    return f"{r.baseline.seconds:.2f}{scaled}"


def render(results: Sequence[SizeResult], *, concurrency: int) -> str:
    load1, _, _ = os.getloadavg()
    rtt = results[0].rtt_ms
    where = "loopback, no added latency" + (f"; then a simulated {rtt:g} ms round trip per request" if rtt else "")
    out = [
        f"finops scale benchmark: sandbox in its own process on 127.0.0.1 ({where}); controller "
        f"concurrency {concurrency}; {os.cpu_count()} CPUs, load average {load1:.2f} at the end",
        "",
        "Wall time (s), controller peak RSS",
        _table(
            ["agents", "load", "plan (empty gw)", "apply", "converged re-plan", "seq. baseline", "speed-up", "RSS"],
            [
                [
                    f"{r.agents:,}",
                    f"{r.load_seconds:.2f}",
                    f"{r.plan.seconds:.2f}",
                    f"{r.apply.seconds:.2f}",
                    f"{r.replan.seconds:.2f}",
                    _baseline_cell(r),
                    f"{r.speedup:.1f}x",
                    f"{r.rss_peak_mb:.0f} MB",
                ]
                for r in results
            ],
        ),
        "",
        "HTTP requests per agent, counted by the sandbox (reads / writes)",
        _table(
            ["agents", "plan (empty gw)", "apply", "converged re-plan", "seq. baseline", "re-plan changes / writes"],
            [
                [
                    f"{r.agents:,}",
                    r.plan.per_agent(r.agents),
                    r.apply.per_agent(r.agents),
                    r.replan.per_agent(r.agents),
                    r.baseline.per_agent(r.agents),
                    f"{r.replan_changes} / {r.replan.writes}",
                ]
                for r in results
            ],
        ),
        "",
        "CPU ms per request (controller / sandbox process)",
        _table(
            [
                "agents",
                "plan (empty gw)",
                "apply",
                "converged re-plan",
                "re-plan, httpx transport",
                "finops plan (CLI)",
                "seq. baseline",
                "ceiling (raw client)",
            ],
            [
                [
                    f"{r.agents:,}",
                    r.plan.cpu_per_request(),
                    r.apply.cpu_per_request(),
                    r.replan.cpu_per_request(),
                    r.replan_httpx.cpu_per_request() if r.replan_httpx else "n/a",
                    r.cli_plan.cpu_per_request() if r.cli_plan else "n/a",
                    r.baseline.cpu_per_request(),
                    r.ceiling_reads.cpu_per_request() if r.ceiling_reads else "n/a",
                ]
                for r in results
            ],
        ),
        f"(before the lean transport, at e9fc396, issue 14 recorded {RECORDED_BEFORE_CPU_MS:.2f} ms for the "
        "converged re-plan; the CLI's figure includes its start-up, manifest load and rendering)",
    ]
    if any(r.cli_plan for r in results):
        out += [
            "",
            "Full `finops plan` (a CLI process, --detailed-exitcode: 0 = converged)",
            _table(
                ["agents", "wall (s)", "requests", "req/s", "of ceiling", "peak RSS", "exit"],
                [
                    [
                        f"{r.agents:,}",
                        f"{r.cli_plan.seconds:.2f}",
                        f"{r.cli_plan.requests:,}",
                        f"{r.cli_plan.rate:,.0f}",
                        f"{r.cli_ceiling_fraction:.0%}" if r.cli_ceiling_fraction is not None else "n/a",
                        f"{r.cli_rss_mb:.0f} MB",
                        str(r.cli_exit),
                    ]
                    for r in results
                    if r.cli_plan
                ],
            ),
        ]
    if any(r.rtt_replan for r in results):
        out += [
            "",
            f"With a simulated {rtt:g} ms round trip (same gateway database, sandbox restarted behind the delay)",
            _table(
                ["agents", "converged re-plan (s)", "changes", "seq. baseline (s)", "speed-up"],
                [
                    [
                        f"{r.agents:,}",
                        f"{r.rtt_replan.seconds:.2f}",
                        str(r.rtt_replan_changes),
                        f"{r.rtt_baseline.seconds:.2f} (from {r.rtt_baseline_agents:,})",
                        f"{r.rtt_speedup:.1f}x",
                    ]
                    for r in results
                    if r.rtt_replan and r.rtt_baseline and r.rtt_speedup
                ],
            ),
        ]
    out += [
        "",
        f"Requests/s: finops against the sandbox's ceiling (raw keep-alive client, {CEILING_CONNECTIONS} connections)",
        _table(
            ["agents", "re-plan", "seq. baseline", "ceiling: health", "ceiling: balance+budget", "re-plan/ceiling"],
            [
                [
                    f"{r.agents:,}",
                    f"{r.replan.rate:,.0f}",
                    f"{r.baseline.rate:,.0f}",
                    f"{r.ceiling_health.rate:,.0f}" if r.ceiling_health else "n/a",
                    f"{r.ceiling_reads.rate:,.0f}" if r.ceiling_reads else "n/a",
                    f"{r.ceiling_fraction:.0%}" if r.ceiling_fraction is not None else "n/a",
                ]
                for r in results
            ],
        ),
    ]
    return "\n".join([*out, "", *verdicts(results)])


def verdicts(results: Sequence[SizeResult]) -> list[str]:
    lines = ["Checks"]
    for r in results:
        ok = r.apply_ok and r.replan.writes == 0 and r.replan_changes == 0
        lines.append(
            f"  {'PASS' if ok else 'FAIL'}  {r.agents:,} agents: apply ok={r.apply_ok}; the converged re-plan made "
            f"{r.replan.writes} writes and planned {r.replan_changes} changes (must be 0 and 0)"
        )
    big = max(results, key=lambda r: r.agents)
    at = f"at {big.agents:,} agents" + ("" if big.agents >= TARGET_SIZE else " (10,000 not run: --with-10k)")
    reads_per_agent = big.replan.reads / big.agents
    fraction = big.ceiling_fraction
    targets: list[tuple[bool | None, str]] = [
        (
            big.speedup >= TARGET_SPEEDUP,
            f"converged plan >= {TARGET_SPEEDUP:.0f}x faster than the sequential baseline: {big.speedup:.1f}x",
        ),
        (
            None if fraction is None else fraction >= TARGET_CEILING_FRACTION,
            "converged plan within 2x of the sandbox ceiling: "
            + (
                "not measured with a simulated round trip"
                if fraction is None or big.ceiling_reads is None
                else f"{big.replan.rate:,.0f} of {big.ceiling_reads.rate:,.0f} req/s ({fraction:.0%}, "
                f"needs >= {TARGET_CEILING_FRACTION:.0%})"
            ),
        ),
        (
            reads_per_agent <= TARGET_REPLAN_READS_PER_AGENT,
            f"<= {TARGET_REPLAN_READS_PER_AGENT:.0f} reads per agent on a converged plan: {reads_per_agent:.2f}",
        ),
        (big.rss_peak_mb <= TARGET_RSS_MB, f"controller RSS <= {TARGET_RSS_MB:.0f} MB: {big.rss_peak_mb:.0f} MB"),
    ]
    lines.append(f"Targets (issue 5), {at}")
    lines += [f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {text}" for ok, text in targets]
    lines.append(f"Targets (issue 14, full plan), {at}")
    lines += [f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {text}" for ok, text in issue14_targets(big)]
    lines += ["", *cpu_split(big)]
    return lines


def issue14_targets(big: SizeResult) -> list[tuple[bool | None, str]]:
    fraction, cli_fraction, speedup = big.ceiling_fraction, big.cli_ceiling_fraction, big.rtt_speedup
    ceiling = big.ceiling_reads.rate if big.ceiling_reads else 0.0
    out: list[tuple[bool | None, str]] = [
        (
            None if fraction is None else fraction >= TARGET14_CEILING_FRACTION,
            f"full plan, in-process observe + plan >= {TARGET14_CEILING_FRACTION:.0%} of the sandbox's balance+budget "
            "ceiling: "
            + ("not measured" if fraction is None else f"{big.replan.rate:,.0f} of {ceiling:,.0f} req/s")
            + ("" if fraction is None else f" ({fraction:.0%})"),
        ),
        (
            None if cli_fraction is None else cli_fraction >= TARGET14_CEILING_FRACTION,
            f"full plan, a `finops plan` process (start-up, manifests, state, render included) >= "
            f"{TARGET14_CEILING_FRACTION:.0%} of the same ceiling: "
            + ("not measured" if cli_fraction is None or big.cli_plan is None else f"{big.cli_plan.rate:,.0f} req/s")
            + ("" if cli_fraction is None else f" ({cli_fraction:.0%})"),
        ),
        (
            None if speedup is None or big.rtt_ms != TARGET14_RTT_MS else speedup >= TARGET14_SPEEDUP,
            f">= {TARGET14_SPEEDUP:.0f}x the sequential baseline with a simulated {TARGET14_RTT_MS:g} ms round trip: "
            + ("not measured (--rtt-ms 20)" if speedup is None else f"{speedup:.1f}x at {big.rtt_ms:g} ms"),
        ),
    ]
    if big.replan_httpx is not None:
        after = big.replan.controller_cpu / max(big.replan.requests, 1) * 1000
        before = big.replan_httpx.controller_cpu / max(big.replan_httpx.requests, 1) * 1000
        sync = big.baseline.controller_cpu / max(big.baseline.requests, 1) * 1000
        out.append(
            (
                after < before and after < sync,
                f"client CPU per request down: {after:.2f} ms (lean transport) vs {before:.2f} ms with httpx's "
                f"transport and {sync:.2f} ms for a plain sync httpx client (recorded before: "
                f"{RECORDED_BEFORE_CPU_MS:.2f} ms)",
            )
        )
    if big.cli_plan is not None:
        out.append(
            (
                big.cli_rss_mb <= TARGET_RSS_MB and big.cli_exit == 0,
                f"finops plan peak RSS {big.cli_rss_mb:.0f} MB (<= {TARGET_RSS_MB:.0f} MB), exit {big.cli_exit} "
                "(0: it found the fleet converged)",
            )
        )
    if big.rtt_replan is not None:
        out.append(
            (
                big.rtt_replan_changes == 0 and big.rtt_replan.writes == 0,
                f"converged re-plan behind the round trip: {big.rtt_replan_changes} changes, "
                f"{big.rtt_replan.writes} writes (must be 0 and 0)",
            )
        )
    return out


def cpu_split(big: SizeResult) -> list[str]:
    """Where the CPU went during the converged re-plan: on 2 cores, the controller and the
    sandbox each want one; whichever is near 1.0 core-seconds per second is the bottleneck."""
    p = big.replan
    if p.seconds <= 0:
        return []
    return [
        f"CPU during the converged re-plan at {big.agents:,} agents ({p.seconds:.2f} s, {os.cpu_count()} CPUs): "
        f"controller {p.controller_cpu / p.seconds:.2f} cores, sandbox {p.sandbox_cpu / p.seconds:.2f} cores "
        f"(the raw ceiling client: {_ceiling_cores(big)})"
    ]


def _ceiling_cores(big: SizeResult) -> str:
    c = big.ceiling_reads
    if c is None or c.seconds <= 0:
        return "n/a"
    return f"itself {c.controller_cpu / c.seconds:.2f}, sandbox {c.sandbox_cpu / c.seconds:.2f} cores"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="finops scale benchmark (issue 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="fleet sizes to run (default 100 1000)")
    parser.add_argument("--agents", type=int, nargs="+", default=None, help="the same as --sizes")
    parser.add_argument("--with-10k", action="store_true", help="also run 10,000 agents (slow)")
    parser.add_argument(
        "--quick", action="store_true", help="1,000 agents, 1 s ceiling runs, 100-agent latency baseline (< 2 min)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="controller requests in flight (CLI default)")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="duration of each ceiling run")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=TARGET14_RTT_MS,
        help="round trip of the latency phase, after the loopback phases (default 20; 0: no latency phase)",
    )
    parser.add_argument(
        "--baseline-agents",
        type=int,
        default=None,
        help="run the loopback sequential baseline over this many agents and scale it (default: all)",
    )
    parser.add_argument(
        "--rtt-baseline-agents",
        type=int,
        default=200,
        help="agents of the sequential baseline behind the round trip, scaled to the fleet (default 200)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.ceiling_seconds = min(args.ceiling_seconds, 1.0)
        args.rtt_baseline_agents = min(args.rtt_baseline_agents, 100)
    if args.child is not None:
        result = run_size(
            args.child,
            concurrency=args.concurrency,
            ceiling_seconds=args.ceiling_seconds,
            rtt_ms=args.rtt_ms,
            baseline_agents=args.baseline_agents,
            rtt_baseline_agents=args.rtt_baseline_agents,
        )
        print(json.dumps(asdict(result)))
        return
    chosen = args.sizes or args.agents or (list(QUICK_SIZES) if args.quick else list(DEFAULT_SIZES))
    sizes = sorted(set(chosen) | ({TARGET_SIZE} if args.with_10k else set()))
    results = [_spawn(n, args) for n in sizes]
    print(render(results, concurrency=args.concurrency))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
