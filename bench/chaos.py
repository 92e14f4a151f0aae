"""Chaos run: a generated fleet applied against a sandbox that misbehaves on purpose.

Run from the repository root::

    .venv/bin/python -m bench.chaos                                   # 1,000 agents, default weather
    .venv/bin/python -m bench.chaos --agents 200 --seed 3 --rate 0.3 --kinds all
    .venv/bin/python -m bench.chaos --kinds drop+500 --rate 0.5       # only committed-then-lost answers

The sandbox runs in this process with seeded fault injection on every ``/v1`` route
(``controller.sandbox.faults``; ``--kinds``, ``--rate``, ``--seed``). The controller runs
the same code as ``finops apply`` (observe → plan → apply), pass after pass, until a plan
made under the same faults has nothing left to do. Then, with faults suspended, the
exact-once check of the integration tests (``assert_converged``) reads the sandbox's own
database: every wallet funded exactly once to target, every ledger adding up to its
balance, caps exact, a clean plan empty and a converged re-apply free of writes.

Prints one row per pass, the faults injected by kind, and the verdict; exits 1 if the
fleet did not converge or the check failed. A pass "blind" is one whose fleet-wide read or
intent recovery failed every attempt (``finops`` would exit 1 and the next run retries).

Passes are spaced more than the settle time apart (``policies.settle``): before each one
the sandbox finishes every request it holds (``late`` ones included) and finops' clock is
moved past the settle time, so an unknown outcome left by a pass is resolved by the next;
"withheld" counts the changes a plan held back while an outcome was still unknown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.fleetgen import write_fleet
from controller.gateway.errors import GatewayError
from controller.keys.vault import KeyVault
from controller.manifest.loader import load_manifests
from controller.sandbox.faults import DEFAULT_KINDS, FaultConfig
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from tests.integration.test_faults import FastHarness, assert_converged, next_pass


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


async def chaos(args: argparse.Namespace, workdir: Path) -> int:
    config = FaultConfig.parse(
        f"seed={args.seed},rate={args.rate},kinds={args.kinds},retry_after={args.retry_after},hang={args.hang}"
    )
    write_fleet(workdir / "manifests", args.agents)
    desired = load_manifests(workdir / "manifests")
    print(
        f"chaos: {args.agents} agents · faults {config.to_spec()} · client timeout {args.timeout:g} s"
        f" · concurrency {args.concurrency}",
        flush=True,
    )
    sandbox = SandboxServer(db_path=workdir / "gateway.db", faults=config).start()
    state = StateStore(workdir / "state" / "state.db")
    sink = KeyVault(workdir / "secrets")
    harness = FastHarness(sandbox, state, sink, timeout=args.timeout, concurrency=args.concurrency)
    rows: list[list[str]] = []
    writes = 0
    converged_after: int | None = None
    started = time.monotonic()
    try:
        for number in range(1, args.passes + 1):
            next_pass(harness)
            t0 = time.monotonic()
            try:
                plan = await harness.plan(desired)
            except GatewayError as exc:
                rows.append([str(number), "blind", "-", "-", "-", "-", f"{time.monotonic() - t0:.1f}"])
                print(f"  pass {number}: observation failed: {exc}", flush=True)
                continue
            if plan.empty and not plan.errors and not plan.blocked:
                converged_after = number - 1
                rows.append([str(number), "0", "0", "0", "0", "0", f"{time.monotonic() - t0:.1f}"])
                break
            try:
                result = await harness.apply(plan)
            except GatewayError as exc:
                rows.append(
                    [
                        str(number),
                        str(len(plan.changes)),
                        str(len(plan.blocked)),
                        str(len(plan.errors)),
                        "blind",
                        "-",
                        "-",
                    ]
                )
                print(f"  pass {number}: apply stopped: {exc}", flush=True)
                continue
            writes += result.writes
            rows.append(
                [
                    str(number),
                    str(len(plan.changes)),
                    str(len(plan.blocked)),
                    str(len(plan.errors)),
                    str(result.writes),
                    str(len(result.failed())),
                    f"{time.monotonic() - t0:.1f}",
                ]
            )
            print(
                f"  pass {number}: {rows[-1][1]} changes, {rows[-1][2]} withheld, {rows[-1][4]} writes, "
                f"{rows[-1][5]} agents failed",
                flush=True,
            )
        elapsed = time.monotonic() - started
        snapshot = sandbox.faults.snapshot()
        verdict = "not checked: did not converge"
        ok = False
        if converged_after is not None:
            try:
                convergence = await assert_converged(sandbox, desired, state=state, sink=harness.sink)
            except AssertionError as exc:
                verdict = "FAIL\n" + str(exc)
            else:
                funded = sum(convergence.expected_deposits.values())
                verdict = (
                    f"PASS: {args.agents} wallets, {funded} funded exactly once and the rest left at the signup "
                    f"bonus; every ledger adds up; caps exact; clean plan empty; converged re-apply wrote nothing; "
                    f"{len(convergence.lost_keys)} key(s) lost to lost register answers"
                )
                ok = True
    finally:
        state.close()
        sandbox.stop()

    print()
    print(_table(["pass", "changes", "withheld", "unobservable", "writes", "failed agents", "seconds"], rows))
    print()
    injected = snapshot["injected"]
    fault_rows = [[kind, str(n)] for kind, n in injected.items()]
    eligible = snapshot["eligible_requests"]
    share = f"{100 * snapshot['total'] / eligible:.1f}%" if eligible else "-"
    fault_rows.append(["total", f"{snapshot['total']} of {eligible} /v1 requests ({share})"])
    print(_table(["fault", "injected"], fault_rows))
    print()
    passes = "did not converge" if converged_after is None else f"converged after {converged_after} pass(es)"
    print(f"{passes} · {writes} writes · {elapsed:.1f} s")
    print(f"exact-once: {verdict}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--kinds", default="+".join(k.value for k in DEFAULT_KINDS), help="'+'-joined fault kinds, or 'all'"
    )
    parser.add_argument("--rate", type=float, default=0.2, help="fraction of /v1 requests faulted")
    parser.add_argument("--passes", type=int, default=10, help="give up after this many passes")
    parser.add_argument("--timeout", type=float, default=0.5, help="the client's timeout, seconds")
    parser.add_argument("--hang", type=float, default=1.0, help="how long a 'late' request is held, seconds")
    parser.add_argument("--retry-after", type=float, default=0.0, help="Retry-After of injected 429s, seconds")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="finops-chaos-") as tmp:
        os.chdir(tmp)  # anything a manifest names relatively stays in the scratch directory
        code = asyncio.run(chaos(args, Path(tmp)))
    sys.exit(code)


if __name__ == "__main__":
    main()
