"""The robustness settings of a run applied to an app: attackers with their poisoned data and forged updates,
the robust aggregator in the app's strategy (FLTrust with its root dataset), the anomaly checks, and the
central evaluation (with the backdoor success rate when a backdoor is planted)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..aggregators import make_aggregator, min_updates, use_aggregator
from ..aggregators.fltrust import RootUpdate
from ..app import TRAINING_KEYS, App
from ..attacks import Attack, Backdoor, choose_attackers, make_attack
from ..config import ConfigError, SimulationConfig
from ..data import FederatedDataset
from ..params import Layout
from ..server.anomaly import AnomalyChecks, make_anomaly_checks
from ..server.round_loop import CentralEval
from ..strategies.base import Aggregator, Strategy
from ..torch import TorchClient, state_of

FLTRUST_ROOT_SIZE = 100  # the FLTrust paper's default root dataset size


@dataclass
class Robustness:
    """What `robustness_setup` built."""

    app: App  # the attackers' training data poisoned; the central evaluation measures a planted backdoor
    strategy: Strategy  # the app's strategy, its mean replaced by the robust aggregator if one is set
    min_clients: int
    transforms: list[Attack]
    anomaly_checks: AnomalyChecks | None


def robustness_setup(cfg: SimulationConfig, app: App, population: int) -> Robustness:
    """Apply the aggregator, attack and anomaly settings of `cfg` to `app` (with `population` clients)."""
    strategy = app.build_strategy()
    aggregator = _aggregator(cfg, app) if cfg.aggregator else None
    needed = 1
    if aggregator is not None:
        try:
            use_aggregator(strategy, aggregator, cfg.aggregator)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        needed = min_updates(aggregator)
    cohort = cfg.clients_per_round or max(1, round((cfg.fraction or 1.0) * population))
    if cohort < needed:
        raise ConfigError(f"aggregator {cfg.aggregator!r} with {cfg.aggregator_params} needs at least {needed} updates "
                          f"per round, but only {cohort} clients are sampled per round; sample more clients "
                          "(--clients-per-round) or lower f")
    attacks: list[Attack] = []
    if cfg.attack:
        data = _data(app, f"attack {cfg.attack!r}")
        attackers = choose_attackers(data.client_ids, cfg.attack_fraction, cfg.seed)
        attack = make_attack(cfg.attack, attackers, seed=cfg.seed, **cfg.attack_params)
        central_eval = app.central_eval
        if isinstance(attack, Backdoor):
            assert app.model_fn is not None
            success = attack.success_evaluator(app.model_fn, *data.test)
            central_eval = success if central_eval is None else _merged(central_eval, success)
        app = replace(app, data=replace(data, clients=attack.poison_clients(data.clients, data.num_classes)),
                      central_eval=central_eval)
        attacks.append(attack)
    return Robustness(app, strategy, max(cfg.min_clients, needed), attacks,
                      make_anomaly_checks(cfg.anomaly_checks, **cfg.anomaly_params))


def _data(app: App, what: str) -> FederatedDataset:
    """The app's data, which `what` needs (it poisons or samples clients' data)."""
    if app.data is None or app.client_fn is not None or app.model_fn is None:
        raise ConfigError(f"{what} needs an app built from a FederatedDataset and a model_fn (App.from_data)")
    return app.data


def _aggregator(cfg: SimulationConfig, app: App) -> Aggregator:
    params = dict(cfg.aggregator_params)
    if cfg.aggregator.lower() == "fltrust":
        root_size = int(params.pop("root_size", FLTRUST_ROOT_SIZE))
        params["root_update"] = fltrust_root_update(cfg, app, root_size)
    return make_aggregator(cfg.aggregator, **params)


def fltrust_root_update(cfg: SimulationConfig, app: App, root_size: int) -> RootUpdate:
    """The server's update on `root_size` clean samples drawn from the union of the clients' training data
    (as in the FLTrust paper), trained like a client of this run."""
    data, model_fn = _data(app, "the fltrust aggregator"), app.model_fn
    assert model_fn is not None
    x = np.concatenate([x for x, _ in data.clients.values()])
    y = np.concatenate([y for _, y in data.clients.values()])
    if not 1 <= root_size <= len(y):
        raise ConfigError(f"FLTrust root_size must be between 1 and {len(y)} (the clients' samples), got {root_size}")
    chosen = np.random.default_rng([cfg.seed, 17]).choice(len(y), size=root_size, replace=False)
    server = TorchClient("fltrust-root", model_fn, x[chosen], y[chosen],
                         **{k: app.fit_config[k] for k in TRAINING_KEYS if k in app.fit_config})
    layout = Layout.of(state_of(model_fn()))

    def root_update(params: np.ndarray) -> np.ndarray:
        return server.fit(layout.unflatten(params), {"seed": cfg.seed}).delta

    return root_update


def _merged(*evaluators: CentralEval) -> CentralEval:
    """One central evaluation reporting the metrics of all of `evaluators`."""
    return lambda state: {k: v for evaluate in evaluators for k, v in evaluate(state).items()}
