"""Optimisation strategies: FedOpt server steps against hand computations, SCAFFOLD and FedNova against the
closed-form optima of heterogeneous quadratic clients, exact resume, the Update extras, Fed-Heart-Disease."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlearn import Update, decode_update, encode_update
from fedlearn.cli import main as cli_main
from fedlearn.data import make_synthetic
from fedlearn.server import ClientSampler, RunStore, Server
from fedlearn.server.validate import update_problem
from fedlearn.serialize import SerializationError
from fedlearn.simulate import run_simulation
from fedlearn.simulation import InProcessPool
from fedlearn.strategies import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedNova, FedYogi, Scaffold, make_strategy
from fedlearn.strategies.fednova import local_work
from fedlearn.torch import LogisticRegression, TorchClient, state_of

HEART = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "heart_disease"


def _updates(deltas, weights, rnd=1):
    return [Update(str(i), rnd, np.asarray(d, dtype=np.float64), w) for i, (d, w) in enumerate(zip(deltas, weights))]


def _server_round(strategy, params, deltas, weights):
    return strategy.apply(params, strategy.aggregate(_updates(deltas, weights)))


# ---------------------------------------------------------------- FedOpt server steps, by hand

def test_fedadam_server_step_matches_hand_computed_adam_on_the_averaged_delta():
    strategy = FedAdam(server_lr=0.5, beta1=0.9, beta2=0.99, tau=0.01)
    x0 = np.array([1.0, -1.0])
    # Round 1: deltas (1, -2) with 1 example and (3, 0) with 3: mean (2.5, -0.5).
    x1 = _server_round(strategy, x0, [[1, -2], [3, 0]], [1, 3])
    m1 = np.array([0.25, -0.05])  # 0.1 * mean
    v1 = 0.99 * 0.01**2 + 0.01 * np.array([6.25, 0.25])  # v starts at tau^2
    np.testing.assert_allclose(x1, x0 + 0.5 * m1 / (np.sqrt(v1) + 0.01), rtol=1e-12)
    # Round 2: one client, delta (-1, 4).
    x2 = _server_round(strategy, x1, [[-1, 4]], [5])
    m2 = 0.9 * m1 + 0.1 * np.array([-1.0, 4.0])
    v2 = 0.99 * v1 + 0.01 * np.array([1.0, 16.0])
    np.testing.assert_allclose(x2, x1 + 0.5 * m2 / (np.sqrt(v2) + 0.01), rtol=1e-12)


@pytest.mark.parametrize("strategy, v_after_two_rounds", [
    # delta 2 then delta 1, v0 = tau^2 = 1e-4
    (FedYogi(server_lr=1.0, beta2=0.9, tau=0.01), (1e-4 + 0.1 * 4) - 0.1 * 1 * np.sign((1e-4 + 0.4) - 1)),
    (FedAdagrad(server_lr=1.0, tau=0.01), 1e-4 + 4 + 1),
])
def test_yogi_and_adagrad_second_moments_match_hand_computation(strategy, v_after_two_rounds):
    x = _server_round(strategy, np.zeros(1), [[2.0]], [1])
    x = _server_round(strategy, x, [[1.0]], [1])
    state = strategy.state_dict()
    np.testing.assert_allclose(state["server_opt/v"], [v_after_two_rounds], rtol=1e-12)
    np.testing.assert_allclose(state["server_opt/m"], [0.9 * 0.2 + 0.1 * 1.0], rtol=1e-12)


def test_fedavgm_accumulates_server_momentum():
    strategy = FedAvgM(server_lr=0.5, momentum=0.8)
    x1 = _server_round(strategy, np.zeros(2), [[1.0, 2.0]], [1])
    x2 = _server_round(strategy, x1, [[-1.0, 0.0]], [1])
    np.testing.assert_allclose(x1, [0.5, 1.0])
    np.testing.assert_allclose(x2, x1 + 0.5 * np.array([0.8 - 1.0, 1.6]))


@pytest.mark.parametrize("bad, message", [(dict(server_lr=0.0), "server learning rate must be positive, got 0.0"),
                                          (dict(beta1=1.0), r"beta1 must be in \[0.0, 1.0\), got 1.0"),
                                          (dict(beta2=-0.1), r"beta2 must be in \[0.0, 1.0\), got -0.1"),
                                          (dict(tau=0.0), "tau must be positive, got 0.0")])
def test_adaptive_strategies_reject_bad_hyperparameters(bad, message):
    with pytest.raises(ValueError, match=message):
        FedAdam(**bad)


# ---------------------------------------------------------------- heterogeneous quadratic clients

class Point(torch.nn.Module):
    """The model is one point w; its 'prediction' is w itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def quadratic_clients(curvatures, centres, lr, steps):
    """Client i minimises f_i(w) = 1/2 sum_j a_ij (w_j - b_ij)^2 with `steps[i]` full-gradient steps."""
    dim = curvatures.shape[1]

    def client_fn(cid: str) -> TorchClient:
        i = int(cid)
        a = torch.as_tensor(curvatures[i])
        loss = lambda w, b, reduction="mean": 0.5 * (a * (w - b) ** 2).sum()  # noqa: E731
        return TorchClient(cid, lambda: Point(dim), np.zeros((1, 1)), centres[i][None, :], loss_fn=loss,
                           local_epochs=int(steps[i]), batch_size=1, lr=lr, shuffle=False)

    return client_fn


def fixed_point(curvatures, centres, lr, steps, scale):
    """The w where sum_i s_i * (I - M_i) (w - b_i) = 0, M_i = (I - lr A_i)^K_i, for per-client scales s_i."""
    shrink = 1.0 - (1.0 - lr * curvatures) ** np.asarray(steps)[:, None]
    weights = np.asarray(scale)[:, None] * shrink
    return (weights * centres).sum(0) / weights.sum(0)


def run_quadratic(strategy, curvatures, centres, lr, steps, rounds):
    client_fn = quadratic_clients(curvatures, centres, lr, steps)
    ids = [str(i) for i in range(len(centres))]
    result = run_simulation(client_fn, ids, lambda: Point(curvatures.shape[1]), strategy=strategy, rounds=rounds)
    return result.final_state["w"]


@pytest.fixture(scope="module")
def quadratics():
    rng = np.random.default_rng(3)
    curvatures = rng.uniform(1.0, 10.0, size=(4, 5))
    centres = rng.normal(0.0, 3.0, size=(4, 5))
    optimum = (curvatures * centres).sum(0) / curvatures.sum(0)  # argmin of sum_i f_i, in closed form
    return curvatures, centres, optimum


def test_scaffold_reaches_the_global_optimum_where_fedavg_stalls_at_a_biased_point(quadratics):
    curvatures, centres, optimum = quadratics
    lr, steps = 0.05, [20] * 4
    fedavg = run_quadratic(FedAvg(), curvatures, centres, lr, steps, rounds=100)
    scaffold = run_quadratic(Scaffold(), curvatures, centres, lr, steps, rounds=100)
    biased = fixed_point(curvatures, centres, lr, steps, [1.0] * 4)
    assert np.linalg.norm(biased - optimum) > 0.5  # many local steps really do bias FedAvg here
    np.testing.assert_allclose(fedavg, biased, atol=1e-6)  # FedAvg converged, to the wrong point
    np.testing.assert_allclose(scaffold, optimum, atol=1e-6)


def test_scaffold_converges_with_partial_participation(quadratics):
    curvatures, centres, optimum = quadratics
    client_fn = quadratic_clients(curvatures, centres, 0.05, [20] * 4)
    result = run_simulation(client_fn, ["0", "1", "2", "3"], lambda: Point(5), strategy=Scaffold(), rounds=150,
                            clients_per_round=2)
    np.testing.assert_allclose(result.final_state["w"], optimum, atol=1e-4)


def test_fednova_removes_the_bias_of_unequal_local_steps(quadratics):
    curvatures, centres, optimum = quadratics
    lr, steps = 0.005, [1, 2, 5, 30]
    fedavg = run_quadratic(FedAvg(), curvatures, centres, lr, steps, rounds=100)
    fednova = run_quadratic(FedNova(), curvatures, centres, lr, steps, rounds=100)
    np.testing.assert_allclose(fedavg, fixed_point(curvatures, centres, lr, steps, [1.0] * 4), atol=1e-6)
    np.testing.assert_allclose(fednova, fixed_point(curvatures, centres, lr, steps, 1.0 / np.array(steps)), atol=1e-6)
    # FedAvg lands near the optimum of the objective weighted by steps; FedNova near the true one.
    assert np.linalg.norm(fednova - optimum) < 0.2 * np.linalg.norm(fedavg - optimum)


def test_fednova_normaliser_is_the_displacement_of_sgd_with_momentum():
    """Along a constant gradient g, `steps` SGD steps with momentum move lr * g * local_work(steps)."""
    steps, momentum, lr = 7, 0.6, 0.1
    client = TorchClient("c", lambda: Point(1), np.zeros((1, 1)), np.zeros((1, 1)),
                         loss_fn=lambda w, b, reduction="mean": 3.0 * w.sum(),
                         local_epochs=steps, batch_size=1, lr=lr, momentum=momentum, shuffle=False)
    update = client.fit(state_of(Point(1)), {})
    np.testing.assert_allclose(update.delta, [-lr * 3.0 * local_work(np.float64(steps), momentum)], rtol=1e-12)
    assert local_work(np.float64(steps)) == steps


# ---------------------------------------------------------------- exact resume

def _synthetic_server(strategy_name, store, seed=0):
    data = make_synthetic(1.0, 1.0, 6, dim=8, num_classes=3, seed=1, max_samples=60)

    def model_fn():
        return LogisticRegression(8, 3)

    def client_fn(cid):
        return TorchClient(cid, model_fn, *data.clients[cid], local_epochs=2, batch_size=8, lr=0.1)

    torch.manual_seed(seed)
    return Server(InProcessPool(client_fn, data.client_ids), make_strategy(strategy_name), state_of(model_fn()),
                  sampler=ClientSampler(count=3, seed=seed), store=store, seed=seed)


@pytest.mark.parametrize("strategy_name", ["scaffold", "fedyogi", "fedavgm"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, strategy_name):
    straight = _synthetic_server(strategy_name, RunStore(tmp_path / "straight"))
    straight.run(5)
    first = _synthetic_server(strategy_name, RunStore(tmp_path / "resumed"))
    first.run(2)  # then the process "dies": only the run store survives
    resumed = _synthetic_server(strategy_name, RunStore(tmp_path / "resumed"))
    assert resumed.round == 2
    resumed.run(5)
    np.testing.assert_array_equal(resumed.params, straight.params)
    expected, got = straight.strategy.state_dict(), resumed.strategy.state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_scaffold_state_keeps_only_participants_and_survives_the_store(tmp_path):
    server = _synthetic_server("scaffold", RunStore(tmp_path))
    server.run(1)
    strategy = server.strategy
    assert len(strategy.client_ids) == 3 and strategy.controls.shape == (3, server.layout.size)
    _, saved = RunStore(tmp_path).load_round(1)
    restored = Scaffold()
    restored.load_state_dict(saved)
    assert restored.client_ids == strategy.client_ids
    for cid in ["0", "1", "2", "3", "4", "5"]:
        np.testing.assert_array_equal(restored.correction(cid), strategy.correction(cid))


def test_scaffold_refuses_updates_without_a_control_variate():
    with pytest.raises(ValueError, match="mean_gradient"):
        Scaffold().aggregate(_updates([[1.0, 2.0]], [1]))


def test_fednova_refuses_updates_without_a_step_count():
    with pytest.raises(ValueError, match="steps"):
        FedNova().aggregate(_updates([[1.0, 2.0]], [1]))


# ---------------------------------------------------------------- Update extras on the wire and in validation

def test_update_extras_round_trip_and_are_checked():
    update = Update("c", 2, np.arange(4.0), 5, {"steps": 3.0}, extras={"mean_gradient": np.linspace(0, 1, 4)})
    back = decode_update(encode_update(update))
    assert list(back.extras) == ["mean_gradient"]
    np.testing.assert_array_equal(back.extras["mean_gradient"], update.extras["mean_gradient"])
    short = Update("c", 2, np.arange(4.0), 5, extras={"mean_gradient": np.ones(3)})
    with pytest.raises(SerializationError, match="shape"):
        decode_update(encode_update(short))
    assert "extra 'mean_gradient'" in update_problem(short, expected_client="c", rnd=2, size=4)
    poisoned = Update("c", 2, np.arange(4.0), 5, extras={"mean_gradient": np.array([0, np.nan, 0, 0])})
    assert "non-finite" in update_problem(poisoned, expected_client="c", rnd=2, size=4)


# ---------------------------------------------------------------- selection by name from the CLI and TOML

@pytest.mark.parametrize("how", ["flags", "toml"])
def test_fedadam_selected_from_cli_and_toml_uses_the_given_server_lr(tmp_path, how):
    common = ["simulate", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "2", "--model", "logreg",
              "--local-epochs", "1", "--eval-clients", "0", "--quiet", "--run-dir", str(tmp_path / "run")]
    if how == "flags":
        extra = ["--strategy", "fedadam", "-p", "server_lr=0.01"]
    else:
        (tmp_path / "cfg.toml").write_text('[strategy]\nname = "fedadam"\nserver_lr = 0.01\n')
        extra = ["--config", str(tmp_path / "cfg.toml")]
    assert cli_main(common + extra) == 0
    store = RunStore(tmp_path / "run")
    start, _ = store.load_round(0)
    end, strategy_state = store.load_round(2)
    assert {"server_opt/m", "server_opt/v"} <= set(strategy_state)
    # Two Adam steps of lr 0.01 move no coordinate more than 0.01 * (1 + 1.35); plain FedAvg moves far more.
    moved = max(np.abs(end[k] - start[k]).max() for k in start)
    assert 0 < moved < 0.0235


# ---------------------------------------------------------------- Fed-Heart-Disease (real data, when present)

@pytest.mark.skipif(not HEART.is_dir(), reason="UCI heart disease files not in ../shared/data")
def test_heart_disease_matches_flamby_preparation():
    from fedlearn.data.heart_disease import load_heart_disease

    data = load_heart_disease(HEART)
    sizes = {h: (len(data.clients[h][1]), len(data.client_test[h][1])) for h in data.client_ids}
    assert sizes == {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16), "va": (85, 45)}
    assert data.input_shape == (13,) and data.num_classes == 2
    for x, _ in data.clients.values():  # standardised with the hospital's own training statistics
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
        std = x.std(0, ddof=1)
        np.testing.assert_allclose(std[std > 0], 1.0, rtol=1e-4)
