"""Robustness benchmark: final test accuracy (and backdoor success) of each aggregator under each attack.

Digits, 50 clients with Dirichlet(alpha=1) label skew, all clients in every round, 20% of them attackers.
Aggregator rows run without the anomaly checks, to show what the aggregator alone does; the "+ checks" rows
add them. Usage:

    PYTHONPATH=src python benchmarks/robustness.py [--rounds 15] [--seed 0] [--rows mean,median] [--attacks alie]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from fedlearn import simulate

SCENARIO: dict[str, Any] = {
    "dataset": "digits", "num_clients": 50, "partition": "dirichlet", "alpha": 1.0,
    "clients_per_round": None, "fraction": 1.0, "eval_clients": 0, "attack_fraction": 0.2,
    "local_epochs": 2, "batch_size": 10, "lr": 0.3,
}
F = 10  # Byzantine clients assumed by Krum, Multi-Krum and Bulyan: 20% of 50
# row label -> (aggregator, its parameters, anomaly checks on)
ROWS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "mean (FedAvg)": ("", {}, False),
    "median": ("median", {}, False),
    "trimmed_mean b=0.2": ("trimmed_mean", {"beta": 0.2}, False),
    "krum f=10": ("krum", {"f": F}, False),
    "multi_krum f=10": ("multi_krum", {"f": F}, False),
    "bulyan f=10": ("bulyan", {"f": F}, False),
    "centered_clipping": ("centered_clipping", {}, False),
    "norm_bounding": ("norm_bounding", {}, False),
    "fltrust": ("fltrust", {}, False),
    "mean + checks": ("", {}, True),
    "norm_bounding + checks": ("norm_bounding", {}, True),
}
ATTACKS = ("none", "label_flip", "sign_flip", "noise", "alie", "ipm", "backdoor")


def run_cell(
    aggregator: str, params: dict[str, Any], checks: bool, attack: str, rounds: int, seed: int
) -> dict[str, float]:
    """Final metrics of one (aggregator, attack) run."""
    config = {**SCENARIO, "rounds": rounds, "seed": seed, "aggregator": aggregator, "aggregator_params": params,
              "anomaly_checks": checks, "attack": "" if attack == "none" else attack}
    result = simulate(config)
    flagged = sum(r.metrics.get("clients_flagged", 0.0) for r in result.history.rounds)
    return {**result.history.last, "flagged": flagged}


def cell_text(metrics: dict[str, float]) -> str:
    text = f"{metrics['test_accuracy']:.3f}"
    if "test_backdoor_success" in metrics:
        text += f" bd {metrics['test_backdoor_success']:.2f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", help="comma-separated row labels' first words (default all)")
    parser.add_argument("--attacks", help=f"comma-separated subset of {','.join(ATTACKS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    rows = {k: v for k, v in ROWS.items() if not args.rows or k.split()[0] in args.rows.split(",")}
    attacks = [a for a in ATTACKS if not args.attacks or a in args.attacks.split(",") + ["none"]]
    print(f"digits, 50 clients, Dirichlet alpha=1, all clients per round, 20% attackers, {args.rounds} rounds, "
          f"seed {args.seed}; cells: final test accuracy (bd: backdoor success rate)")
    width = max(map(len, rows)) + 2
    print(f"{'aggregator':<{width}}" + "".join(f"{a:>16}" for a in attacks))
    start = time.perf_counter()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label, (aggregator, params, checks) in rows.items():
        table[label] = {a: run_cell(aggregator, params, checks, a, args.rounds, args.seed) for a in attacks}
        print(f"{label:<{width}}" + "".join(f"{cell_text(table[label][a]):>16}" for a in attacks), flush=True)
    if "mean (FedAvg)" in table:
        clean = table["mean (FedAvg)"]["none"]["test_accuracy"]
        robust = [label for label in table if label != "mean (FedAvg)"]
        print(f"\nclean FedAvg accuracy {clean:.3f}; best robust row per attack (gap to clean FedAvg):")
        for a in attacks:
            if robust:
                best = max(robust, key=lambda label: table[label][a]["test_accuracy"])
                print(f"  {a:<11} {best:<24} {table[best][a]['test_accuracy'] - clean:+.3f}")
    print(f"\n{len(rows) * len(attacks)} runs in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
