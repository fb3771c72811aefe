"""Simulation speed and memory: fedlearn's engines beside a plain PyTorch loop (the floor) and Flower.

digits (default): scikit-learn digits scaled to [0, 1], stratified 80/20 split (random_state=0),
Dirichlet(0.5) label skew over N clients, MLP 64-64-10 with ReLU, SGD lr 0.05, batch 16, 1 local epoch,
FedAvg weighted by examples, all clients every round, central evaluation every round;
N = 10 (30 rounds), 100 (30 rounds), 1000 (5 rounds).
femnist (--task femnist): LEAF FEMNIST from ../shared/data/femnist, the 105 writers with train and test
samples as clients (each client's data is what one person wrote), a small CNN, 10 and 50 writers per
round (--writers), 20 rounds, the same SGD; central evaluation on all writers' test samples.

Each contender runs in a fresh process with one torch thread per process (OMP_NUM_THREADS=1; the
process and Ray engines and Flower use every core through their workers) on one workload file: same
data, initial weights, cohorts and per-client shuffle seeds (see sim_contenders.py). Columns:
  wall       launch to exit of the contender's process
  start-up   launch to the first round (imports, data, pool or Ray start; Ray actors start in round 1)
  s/round    training and evaluation time over the rounds
  train s/r  the same without the central evaluation (the same model on the same test set for everyone)
  updates/s  client updates trained per second of training (cohort size / train s/r)
  peak MiB   highest sum of PSS over the process and all its descendants, sampled every 20 ms (PSS
             counts pages that forked workers share once)
  Flower/x   Flower's time over this contender's (wall, and per round); x/plain: this contender's time
             over the plain loop's (wall, and per round)
Flower runs when flwr is importable by --flower-python (default: this interpreter); other rows run
anyway.

    PYTHONPATH=src python benchmarks/simulation.py
    PYTHONPATH=src python benchmarks/simulation.py --clients 100 --flower-python /tmp/flwr-venv/bin/python
    PYTHONPATH=src python benchmarks/simulation.py --task femnist --flower-python /tmp/flwr-venv/bin/python

A Flower environment that reuses this one's torch: python -m venv /tmp/flwr-venv, then a .pth file in its
site-packages naming this environment's site-packages, then /tmp/flwr-venv/bin/pip install 'flwr[simulation]'.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
FEMNIST = HERE.parents[1] / "shared" / "data" / "femnist" / "femnist_leaf_subset.npz"
DIGITS_ROUNDS = {10: 30, 100: 30, 1000: 5}
ENGINES = ["fedlearn-sequential", "fedlearn-vectorized", "fedlearn-process", "fedlearn-ray"]


def write_workload(path: Path, task: str, num_clients: int, rounds: int, writers: int = 10) -> None:
    """Data, client split, cohorts, shuffle seeds and initial weights, fixed once for every contender
    (femnist: `writers` sampled per round)."""
    from fedlearn.data import federate, load_digits, load_femnist_npz
    from fedlearn.server import ClientSampler
    from fedlearn.server.sampling import client_seed

    sys.path.insert(0, str(HERE))
    from sim_contenders import make_model

    if task == "digits":
        data = federate(load_digits(test_size=0.2, seed=0), "dirichlet", num_clients, seed=0, alpha=0.5)
        cohort = num_clients
    else:
        data, cohort = load_femnist_npz(FEMNIST), writers
    ids = data.client_ids
    sampler = ClientSampler(count=cohort, seed=0)
    position = {cid: k for k, cid in enumerate(ids)}
    torch.manual_seed(0)
    init = make_model(task).state_dict()
    np.savez(
        path, task=task, client_ids=np.array(ids),
        x=np.concatenate([data.clients[c][0] for c in ids]), y=np.concatenate([data.clients[c][1] for c in ids]),
        starts=np.cumsum([0] + [len(data.clients[c][1]) for c in ids]),
        x_test=data.test[0], y_test=data.test[1],
        cohorts=np.array([[position[c] for c in sampler.sample(ids, r)] for r in range(1, rounds + 1)]),
        seeds=np.array([[client_seed(0, r, c) for c in ids] for r in range(1, rounds + 1)], dtype=np.int64),
        param_names=np.array(list(init)), **{f"param_{i}": v.numpy() for i, v in enumerate(init.values())},
        lr=0.05, batch_size=16, epochs=1,
    )


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def run_contender(python: str, contender: str, workload: Path, log: Path) -> dict:
    """Run one contender in a fresh process; its timings, accuracy and peak memory (MiB, PSS of the tree)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(SRC), os.environ.get("PYTHONPATH", "")])}
    launch = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen([python, "-c", "import sim_contenders as c; c.main()", contender, str(workload)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=HERE)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.02)
        out = proc.stdout.read()
    wall = time.time() - launch
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"{contender} failed (exit {proc.returncode}); end of its log:\n{tail}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return {"wall": wall, "startup": result["begin"] - launch, "train": result["end"] - result["begin"],
            "eval": result["eval"], "accuracy": result["accuracy"], "peak_mib": peak / 1024}


def has_flower(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import flwr, flwr.simulation, ray"], capture_output=True).returncode == 0
    except OSError:  # no such interpreter
        return False


def table(title: str, rounds: int, cohort: int, rows: dict[str, dict]) -> str:
    """One row per contender; ratios of wall time and of time per round against Flower, the plain loop and
    the sequential engine (x/seq: of training alone)."""
    flower, plain, seq = rows.get("flower"), rows.get("plain"), rows.get("fedlearn-sequential")
    for r in rows.values():
        r["fit"] = r["train"] - r["eval"]

    def ratio(a: dict | None, b: dict | None, key: str) -> str:
        return f"{a[key] / b[key]:.1f}x" if a and b else "-"

    head = (f"{'contender':<20}{'wall s':>7}{'s/round':>8}{'train s/r':>10}{'updates/s':>10}{'start-up s':>11}"
            f"{'peak MiB':>9}{'accuracy':>9}{'Flower/x wall':>14}{'round':>7}{'x/plain wall':>13}{'round':>7}"
            f"{'x/seq train':>12}")
    lines = [title, head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<20}{r['wall']:>7.2f}{r['train'] / rounds:>8.3f}{r['fit'] / rounds:>10.3f}"
                     f"{cohort * rounds / r['fit']:>10.1f}{r['startup']:>11.2f}"
                     f"{r['peak_mib']:>9.0f}{r['accuracy']:>9.4f}{ratio(flower, r, 'wall'):>14}"
                     f"{ratio(flower, r, 'train'):>7}{ratio(r, plain, 'wall'):>13}{ratio(r, plain, 'train'):>7}"
                     f"{ratio(seq, r, 'fit'):>12}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["digits", "femnist"], default="digits")
    parser.add_argument("--clients", type=int, nargs="*", default=sorted(DIGITS_ROUNDS),
                        help="digits: client counts to run (default 10 100 1000)")
    parser.add_argument("--writers", type=int, nargs="*", default=[10, 50],
                        help="femnist: writers per round to run (default 10 50)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--engines", nargs="*", default=ENGINES, help="fedlearn engines to run")
    parser.add_argument("--flower-python", default=sys.executable,
                        help="Python of an environment with flwr[simulation] (default: this one)")
    args = parser.parse_args()
    flower = has_flower(args.flower_python)
    if not flower:
        print(f"Flower: not importable by {args.flower_python}; its row is skipped "
              "(pip install 'flwr[simulation]', or --flower-python PATH)")
    from fedlearn.simulation.backends import backend_unavailable

    engines = []
    for engine in args.engines:
        reason = backend_unavailable(engine.removeprefix("fedlearn-"))
        if reason:
            print(f"{engine}: skipped, {reason}")
        else:
            engines.append(engine)
    contenders = [*engines, "plain", *(["flower"] if flower else [])]
    # (clients, clients per round) of each table
    sizes = [(105, w) for w in args.writers] if args.task == "femnist" else [(n, n) for n in args.clients]
    print("command: " + " ".join(["PYTHONPATH=src", "nice -n 10", "python", *sys.argv]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n, cohort in sizes:
            rounds = args.rounds or (20 if args.task == "femnist" else DIGITS_ROUNDS.get(n, 5))
            workload = Path(tmp) / f"{args.task}-{n}-{cohort}.npz"
            write_workload(workload, args.task, n, rounds, cohort)
            rows = {}
            load_before = os.getloadavg()
            for name in contenders:
                python = args.flower_python if name == "flower" else sys.executable
                rows[name] = run_contender(python, name, workload, Path(tmp) / f"{name}-{n}-{cohort}.log")
                print(f"  {args.task} N={n} cohort={cohort} {name}: {rows[name]['wall']:.1f}s", file=sys.stderr,
                      flush=True)
            load = " / ".join(f"{a:.1f}" for a in os.getloadavg())
            title = (f"\n{args.task}: {n} clients, {cohort} per round, {rounds} rounds ({os.cpu_count()} cores, "
                     f"torch {torch.__version__}; load average before {load_before[0]:.1f}, after {load})")
            print(table(title, rounds, cohort, rows), flush=True)


if __name__ == "__main__":
    main()
