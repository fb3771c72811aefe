"""The robustness settings of a built-in simulation made into objects: attackers with their poisoned data
and forged updates, the robust aggregator (FLTrust with its root dataset), the anomaly checks, and the
central evaluation (with the backdoor success rate when a backdoor is planted)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..aggregators import make_aggregator, min_updates
from ..aggregators.fltrust import RootUpdate
from ..attacks import Attack, Backdoor, choose_attackers, make_attack
from ..config import ConfigError, SimulationConfig
from ..data import FederatedDataset
from ..params import Layout
from ..server.anomaly import AnomalyChecks, make_anomaly_checks
from ..server.round_loop import CentralEval
from ..strategies.base import Aggregator
from ..torch import TorchClient, state_of
from ..torch.train import central_evaluator

ModelFn = Callable[[], torch.nn.Module]
FLTRUST_ROOT_SIZE = 100  # the FLTrust paper's default root dataset size


@dataclass
class Robustness:
    """What `robustness_setup` built; `data` has the attackers' training data already poisoned."""

    data: FederatedDataset
    aggregator: Aggregator | None  # None keeps the strategy's own
    min_clients: int
    transforms: list[Attack]
    anomaly_checks: AnomalyChecks | None
    central_eval: CentralEval


def robustness_setup(cfg: SimulationConfig, data: FederatedDataset, model_fn: ModelFn) -> Robustness:
    """Turn the aggregator, attack and anomaly settings of `cfg` into objects for `run_simulation`."""
    aggregator = _aggregator(cfg, data, model_fn) if cfg.aggregator else None
    needed = min_updates(aggregator) if aggregator is not None else 1
    cohort = cfg.clients_per_round or max(1, round((cfg.fraction or 1.0) * cfg.num_clients))
    if cohort < needed:
        raise ConfigError(f"aggregator {cfg.aggregator!r} with {cfg.aggregator_params} needs at least {needed} updates "
                          f"per round, but only {cohort} clients are sampled per round; sample more clients "
                          "(--clients-per-round) or lower f")
    central_eval = central_evaluator(model_fn, *data.test)
    attacks: list[Attack] = []
    if cfg.attack:
        attackers = choose_attackers(data.client_ids, cfg.attack_fraction, cfg.seed)
        attack = make_attack(cfg.attack, attackers, seed=cfg.seed, **cfg.attack_params)
        data = replace(data, clients=attack.poison_clients(data.clients, data.num_classes))
        attacks.append(attack)
        if isinstance(attack, Backdoor):
            central_eval = _merged(central_eval, attack.success_evaluator(model_fn, *data.test))
    return Robustness(data, aggregator, max(cfg.min_clients, needed), attacks,
                      make_anomaly_checks(cfg.anomaly_checks, **cfg.anomaly_params), central_eval)


def _aggregator(cfg: SimulationConfig, data: FederatedDataset, model_fn: ModelFn) -> Aggregator:
    params = dict(cfg.aggregator_params)
    if cfg.aggregator.lower() == "fltrust":
        root_size = int(params.pop("root_size", FLTRUST_ROOT_SIZE))
        params["root_update"] = fltrust_root_update(cfg, data, model_fn, root_size)
    return make_aggregator(cfg.aggregator, **params)


def fltrust_root_update(cfg: SimulationConfig, data: FederatedDataset, model_fn: ModelFn, root_size: int) -> RootUpdate:
    """The server's update on `root_size` clean samples drawn from the union of the clients' training data
    (as in the FLTrust paper), trained like a client of this run."""
    x = np.concatenate([x for x, _ in data.clients.values()])
    y = np.concatenate([y for _, y in data.clients.values()])
    if not 1 <= root_size <= len(y):
        raise ConfigError(f"FLTrust root_size must be between 1 and {len(y)} (the clients' samples), got {root_size}")
    chosen = np.random.default_rng([cfg.seed, 17]).choice(len(y), size=root_size, replace=False)
    server = TorchClient("fltrust-root", model_fn, x[chosen], y[chosen], local_epochs=cfg.local_epochs,
                         batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum)
    layout = Layout.of(state_of(model_fn()))

    def root_update(params: np.ndarray) -> np.ndarray:
        return server.fit(layout.unflatten(params), {"seed": cfg.seed}).delta

    return root_update


def _merged(*evaluators: CentralEval) -> CentralEval:
    """One central evaluation reporting the metrics of all of `evaluators`."""
    return lambda state: {k: v for evaluate in evaluators for k, v in evaluate(state).items()}
