"""Differential privacy: accounting, clipping, noise, adaptive clipping, budgets, local DP, DP-SGD, config."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from fedlearn import InProcessPool, Transform, Update
from fedlearn.aggregators import make_aggregator
from fedlearn.cli import _simulation_settings, build_parser
from fedlearn.config import ConfigError, SimulationConfig, load_toml
from fedlearn.privacy import (AdaptiveClipping, CentralDP, LocalDP, PrivacyBudgetError, PrivacyConfig, SampledGaussian,
                              build_privacy, gaussian_epsilon, noise_for_epsilon)
from fedlearn.server import ClientSampler, RunStore, Server
from fedlearn.strategies import make_strategy
from vector_clients import VectorClient, known_delta, zero_state


def test_epsilon_matches_the_published_reference_values():
    rdp = SampledGaussian(1.0, 100_000, 1_000, "poisson", "rdp")
    pld = SampledGaussian(1.0, 100_000, 1_000, "poisson", "pld")
    assert round(rdp.epsilon(1000, 1e-5), 2) == 2.10
    assert round(pld.epsilon(1000, 1e-5), 2) == 1.83


def test_noise_helper_finds_the_smallest_noise_for_a_target_epsilon():
    z = noise_for_epsilon(3.0, 200, 1e-5, population=1000, cohort=20, sampling="fixed")
    mech = SampledGaussian(z, 1000, 20, "fixed")
    assert mech.epsilon(200, 1e-5) <= 3.0
    assert SampledGaussian(z * 0.99, 1000, 20, "fixed").epsilon(200, 1e-5) > 3.0


def test_pld_with_fixed_size_cohorts_is_refused():
    with pytest.raises(PrivacyBudgetError, match="PLD accountant supports Poisson sampling only"):
        SampledGaussian(1.0, 100, 10, "fixed", "pld")


class NormSpy(Transform):
    """Records the L2 norm of every update that reaches aggregation."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def server(self, updates, rnd):
        self.norms += [float(np.linalg.norm(u.delta)) for u in updates]
        return updates, []


def dp_server(n: int, dim: int, dp: Transform, *, scale: float = 0.5, extra=(), store=None, sampled=None) -> Server:
    ids = [str(i) for i in range(n)]
    pool = InProcessPool(lambda cid: VectorClient(cid, dim, scale), ids)
    sampler = ClientSampler(count=sampled) if sampled else ClientSampler(fraction=1.0)
    return Server(pool, make_strategy("fedavg"), zero_state(dim), sampler=sampler, transforms=[dp, *extra],
                  anomaly_checks=None, store=store)


def test_clipping_bound_holds_for_every_update():
    spy = NormSpy()
    dp = CentralDP(1.5, SampledGaussian(1.0, 40, 10, "fixed"), 1e-5, rng=np.random.default_rng(0))
    dp_server(40, 50, dp, scale=1.0, extra=[spy], sampled=10).run(5)
    raw = [np.linalg.norm(known_delta(str(i), 50, 1.0)) for i in range(40)]
    assert min(raw) > 1.5  # every client needed clipping
    assert len(spy.norms) == 50 and max(spy.norms) <= 1.5 * (1 + 1e-12)


def test_server_refuses_an_update_that_was_not_clipped():
    dp = CentralDP(1.0, SampledGaussian(1.0, 10, 2, "fixed"), 1e-5)
    update = VectorClient("3", 50, 1.0).fit(zero_state(50), {"round": 1})
    kept, refused = dp.server([update], 1)
    assert not kept and "did not clip" in refused[0].reason


def test_an_update_clipped_to_c_and_sent_in_float32_is_kept_and_projected_back_onto_the_ball():
    """A deployment sends updates in the model's dtype: float32 rounding leaves an update clipped to C a
    hair outside the ball. It is an honest client's update, kept, and scaled back to norm C (to float64 rounding)."""
    dp = CentralDP(1.0, SampledGaussian(1.0, 10, 2, "fixed"), 1e-5)
    outside = None
    for size in range(100, 200):  # a constant update rounds every coordinate the same way
        sent = np.full(size, 1 / np.sqrt(size)).astype(np.float32).astype(np.float64)
        if np.linalg.norm(sent) > 1.0 + 1e-8:
            outside = sent
            break
    assert outside is not None and np.linalg.norm(outside) < 1.0 + 1e-6
    [kept], refused = dp.server([Update("0", 1, outside, 10, {})], 1)
    assert refused == [] and np.linalg.norm(kept.delta) <= 1.0 + 1e-12 and kept.num_examples == 1


def test_measured_noise_std_on_the_aggregate_matches_the_formula():
    n, dim, clip, z = 10, 50_000, 1.0, 2.0
    dp = CentralDP(clip, SampledGaussian(z, 100, n, "fixed"), 1e-5, rng=np.random.default_rng(1))
    server = dp_server(n, dim, dp, scale=0.001)  # small updates: no clipping, the mean is known exactly
    server.run(1)
    noise = server.params - sum(known_delta(str(i), dim, 0.001) for i in range(n)) / n
    assert abs(noise.std() / (z * clip / n) - 1) < 0.02
    assert server.history.last["dp_noise_std"] == pytest.approx(z * clip / n)


def test_adaptive_clipping_tracks_the_target_quantile():
    # update norms: client i has norm ~ proportional to its scale, median norm known from the clients
    n, dim = 100, 20
    norms = np.array([np.linalg.norm(known_delta(str(i), dim, 1.0)) for i in range(n)])
    dp = CentralDP(0.1, SampledGaussian(1.0, n, n, "fixed"), 1e-5, adaptive=AdaptiveClipping(0.5, 0.3),
                   rng=np.random.default_rng(2))
    server = dp_server(n, dim, dp, scale=1.0)
    server.run(40)
    assert dp.clip == pytest.approx(float(np.median(norms)), rel=0.15)
    assert dp.update_noise > 1.0  # part of the noise budget went to the clipped count


def test_epsilon_is_stored_every_round_and_the_budget_stops_the_run(tmp_path):
    mech = SampledGaussian(1.0, 20, 5, "fixed")
    budget = (mech.epsilon(3, 1e-5) + mech.epsilon(4, 1e-5)) / 2  # three rounds fit, four do not
    dp = CentralDP(1.0, mech, 1e-5, budget=budget)
    store = RunStore(tmp_path)
    server = dp_server(20, 30, dp, store=store, sampled=5)
    server.run(10)
    assert server.round == 3 and "above the budget" in server.stop_reason
    stored = [r.metrics["dp_epsilon"] for r in store.history()]
    assert stored == pytest.approx([mech.epsilon(t, 1e-5) for t in (1, 2, 3)])
    store.close()
    # a restarted server resumes the accountant: it may not spend the budget again
    dp2 = CentralDP(1.0, mech, 1e-5, budget=budget)
    resumed = dp_server(20, 30, dp2, store=RunStore(tmp_path), sampled=5)
    resumed.run(10)
    assert resumed.round == 3 and dp2.rounds_spent == 3


def test_a_budget_too_small_for_one_round_refuses_to_start():
    cfg = PrivacyConfig(dp_clip=1.0, dp_noise=0.3, epsilon_budget=0.5)
    with pytest.raises(PrivacyBudgetError, match="refusing to start"):
        build_privacy(cfg, client_ids=[str(i) for i in range(100)], cohort=10, rounds=5, strategy=make_strategy("fedavg"))


def test_central_dp_and_secure_aggregation_refuse_robust_aggregators():
    strategy = make_strategy("fedavg")
    strategy.aggregator = make_aggregator("trimmed_mean")
    ids = [str(i) for i in range(20)]
    with pytest.raises(ValueError, match="noise is calibrated to the sensitivity of the mean"):
        build_privacy(PrivacyConfig(dp_clip=1.0, dp_noise=1.0), client_ids=ids, cohort=10, rounds=2, strategy=strategy)
    with pytest.raises(ValueError, match="secure aggregation gives the server only the sum"):
        build_privacy(PrivacyConfig(secagg=True), client_ids=ids, cohort=10, rounds=2, strategy=strategy)


@pytest.mark.parametrize("settings, feature", [({"dp_clip": 1.0, "dp_noise": 1.0}, "differential privacy"),
                                               ({"local_dp_clip": 1.0, "local_dp_noise": 1.0}, "differential privacy"),
                                               ({"secagg": True}, "secure aggregation")])
def test_privacy_refuses_strategies_whose_clients_upload_extras(settings, feature):
    """SCAFFOLD's control variates travel beside the delta, where no clipping, noise or mask reaches them."""
    ids = [str(i) for i in range(20)]
    with pytest.raises(ValueError, match=f"{feature} cannot be combined with the scaffold strategy: its clients also "
                                         "upload mean_gradient"):
        build_privacy(PrivacyConfig(**settings), client_ids=ids, cohort=10, rounds=2, strategy=make_strategy("scaffold"))
    assert build_privacy(PrivacyConfig(**settings), client_ids=ids, cohort=10, rounds=2,
                         strategy=make_strategy("fedavg")).summary


def test_local_dp_noises_on_the_client_and_reports_each_clients_epsilon():
    n, dim, clip, z = 4, 40_000, 1.0, 0.5
    ldp = LocalDP(clip, z, 1e-5, rng=np.random.default_rng(4))
    seen = []
    spy = NormSpy()
    spy.server = lambda updates, rnd: (seen.extend(updates) or updates, [])
    server = dp_server(n, dim, ldp, scale=0.001, extra=[spy])
    server.run(3)
    noise = seen[-1].delta - known_delta(seen[-1].client_id, dim, 0.001)
    assert abs(noise.std() / (z * clip) - 1) < 0.02
    assert seen[-1].metrics["ldp_epsilon"] == pytest.approx(gaussian_epsilon(z, 3, 1e-5))
    assert server.history.rounds[0].metrics["ldp_epsilon_max"] < server.history.last["ldp_epsilon_max"]


def test_privacy_settings_from_toml_and_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[privacy]\ndp_clip = 1.0\ntarget_epsilon = 3.0\naccountant = 'pld'\nsampling = 'poisson'\n")
    assert load_toml(path)["privacy"] == {"dp_clip": 1.0, "target_epsilon": 3.0, "accountant": "pld", "sampling": "poisson"}
    args = build_parser().parse_args(["simulate", "--config", str(path), "--secagg", "--epsilon-budget", "4"])
    settings = _simulation_settings(args)
    assert settings["privacy"]["secagg"] is True and settings["privacy"]["epsilon_budget"] == 4.0
    assert SimulationConfig.from_dict(settings).privacy["dp_clip"] == 1.0
    with pytest.raises(ConfigError, match="adaptive clipping needs each client's clipped"):
        SimulationConfig(privacy={"dp_clip": 1.0, "dp_noise": 1.0, "adaptive_clip": True, "secagg": True})
    with pytest.raises(ConfigError, match="exactly one of dp_noise and target_epsilon"):
        SimulationConfig(privacy={"dp_clip": 1.0})


@pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="opacus (the dpsgd extra) is not installed")
def test_dpsgd_clients_report_epsilon_that_grows_with_their_steps():
    from fedlearn.privacy.dpsgd import DPSGDClient
    from fedlearn.torch import state_of

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    ledger: dict[str, int] = {}

    def model_fn():
        torch.manual_seed(0)
        return torch.nn.Linear(5, 2)

    client = DPSGDClient("a", model_fn, x, y, batch_size=16, lr=0.5, local_epochs=1, noise_multiplier=1.0,
                         max_grad_norm=1.0, delta=1e-5, ledger=ledger)
    state = state_of(model_fn())
    first = client.fit(state, {"round": 1})
    second = client.fit(state, {"round": 2})
    assert ledger["a"] == 8
    assert first.metrics["dpsgd_epsilon"] == pytest.approx(SampledGaussian(1.0, 64, 16, "poisson").epsilon(4, 1e-5))
    assert second.metrics["dpsgd_epsilon"] > first.metrics["dpsgd_epsilon"]
    assert np.linalg.norm(first.delta) > 0
