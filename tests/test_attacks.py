"""Attacks: each does what its paper says, and in a small version of the robustness benchmark (digits,
50 clients, Dirichlet alpha=1, 20% attackers) the attacks hurt, and the defences hold."""
from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from fedlearn import Update, simulate
from fedlearn.attacks import (ALIE, IPM, Backdoor, GaussianNoise, LabelFlip, SignFlip, Trigger, choose_attackers,
                              make_attack)

IDS = [f"c{i}" for i in range(6)]


def round_updates() -> list[Update]:
    deltas = [[1.0, -2.0], [3.0, -4.0], [2.0, 0.0], [4.0, -2.0], [10.0, 10.0], [20.0, 20.0]]
    return [Update(cid, 1, np.array(d), 5) for cid, d in zip(IDS, deltas, strict=True)]


def forged(attack, updates: list[Update]) -> dict[str, np.ndarray]:
    out, refused = attack.server(updates, 1)
    assert refused == []
    assert [u.client_id for u in out] == [u.client_id for u in updates]
    return {u.client_id: u.delta for u in out}


def test_attackers_are_a_seeded_fixed_fraction():
    ids = [str(i) for i in range(50)]
    chosen = choose_attackers(ids, 0.2, seed=3)
    assert len(chosen) == 10 and chosen == choose_attackers(ids, 0.2, seed=3) != choose_attackers(ids, 0.2, seed=4)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        choose_attackers(ids, 1.0, seed=0)


def test_model_attacks_rewrite_only_the_malicious_updates():
    updates = round_updates()
    honest = np.array([u.delta for u in updates[:4]])  # c4, c5 are the attackers
    out = forged(SignFlip(["c4", "c5"], scale=4.0), updates)
    np.testing.assert_array_equal(out["c4"], [-40.0, -40.0])
    np.testing.assert_array_equal(out["c0"], updates[0].delta)
    np.testing.assert_allclose(forged(IPM(["c4", "c5"], epsilon=0.5), updates)["c5"], -0.5 * honest.mean(axis=0))
    # ALIE: benign mean (2.5, -2), std (sqrt(1.25), sqrt(2)); z=1 moves each coordinate against the mean's sign
    np.testing.assert_allclose(forged(ALIE(["c4", "c5"], z=1.0), updates)["c4"],
                               [2.5 - np.sqrt(1.25), -2.0 + np.sqrt(2.0)])


def test_alie_default_z_is_the_papers_z_max():
    # n = 50, f = 10: s = floor(50/2 + 1) - 10 = 16, z = Phi^-1((50 - 16) / 50) = Phi^-1(0.68) ~ 0.4677
    assert ALIE.z_max(50, 10) == pytest.approx(0.4677, abs=1e-4)


def test_noise_has_the_scaled_norm_and_is_reproducible():
    update = Update("c0", 1, np.random.default_rng(0).normal(size=10_000), 5)
    first = forged(GaussianNoise(["c0"], seed=1, scale=100.0), [update])["c0"]
    assert np.linalg.norm(first) / np.linalg.norm(update.delta) == pytest.approx(100.0, rel=0.03)
    np.testing.assert_array_equal(first, forged(GaussianNoise(["c0"], seed=1, scale=100.0), [update])["c0"])


def test_label_flip_and_backdoor_poison_only_the_attackers_data():
    rng = np.random.default_rng(0)
    clients = {cid: (rng.random((10, 64)).astype(np.float32), np.arange(10)) for cid in ("a", "b")}
    flipped = LabelFlip(["a"]).poison_clients(clients, num_classes=10)
    np.testing.assert_array_equal(flipped["a"][1], 9 - np.arange(10))
    np.testing.assert_array_equal(flipped["b"][1], np.arange(10))
    backdoor = Backdoor(["a"], target=7, poison_fraction=0.5, trigger_size=2, trigger_row=2, trigger_col=3)
    x, y = backdoor.poison_clients(clients, num_classes=10)["a"]
    stamped = (x.reshape(10, 8, 8)[:, 2:4, 3:5] == 1.0).all(axis=(1, 2))
    assert stamped.sum() == 5 and (y[stamped] == 7).all()
    np.testing.assert_array_equal(y[~stamped], np.arange(10)[~stamped])
    np.testing.assert_array_equal(x[~stamped], clients["a"][0][~stamped])


def test_backdoor_boosts_by_n_over_f_and_refuses_non_images():
    out = forged(Backdoor(["c4", "c5"]), round_updates())
    np.testing.assert_array_equal(out["c5"], 3.0 * np.array([20.0, 20.0]))  # 6 updates, 2 attackers
    with pytest.raises(ValueError, match="square images"):
        Trigger().stamp(np.zeros((3, 30)))
    with pytest.raises(ValueError, match="unknown attack 'flood'"):
        make_attack("flood", ["a"])


# --- the benchmark, kept small: every cell of it the assertions need, each run once ---

SCENARIO = {"dataset": "digits", "num_clients": 50, "alpha": 1.0, "clients_per_round": None, "fraction": 1.0,
            "eval_clients": 0, "attack_fraction": 0.2, "rounds": 15, "local_epochs": 2, "batch_size": 10, "lr": 0.3}


@cache
def final(aggregator: str = "", attack: str = "", checks: bool = False, **params: int) -> dict[str, float]:
    """Final metrics of one benchmark cell (anomaly checks off unless asked: the aggregator alone)."""
    config = {**SCENARIO, "aggregator": aggregator, "aggregator_params": params, "attack": attack,
              "anomaly_checks": checks}
    return simulate(config).history.last


def accuracy(*args: str, **kwargs) -> float:
    return final(*args, **kwargs)["test_accuracy"]


def test_fedavg_collapses_under_scaled_sign_flipping():
    assert accuracy() - accuracy(attack="sign_flip") >= 0.20


@pytest.mark.parametrize("attack", ["alie", "ipm"])
def test_alie_and_ipm_measurably_lower_bulyan(attack):
    assert accuracy("bulyan", f=10) - accuracy("bulyan", attack, f=10) >= 0.05


@pytest.mark.parametrize("attack", ["label_flip", "sign_flip", "noise", "alie", "ipm", "backdoor"])
def test_the_best_robust_aggregator_stays_within_5_points_of_clean_fedavg(attack):
    assert accuracy("fltrust", attack) >= accuracy() - 0.05


def test_norm_bounding_and_anomaly_checks_stop_the_model_replacement_backdoor():
    assert final(attack="backdoor")["test_backdoor_success"] > 0.5
    assert final("norm_bounding", "backdoor", checks=True)["test_backdoor_success"] < 0.10
