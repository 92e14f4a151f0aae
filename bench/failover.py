"""Failover time of the HA daemon: the active ``finops run`` replica SIGKILLed mid-pass, until
the standby's first completed pass.

Run from the repository root::

    .venv/bin/python -m bench.failover                      # 5 trials, 50 agents, --standby-poll 2
    .venv/bin/python -m bench.failover --trials 10 --poll 0.5 --agents 200
    .venv/bin/python -m bench.failover --pg-url postgresql://finops@127.0.0.1:5432/postgres

Each trial gets a fresh sandbox (in this process), a fresh PostgreSQL database (on the
server at ``--pg-url``, or on a throwaway server started here with ``tests/pgserver.py``),
and two ``finops run`` replicas as subprocesses, each with its own state directory (as on
two machines). The test process holds the writer lock until both replicas stand by, then
releases it; a sandbox tripwire SIGKILLs whichever replica holds the lock when the sandbox
receives its N-th write of the first pass (N drawn from ``--seed``), so every kill lands
mid-pass and leaves intents behind. Measured from the kill, read from the survivor's own
``/metrics`` (polled every 20 ms):

- **takeover**: until ``finops_leader`` is 1 (the standby holds the lock; bounded by
  ``--standby-poll``, since a SIGKILLed session ends at once);
- **first pass**: until ``finops_last_reconcile_success_timestamp_seconds`` (the survivor's
  own clock) passes the kill time: the figure issue 11 asks for;
- **converged**: until a pass that planned nothing (``finops_drift_changes`` 0); it includes
  the settle time (``FINOPS_SETTLE_SECONDS``, 2 s here) that the dead leader's unknown
  outcomes must wait before they can be declared not landed, and the ``--interval``.

Prints one row per trial and min / median / max; exits 1 if a trial failed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from controller.sandbox.faults import Tripwire
from controller.sandbox.server import SandboxServer
from controller.state.location import StateLocation
from controller.state.lock import try_writer_lock
from tests import pgserver
from tests.integration.haproc import LeaderKiller, ReplicaProcess, wait_until
from tests.integration.test_faults import write_generated_fleet

SETTLE_S = "2"


@dataclass(frozen=True)
class Trial:
    kill_at_write: int
    takeover_s: float
    first_pass_s: float
    converged_s: float


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    directory = Path(tempfile.mkdtemp(prefix="finops-bench-pg-"))
    try:
        yield pgserver.start(directory)
    finally:
        pgserver.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def database(server: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{server.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _metric(replica: ReplicaProcess, name: str) -> float:
    return replica.metrics().get(name, 0.0)


def trial(workdir: Path, pg_url: str, args: argparse.Namespace, kill_at: int) -> Trial:
    manifests = write_generated_fleet(workdir / "manifests", args.agents)
    with SandboxServer(db_path=workdir / "gateway.db", admin_key_file=workdir / "admin.key") as sandbox:
        assert sandbox.admin_key_file is not None
        replicas = [
            ReplicaProcess(
                name,
                workdir / name,
                sandbox.url,
                sandbox.admin_key_file,
                pg_url,
                manifests,
                workdir / "secrets",
                interval=args.interval,
                poll=args.poll,
                env={"FINOPS_SETTLE_SECONDS": SETTLE_S},
            )
            for name in ("a", "b")
        ]
        gate = try_writer_lock(StateLocation(workdir / "anchor.db", url=pg_url), purpose="bench: hold the replicas")
        assert gate is not None
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:

                def standing_by(r: ReplicaProcess = replica) -> bool:
                    return r.leader() == 0

                wait_until(standing_by, 60, f"replica {replica.name} standing by")
            killer = LeaderKiller(pg_url, replicas)
            sandbox.faults.arm(Tripwire(kill_at, killer, commit=True))
            gate.release()
            if not killer.fired.wait(120) or killer.killed is None or killer.at is None:
                raise RuntimeError("the tripwire did not kill a replica (fleet too small for --kill-at?)")
            sandbox.faults.disarm()
            killed_at = killer.at
            survivor = next(r for r in replicas if r is not killer.killed)
            wait_until(lambda: _metric(survivor, "finops_leader") == 1, 120, "the takeover", every=0.02)
            takeover = time.time() - killed_at
            first = wait_until(
                lambda: (
                    t
                    if (t := _metric(survivor, "finops_last_reconcile_success_timestamp_seconds")) > killed_at
                    else 0.0
                ),
                120,
                "the first completed pass",
                every=0.02,
            )
            wait_until(
                lambda: (
                    _metric(survivor, "finops_drift_changes") == 0
                    and _metric(survivor, "finops_last_reconcile_success_timestamp_seconds") > first
                ),
                180,
                "a pass that planned nothing",
                every=0.02,
            )
            converged = _metric(survivor, "finops_last_reconcile_success_timestamp_seconds")
            if survivor.stop() != 0:
                raise RuntimeError(f"the survivor did not stop cleanly:\n{survivor.text()[-2000:]}")
            return Trial(kill_at, takeover, first - killed_at, converged - killed_at)
        finally:
            gate.release()
            for replica in replicas:
                replica.kill()


def _stats(label: str, values: Sequence[float]) -> str:
    return (
        f"{label:<12} min {min(values):6.2f} s   median {statistics.median(values):6.2f} s   max {max(values):6.2f} s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--poll", type=float, default=2.0, help="the replicas' --standby-poll, seconds")
    parser.add_argument("--interval", type=float, default=5.0, help="the replicas' --interval, seconds")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--pg-url", default=None, help="a PostgreSQL server to use (default: start one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    trials: list[Trial] = []
    failed = 0
    print(
        f"{args.trials} trials · {args.agents} agents · --standby-poll {args.poll:g} s · --interval {args.interval:g} s"
    )
    print("trial  kill@write  takeover  first pass  converged")
    with postgres(args.pg_url) as server:
        for n in range(args.trials):
            kill_at = rng.randint(1, args.agents)  # a fresh fleet makes 2-3 writes per agent
            with database(server) as pg_url, tempfile.TemporaryDirectory(prefix="finops-failover-") as tmp:
                try:
                    result = trial(Path(tmp), pg_url, args, kill_at)
                except (AssertionError, RuntimeError) as exc:
                    failed += 1
                    print(f"{n + 1:>5}  {kill_at:>10}  FAILED: {exc}")
                    continue
            trials.append(result)
            print(
                f"{n + 1:>5}  {kill_at:>10}  {result.takeover_s:7.2f}s  {result.first_pass_s:9.2f}s  "
                f"{result.converged_s:8.2f}s"
            )
    if trials:
        print()
        print(_stats("takeover", [t.takeover_s for t in trials]))
        print(_stats("first pass", [t.first_pass_s for t in trials]))
        print(_stats("converged", [t.converged_s for t in trials]))
    sys.exit(1 if failed or not trials else 0)


if __name__ == "__main__":
    main()
