"""Contribution accounting: exact Shapley and leave-one-out pinned to closed forms, GTG-Shapley within its
stated tolerance of exact Shapley on real rounds (n <= 8) at a lower cost, a free rider scores about 0, a
client that joins twice does not double its share, and the ledger / payout of a real run."""
from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from contribution_game import DigitsRound
from fedlearn.cli import main
from fedlearn.contributions import ContributionAccounting, Utility, exact_shapley, gtg_shapley, leave_one_out, payout_split
from fedlearn.contributions.accounting import cosine_to_others
from fedlearn.server.store import RunStore

GTG_TOLERANCE = 0.2  # stated: relative L1 error of GTG-Shapley against exact Shapley, at default settings


def glove(s: frozenset[int]) -> float:
    """Glove game: player 0 holds a left glove, 1 and 2 right gloves; a pair is worth 1."""
    return float(0 in s and bool(s & {1, 2}))


def test_exact_shapley_and_loo_match_closed_forms() -> None:
    assert exact_shapley(3, Utility(glove)) == pytest.approx([2 / 3, 1 / 6, 1 / 6])
    assert leave_one_out(3, Utility(glove)) == pytest.approx([1, 0, 0])
    weights = np.array([0.5, 2.0, -1.0, 3.0])
    additive = Utility(lambda s: float(sum(weights[list(s)])))
    assert exact_shapley(4, additive) == pytest.approx(weights)
    assert additive.evaluations == 16  # every coalition once: the cache works
    assert gtg_shapley(4, Utility(lambda s: float(sum(weights[list(s)])))) == pytest.approx(weights)


def test_gtg_truncates_a_round_that_changed_nothing() -> None:
    flat = Utility(lambda s: 0.5 + 1e-5 * len(s))
    assert np.all(gtg_shapley(6, flat) == 0) and flat.evaluations == 2


@pytest.mark.parametrize("n", [4, 6, 8])
@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_gtg_is_within_tolerance_of_exact_shapley(n: int, metric: str) -> None:
    game = DigitsRound(n, seed=n)
    exact = ContributionAccounting(game.evaluate, methods=("exact",), metric=metric)
    ex = exact.score(game.layout, game.params, game.updates, 1)
    assert exact.last_evaluations == 2 ** len(game.updates)
    values = np.array([ex[u.client_id]["exact"] for u in game.updates])
    sign = -1 if metric == "loss" else 1
    total = sign * (game.evaluate(game.layout.unflatten(game.params + np.average(
        [u.delta for u in game.updates], axis=0, weights=[u.num_examples for u in game.updates])))[metric]
        - game.evaluate(game.state)[metric])
    assert values.sum() == pytest.approx(total)  # efficiency: Shapley values add up to the round's gain
    for seed in range(3):
        gtg = ContributionAccounting(game.evaluate, methods=("gtg",), metric=metric, seed=seed)
        est = gtg.score(game.layout, game.params, game.updates, 1)
        approx = np.array([est[u.client_id]["gtg"] for u in game.updates])
        assert np.abs(approx - values).sum() <= GTG_TOLERANCE * np.abs(values).sum(), (approx, values)
        assert gtg.last_evaluations <= 2 ** len(game.updates)


def test_gtg_costs_far_less_than_exact_for_many_clients() -> None:
    game = DigitsRound(12, seed=3)
    gtg = ContributionAccounting(game.evaluate, methods=("gtg",))
    gtg.score(game.layout, game.params, game.updates, 1)
    assert gtg.last_evaluations < 2 ** len(game.updates) / 4


@pytest.mark.parametrize("rider", ["zero", "noise"])
def test_a_free_rider_scores_about_zero(rider: str) -> None:
    game = DigitsRound(5, seed=1)
    honest = game.updates
    size = honest[0].delta.size
    norm = float(np.median([np.linalg.norm(u.delta) for u in honest]))
    delta = np.zeros(size) if rider == "zero" else np.random.default_rng(0).normal(size=size) * norm / math.sqrt(size)
    free = replace(honest[0], client_id="free", delta=delta, num_examples=int(np.median([u.num_examples for u in honest])))
    for metric in ("accuracy", "loss"):
        acc = ContributionAccounting(game.evaluate, methods=("gtg", "exact", "cosine"), metric=metric)
        scores = acc.score(game.layout, game.params, [*honest, free], 1)
        for method in ("gtg", "exact"):
            honest_mean = np.mean([scores[u.client_id][method] for u in honest])
            assert scores["free"][method] <= 0.15 * honest_mean, (metric, method, scores)
            ledger = {cid: {method: (s[method], 1)} for cid, s in scores.items()}
            assert dict((p.client_id, p.amount) for p in payout_split(ledger, method, 100.0))["free"] <= 3.0
        assert abs(scores["free"]["cosine"]) < 0.1 < min(scores[u.client_id]["cosine"] for u in honest)


def test_joining_twice_does_not_double_the_share() -> None:
    game = DigitsRound(5, seed=1)
    twin = replace(game.updates[0], client_id="0-again")
    for metric in ("accuracy", "loss"):
        for method in ("exact", "gtg"):
            acc = ContributionAccounting(game.evaluate, methods=(method,), metric=metric)
            alone = acc.score(game.layout, game.params, game.updates, 1)
            twice = acc.score(game.layout, game.params, [*game.updates, twin], 1)
            share_alone = alone["0"][method] / sum(s[method] for s in alone.values())
            share_twice = (twice["0"][method] + twice["0-again"][method]) / sum(s[method] for s in twice.values())
            assert share_twice < 1.35 * share_alone, (metric, method, share_alone, share_twice)


def test_cosine_to_others_by_hand() -> None:
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = cosine_to_others(deltas, np.array([1.0, 1.0, 2.0]))
    # others of 0: (0,1)*1 + (1,1)*2 over 3 = (2/3, 1): cos = (2/3) / sqrt(4/9 + 1)
    assert got[0] == pytest.approx((2 / 3) / math.sqrt(4 / 9 + 1))
    assert got[2] == pytest.approx(1.0)  # others of 2: (0.5, 0.5), parallel to (1, 1)
    assert got[1] == pytest.approx((2 / 3) / math.sqrt(1 + 4 / 9))  # others of 1: (1, 2/3)
    assert cosine_to_others(np.array([[1.0, 2.0]]), np.array([1.0]))[0] == 0


def test_payout_split_by_hand() -> None:
    ledger = {"a": {"gtg": (3.0, 2)}, "b": {"gtg": (1.0, 2)}, "c": {"gtg": (-0.5, 1)}, "d": {"gtg": (2.0, 1)}}
    rows = {p.client_id: p for p in payout_split(ledger, "gtg", 100.0)}
    assert rows["a"].amount == 50.0 and rows["d"].amount == pytest.approx(33.33) and rows["c"].amount == 0.0
    assert sum(p.amount for p in rows.values()) == pytest.approx(100.0)  # cents add up exactly
    with pytest.raises(ValueError, match="no 'loo' scores"):
        payout_split(ledger, "loo", 100.0)


def test_a_run_keeps_a_ledger_and_reports_a_payout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedlearn import simulate

    run_dir = tmp_path / "run"
    simulate({"num_clients": 6, "rounds": 3, "clients_per_round": 4, "local_epochs": 1, "eval_clients": 0,
              "contributions": {"methods": ["gtg", "loo", "cosine"]}}, run_dir=run_dir)
    store = RunStore(run_dir, readonly=True)
    ledger, per_round = store.contribution_ledger(), store.round_contributions()
    history = store.history()
    store.close()
    for cid, methods in ledger.items():
        for method, (total, rounds) in methods.items():
            scores = [s for _, c, m, s in per_round if c == cid and m == method]
            assert total == pytest.approx(sum(scores)) and rounds == len(scores)
    assert {c for _, c, _, _ in per_round} == {c for r in history for c in r.participants}
    assert all(r.metrics["contribution_evaluations"] >= 2 for r in history)
    assert main(["report", "contributions", str(run_dir), "--budget", "1000"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["client_id"] for r in rows} == set(ledger)
    assert sum(float(r["payout"]) for r in rows) == pytest.approx(1000.0)
    assert main(["report", "contributions", str(run_dir), "--method", "exact"]) == 2  # not computed in this run
