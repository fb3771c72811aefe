"""Central and local DP calibration pinned to hand computations, and the accountant pinned to dp-accounting
called directly with its own inputs: noise std z*C with C != 1, the fixed (expected-cohort) denominator when
clients drop out, the clip tolerance, the rounding slack, adaptive clipping's two formulas, the fixed-size
cohort accountant, and the cohort size that `simulate` hands the accountant."""
from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedlearn import simulate
from fedlearn.privacy import (AdaptiveClipping, CentralDP, LocalDP, PrivacyBudgetError, SampledGaussian,
                              affordable_rounds, clip_l2, gaussian_epsilon, noise_for_epsilon)
from fedlearn.privacy.central import CLIP_KEY, UNCLIPPED_KEY, clip_to_server_norm
from fedlearn.types import Update

DELTA = 1e-5


def _raw(i: int, dim: int, norm: float) -> np.ndarray:
    """A fixed random direction with L2 norm `norm`."""
    v = np.random.default_rng(100 + i).normal(size=dim)
    return v * (norm / np.linalg.norm(v))


def _clipped_round(dp: CentralDP, raws: list[np.ndarray], clip: float) -> np.ndarray:
    """The server's path for one round: client halves, server half, equal-weight mean, finalize."""
    updates = [dp.client(Update(str(i), 1, r, 37), {CLIP_KEY: clip}) for i, r in enumerate(raws)]
    kept, refused = dp.server(updates, 1)
    assert not refused and all(u.num_examples == 1 for u in kept)  # equal weights, whatever the data size
    mean = np.mean([u.delta for u in kept], axis=0)
    return dp.finalize(mean, kept, 1)


def _rdp_epsilon(event, rounds: int, relation) -> float:
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(DELTA)


# ---------------------------------------------------------------- the client half

def test_client_half_clips_to_the_norm_the_server_sent_and_reports_the_unclipped_bit():
    big, small = _raw(0, 30, 7.0), _raw(1, 30, 1.0)
    out = clip_to_server_norm(Update("a", 1, big, 5), {CLIP_KEY: 2.5})
    np.testing.assert_allclose(out.delta, big * (2.5 / 7.0), rtol=1e-12)  # same direction, norm exactly C
    assert out.metrics[UNCLIPPED_KEY] == 0.0
    kept = clip_to_server_norm(Update("b", 1, small, 5), {CLIP_KEY: 2.5})
    np.testing.assert_array_equal(kept.delta, small)
    assert kept.metrics[UNCLIPPED_KEY] == 1.0
    edge, within = clip_l2(_raw(2, 30, 2.5), 2.5)  # exactly at the bound: not clipped
    assert within and np.linalg.norm(edge) == pytest.approx(2.5, rel=1e-12)
    with pytest.raises(ValueError, match="server sent no clip norm"):
        clip_to_server_norm(Update("a", 1, big, 5), {})


# ---------------------------------------------------------------- the server halves

def test_denominator_is_the_expected_cohort_even_when_clients_drop_out():
    """Without noise the output is exactly sum(clipped) / expected cohort: 8 survivors of an expected 10."""
    clip, dim = 2.5, 50
    dp = CentralDP(clip, SampledGaussian(0.0, 100, 10, "fixed"), DELTA)
    raws = [_raw(i, dim, 3.0 + i) for i in range(8)]  # every update above C, each clipped to norm C
    out = _clipped_round(dp, raws, clip)
    expected = sum(r * (clip / np.linalg.norm(r)) for r in raws) / 10
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert dp.rounds_spent == 1


def test_noise_std_is_z_times_clip_over_the_expected_cohort():
    clip, z, dim = 2.5, 1.5, 60_000
    dp = CentralDP(clip, SampledGaussian(z, 100, 10, "fixed"), DELTA, rng=np.random.default_rng(5))
    raws = [_raw(i, dim, 4.0) for i in range(8)]
    out = _clipped_round(dp, raws, clip)
    noise = out - sum(r * (clip / 4.0) for r in raws) / 10
    expected_std = 1.5 * 2.5 / 10  # z * C / expected cohort = 0.375
    assert abs(noise.std() / expected_std - 1) < 0.02
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(dim)
    assert dp.report(1)["dp_noise_std"] == pytest.approx(0.375, rel=1e-12)
    assert dp.report(1)["dp_clip"] == 2.5


def test_rounding_slack_widens_the_sensitivity():
    """Under secure aggregation each coordinate may be off by one quantisation step after clipping: the noise
    is calibrated to C + step * sqrt(d)."""
    clip, z, dim, step = 2.0, 0.8, 10_000, 0.01
    dp = CentralDP(clip, SampledGaussian(z, 50, 5, "fixed"), DELTA, rounding_step=step, rng=np.random.default_rng(3))
    raws = [_raw(i, dim, 0.5) for i in range(5)]
    out = _clipped_round(dp, raws, clip)
    expected_std = 0.8 * (2.0 + 0.01 * 100) / 5  # = 0.48
    assert dp.report(1)["dp_noise_std"] == pytest.approx(0.48, rel=1e-12)
    assert abs((out - sum(raws) / 5).std() / expected_std - 1) < 0.03


def test_server_refuses_updates_above_the_clip_norm_beyond_float_tolerance():
    clip = 2.5
    dp = CentralDP(clip, SampledGaussian(1.0, 100, 10, "fixed"), DELTA)
    at, rounding, over = (Update(c, 1, _raw(i, 40, n), 9) for i, (c, n) in
                          enumerate([("at", clip), ("rounding", clip * (1 + 1e-7)), ("over", clip * (1 + 1e-5))]))
    kept, refused = dp.server([at, rounding, over], 1)
    assert [u.client_id for u in kept] == ["at", "rounding"]  # float32 transport of a clipped delta: ~1e-7 over
    assert np.linalg.norm(kept[1].delta) == pytest.approx(clip, rel=1e-12)  # projected back onto the ball
    assert [f.client_id for f in refused] == ["over"] and "exceeds the DP clip norm 2.5" in refused[0].reason
    unverified = CentralDP(clip, SampledGaussian(1.0, 100, 10, "fixed"), DELTA, verify_clipping=False)
    assert len(unverified.server([over], 1)[0]) == 1  # secure aggregation: masked updates are not checked


@pytest.mark.parametrize("clip, delta, message", [(0.0, DELTA, "clip norm must be a positive number"),
                                                  (math.inf, DELTA, "clip norm must be a positive number"),
                                                  (1.0, 1.0, "delta must be in")])
def test_central_dp_refuses_bad_settings(clip, delta, message):
    with pytest.raises(ValueError, match=message):
        CentralDP(clip, SampledGaussian(1.0, 100, 10, "fixed"), delta)


def test_configure_sends_the_clip_norm_and_report_counts_noised_rounds():
    mech = SampledGaussian(1.1, 200, 20, "fixed")
    dp = CentralDP(3.0, mech, DELTA, rng=np.random.default_rng(0))
    assert dp.configure(1) == {CLIP_KEY: 3.0}
    for rnd in (1, 2):
        _clipped_round(dp, [_raw(i, 10, 1.0) for i in range(3)], 3.0)
    report = dp.report(2)
    assert report["dp_rounds"] == 2.0 and "dp_clip_next" not in report
    assert report["dp_epsilon"] == pytest.approx(
        _rdp_epsilon(dp_accounting.SampledWithoutReplacementDpEvent(200, 20, dp_accounting.GaussianDpEvent(0.55)), 2,
                     dp_accounting.NeighboringRelation.REPLACE_ONE), rel=1e-9)


# ---------------------------------------------------------------- adaptive clipping

def test_adaptive_clipping_splits_the_noise_budget_as_andrew_et_al_theorem_1():
    clipping = AdaptiveClipping(quantile=0.6, lr=0.3)  # count noise std: expected / 20 = 2.5 for 50 clients
    assert clipping.update_noise_multiplier(1.2, 50.0) == pytest.approx((1.2**-2 - 5.0**-2) ** -0.5, rel=1e-12)
    assert AdaptiveClipping(count_noise=4.0).update_noise_multiplier(1.2, 50.0) == pytest.approx(
        (1.2**-2 - 8.0**-2) ** -0.5, rel=1e-12)
    with pytest.raises(ValueError, match="already spends the whole budget"):
        AdaptiveClipping(count_noise=0.5).update_noise_multiplier(1.0, 50.0)  # (2 * 0.5)^-2 = 1 >= 1^-2


def test_adaptive_clip_moves_geometrically_with_the_noised_unclipped_fraction():
    clipping = AdaptiveClipping(quantile=0.6, lr=0.3)
    draw = np.random.default_rng(7).normal(0.0, 2.5)  # count noise std 50 / 20
    fraction = (20 + draw) / 50
    got = clipping.next_clip(1.7, 20.0, 50.0, np.random.default_rng(7))
    assert got == pytest.approx(1.7 * math.exp(-0.3 * (fraction - 0.6)), rel=1e-12)


def test_central_dp_counts_unclipped_updates_for_the_next_clip_norm():
    """Two of five updates are within C: the next C follows the noised count 2, and is reported."""
    clip, dim = 2.0, 20
    adaptive = AdaptiveClipping(quantile=0.5, lr=0.2, count_noise=0.1)
    dp = CentralDP(clip, SampledGaussian(0.0, 100, 5, "fixed"), DELTA, adaptive=adaptive, rng=np.random.default_rng(11))
    raws = [_raw(i, dim, n) for i, n in enumerate([0.5, 1.5, 3.0, 4.0, 5.0])]
    _clipped_round(dp, raws, clip)
    rng = np.random.default_rng(11)
    rng.normal(0.0, 0.0, size=dim)  # the (zero) update noise is drawn first
    fraction = (2 + rng.normal(0.0, 0.1)) / 5
    assert dp.clip == pytest.approx(2.0 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
    report = dp.report(1)
    assert report["dp_clip"] == 2.0 and report["dp_clip_next"] == dp.clip
    resumed = CentralDP(clip, SampledGaussian(0.0, 100, 5, "fixed"), DELTA, adaptive=adaptive)

    class Record:
        metrics = report

    resumed.restore([Record()])
    assert resumed.clip == dp.clip and resumed.rounds_spent == 1


# ---------------------------------------------------------------- local DP with C != 1

def test_local_dp_noise_std_is_z_times_its_clip():
    clip, z, dim = 2.0, 0.7, 50_000
    ldp = LocalDP(clip, z, DELTA, rng=np.random.default_rng(9))
    raw = _raw(0, dim, 5.0)
    out = ldp.client(Update("a", 1, raw, 3), {})
    noise = out.delta - raw * (2.0 / 5.0)
    assert abs(noise.std() / 1.4 - 1) < 0.02
    ldp.client(Update("a", 2, raw, 3), {})
    again = ldp.client(Update("a", 3, raw, 3), {})
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(0.7), 3)
    assert again.metrics["ldp_epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert gaussian_epsilon(0.7, 0, DELTA) == 0.0 and gaussian_epsilon(0.0, 3, DELTA) == math.inf
    one = rdp.RdpAccountant()
    one.compose(dp_accounting.GaussianDpEvent(0.7), 1)
    assert gaussian_epsilon(0.7, 1, DELTA) == pytest.approx(one.get_epsilon(DELTA), rel=1e-9)
    with pytest.raises(ValueError, match="positive clip norm and noise multiplier"):
        LocalDP(2.0, 0.0, DELTA)


# ---------------------------------------------------------------- the accountant against dp-accounting

@pytest.mark.parametrize("z, population, cohort, rounds", [(1.3, 1000, 20, 50), (0.9, 60, 15, 7)])
def test_fixed_size_cohort_epsilon_equals_dp_accounting_called_directly(z, population, cohort, rounds):
    """Replace-one neighbours: the sum of clipped updates moves by up to 2C, so the Gaussian event has
    multiplier z / 2 (noise z*C over sensitivity 2C)."""
    event = dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, dp_accounting.GaussianDpEvent(z / 2))
    reference = _rdp_epsilon(event, rounds, dp_accounting.NeighboringRelation.REPLACE_ONE)
    got = SampledGaussian(z, population, cohort, "fixed", "rdp").epsilon(rounds, DELTA)
    assert got == pytest.approx(reference, rel=1e-9)
    assert 0 < got < math.inf


def test_poisson_epsilon_equals_dp_accounting_called_directly():
    z, population, cohort, rounds = 1.1, 500, 25, 40
    event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1))
    assert SampledGaussian(z, population, cohort, "poisson", "rdp").epsilon(rounds, DELTA) == pytest.approx(
        _rdp_epsilon(event, rounds, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE), rel=1e-9)
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    assert SampledGaussian(z, population, cohort, "poisson", "pld").epsilon(rounds, DELTA) == pytest.approx(
        acc.get_epsilon(DELTA), rel=1e-9)


def test_accountant_edges_and_affordable_rounds():
    mech = SampledGaussian(1.0, 50, 10, "poisson")
    assert mech.epsilon(0, DELTA) == 0.0
    assert SampledGaussian(0.0, 50, 10, "fixed").epsilon(1, DELTA) == math.inf
    budget = (mech.epsilon(4, DELTA) + mech.epsilon(5, DELTA)) / 2
    assert affordable_rounds(mech, budget, DELTA, 12) == 4
    assert affordable_rounds(mech, budget, DELTA, 3) == 3
    assert affordable_rounds(mech, mech.epsilon(4, DELTA), DELTA, 12) == 4  # exactly at the budget fits
    for bad, message in [(dict(cohort=0), "cohort 0 must be between 1"), (dict(cohort=51), "cohort 51 must be between"),
                         (dict(noise_multiplier=-0.1), "noise multiplier must be >= 0"),
                         (dict(sampling="shuffle"), "sampling must be one of"),
                         (dict(accountant="gdp"), "accountant must be one of")]:
        with pytest.raises(PrivacyBudgetError, match=message):
            SampledGaussian(**{"noise_multiplier": 1.0, "population": 50, "cohort": 10, **bad})


# ---------------------------------------------------------------- simulate hands the accountant the real cohort

QUICK = {"dataset": "breast_cancer", "num_clients": 20, "rounds": 2, "local_epochs": 1, "eval_clients": 0,
         "model": "logreg", "seed": 3}


@pytest.mark.parametrize("sampling_keys, sampling, cohort", [
    ({"fraction": 0.25, "clients_per_round": None}, "fixed", 5),
    ({"clients_per_round": 4}, "fixed", 4),
    ({"clients_per_round": 4}, "poisson", 4),
])
def test_simulate_accounts_with_the_real_cohort_size(sampling_keys, sampling, cohort):
    result = simulate({**QUICK, **sampling_keys, "privacy": {"dp_clip": 0.7, "dp_noise": 1.2, "sampling": sampling}})
    if sampling == "fixed":
        event = dp_accounting.SampledWithoutReplacementDpEvent(20, cohort, dp_accounting.GaussianDpEvent(0.6))
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    else:
        event = dp_accounting.PoissonSampledDpEvent(cohort / 20, dp_accounting.GaussianDpEvent(1.2))
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    stored = result.history.metric("dp_epsilon")
    assert stored == pytest.approx([_rdp_epsilon(event, t, relation) for t in (1, 2)], rel=1e-9)
    assert result.history.last["dp_noise_std"] == pytest.approx(1.2 * 0.7 / cohort, rel=1e-12)
    if sampling == "fixed":
        assert [r.metrics["clients_sampled"] for r in result.history.rounds] == [float(cohort)] * 2


def test_noise_for_a_target_epsilon_below_one_and_refusals():
    z = noise_for_epsilon(0.8, 10, DELTA, population=100, cohort=10, sampling="poisson")
    assert SampledGaussian(z, 100, 10, "poisson").epsilon(10, DELTA) <= 0.8
    assert SampledGaussian(z * 0.995, 100, 10, "poisson").epsilon(10, DELTA) > 0.8
    for target in (0.0, -1.0):
        with pytest.raises(PrivacyBudgetError, match="target epsilon must be > 0"):
            noise_for_epsilon(target, 10, DELTA, population=100, cohort=10)


# ---------------------------------------------------------------- settings and what build_privacy makes of them

@pytest.mark.parametrize("settings, message", [
    (dict(dp_clip=-1.0), "dp_clip must be >= 0"),
    (dict(dp_clip=1.0, dp_noise=-0.5), "dp_noise must be >= 0"),
    (dict(dp_clip=1.0, target_epsilon=0.0), "target_epsilon must be > 0"),
    (dict(dp_clip=1.0, dp_noise=1.0, epsilon_budget=0.0), "epsilon_budget must be > 0"),
    (dict(dp_delta=1.0), r"dp_delta must be in \(0, 1\)"),
    (dict(dp_delta=0.0), r"dp_delta must be in \(0, 1\)"),
    (dict(accountant="moments"), "accountant must be one of rdp, pld"),
    (dict(sampling="stratified"), "sampling must be one of poisson, fixed"),
    (dict(dp_clip=1.0, dp_noise=1.0, target_epsilon=2.0), "exactly one of dp_noise and target_epsilon"),
    (dict(dp_noise=1.0), "need dp_clip > 0"),
    (dict(adaptive_clip=True), "need dp_clip > 0"),
    (dict(epsilon_budget=3.0), "need dp_clip > 0"),
    (dict(local_dp_clip=1.0), "local DP needs both"),
    (dict(local_dp_noise=1.0), "local DP needs both"),
    (dict(secagg=True, secagg_range=0.0), "secagg_range must be > 0"),
])
def test_privacy_config_refuses_each_bad_setting(settings, message):
    from fedlearn.privacy import PrivacyConfig

    with pytest.raises(ValueError, match=message):
        PrivacyConfig(**settings)


def test_privacy_config_flags():
    from fedlearn.privacy import PrivacyConfig

    assert not PrivacyConfig().enabled and PrivacyConfig().sampling == "fixed"
    assert PrivacyConfig(dp_clip=1.0, dp_noise=1.0).central and PrivacyConfig(dp_clip=1.0, dp_noise=1.0).enabled
    assert PrivacyConfig(local_dp_clip=1.0, local_dp_noise=1.0).local
    assert PrivacyConfig(secagg=True).enabled and not PrivacyConfig(secagg=True).central
    assert PrivacyConfig.from_dict({"dp_clip": 2.0, "dp_noise": 0.5}).to_dict()["dp_clip"] == 2.0
    with pytest.raises(ValueError, match="privacy: "):
        PrivacyConfig.from_dict({"dp_clipp": 1.0})


IDS = [str(i) for i in range(40)]


def _build(**settings):
    from fedlearn.privacy import PrivacyConfig, build_privacy
    from fedlearn.strategies import make_strategy

    return build_privacy(PrivacyConfig(**settings), client_ids=IDS, cohort=8, rounds=6,
                         strategy=make_strategy("fedavg"), seed=4)


def test_build_privacy_makes_the_mechanism_of_the_settings():
    setup = _build(dp_clip=1.5, dp_noise=0.9, sampling="poisson", epsilon_budget=50.0)
    [dp] = setup.transforms
    assert isinstance(dp, CentralDP) and dp.clip == 1.5 and dp.budget == 50.0 and dp.rounding_step == 0.0
    assert dp.mechanism == SampledGaussian(0.9, 40, 8, "poisson", "rdp") and dp.verify_clipping
    assert setup.sampler is not None and setup.sampler.rate == 8 / 40 and setup.sampler.seed == 4
    assert setup.protocol is None and setup.handlers == {}
    assert "central DP: clip 1.5, noise multiplier 0.9" in setup.summary[0] and "poisson sampling of 8/40" in setup.summary[0]
    fixed = _build(dp_clip=1.5, dp_noise=0.9)
    assert fixed.sampler is None and fixed.transforms[0].mechanism.sampling == "fixed"


def test_build_privacy_with_a_target_epsilon_spends_it_in_the_planned_rounds():
    setup = _build(dp_clip=1.0, target_epsilon=4.0)
    [dp] = setup.transforms
    assert dp.budget == 4.0
    assert dp.epsilon(6) <= 4.0 < SampledGaussian(dp.mechanism.noise_multiplier * 0.99, 40, 8, "fixed").epsilon(6, 1e-5)
    assert not any("allows" in line for line in setup.summary)


def test_build_privacy_says_when_the_budget_cuts_the_run_short():
    mech = SampledGaussian(1.0, 40, 8, "fixed")
    budget = (mech.epsilon(2, 1e-5) + mech.epsilon(3, 1e-5)) / 2
    setup = _build(dp_clip=1.0, dp_noise=1.0, epsilon_budget=budget)
    assert setup.summary[-1] == f"the epsilon budget {budget:g} allows 2 of 6 rounds; the run stops there"


def test_build_privacy_with_secure_aggregation_widens_the_noise_by_one_quantisation_step():
    setup = _build(dp_clip=2.0, dp_noise=1.0, secagg=True)
    dp = setup.transforms[0]
    # clip range = the DP clip norm; levels such that twice the population's sum stays below 2**32 (the upper
    # half of the ring is headroom that exposes forged out-of-range inputs)
    levels = (2**32 - 1) // (2 * 40) + 1
    step = 2 * 2.0 / (levels - 1)
    assert dp.rounding_step == pytest.approx(step, rel=1e-12) and not dp.verify_clipping
    assert setup.protocol is not None and set(setup.handlers) and "clipped to +-2" in setup.summary[-1]
    plain = _build(secagg=True)
    assert plain.transforms == [] and "clipped to +-1" in plain.summary[-1]
    ranged = _build(secagg=True, secagg_range=0.3)
    assert "clipped to +-0.3" in ranged.summary[-1]


def test_build_privacy_adds_local_dp_and_adaptive_clipping():
    setup = _build(local_dp_clip=0.5, local_dp_noise=2.0)
    [ldp] = setup.transforms
    assert isinstance(ldp, LocalDP) and (ldp.clip, ldp.noise_multiplier, ldp.delta) == (0.5, 2.0, 1e-5)
    assert "local DP: clip 0.5, noise multiplier 2" in setup.summary[0]
    adaptive = _build(dp_clip=1.0, dp_noise=1.0, adaptive_clip=True, clip_quantile=0.7, clip_lr=0.1, count_noise=3.0)
    assert adaptive.transforms[0].adaptive == AdaptiveClipping(0.7, 0.1, 3.0)
    assert "clip 1 (adaptive)" in adaptive.summary[0]


def test_adaptive_clipping_settings_at_their_edges_are_refused():
    for quantile in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
            AdaptiveClipping(quantile=quantile)
    for bad, message in [(dict(lr=0.0), "clipping learning rate must be > 0"),
                         (dict(count_noise=0.0), "count noise must be > 0")]:
        with pytest.raises(ValueError, match=message):
            AdaptiveClipping(**bad)


def test_a_target_epsilon_below_one_is_a_valid_target_and_zero_is_not():
    from fedlearn.privacy import PrivacyConfig

    assert PrivacyConfig(dp_clip=1.0, target_epsilon=0.5).target_epsilon == 0.5  # strong privacy is allowed
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="target_epsilon must be > 0"):
            PrivacyConfig(dp_clip=1.0, target_epsilon=bad)
