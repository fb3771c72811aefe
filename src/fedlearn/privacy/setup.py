"""Turn `PrivacyConfig` into the objects a run needs: transforms, the secure-aggregation protocol with its
client handlers, and the client sampler; refuse combinations that would not give the promised guarantee."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..messages import Handler
from ..secagg.client import SecAggClient
from ..secagg.keys import Identities
from ..secagg.protocol import SecAggConfig, threshold_count
from ..secagg.server import SecAggProtocol, refuse_extras, refuse_strategy
from ..server.protocol import RoundProtocol
from ..server.sampling import PoissonSampler
from ..strategies.base import Strategy
from ..strategies.fedavg import weighted_mean
from ..transforms.base import Transform
from .accountant import PrivacyBudgetError, SampledGaussian, affordable_rounds, noise_for_epsilon
from .central import CentralDP
from .clipping import AdaptiveClipping
from .config import PrivacyConfig
from .local import LocalDP


@dataclass
class PrivacySetup:
    """What `build_privacy` made; `sampler` is None when the run's own fixed-size sampler is kept."""

    transforms: list[Transform] = field(default_factory=list)
    protocol: RoundProtocol | None = None
    handlers: dict[str, Handler] = field(default_factory=dict)
    sampler: PoissonSampler | None = None
    summary: list[str] = field(default_factory=list)


def build_privacy(cfg: PrivacyConfig, *, client_ids: Sequence[str], cohort: int, rounds: int, strategy: Strategy,
                  seed: int = 0, registry: Mapping[str, bytes] | None = None) -> PrivacySetup:
    """Objects for `cfg` in a run of `rounds` rounds sampling `cohort` of `client_ids` (the expected cohort
    under Poisson sampling). Raises `ValueError` (or `PrivacyBudgetError`) for a setting it cannot honour.

    `registry` (client id -> Ed25519 identity public key) is a deployment's PKI: the clients sign with their
    own identity keys, so no client handlers are made. Without it (simulation) fresh identities are made."""
    setup = PrivacySetup()
    if cfg.enabled:
        refuse_extras(strategy, "secure aggregation" if cfg.secagg else
                      "homomorphic-encryption aggregation" if cfg.he else "differential privacy")
    population = len(client_ids)
    if cfg.sampling == "poisson":
        setup.sampler = PoissonSampler(cohort / population, seed=seed)
    z = _noise_multiplier(cfg, population, cohort, rounds) if cfg.central else 0.0
    secagg = SecAggConfig(clip_range=cfg.secagg_range or _secagg_range(cfg, z, cohort), graph=cfg.secagg_graph,
                          degree=cfg.secagg_degree, threshold=cfg.secagg_threshold) if cfg.secagg else None
    if cfg.local:
        setup.transforms.append(LocalDP(cfg.local_dp_clip, cfg.local_dp_noise, cfg.dp_delta))
        setup.summary.append(f"local DP: clip {cfg.local_dp_clip:g}, noise multiplier {cfg.local_dp_noise:g} on every client")
    if cfg.central:
        setup.transforms.append(_central(cfg, z, population, cohort, rounds, strategy, secagg, setup.summary))
    if secagg is not None:
        refuse_strategy(strategy, "secure aggregation")
        if registry is None:
            identities = Identities.generate(client_ids)
            registry = identities.registry
            setup.handlers = SecAggClient(identities.sign, registry).handlers()
        noise = z if cfg.dp_distributed else 0.0
        setup.protocol = SecAggProtocol(secagg, registry, seed=seed, noise=noise)
        if cfg.dp_distributed:
            setup.summary.append(f"distributed DP: each client adds its share of noise multiplier {noise:.4g} inside "
                                 "secure aggregation, enough for the fewest survivors the round accepts; the server "
                                 "adds none and never holds an un-noised sum")
        setup.summary.append(f"secure aggregation: {secagg.graph} graph, threshold {secagg.threshold:g} of each "
                             f"neighbourhood and of the cohort (consistency quorum), coordinates clipped to +-{secagg.clip_range:g}; update anomaly checks are off "
                             "(they need individual updates)")
    if cfg.he:
        setup.protocol, setup.handlers = _he(cfg, strategy, registry is not None)
        setup.summary.append("homomorphic-encryption aggregation (CKKS): the server adds ciphertexts with the public "
                             "key only, contributors decrypt the sum; update anomaly checks are off")
    return setup


def _he(cfg: PrivacyConfig, strategy: Strategy, deployment: bool) -> tuple[RoundProtocol, dict[str, Handler]]:
    """The HE protocol; in a simulation a fresh key whose secret half goes to the client handlers, in a
    deployment the public context file named by `he_public_key` (clients load the secret one themselves)."""
    from ..he import HEClient, HEConfig, HEProtocol, create_keys  # TenSEAL is an optional dependency

    refuse_strategy(strategy, "homomorphic-encryption aggregation")
    config = HEConfig(weighted=not cfg.central)
    if deployment:
        if not cfg.he_public_key:
            raise ValueError("privacy: he needs he_public_key, the server's public context from `fedlearn he-keys`")
        return HEProtocol(config, Path(cfg.he_public_key).read_bytes()), {}
    secret, public = create_keys()
    return HEProtocol(config, public), HEClient(secret).handlers()


def _noise_multiplier(cfg: PrivacyConfig, population: int, cohort: int, rounds: int) -> float:
    """Central DP's noise multiplier: the configured one, or the least that keeps epsilon at the target."""
    if cfg.dp_noise is not None:
        return cfg.dp_noise
    return noise_for_epsilon(cfg.target_epsilon, rounds, cfg.dp_delta, population=population, cohort=cohort,
                             sampling=cfg.sampling, accountant=cfg.accountant)


def _central(cfg: PrivacyConfig, z: float, population: int, cohort: int, rounds: int, strategy: Strategy,
             secagg: SecAggConfig | None, summary: list[str]) -> CentralDP:
    if strategy.aggregator is not weighted_mean:
        name = getattr(strategy.aggregator, "__name__", type(strategy.aggregator).__name__)
        raise ValueError(f"central DP cannot be combined with the {name} aggregator: its noise is calibrated to the "
                         "sensitivity of the mean of clipped updates, and a robust aggregator has a different one. "
                         "Use the weighted mean; clipping already bounds each client's influence.")
    mechanism = SampledGaussian(z, population, cohort, cfg.sampling, cfg.accountant)
    budget = cfg.epsilon_budget or cfg.target_epsilon
    planned = mechanism.epsilon(rounds, cfg.dp_delta)
    summary.append(f"central DP: clip {cfg.dp_clip:g}{' (adaptive)' if cfg.adaptive_clip else ''}, noise multiplier "
                   f"{z:.4g}, epsilon {planned:.3f} at delta {cfg.dp_delta:g} after {rounds} rounds "
                   f"({cfg.accountant.upper()}, {cfg.sampling} sampling of {cohort}/{population} clients)")
    if budget is not None:
        affordable = affordable_rounds(mechanism, budget, cfg.dp_delta, rounds)
        if affordable == 0:
            raise PrivacyBudgetError(f"refusing to start: one round already costs epsilon "
                                     f"{mechanism.epsilon(1, cfg.dp_delta):.3f} > budget {budget:g}; raise the noise")
        if affordable < rounds:
            summary.append(f"the epsilon budget {budget:g} allows {affordable} of {rounds} rounds; the run stops there")
    adaptive = AdaptiveClipping(cfg.clip_quantile, cfg.clip_lr, cfg.count_noise) if cfg.adaptive_clip else None
    step = secagg.quantizer(population).step if secagg is not None else 0.0
    return CentralDP(cfg.dp_clip, mechanism, cfg.dp_delta, budget=budget, adaptive=adaptive,
                     verify_clipping=secagg is None, rounding_step=step, distributed=cfg.dp_distributed)


def _secagg_range(cfg: PrivacyConfig, z: float, cohort: int) -> float:
    """Per-coordinate clip range of secure aggregation: the DP clip norm (no coordinate of a clipped update is
    larger), widened under distributed DP by 10 std of a client's noise share so that noise is never clipped."""
    if not cfg.central:
        return 1.0
    if not cfg.dp_distributed:
        return cfg.dp_clip
    shares = threshold_count(cfg.secagg_threshold, cohort)  # the fewest survivors a round accepts
    return cfg.dp_clip * (1 + 10 * z / math.sqrt(shares))
