"""Contribution accounting cost: validation evaluations per round for GTG-Shapley and leave-one-out beside
exact Shapley (2^n), and GTG's error against exact, on real rounds of the built-in digits task (MLP,
Dirichlet alpha 0.5, one local epoch). Each method is scored on the same updates with its own evaluation
cache, so the counts are what each would pay alone.

    PYTHONPATH=src python benchmarks/contribution.py            # cohorts of 4, 6, 8, 10, 12 clients, 3 rounds
    PYTHONPATH=src python benchmarks/contribution.py --quick    # cohorts of 4 and 6, 2 rounds
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from fedlearn import SimulationConfig
from fedlearn.contributions import ContributionAccounting
from fedlearn.simulate import builtin_app, run_simulation


class Comparison:
    """Scores every round with each method separately and keeps evaluations, seconds and GTG's error."""

    def __init__(self, evaluate, exact: bool) -> None:
        names = ("gtg", "loo", "exact") if exact else ("gtg", "loo")
        self.methods = {m: ContributionAccounting(evaluate, methods=(m,)) for m in names}
        self.stats: dict[str, list[float]] = defaultdict(list)
        self.last_evaluations = 0

    def score(self, layout, params, updates, rnd):
        scores = {}
        for name, method in self.methods.items():
            start = time.perf_counter()
            scores[name] = method.score(layout, params, updates, rnd)
            self.stats[f"{name}_evals"].append(method.last_evaluations)
            self.stats[f"{name}_seconds"].append(time.perf_counter() - start)
        if "exact" in scores:
            exact = np.array([scores["exact"][u.client_id]["exact"] for u in updates])
            gtg = np.array([scores["gtg"][u.client_id]["gtg"] for u in updates])
            self.stats["gtg_error"].append(float(np.abs(gtg - exact).sum() / max(np.abs(exact).sum(), 1e-12)))
        self.last_evaluations = sum(m.last_evaluations for m in self.methods.values())
        return {u.client_id: {k: v for s in scores.values() for k, v in s[u.client_id].items()} for u in updates}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cohorts, rounds = ((4, 6), 2) if args.quick else ((4, 6, 8, 10, 12), 3)
    print(f"digits, 30 clients (Dirichlet 0.5), MLP, {rounds} rounds per cohort size; mean per round")
    print(f"{'clients':>7} {'exact evals':>11} {'gtg evals':>9} {'loo evals':>9} {'gtg rel. L1 err':>15} "
          f"{'exact s':>8} {'gtg s':>6} {'loo s':>6}")
    for n in cohorts:
        cfg = SimulationConfig(num_clients=30, clients_per_round=n, rounds=rounds, local_epochs=1, eval_clients=0)
        app = builtin_app(cfg)
        comparison = Comparison(app.central_eval, exact=n <= 12)
        run_simulation(app=app, rounds=rounds, clients_per_round=n, anomaly_checks=None, contributions=comparison,
                       seed=cfg.seed)
        s = {k: float(np.mean(v)) for k, v in comparison.stats.items()}
        print(f"{n:>7} {s.get('exact_evals', float('nan')):>11.0f} {s['gtg_evals']:>9.1f} {s['loo_evals']:>9.1f} "
              f"{s.get('gtg_error', float('nan')):>15.3f} {s.get('exact_seconds', float('nan')):>8.2f} "
              f"{s['gtg_seconds']:>6.2f} {s['loo_seconds']:>6.2f}")


if __name__ == "__main__":
    main()
