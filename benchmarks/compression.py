"""Compressed updates on FEMNIST writers (CNN): bytes per round on the wire and final accuracy per method.

Workload: femnist_task.py (105 writers, CNN of 45,006 float32 parameters), FedAvg, --cohort writers per
round, --rounds rounds, the same seed, cohorts and initial model for every row. Every update goes through
the real wire format (`WirePool`): packed by the run's codec, unpacked by the strict decoder the server
uses, so the bytes are measured, not estimated (whole messages: header, metadata and payload).

Columns: upload / download bytes per round (all clients of the round), upload reduction against float32
updates (the model's own dtype, the default), final test accuracy (mean of the last 3 rounds, to damp
round-to-round noise), and its difference to the float32 row in points.

    PYTHONPATH=src python benchmarks/compression.py [--rounds 50] [--rows float32,qsgd4,topk1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from femnist_task import FemnistTask  # noqa: E402

from fedlearn import FedAvg, InProcessPool, Server, Update  # noqa: E402
from fedlearn.compression import QSGD, Cast, RandomK, TopK  # noqa: E402
from fedlearn.serialize import encode_update  # noqa: E402
from fedlearn.server import ClientSampler  # noqa: E402
from fedlearn.server.store import RoundRecord  # noqa: E402
from fedlearn.simulation.wire import WirePool  # noqa: E402

ROWS = {  # name -> (uplink transform, downlink compression)
    "float32": (lambda: None, lambda: None),
    "bf16": (lambda: Cast("bfloat16"), lambda: None),
    "qsgd8": (lambda: QSGD(8), lambda: None),
    "qsgd4": (lambda: QSGD(4), lambda: None),
    "qsgd2": (lambda: QSGD(2), lambda: None),
    "qsgd1": (lambda: QSGD(1), lambda: None),
    "qsgd1-b2048-fp16": (lambda: QSGD(1, 2048, scale_dtype="float16"), lambda: None),
    "qsgd2-keep0.42": (lambda: QSGD(2, 256, scale_dtype="float16", fraction=0.42), lambda: None),
    "qsgd3-keep0.3": (lambda: QSGD(3, 1024, scale_dtype="float16", fraction=0.3), lambda: None),
    "qsgd4-keep0.22": (lambda: QSGD(4, 512, scale_dtype="float16", fraction=0.22), lambda: None),
    "qsgd4-keep0.13": (lambda: QSGD(4, 512, scale_dtype="float16", fraction=0.13), lambda: None),
    "topk10": (lambda: TopK(0.10), lambda: None),
    "topk1": (lambda: TopK(0.01), lambda: None),
    "randomk10": (lambda: RandomK(0.10), lambda: None),
    "topk1+down-qsgd8": (lambda: TopK(0.01), lambda: QSGD(8)),
    "qsgd3-keep0.3+down-qsgd8": (lambda: QSGD(3, 1024, scale_dtype="float16", fraction=0.3), lambda: QSGD(8)),
}


def run_row(name: str, task: FemnistTask, args: argparse.Namespace) -> dict:
    uplink, downlink = (make() for make in ROWS[name])
    pool = WirePool(InProcessPool(task.client, task.client_ids), downlink=downlink)
    up, down, acc = [], [], []

    def record(r: RoundRecord) -> None:
        up.append(pool.last.bytes_up)
        down.append(pool.last.bytes_down)
        acc.append(r.metrics["test_accuracy"])

    server = Server(pool, FedAvg(), task.initial_state, sampler=ClientSampler(args.cohort, seed=args.seed),
                    transforms=[uplink] if uplink else [], central_eval=task.central_eval, seed=args.seed,
                    anomaly_checks=None)
    server.run(args.rounds, [record])
    return {"up": float(np.mean(up)), "down": float(np.mean(down)), "acc": float(np.mean(acc[-3:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = FemnistTask(seed=args.seed, lr=args.lr)
    rows = {}
    for name in args.rows.split(","):
        start = time.perf_counter()
        rows[name] = run_row(name, task, args)
        print(f"  {name}: {time.perf_counter() - start:.0f}s wall, accuracy {rows[name]['acc']:.4f}",
              file=sys.stderr, flush=True)
    size = sum(v.size for v in task.initial_state.values())
    float64 = len(encode_update(Update("c", 1, np.zeros(size), 1, {"train_loss": 0.0})))
    base = rows.get("float32")
    print(f"\nFEMNIST CNN ({size} parameters), {args.rounds} rounds of {args.cohort} writers, lr {args.lr}")
    head = (f"{'method':<18}{'up B/round':>12}{'up x less':>10}{'down B/round':>13}{'down x less':>12}"
            f"{'accuracy':>10}{'vs float32':>11}")
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        up_x = f"{base['up'] / r['up']:.1f}x" if base else "-"
        down_x = f"{base['down'] / r['down']:.1f}x" if base else "-"
        diff = f"{100 * (r['acc'] - base['acc']):+.2f} pt" if base else "-"
        print(f"{name:<18}{r['up']:>12.0f}{up_x:>10}{r['down']:>13.0f}{down_x:>12}{r['acc']:>10.4f}{diff:>11}")
    print(f"(before this change updates travelled as float64: {float64 * args.cohort} B/round of upload)")


if __name__ == "__main__":
    main()
