"""Strategy settings that must reach the math, pinned to hand computations: the server learning rate of
FedAvg, FedProx and SCAFFOLD, FedProx's mu in the clients' local steps, SCAFFOLD's example-weighted control
variates and the correction of a client seen for the first time; the seeds of both client samplers; and the
anomaly checks' minimum crowd and repeated passes."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedlearn import Client, Update, run_simulation
from fedlearn.server.anomaly import AnomalyChecks
from fedlearn.server.sampling import ClientSampler, PoissonSampler, client_seed
from fedlearn.strategies import FedAdam, FedAvg, FedAvgM, FedNova, FedProx, Scaffold
from fedlearn.torch import TorchClient, state_of
from test_strategies_opt import Point  # the one-point model w whose 'prediction' is w itself


def _updates(deltas, weights, extras=None):
    return [Update(f"c{i}", 1, np.asarray(d, dtype=np.float64), w,
                   extras={} if extras is None else {"mean_gradient": np.asarray(extras[i], dtype=np.float64)})
            for i, (d, w) in enumerate(zip(deltas, weights))]


# ---------------------------------------------------------------- server learning rate

@pytest.mark.parametrize("strategy", [FedAvg(server_lr=0.3), FedProx(mu=0.1, server_lr=0.3), Scaffold(server_lr=0.3)])
def test_server_lr_scales_the_weighted_mean(strategy):
    x0 = np.array([1.0, -2.0, 0.5])
    deltas, weights = [[1.0, 2.0, -3.0], [4.0, 0.0, 1.0]], [1, 3]
    controls = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    x1 = strategy.apply(x0, strategy.aggregate(_updates(deltas, weights, controls)))
    mean = np.array([(1 + 12) / 4, (2 + 0) / 4, (-3 + 3) / 4])  # example-weighted: (1*d1 + 3*d2) / 4
    np.testing.assert_allclose(x1, x0 + 0.3 * mean, rtol=1e-12)


@pytest.mark.parametrize("make", [lambda: FedAvg(server_lr=0.0), lambda: FedProx(server_lr=-1.0),
                                  lambda: Scaffold(server_lr=0.0)])
def test_server_lr_must_be_positive(make):
    with pytest.raises(ValueError, match="server learning rate must be positive"):
        make()


# ---------------------------------------------------------------- FedProx's mu reaches the client

A = np.array([1.0, 3.0, 0.5])
B = np.array([2.0, -1.0, 4.0])
LR, STEPS = 0.1, 6


def _quadratic_client(cid: str) -> TorchClient:
    """f(w) = 1/2 sum_j a_j (w_j - b_j)^2, minimised with STEPS full-gradient steps."""
    a = torch.as_tensor(A)
    return TorchClient(cid, lambda: Point(3), np.zeros((1, 1)), B[None, :],
                       loss_fn=lambda w, b, reduction="mean": 0.5 * (a * (w - b) ** 2).sum(),
                       local_epochs=STEPS, batch_size=1, lr=LR, shuffle=False)


def _prox_path(mu: float, correction=0.0) -> tuple[np.ndarray, np.ndarray]:
    """Hand computation of STEPS steps w <- w - lr * (A (w - B) + correction + mu (w - w0)) from w0 = 0; also
    the mean uncorrected gradient A (w - B)."""
    w0 = np.zeros(3)
    w, grads = w0.copy(), []
    for _ in range(STEPS):
        g = A * (w - B)
        grads.append(g)
        w = w - LR * (g + correction + mu * (w - w0))
    return w, np.mean(grads, axis=0)


def test_fedprox_mu_reaches_the_clients_local_steps():
    result = run_simulation(_quadratic_client, ["a"], lambda: Point(3), strategy=FedProx(mu=2.0), rounds=1,
                            anomaly_checks=None)
    with_mu, _ = _prox_path(2.0)
    without_mu, _ = _prox_path(0.0)
    np.testing.assert_allclose(result.final_state["w"], with_mu, rtol=1e-12)
    assert np.abs(with_mu - without_mu).max() > 0.1  # mu = 0 would land clearly elsewhere
    assert FedProx(mu=0.25).configure_fit(1, "a")["proximal_mu"] == 0.25
    with pytest.raises(ValueError, match="FedProx mu must be >= 0"):
        FedProx(mu=-0.1)


# ---------------------------------------------------------------- SCAFFOLD control variates

def test_scaffold_server_control_is_example_weighted_and_new_clients_get_c():
    s = Scaffold()
    assert s.correction("anyone") == 0.0 and s.configure_fit(1, "anyone")["gradient_correction"] == 0.0
    s.aggregate([Update("a", 1, np.zeros(2), 1, extras={"mean_gradient": np.array([1.0, 0.0])}),
                 Update("b", 1, np.zeros(2), 3, extras={"mean_gradient": np.array([0.0, 4.0])})])
    c = np.array([0.25, 3.0])  # (1 * (1, 0) + 3 * (0, 4)) / 4
    np.testing.assert_allclose(s.server_control, c, rtol=1e-12)
    np.testing.assert_allclose(s.correction("a"), c - [1.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(s.correction("b"), c - [0.0, 4.0], rtol=1e-12)
    np.testing.assert_allclose(s.correction("new"), c, rtol=1e-12)  # c_i = 0 for a first-time client
    np.testing.assert_allclose(s.configure_fit(2, "new")["gradient_correction"], c, rtol=1e-12)
    # round 2: "a" reports again with another size, "z" for the first time; "b" keeps its stored c_i
    s.aggregate([Update("a", 2, np.zeros(2), 2, extras={"mean_gradient": np.array([2.0, 2.0])}),
                 Update("z", 2, np.zeros(2), 5, extras={"mean_gradient": np.array([-1.0, 1.0])})])
    c2 = (2 * np.array([2.0, 2.0]) + 3 * np.array([0.0, 4.0]) + 5 * np.array([-1.0, 1.0])) / 10
    np.testing.assert_allclose(s.server_control, c2, rtol=1e-12)
    np.testing.assert_allclose(s.correction("z"), c2 - [-1.0, 1.0], rtol=1e-12)
    assert s.client_ids == ["a", "b", "z"]


def test_scaffold_client_adds_the_correction_and_reports_its_uncorrected_mean_gradient():
    correction = np.array([0.5, -1.0, 2.0])
    update = _quadratic_client("a").fit(state_of(Point(3)), {"round": 1, "gradient_correction": correction})
    w, mean_gradient = _prox_path(0.0, correction)
    np.testing.assert_allclose(update.delta, w, rtol=1e-12)
    np.testing.assert_allclose(update.extras["mean_gradient"], mean_gradient, rtol=1e-12)


def test_scaffold_round_uses_the_stored_controls_of_unequal_clients():
    """Two rounds of two clients with different data sizes through the round loop: the second round's
    corrections are c - c_i with the example-weighted c of the first round's mean gradients."""
    sizes = {"a": 1, "b": 3}
    centres = {"a": np.array([1.0, 0.0, 2.0]), "b": np.array([-2.0, 1.0, 0.0])}

    def client_fn(cid):
        a = torch.as_tensor(A)
        x = np.zeros((sizes[cid], 1))
        y = np.repeat(centres[cid][None, :], sizes[cid], axis=0)
        return TorchClient(cid, lambda: Point(3), x, y, local_epochs=1, batch_size=1, lr=LR, shuffle=False,
                           loss_fn=lambda w, b, reduction="mean": 0.5 * (a * (w - b) ** 2).sum())

    def local(w0, centre, n, corr):
        w, grads = w0.copy(), []
        for _ in range(n):  # one epoch of n batches of one example
            g = A * (w - centre)
            grads.append(g)
            w = w - LR * (g + corr)
        return w - w0, np.mean(grads, axis=0)

    result = run_simulation(client_fn, ["a", "b"], lambda: Point(3), strategy=Scaffold(server_lr=0.5), rounds=2,
                            anomaly_checks=None)
    x = np.zeros(3)
    (da, ga), (db, gb) = local(x, centres["a"], 1, 0.0), local(x, centres["b"], 3, 0.0)
    x = x + 0.5 * (1 * da + 3 * db) / 4
    c = (1 * ga + 3 * gb) / 4
    (da, _), (db, _) = local(x, centres["a"], 1, c - ga), local(x, centres["b"], 3, c - gb)
    x = x + 0.5 * (1 * da + 3 * db) / 4
    np.testing.assert_allclose(result.final_state["w"], x, rtol=1e-10)


# ---------------------------------------------------------------- samplers and their seeds

IDS = [f"c{i}" for i in range(30)]


def test_cohort_sampler_is_seeded_by_seed_and_round():
    a = [ClientSampler(count=5, seed=1).sample(IDS, r) for r in range(1, 6)]
    assert a == [ClientSampler(count=5, seed=1).sample(IDS, r) for r in range(1, 6)]
    assert a != [ClientSampler(count=5, seed=2).sample(IDS, r) for r in range(1, 6)]
    assert len({tuple(c) for c in a}) > 1  # rounds differ
    assert all(len(c) == 5 == len(set(c)) and c == sorted(c, key=IDS.index) for c in a)


def test_cohort_sampler_sizes_and_uniformity():
    assert ClientSampler(fraction=0.1).size(30) == 3 and ClientSampler(fraction=0.01).size(30) == 1
    assert ClientSampler(fraction=1.0).sample(IDS, 4) == IDS
    with pytest.raises(ValueError, match="cannot sample 31 clients per round from 30"):
        ClientSampler(count=31).size(30)
    for kwargs, message in [(dict(), "exactly one"), (dict(count=2, fraction=0.5), "exactly one"),
                            (dict(count=0), "must be >= 1"), (dict(fraction=1.5), r"must be in \(0, 1\]"),
                            (dict(fraction=0.0), r"must be in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            ClientSampler(**kwargs)
    counts = np.zeros(len(IDS))
    sampler = ClientSampler(count=6, seed=4)
    for r in range(1000):
        for c in sampler.sample(IDS, r):
            counts[IDS.index(c)] += 1
    assert np.abs(counts / 1000 - 0.2).max() < 0.06  # binomial std 0.0126


def test_poisson_sampler_is_seeded_and_joins_at_its_rate():
    a = [PoissonSampler(0.2, seed=1).sample(IDS, r) for r in range(1, 200)]
    assert a == [PoissonSampler(0.2, seed=1).sample(IDS, r) for r in range(1, 200)]
    assert a != [PoissonSampler(0.2, seed=2).sample(IDS, r) for r in range(1, 200)]
    sizes = np.array([len(c) for c in a])
    assert abs(sizes.mean() / 6 - 1) < 0.05 and len(set(sizes)) > 3  # 30 * 0.2 on average, and it varies
    assert all(c == sorted(c, key=IDS.index) for c in a)
    assert PoissonSampler(1.0).sample(IDS, 3) == IDS
    for rate in (0.0, 1.01):
        with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
            PoissonSampler(rate)


def test_poisson_draws_are_independent_of_the_cohort_samplers_draws():
    """Same seed and round must not give correlated cohorts in the two samplers (separate streams)."""
    same = sum(PoissonSampler(0.5, seed=s).sample(IDS, 1) == ClientSampler(fraction=0.5, seed=s).sample(IDS, 1)
               for s in range(20))
    assert same == 0


class Recorder(Client):
    def fit(self, state, config):
        return Update(self.cid, int(config["round"]), np.zeros(2), 1, {"seed": float(config["seed"])})


def test_the_run_seed_drives_sampling_and_client_seeds():
    def participants(seed):
        result = run_simulation(Recorder, IDS, initial_state=OrderedDict(w=np.zeros(2)), rounds=4,
                                clients_per_round=4, seed=seed, anomaly_checks=None)
        return [r.participants for r in result.history.rounds]

    assert participants(0) == participants(0)
    assert participants(0) != participants(1)
    seeds = {client_seed(0, r, c) for r in (1, 2) for c in ("a", "b")}
    assert len(seeds) == 4 and client_seed(1, 1, "a") != client_seed(0, 1, "a")
    assert client_seed(0, 1, "a") == client_seed(0, 1, "a")


# ---------------------------------------------------------------- anomaly checks

D = 100


def _crowd(n, seed=0):
    rng = np.random.default_rng(seed)
    common = rng.normal(size=D)
    return [rng.uniform(1.0, 2.0) * (common + rng.normal(size=D)) for _ in range(n)]


def _screen(deltas, **kwargs):
    updates = [Update(f"c{i}", 1, d, 10) for i, d in enumerate(deltas)]
    kept, flagged = AnomalyChecks(**kwargs).screen(updates, D)
    return [u.client_id for u in kept], {f.client_id: f.reason for f in flagged}


def test_statistics_run_from_exactly_min_updates():
    deltas = _crowd(5)
    deltas[2] = deltas[2] * 100.0
    assert set(_screen(deltas, min_updates=5)[1]) == {"c2"}
    assert _screen(deltas[:4] + [deltas[2]], min_updates=6)[1] == {}  # five updates, six needed
    assert set(_screen(deltas, min_updates=3)[1]) == {"c2"}
    with pytest.raises(ValueError, match="min_updates must be >= 3"):
        AnomalyChecks(min_updates=2)


def test_a_second_pass_finds_what_the_first_pass_could_not():
    """A few huge updates inflate the spread of log norms and hide a moderately boosted one; once the huge
    ones are out, the next pass flags it. One pass alone would keep it."""
    deltas = _crowd(20, seed=3)
    for i, scale in zip(range(5), (1e4, 2e4, 4e4, 8e4, 1.6e5)):
        deltas[i] = deltas[i] * scale
    deltas[5] = deltas[5] * 12.0
    checks = AnomalyChecks()
    first = checks._outliers([Update(f"c{i}", 1, d, 10) for i, d in enumerate(deltas)], list(range(20)))
    assert "c5" not in {f"c{i}" for i in first}, "the setup needs a hidden outlier"
    kept, flagged = _screen(deltas)
    assert set(flagged) == {f"c{i}" for i in range(6)}
    assert flagged["c5"].startswith("norm outlier")
    assert kept == [f"c{i}" for i in range(6, 20)]


def test_direction_and_norm_thresholds_are_used():
    deltas = _crowd(20, seed=5)
    deltas[4] = deltas[4] * 8.0
    deltas[9] = -deltas[9]
    assert set(_screen(deltas)[1]) == {"c4", "c9"}
    assert "c4" not in _screen(deltas, norm_z=50.0)[1] and "c9" in _screen(deltas, norm_z=50.0)[1]
    assert "c9" not in _screen(deltas, cosine_z=50.0)[1] and "c4" in _screen(deltas, cosine_z=50.0)[1]
    for name in ("cosine_z", "min_log_norm_scale", "min_cosine_scale"):
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            AnomalyChecks(**{name: 0.0})


class HalfDone(Client):
    """Clients whose id starts with 's' are stragglers: they send partial work."""

    def fit(self, state, config):
        return Update(self.cid, int(config["round"]), np.full(2, 1.0 if self.cid[0] == "s" else 3.0), 1,
                      {"steps": 1.0}, partial=self.cid[0] == "s")


@pytest.mark.parametrize("strategy, used", [(FedAvg(), 3.0), (FedProx(mu=0.0), 2.0), (FedNova(), 2.0)])
def test_partial_work_is_dropped_by_fedavg_and_used_by_fedprox(strategy, used):
    result = run_simulation(HalfDone, ["s1", "f1"], initial_state=OrderedDict(w=np.zeros(2)), strategy=strategy,
                            rounds=1, anomaly_checks=None)
    np.testing.assert_array_equal(result.final_state["w"], [used, used])  # mean of 1 and 3, or 3 alone
    failures = result.history.rounds[0].failures
    if used == 3.0:
        assert [(f.client_id, f.kind, f.reason) for f in failures] == [("s1", "straggler",
                                                                         "partial work dropped by fedavg")]
    else:
        assert failures == []


def test_default_thresholds_against_hand_computed_robust_z_scores():
    """Nine identical updates (MAD 0, so the scale floors apply) and one odd one out. Log-norm scale floor
    0.2: norm x4 gives z = ln 4 / 0.2 = 6.9 > 6 (flagged), x3 gives 5.5 (kept). Cosine scale floor 0.1:
    cosine 0.3 gives z = -7 < -6 (flagged), 0.5 gives -5 (kept)."""
    u = np.random.default_rng(1).normal(size=D)
    w = np.random.default_rng(2).normal(size=D)
    w -= (w @ u) / (u @ u) * u  # orthogonal to u, same norm
    w *= np.linalg.norm(u) / np.linalg.norm(w)

    def odd_one(v):
        return _screen([u.copy() for _ in range(9)] + [v])[1]

    assert "c9" in odd_one(4.0 * u) and odd_one(3.0 * u) == {}
    assert odd_one(0.3 * u + np.sqrt(1 - 0.09) * w)["c9"].startswith("direction outlier")
    assert odd_one(0.5 * u + np.sqrt(1 - 0.25) * w) == {}
    five = [u.copy() for _ in range(4)] + [50.0 * u]
    assert set(_screen(five)[1]) == {"c4"}  # the default crowd is five updates


def test_a_stateful_aggregators_state_travels_with_the_strategy_state():
    from fedlearn.aggregators import make_aggregator

    strategy = FedAvg()
    strategy.aggregator = make_aggregator("centered_clipping", tau=10.0)
    strategy.aggregate(_updates([[1.0, 2.0], [3.0, 4.0]], [1, 1]))
    state = strategy.state_dict()
    assert set(state) == {"aggregator/center"}
    np.testing.assert_allclose(state["aggregator/center"], [2.0, 3.0])  # within tau: the plain mean
    restored = FedAvg()
    restored.aggregator = make_aggregator("centered_clipping", tau=10.0)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.aggregator.center, [2.0, 3.0])


@pytest.mark.parametrize("n, reason", [(0, "num_examples must be in [1, 2**53], got 0"),
                                       (-3, "num_examples must be in [1, 2**53], got -3"),
                                       (2.0, "num_examples must be an integer, got float 2.0")])
def test_updates_without_a_positive_integer_example_count_are_rejected(n, reason):
    from fedlearn.server.validate import update_problem

    problem = update_problem(Update("a", 1, np.zeros(2), n), expected_client="a", rnd=1, size=2)
    assert problem == reason


def test_hyperparameters_at_the_edges_of_their_ranges():
    from fedlearn.strategies.fedopt import ServerAdam

    assert FedAdam(beta1=0.0, beta2=0.0).server_optimizer.beta1 == 0.0  # [0, 1): zero is allowed
    assert FedAvgM(momentum=0.0).server_optimizer.momentum == 0.0
    adam = ServerAdam(0.1)  # the paper's defaults
    assert (adam.beta1, adam.beta2, adam.tau) == (0.9, 0.99, 1e-3)


def test_each_round_hands_its_starting_model_to_an_aggregator_that_needs_it():
    """FLTrust through FedAvg over two rounds, with root update r(x) = (2, 0) - x, by hand. Round 1 from x = 0:
    r = (2, 0); (3, 4) has cosine 3/5 and is rescaled to |r| = 2: (1.2, 1.6); (-1, 0) points away, weight 0.
    Round 2 from x = (1.2, 1.6): r = (0.8, -1.6), parallel to (1, -2), which is rescaled to |r|: (0.8, -1.6).
    A stale root update (2, 0) would give 2 / sqrt(5) * (1, -2) instead."""
    from fedlearn.aggregators.fltrust import FLTrust

    strategy = FedAvg()
    strategy.aggregator = FLTrust(lambda x: np.array([2.0, 0.0]) - x)
    x = np.zeros(2)
    strategy.begin_round(1, x)
    x = strategy.apply(x, strategy.aggregate(_updates([[3.0, 4.0], [-1.0, 0.0]], [1, 1])))
    np.testing.assert_allclose(x, [1.2, 1.6], rtol=1e-12)
    strategy.begin_round(2, x)
    step = strategy.aggregate(_updates([[1.0, -2.0]], [1]))
    np.testing.assert_allclose(step, [0.8, -1.6], rtol=1e-12)


def test_only_a_streaming_aggregator_gets_a_running_aggregate_and_it_is_the_weighted_mean():
    """FedAvg's weighted mean folds update by update: (1 * (1, 2) + 3 * (5, -2)) / 4 = (4, -1) by hand. A median,
    or any aggregator that does not say it streams, gets the whole stack instead (no running aggregate)."""
    from fedlearn.aggregators import make_aggregator

    running = FedAvg().running_aggregate()
    running.add(np.array([1.0, 2.0]), 1)
    running.add(np.array([5.0, -2.0]), 3)
    np.testing.assert_allclose(running.result(), [4.0, -1.0], rtol=1e-12)
    median = FedAvg()
    median.aggregator = make_aggregator("median")
    plain = FedAvg()
    plain.aggregator = lambda deltas, weights: deltas.mean(axis=0)  # says nothing about streaming
    assert median.running_aggregate() is None and plain.running_aggregate() is None


def test_fedadam_defaults_give_the_hand_computed_first_step():
    """Reddi et al.'s defaults (server lr 0.01, beta1 0.9, beta2 0.99, tau 1e-3), first step from x = 0 with
    delta = 1: m = 0.1, v = 0.99 tau^2 + 0.01 = 0.01000099, x = 0.01 * 0.1 / (sqrt(v) + tau)."""
    x = FedAdam().apply(np.zeros(1), np.ones(1))
    expected = 0.01 * 0.1 / (np.sqrt(0.99e-6 + 0.01) + 1e-3)
    np.testing.assert_allclose(x, [expected], rtol=1e-12)
    assert abs(expected - 0.0099005) < 1e-7


def test_fedprox_sends_its_default_mu_and_fednova_refuses_a_momentum_of_one():
    assert FedProx().configure_fit(1, "c0")["proximal_mu"] == 0.01
    assert FedProx(mu=0.5).configure_fit(1, "c0")["proximal_mu"] == 0.5
    FedNova(local_momentum=0.99)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"local_momentum must be in \[0, 1\)"):
            FedNova(local_momentum=bad)


def test_scaffold_loads_a_state_saved_before_any_client_reported():
    """A store whose strategy state has no SCAFFOLD tables (a resume from round 0) gives a fresh strategy: no
    correction for anyone, and the first clients start the table."""
    strategy = Scaffold()
    strategy.load_state_dict({})
    assert strategy.correction("c0") == 0.0 and strategy.client_ids == []
    strategy.aggregate(_updates([[1.0, 2.0]], [2], [[0.5, -0.5]]))
    np.testing.assert_allclose(strategy.correction("c9"), [0.5, -0.5])
