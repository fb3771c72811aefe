"""Robust aggregators against hand computations, their refusals of impossible settings, and their wiring
into strategies, config, CLI and the simulation front door."""
from __future__ import annotations

import numpy as np
import pytest

from fedlearn.aggregators import (AGGREGATORS, Bulyan, CenteredClipping, CoordinateMedian, FLTrust, Krum, NormBounding,
                                  TrimmedMean, make_aggregator)
from fedlearn.cli import _simulation_settings, build_parser
from fedlearn.config import ConfigError, SimulationConfig, load_toml
from fedlearn.server import RunStore
from fedlearn.simulate import simulate
from fedlearn.strategies import FedAvg
from fedlearn.strategies.fedavg import weighted_mean


def ones(n: int) -> np.ndarray:
    return np.ones(n)


def column(*values: float) -> np.ndarray:
    """One-dimensional deltas as an (n, 1) stack."""
    return np.array(values, dtype=np.float64)[:, None]


def test_coordinate_median_ignores_weights_and_extremes():
    deltas = np.array([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0]])
    np.testing.assert_array_equal(CoordinateMedian()(deltas, np.array([1.0, 1.0, 1000.0])), [2.0, 0.0])


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
    deltas = np.array([[1.0, -7.0], [2.0, 0.0], [3.0, 1.0], [100.0, 2.0]])
    # beta=0.25, n=4: one value cut from each end -> coordinate 0 keeps (2, 3), coordinate 1 keeps (0, 1)
    np.testing.assert_allclose(TrimmedMean(beta=0.25)(deltas, ones(4)), [2.5, 0.5])
    np.testing.assert_allclose(TrimmedMean(beta=0.2)(deltas, ones(4)), deltas.mean(axis=0))  # floor(0.8) = 0


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1])
def test_trimmed_mean_refuses_beta_outside_zero_to_half(beta):
    with pytest.raises(ValueError, match=r"beta .* \[0, 0.5\)"):
        TrimmedMean(beta=beta)


def test_krum_and_multi_krum_pick_by_neighbour_distances():
    deltas = column(0.0, 1.0, 2.5, 3.0, 100.0)
    # f=1, n=5: each score sums the squared distances to the n - f - 2 = 2 nearest others:
    # 0 -> 1 + 6.25 = 7.25; 1 -> 1 + 2.25 = 3.25; 2.5 -> 0.25 + 2.25 = 2.5; 3 -> 0.25 + 4 = 4.25; 100 -> huge
    np.testing.assert_allclose(Krum(f=1)(deltas, ones(5)), [2.5])
    np.testing.assert_allclose(Krum(f=1, m=3)(deltas, ones(5)), [(2.5 + 1.0 + 3.0) / 3])
    np.testing.assert_allclose(make_aggregator("multi_krum", f=1)(deltas, ones(5)), [(0.0 + 1.0 + 2.5 + 3.0) / 4])


def test_krum_refuses_too_few_updates_and_bad_settings():
    with pytest.raises(ValueError, match=r"Krum with f=2 needs at least 7 updates .*n >= 2f \+ 3.* got 6"):
        Krum(f=2)(np.zeros((6, 3)), ones(6))
    with pytest.raises(ValueError, match="f .* whole number >= 0"):
        Krum(f=-1)
    with pytest.raises(ValueError, match="m .* >= 1"):
        Krum(f=1, m=0)


def test_bulyan_selects_by_krum_then_trims_around_the_median():
    # n=7, f=1: theta = n - 2f = 5 updates selected by repeated Krum, then per coordinate the
    # beta = theta - 2f = 3 values closest to the median are averaged. The five clustered updates are
    # selected (the far ones score worst; at the last pick the tie between the cluster and (50, 50) goes to
    # the earlier update). Coordinate 0: median 2, closest (1, 2, 3) -> 2. Coordinate 1: values
    # (10, 0, 7, 1, 2), median 2, closest (2, 1, 0) -> 1.
    deltas = np.array([[0, 10], [1, 0], [2, 7], [3, 1], [4, 2], [50, 50], [1000, 1000]], dtype=np.float64)
    np.testing.assert_allclose(Bulyan(f=1)(deltas, ones(7)), [2.0, 1.0])


def test_bulyan_says_it_needs_n_at_least_4f_plus_3():
    with pytest.raises(ValueError, match=r"Bulyan with f=2 needs at least 11 updates .*n >= 4f \+ 3 = 11.* got 10"):
        Bulyan(f=2)(np.zeros((10, 4)), ones(10))
    assert Bulyan(f=10).min_updates == 43


def test_centered_clipping_clips_around_the_previous_aggregate_and_resumes_exactly():
    deltas = np.array([[3.0, 0.0], [0.0, 0.5]])
    cc = CenteredClipping(tau=1.0, iters=1)
    # round 1 from v = 0: (3, 0) is clipped to (1, 0), (0, 0.5) is inside tau -> v = (0.5, 0.25)
    np.testing.assert_allclose(cc(deltas, ones(2)), [0.5, 0.25])
    resumed = CenteredClipping(tau=1.0, iters=1)
    resumed.load_state_dict(cc.state_dict())
    # round 2 from v = (0.5, 0.25): (2.5, -0.25) is clipped to norm 1, (-0.5, 0.25) is kept
    far = np.array([2.5, -0.25])
    expected = np.array([0.5, 0.25]) + (far / np.linalg.norm(far) + np.array([-0.5, 0.25])) / 2
    np.testing.assert_allclose(cc(deltas, ones(2)), expected)
    np.testing.assert_allclose(resumed(deltas, ones(2)), expected)


def test_centered_clipping_state_travels_with_the_strategy():
    strategy = FedAvg()
    strategy.aggregator = CenteredClipping(tau=1.0)
    strategy.aggregator(np.array([[3.0, 0.0], [0.0, 0.5]]), ones(2))
    saved = strategy.state_dict()
    assert set(saved) == {"aggregator/center"}
    fresh = FedAvg()
    fresh.aggregator = CenteredClipping(tau=1.0)
    fresh.load_state_dict(saved)
    np.testing.assert_array_equal(fresh.aggregator.center, strategy.aggregator.center)


@pytest.mark.parametrize("kwargs", [{"tau": 0.0}, {"tau": -1.0}, {"iters": 0}])
def test_centered_clipping_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError, match="centered clipping"):
        CenteredClipping(**kwargs)


def test_norm_bounding_clips_then_takes_the_weighted_mean():
    deltas = np.array([[3.0, 4.0], [0.6, 0.0]])
    # (3, 4) has norm 5 -> (0.6, 0.8); weights 1 and 3 -> (0.6 + 1.8, 0.8) / 4
    np.testing.assert_allclose(NormBounding(max_norm=1.0)(deltas, np.array([1.0, 3.0])), [0.6, 0.2])
    # default bound: the round's median norm (here 1 from norms 5, 1, 0.5): only (3, 4) is clipped
    three = np.array([[3.0, 4.0], [0.0, 1.0], [0.5, 0.0]])
    np.testing.assert_allclose(NormBounding()(three, ones(3)), ([0.6, 0.8] + three[1] + three[2]) / 3)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        NormBounding(max_norm=0.0)


def test_fltrust_weights_by_agreement_with_the_root_update_and_ignores_boosting():
    seen = []

    def root_update(params: np.ndarray) -> np.ndarray:
        seen.append(params.copy())
        return np.array([1.0, 0.0])

    agg = FLTrust(root_update)
    strategy = FedAvg()
    strategy.aggregator = agg
    strategy.begin_round(1, np.array([7.0, 7.0]))  # the round loop hands over the round's model
    np.testing.assert_array_equal(seen[0], [7.0, 7.0])
    deltas = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    # trust = relu(cos): 1, 0, 0, 1/sqrt(2); each update rescaled to the root norm 1
    t = 1 / np.sqrt(2)
    expected = (np.array([1.0, 0.0]) + t * np.array([t, t])) / (1 + t)
    np.testing.assert_allclose(agg(deltas, ones(4)), expected)
    boosted = deltas * np.array([[100.0], [1.0], [1.0], [1.0]])
    np.testing.assert_allclose(agg(boosted, ones(4)), expected)
    np.testing.assert_array_equal(agg(np.array([[-1.0, 0.0], [0.0, 2.0]]), ones(2)), [0.0, 0.0])


def test_fltrust_refuses_to_aggregate_without_a_root_update():
    with pytest.raises(ValueError, match="begin_round"):
        FLTrust(lambda p: p)(np.zeros((3, 2)), ones(3))
    with pytest.raises(ValueError, match="root_update"):
        FLTrust(None)


def test_registry_builds_by_name_and_explains_mistakes():
    assert make_aggregator("mean") is weighted_mean
    assert isinstance(make_aggregator("Trimmed_Mean", beta=0.1), TrimmedMean)
    assert set(AGGREGATORS) >= {"median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clipping",
                                "norm_bounding", "fltrust"}
    with pytest.raises(ValueError, match="unknown aggregator 'mode'.*median"):
        make_aggregator("mode")
    with pytest.raises(ValueError, match="aggregator 'krum' has no parameter 'g'; its parameters: f, m"):
        make_aggregator("krum", g=2)


def test_aggregator_section_in_toml_and_flags_on_the_command_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[aggregator]\nname = "krum"\nf = 2\n[attack]\nname = "alie"\nfraction = 0.1\nz = 1.5\n'
                    '[anomaly]\nenabled = false\nnorm_z = 4.0\n')
    values = load_toml(path)
    assert (values["aggregator"], values["aggregator_params"]) == ("krum", {"f": 2})
    assert (values["attack"], values["attack_fraction"], values["attack_params"]) == ("alie", 0.1, {"z": 1.5})
    assert (values["anomaly_checks"], values["anomaly_params"]) == (False, {"norm_z": 4.0})
    args = build_parser().parse_args(["simulate", "--config", str(path), "--aggregator", "multi_krum", "-a", "m=5",
                                      "--attack-param", "z=0.5", "--no-anomaly-checks"])
    cfg = SimulationConfig.from_dict(_simulation_settings(args))
    assert (cfg.aggregator, cfg.aggregator_params) == ("multi_krum", {"f": 2, "m": 5})
    assert cfg.attack_params == {"z": 0.5} and cfg.anomaly_checks is False


def test_simulate_refuses_an_aggregator_the_cohort_cannot_satisfy():
    with pytest.raises(ConfigError, match="bulyan.*needs at least 43 updates per round.*only 10 clients"):
        simulate({"rounds": 1, "aggregator": "bulyan", "aggregator_params": {"f": 10}})


def test_simulate_with_a_robust_aggregator_and_fltrust_root_data_learns_digits():
    base = {"num_clients": 20, "clients_per_round": 10, "rounds": 8, "local_epochs": 2, "batch_size": 10, "lr": 0.3,
            "eval_clients": 0, "alpha": 1.0}
    for name, params in (("median", {}), ("fltrust", {"root_size": 50})):
        result = simulate({**base, "aggregator": name, "aggregator_params": params})
        assert result.accuracy > 0.8, (name, result.accuracy)


def test_a_run_with_centered_clipping_resumes_exactly(tmp_path):
    config = {"num_clients": 20, "clients_per_round": 10, "local_epochs": 1, "batch_size": 10, "eval_clients": 0,
              "aggregator": "centered_clipping", "attack": "sign_flip"}
    straight = simulate({**config, "rounds": 4}).final_state
    simulate({**config, "rounds": 2}, run_dir=tmp_path)
    store = RunStore(tmp_path)
    store.set_meta("config", {**store.get_meta("config"), "rounds": 4})
    store.close()
    resumed = simulate(run_dir=tmp_path, resume=True).final_state
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
