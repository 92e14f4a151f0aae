"""Scale benchmark (issue 5): how finops behaves with 100, 1,000 and 10,000 agents.

Run from the repository root::

    .venv/bin/python -m bench.scale                  # 100 and 1,000 agents
    .venv/bin/python -m bench.scale --with-10k       # also 10,000 (several minutes)
    .venv/bin/python -m bench.scale --rtt-ms 20      # with a simulated 20 ms round trip

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

    @property
    def speedup(self) -> float:
        return self.baseline.seconds / self.replan.seconds

    @property
    def ceiling_fraction(self) -> float | None:
        return self.replan.rate / self.ceiling_reads.rate if self.ceiling_reads else None


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
    store = StateStore(state / "state-sandbox.db")
    sink = KeyVault(state / "secrets")
    try:
        async with GatewayClient(sb.url, sb.admin_key, concurrency=concurrency) as client:
            plan, plan_phase = await _measured(sb, observe_and_plan(client, desired, "sandbox", store))
            if plan.errors or plan.violations:
                raise RuntimeError(f"plan refused: {plan.errors[:3]} {plan.violations[:3]}")
            _log(f"{agents}: plan {plan_phase.seconds:.2f}s, {len(plan.changes)} changes; applying")
            result, apply_phase = await _measured(sb, Applier(client, store, sink).apply(plan))
            _log(f"{agents}: apply {apply_phase.seconds:.2f}s, ok={result.ok}; re-planning")
            replan, replan_phase = await _measured(sb, observe_and_plan(client, desired, "sandbox", store))
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
    agents: int, *, concurrency: int, ceiling_seconds: float, rtt_ms: float, baseline_agents: int | None
) -> SizeResult:
    with tempfile.TemporaryDirectory(prefix=f"finops-bench-{agents}-") as tmp:
        root = Path(tmp)
        agent_ids = write_fleet(root / "manifests", agents)
        with SandboxProcess(root / "sandbox", rtt_ms=rtt_ms) as sb:
            _log(f"{agents}: sandbox pid {sb.pid} at {sb.url}" + (f", rtt {rtt_ms} ms" if rtt_ms else ""))
            run = asyncio.run(_controller(sb, root / "manifests", root / "state", agents, concurrency))
            sample = min(agents, baseline_agents or agents)
            _log(f"{agents}: re-plan {run.replan.seconds:.2f}s; sequential baseline over {sample} agents")
            baseline = _sequential_baseline(sb, agent_ids, sample)
            health = reads = None
            if rtt_ms == 0:
                _log(f"{agents}: baseline {baseline.seconds:.2f}s; sandbox ceiling")
                health = _ceiling(sb, ["/v1/health"], False, ceiling_seconds)
                paths = [f"/v1/billing/wallets/{a}/{what}" for a in agent_ids for what in ("balance", "budget")]
                reads = _ceiling(sb, paths, True, ceiling_seconds)
            sandbox_rss = sb.peak_rss_mb()
    return SizeResult(
        agents=agents,
        rtt_ms=rtt_ms,
        **asdict(run),
        sandbox_rss_mb=sandbox_rss,
        baseline=baseline,
        baseline_agents=sample,
        ceiling_health=health,
        ceiling_reads=reads,
    )


# ----------------------------------------------------------------------------- parent


def _phase(data: Any) -> Phase | None:
    return None if data is None else Phase(**data)


def _result_from_json(data: dict[str, Any]) -> SizeResult:
    for name in ("plan", "apply", "replan", "baseline", "ceiling_health", "ceiling_reads"):
        data[name] = _phase(data[name])
    return SizeResult(**data)


def _spawn(agents: int, args: argparse.Namespace) -> SizeResult:
    cmd = [sys.executable, "-m", "bench.scale", "--child", str(agents), "--concurrency", str(args.concurrency)]
    cmd += ["--ceiling-seconds", str(args.ceiling_seconds), "--rtt-ms", str(args.rtt_ms)]
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
    where = f"simulated round trip {rtt:g} ms per request" if rtt else "loopback, no added latency"
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
            ["agents", "plan (empty gw)", "apply", "converged re-plan", "seq. baseline", "ceiling (raw client)"],
            [
                [
                    f"{r.agents:,}",
                    r.plan.cpu_per_request(),
                    r.apply.cpu_per_request(),
                    r.replan.cpu_per_request(),
                    r.baseline.cpu_per_request(),
                    r.ceiling_reads.cpu_per_request() if r.ceiling_reads else "n/a",
                ]
                for r in results
            ],
        ),
    ]
    if not rtt:
        out += [
            "",
            f"Requests/s: finops against the sandbox's ceiling (raw keep-alive client, {CEILING_CONNECTIONS} "
            "connections)",
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
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="finops scale benchmark (issue 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="fleet sizes to run")
    parser.add_argument("--with-10k", action="store_true", help="also run 10,000 agents (slow)")
    parser.add_argument("--concurrency", type=int, default=32, help="controller requests in flight (CLI default)")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="duration of each ceiling run")
    parser.add_argument(
        "--rtt-ms", type=float, default=0.0, help="simulated round trip added to every request (default: none)"
    )
    parser.add_argument(
        "--baseline-agents",
        type=int,
        default=None,
        help="run the sequential baseline over this many agents and scale it (default: all; 200 with --rtt-ms)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_agents is None and args.rtt_ms > 0:
        args.baseline_agents = 200
    if args.child is not None:
        result = run_size(
            args.child,
            concurrency=args.concurrency,
            ceiling_seconds=args.ceiling_seconds,
            rtt_ms=args.rtt_ms,
            baseline_agents=args.baseline_agents,
        )
        print(json.dumps(asdict(result)))
        return
    sizes = sorted(set(args.sizes) | ({TARGET_SIZE} if args.with_10k else set()))
    results = [_spawn(n, args) for n in sizes]
    print(render(results, concurrency=args.concurrency))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
