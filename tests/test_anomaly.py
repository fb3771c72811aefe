"""Anomaly checks: what they flag and why, that honest crowds pass, and that flags reach the run store,
the round metrics and the run summary."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlearn import Client, RunStore, Update, run_simulation
from fedlearn.server.anomaly import AnomalyChecks, flag_counts, make_anomaly_checks
from fedlearn.server.store import RoundRecord
from fedlearn.types import Failure

D = 200


def honest_crowd(n: int, seed: int = 0) -> list[np.ndarray]:
    """Updates sharing a direction, with their own noise and norms spread over a factor of two."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=D)
    return [rng.uniform(1.0, 2.0) * (common + rng.normal(size=D)) for _ in range(n)]


def updates_of(deltas: list[np.ndarray]) -> list[Update]:
    return [Update(f"c{i}", 1, d, 10) for i, d in enumerate(deltas)]


def test_an_honest_non_iid_like_crowd_is_not_flagged():
    for seed in range(5):
        kept, flagged = AnomalyChecks().screen(updates_of(honest_crowd(30, seed)), D)
        assert flagged == [] and len(kept) == 30


def test_boosted_flipped_and_non_finite_updates_are_flagged_with_reasons():
    deltas = honest_crowd(20)
    deltas[3] = deltas[3] * 30.0
    deltas[7] = -deltas[7]
    deltas[11] = np.full(D, np.nan)
    kept, flagged = AnomalyChecks().screen(updates_of(deltas), D)
    reasons = {f.client_id: f.reason for f in flagged}
    assert set(reasons) == {"c3", "c7", "c11"} and all(f.kind == "flagged" for f in flagged)
    assert reasons["c3"].startswith("norm outlier") and "x the round's median" in reasons["c3"]
    assert "direction outlier" in reasons["c7"]
    assert "non-finite" in reasons["c11"]
    assert [u.client_id for u in kept] == [f"c{i}" for i in range(20) if i not in (3, 7, 11)]


def test_wrong_layout_is_flagged_and_small_rounds_skip_the_statistics():
    deltas = honest_crowd(4)
    deltas[0] = deltas[0] * 100.0  # would be a norm outlier in a crowd, but 4 updates are too few to judge
    deltas[1] = np.ones(D + 1)
    kept, flagged = AnomalyChecks(min_updates=5).screen(updates_of(deltas), D)
    assert [f.client_id for f in flagged] == ["c1"] and "shape" in flagged[0].reason
    assert len(kept) == 3


def test_a_cluster_of_outliers_is_peeled_off_in_passes():
    deltas = honest_crowd(40)
    for i in range(10):  # a fifth of the round pointing the other way, at varied strength
        deltas[i] = -(1.0 + 0.1 * i) * deltas[i]
    _, flagged = AnomalyChecks().screen(updates_of(deltas), D)
    assert {f.client_id for f in flagged} == {f"c{i}" for i in range(10)}


def test_settings_are_checked_and_can_turn_the_checks_off():
    assert make_anomaly_checks(enabled=False, norm_z=1.0) is None
    assert make_anomaly_checks(norm_z=4.0) == AnomalyChecks(norm_z=4.0)
    with pytest.raises(ValueError, match="norm_z must be > 0"):
        AnomalyChecks(norm_z=0.0)
    with pytest.raises(ValueError, match="bad anomaly check setting"):
        make_anomaly_checks(norm=3.0)


def test_flag_counts_count_rounds_per_client():
    rounds = [RoundRecord(r, {}, [], [Failure("a", "flagged", "x"), Failure("b", "crash", "y")]) for r in (1, 2)]
    rounds.append(RoundRecord(3, {}, [], [Failure("b", "flagged", "z")]))
    assert flag_counts(rounds) == {"a": 2, "b": 1}


class FixedClient(Client):
    """Sends the same update every round; the 'booster' sends it fifty times larger."""

    def __init__(self, cid: str, delta: np.ndarray) -> None:
        super().__init__(cid)
        self.delta = delta

    def fit(self, state, config):
        return Update(self.cid, int(config["round"]), self.delta, 10)


def test_flagged_updates_are_excluded_stored_counted_and_summarised(tmp_path, capsys):
    from fedlearn.cli import print_flagged

    deltas = dict(zip([f"c{i}" for i in range(12)], honest_crowd(12), strict=True))
    deltas["c5"] = deltas["c5"] * 50.0
    state = OrderedDict(w=np.zeros(D))
    result = run_simulation(lambda cid: FixedClient(cid, deltas[cid]), list(deltas), initial_state=state, rounds=3,
                            run_dir=tmp_path)
    honest_mean = np.mean([d for cid, d in deltas.items() if cid != "c5"], axis=0)
    np.testing.assert_allclose(result.final_state["w"], 3 * honest_mean)  # the booster never got in
    assert all(r.metrics["clients_flagged"] == 1.0 and "c5" not in r.participants for r in result.history.rounds)
    store = RunStore(tmp_path)
    stored = [f for r in store.history() for f in r.failures]
    store.close()
    assert [(f.client_id, f.kind) for f in stored] == [("c5", "flagged")] * 3
    assert "norm outlier" in stored[0].reason
    print_flagged(result.history.rounds)
    assert "clients flagged in several rounds (1): c5 (3 rounds)" in capsys.readouterr().out


def test_a_client_claiming_far_more_examples_than_the_round_is_flagged_as_a_weight_outlier():
    deltas = honest_crowd(10)
    updates = [Update(f"c{i}", 1, d, n) for i, (d, n) in enumerate(zip(deltas, [5, 40, 12, 9, 30, 20, 8, 15, 25, 7]))]
    assert AnomalyChecks().screen(updates, D)[1] == []  # honest counts spread over a factor of eight
    updates[4].num_examples = 100_000  # an ordinary update that claims 6,700 times the median count
    kept, flagged = AnomalyChecks().screen(updates, D)
    [flag] = flagged
    assert flag.client_id == "c4" and flag.reason.startswith("weight outlier: claims 1e+05 examples")
    assert len(kept) == 9
