"""Asynchronous (FedBuff) vs synchronous FedAvg on the same slow, unreliable fleet, timed on the virtual clock.

Workload: FEMNIST writers (see femnist_task.py). Fleet (seeded, the same for every row): each writer's median
task time is lognormal, exp(N(0, --speed-sigma)) seconds (heavy-tailed: with sigma 1.5 the slowest of 10 is
typically ~10x the median), per-task jitter exp(N(0, 0.2)), and each writer goes offline for exponential
periods (mean --offline s) between online periods (mean --online s); a task in flight when its writer goes
offline is lost.

Rows:
  sync            FedAvg, --cohort writers per round, the round waits for all of them (no deadline)
  sync+deadline   the same with a deadline (--deadline s) that drops stragglers
  fedbuff         FedBuff: --concurrency writers training at once, a server step every K = --cohort results,
                  staleness weight 1/sqrt(1+s), results more than --max-staleness steps old dropped
Sync rows make --rounds rounds. FedBuff runs until the virtual time sync (no deadline) needed for its rounds
has passed (the equal time budget), or --async-steps server steps, whichever comes first. The model is
evaluated centrally after every round / step.

Columns: virtual seconds to reach --target test accuracy (first step at or above it) and the speed-up over
sync, final accuracy and mean of the last 5 evaluations, client updates aggregated, total virtual time.
Then the two fair comparisons of FedBuff's accuracy with sync's final accuracy:
  equal updates   FedBuff after as many aggregated client updates as sync aggregated in all its rounds
  equal time      FedBuff at the end of its run, which used at most sync's total virtual time

    PYTHONPATH=src python benchmarks/async.py [--rounds 100] [--async-steps 300] [--target 0.5] [--rows fedbuff]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from femnist_task import FemnistTask  # noqa: E402

from fedlearn import FedAvg, InProcessPool, Server  # noqa: E402
from fedlearn.server import ClientSampler  # noqa: E402
from fedlearn.server.async_loop import AsyncServer  # noqa: E402
from fedlearn.server.store import RoundRecord  # noqa: E402
from fedlearn.simulation.clock import Fleet, VirtualClock  # noqa: E402
from fedlearn.simulation.clocked import ClockedPool, VirtualExecutor  # noqa: E402


Point = tuple[float, float, int]  # (virtual time, test accuracy, client updates aggregated so far)


def run_row(name: str, task: FemnistTask, args: argparse.Namespace, budget: float | None = None) -> list[Point]:
    """The curve after each server step; FedBuff stops at virtual time `budget` (or --async-steps)."""
    fleet = Fleet(seed=args.seed, task_seconds=1.0, speed_sigma=args.speed_sigma, jitter_sigma=0.2,
                  mean_online=args.online, mean_offline=args.offline)
    clock = VirtualClock(fleet)
    pool = InProcessPool(task.client, task.client_ids)
    curve: list[Point] = []

    def record(r: RoundRecord) -> None:
        used = (curve[-1][2] if curve else 0) + len(r.participants)
        curve.append((clock.now, r.metrics["test_accuracy"], used))

    if name == "fedbuff":
        server = AsyncServer(VirtualExecutor(pool, clock), FedAvg(), task.initial_state, buffer_size=args.cohort,
                             concurrency=args.concurrency, max_staleness=args.max_staleness,
                             central_eval=task.central_eval, seed=args.seed)
        server.run(args.async_steps, [record], until=budget)
    else:
        deadline = args.deadline if name == "sync+deadline" else None
        clocked = ClockedPool(pool, clock, deadline=deadline, min_online=args.cohort)
        server = Server(clocked, FedAvg(), task.initial_state, sampler=ClientSampler(args.cohort, seed=args.seed),
                        central_eval=task.central_eval, seed=args.seed, max_failed_rounds=args.rounds)
        server.run(args.rounds, [record])
    return curve


def time_to(curve: list[Point], target: float) -> float:
    return next((t for t, acc, _ in curve if acc >= target), math.inf)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def compare(curves: dict[str, list[Point]], target: float) -> None:
    """FedBuff against sync (no deadline): time to target, and accuracy at equal updates / equal time."""
    sync, fedbuff = curves["sync"], curves["fedbuff"]
    sync_acc, sync_used, sync_time = sync[-1][1], sync[-1][2], sync[-1][0]
    t_sync, t_fedbuff = time_to(sync, target), time_to(fedbuff, target)
    print(f"\nFedBuff vs sync (no deadline; sync final accuracy {sync_acc:.4f} after {sync_used} updates, "
          f"{sync_time:.0f}s):")
    if math.isinf(t_fedbuff):
        print(f"  time to {target:.2f}: FedBuff never reached it (goal >= 3x sooner): NOT met")
    elif math.isinf(t_sync):
        print(f"  time to {target:.2f}: sync never reached it, FedBuff at {t_fedbuff:.0f}s (goal >= 3x sooner): met")
    else:
        speedup = t_sync / t_fedbuff
        print(f"  time to {target:.2f}: {speedup:.1f}x sooner (goal >= 3x): {verdict(speedup >= 3)}")
    at = next((p for p in fedbuff if p[2] >= sync_used), None)
    if at is None:
        print(f"  equal updates: FedBuff aggregated only {fedbuff[-1][2]} updates; rerun with more --async-steps")
    else:
        gap = 100 * (at[1] - sync_acc)
        print(f"  equal updates ({at[2]}): FedBuff {at[1]:.4f} at {at[0]:.0f}s, {gap:+.1f} points "
              f"(goal >= -1): {verdict(gap >= -1)}")
    end = fedbuff[-1]
    gap = 100 * (end[1] - sync_acc)
    print(f"  equal time (budget {sync_time:.0f}s): FedBuff {end[1]:.4f} at {end[0]:.0f}s "
          f"({100 * end[0] / sync_time:.0f}% of the budget, {end[2]} updates), {gap:+.1f} points "
          f"(goal >= -1): {verdict(gap >= -1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="synchronous rounds")
    parser.add_argument("--async-steps", type=int, default=300,
                        help="most FedBuff server steps (it also stops at sync's total virtual time)")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--cohort", type=int, default=10, help="sync clients per round = FedBuff buffer size K")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=3.0)
    parser.add_argument("--speed-sigma", type=float, default=1.5)
    parser.add_argument("--online", type=float, default=300.0)
    parser.add_argument("--offline", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="sync,sync+deadline,fedbuff")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = FemnistTask(seed=args.seed)
    curves: dict[str, list[Point]] = {}
    rows = args.rows.split(",")
    for name in sorted(rows, key=lambda r: r != "sync"):  # sync first: its total time is FedBuff's budget
        start = time.perf_counter()
        budget = curves["sync"][-1][0] if "sync" in curves else None
        curves[name] = run_row(name, task, args, budget)
        print(f"  {name}: {time.perf_counter() - start:.0f}s wall", file=sys.stderr, flush=True)
    base = time_to(curves.get("sync", []), args.target)
    print(f"\nFEMNIST, {len(task.client_ids)} writers, server steps of {args.cohort} updates, concurrency "
          f"{args.concurrency}, max staleness {args.max_staleness}; lognormal "
          f"speeds sigma={args.speed_sigma}, online/offline means {args.online:g}/{args.offline:g}s; target "
          f"accuracy {args.target:.2f}")
    head = (f"{'row':<15}{'steps':>6}{'time to target':>15}{'speed-up':>10}{'final acc':>10}{'last-5 acc':>11}"
            f"{'updates':>8}{'total time':>11}")
    print(head + "\n" + "-" * len(head))
    for name, curve in curves.items():
        t = time_to(curve, args.target)
        speedup = f"{base / t:.1f}x" if math.isfinite(t) and math.isfinite(base) else "-"
        accs = [a for _, a, _ in curve]
        print(f"{name:<15}{len(curve):>6}{t:>15.1f}{speedup:>10}{accs[-1]:>10.4f}{np.mean(accs[-5:]):>11.4f}"
              f"{curve[-1][2]:>8}{curve[-1][0]:>11.1f}")
    if "sync" in curves and "fedbuff" in curves:
        compare(curves, args.target)


if __name__ == "__main__":
    main()
