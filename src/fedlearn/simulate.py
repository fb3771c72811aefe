"""Front door for simulations: `simulate(config, app=...)` with the run settings of a config (on an app, or
on a built-in task), `run_simulation(...)` for an app or its parts in Python. Both run the same `Server`
round loop over an in-process pool and write a run directory (SQLite store, final model, metrics CSV, plot)."""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .aggregators import make_aggregator, use_aggregator
from .app import App, app_from_settings
from .client import Client
from .config import ConfigError, SimulationConfig
from .contributions import ContributionAccounting
from .data import FederatedDataset, federate, load_breast_cancer, load_digits, load_femnist_npz, load_leaf_json, make_synthetic
from .messages import Handler
from .report import plot, write_csv
from .serialize import encode_state
from .privacy import PrivacyConfig, build_privacy
from .server import ClientSampler, History, RunStore, Server
from .server.store import stored_config
from .server.anomaly import AnomalyChecks
from .server.protocol import RoundProtocol
from .server.round_loop import CentralEval
from .server.sampling import PoissonSampler
from .compression.settings import CompressionSettings
from .simulation import FaultInjector, WirePool
from .simulation.backends import make_pool
from .simulation.robustness import robustness_setup
from .strategies import Aggregator, Strategy, make_strategy
from .torch.models import build_model
from .transforms.base import Transform
from .types import State

FINAL_MODEL = "final_model.flt"
BUILTIN_TRAINING = ("local_epochs", "batch_size", "lr", "momentum")
# Settings of the built-in task, which an app replaces: setting one of them beside an app is a mistake.
TASK_SETTINGS = ("dataset", "data_path", "partition", "alpha", "shards_per_client", "sigma", "num_clients",
                 "synthetic_alpha", "synthetic_beta", "model", "strategy", "strategy_params", *BUILTIN_TRAINING)
log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What a finished run returns: its `history` (every round's metrics, see `History`), the final global
    model `final_state`, the run directory (None when nothing was written) and the wall-clock `seconds`."""

    history: History
    final_state: State
    run_dir: Path | None
    seconds: float

    @property
    def accuracy(self) -> float:
        """The last round's accuracy of the server's central evaluation (``test_accuracy``), else of the
        clients' federated evaluation (``fed_accuracy``); NaN when the run measured neither."""
        last = self.history.last
        return last.get("test_accuracy", last.get("fed_accuracy", float("nan")))

    def summary(self) -> str:
        """The line the front doors end with: the final accuracy, saying which evaluation measured it (the
        server's test set, or the clients' own data when the server holds none), its loss and the time."""
        last = self.history.last
        if "test_accuracy" in last or "fed_accuracy" not in last:
            return (f"final test accuracy: {self.accuracy:.4f}  "
                    f"(test loss {last.get('test_loss', float('nan')):.4f}, {self.seconds:.1f}s)")
        return (f"final accuracy (clients' evaluation): {self.accuracy:.4f}  "
                f"(loss {last.get('fed_loss', float('nan')):.4f}, {self.seconds:.1f}s)")


def load_task_data(cfg: SimulationConfig) -> FederatedDataset:
    """The configured data set, split over clients."""
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.synthetic_alpha, cfg.synthetic_beta, cfg.num_clients, seed=cfg.seed)
    if cfg.dataset == "femnist":
        return load_femnist_npz(cfg.data_path)
    if cfg.dataset == "leaf":
        return load_leaf_json(cfg.data_path, seed=cfg.seed)
    central = load_digits(seed=0) if cfg.dataset == "digits" else load_breast_cancer(seed=0)
    kwargs = {"dirichlet": {"alpha": cfg.alpha}, "shards": {"shards_per_client": cfg.shards_per_client},
              "quantity": {"sigma": cfg.sigma}}.get(cfg.partition, {})
    return federate(central, cfg.partition, cfg.num_clients, seed=cfg.seed, **kwargs)


def builtin_app(cfg: SimulationConfig) -> App:
    """The built-in task of `cfg` (data set, model, strategy, client training settings) as an ordinary app."""
    data = load_task_data(cfg)
    in_features = int(torch.tensor(data.input_shape).prod())

    def model_fn() -> torch.nn.Module:
        return build_model(cfg.model, in_features, data.num_classes)

    return App.from_data(data, model_fn, strategy=cfg.strategy, strategy_params=dict(cfg.strategy_params),
                         fit_config={k: getattr(cfg, k) for k in BUILTIN_TRAINING})


def task_app(cfg: SimulationConfig, app: App | None = None) -> App:
    """The task of a run: `app`, else the app named in `cfg.app` ([app], --app), else the built-in task of
    `cfg`. Built-in task settings next to an app are refused: they would be silently ignored."""
    if app is None and not cfg.app:
        return builtin_app(cfg)
    defaults = SimulationConfig()
    changed = [name for name in TASK_SETTINGS if getattr(cfg, name) != getattr(defaults, name)]
    if changed:
        raise ConfigError(f"the app defines the task, so these settings would be ignored: {', '.join(changed)}; "
                          "remove them (data, model, strategy and client training belong to the app)")
    return app if app is not None else app_from_settings(cfg.app)


def simulate(
    config: SimulationConfig | dict[str, Any] | None = None,
    *,
    app: App | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
) -> SimulationResult:
    """Run a simulation with the run settings of `config` (rounds, sampling, faults, robustness, privacy,
    backend) on `app`, or on the built-in task `config` describes when no app is given. With `resume`,
    continue the run stored in `run_dir` from its last round: with its stored configuration when `config`
    is None (an app named in it is loaded again; an `app` object must be given again), or with `config`,
    which may differ from it only in a higher `rounds`. Without `resume`, a `run_dir` holding a run of
    another configuration is refused."""
    if resume:
        if run_dir is None:
            raise ConfigError("cannot resume without the run directory (run_dir)")
        config = stored_config(run_dir) if config is None else config
    cfg = config if isinstance(config, SimulationConfig) else SimulationConfig.from_dict(dict(config or {}))
    app = task_app(cfg, app)
    client_ids = app.simulated_client_ids
    robust = robustness_setup(cfg, app, len(client_ids))
    if cfg.asynchronous:
        return simulate_async(cfg, robust.app, robust.strategy, robust.transforms, robust.anomaly_checks,
                              run_dir=run_dir, resume=resume, show_progress=show_progress)
    privacy = build_privacy(PrivacyConfig.from_dict(cfg.privacy), client_ids=client_ids,
                            cohort=ClientSampler(cfg.clients_per_round, cfg.fraction).size(len(client_ids)),
                            rounds=cfg.rounds, strategy=robust.strategy, seed=cfg.seed)
    for line in privacy.summary:
        log.info("privacy: %s", line)
        if show_progress:
            print(f"privacy: {line}")
    # secure aggregation hides individual updates, so the anomaly checks have nothing to screen
    anomaly_checks = None if privacy.protocol is not None else robust.anomaly_checks
    compression = CompressionSettings.from_dict(cfg.compression)  # validated with the config
    if compression.measured and privacy.protocol is not None:
        raise ConfigError("[compression] measures and compresses individual updates; a simulation with secure "
                          "aggregation or HE ([privacy]) has none: remove one of the two")
    return run_simulation(
        app=robust.app, strategy=robust.strategy,
        rounds=cfg.rounds, clients_per_round=cfg.clients_per_round, fraction=cfg.fraction,
        min_clients=robust.min_clients, eval_clients=cfg.eval_clients, max_examples=cfg.max_examples,
        transforms=[*robust.transforms, *privacy.transforms, *([compression.uplink] if compression.uplink else [])],
        anomaly_checks=anomaly_checks, protocol=privacy.protocol, handlers=privacy.handlers, sampler=privacy.sampler,
        faults=FaultInjector(cfg.crash_rate, cfg.drop_rate, cfg.straggler_rate, seed=cfg.seed),
        seed=cfg.seed, run_dir=run_dir, run_config=cfg.to_dict(), resume=resume, show_progress=show_progress,
        backend=cfg.backend, ray_address=cfg.ray_address or None,
        contributions=contribution_accounting(cfg, app, privacy.protocol is not None or bool(privacy.transforms)),
        wire=compression if compression.measured else None,
    )


def simulate_async(cfg: SimulationConfig, app: App, strategy: Strategy, transforms: Sequence[Transform],
                   anomaly_checks: AnomalyChecks | None, *, run_dir: str | Path | None = None, resume: bool = False,
                   show_progress: bool = False) -> SimulationResult:
    """FedBuff (`AsyncServer`) on the virtual clock of the [async] fleet: `cfg.rounds` server steps, each
    committed to the run store in `run_dir` (a run of the same configuration there is resumed exactly)."""
    from .server.async_loop import AsyncServer
    from .simulation.clock import VirtualClock
    from .simulation.clocked import VirtualExecutor

    settings = cfg.async_config()
    assert settings is not None
    client_ids = app.simulated_client_ids
    faults = FaultInjector(cfg.crash_rate, cfg.drop_rate, cfg.straggler_rate, seed=cfg.seed)
    pool = make_pool(cfg.backend, app.client, client_ids, faults, ray_address=cfg.ray_address or None)
    store = None
    start = time.perf_counter()
    try:
        if run_dir is not None:
            store = RunStore(run_dir)
            store.bind_config(cfg.to_dict(), resume=resume)
        server = AsyncServer(
            VirtualExecutor(pool, VirtualClock(settings.fleet(cfg.seed))), strategy, app.initial(cfg.seed),
            **settings.settings().server_args(), transforms=transforms, anomaly_checks=anomaly_checks,
            central_eval=app.central_eval, store=store, seed=cfg.seed,
            max_examples=cfg.max_examples, fit_config=app.fit_config)
        history = _drive(server, cfg.rounds, show_progress)
    finally:
        pool.close()
        if store is not None:
            store.close()
    return _result(history, server.state, run_dir, start)


def contribution_accounting(cfg: SimulationConfig, app: App, private: bool) -> ContributionAccounting | None:
    """The configured contribution accounting with the app's central evaluation (held-out data), or None when
    it is off. Refused with secure aggregation (no individual updates to score) and DP (scores of raw updates
    would leak)."""
    if not cfg.contributions:
        return None
    if private:
        raise ConfigError("contribution accounting scores individual updates, which secure aggregation hides and "
                          "differential privacy must not publish; turn off [contributions] or [privacy]")
    if app.central_eval is None:
        raise ConfigError("contribution accounting needs held-out data on the server: the app's central_eval")
    try:
        return ContributionAccounting(app.central_eval, seed=cfg.seed, **cfg.contributions)
    except TypeError as exc:
        raise ConfigError(f"bad [contributions] setting: {exc}") from None


def run_simulation(
    client_fn: Callable[[str], Client] | None = None,
    client_ids: Sequence[str] | None = None,
    model_fn: Callable[[], torch.nn.Module] | None = None,
    *,
    app: App | None = None,
    data: FederatedDataset | None = None,
    initial_state: State | None = None,
    strategy: Strategy | str | None = None,
    aggregator: Aggregator | str | None = None,
    rounds: int = 10,
    clients_per_round: int | None = None,
    fraction: float | None = None,
    min_clients: int = 1,
    max_failed_rounds: int = 3,
    eval_clients: int = 0,
    max_examples: int | None = None,
    central_eval: CentralEval | None = None,
    faults: FaultInjector | None = None,
    transforms: Sequence[Transform] = (),
    anomaly_checks: AnomalyChecks | None = AnomalyChecks(),
    protocol: RoundProtocol | None = None,
    handlers: dict[str, Handler] | None = None,
    sampler: ClientSampler | PoissonSampler | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
    run_config: dict[str, Any] | None = None,
    resume: bool = False,
    show_progress: bool = False,
    backend: str = "sequential",
    ray_address: str | None = None,
    contributions: ContributionAccounting | None = None,
    wire: CompressionSettings | None = None,
) -> SimulationResult:
    """Simulate federated training. The task is an `app` (see `fedlearn.App`), or is given by its parts:
    `data` (a `FederatedDataset`) and `model_fn` are enough (a `TorchClient` per client, central evaluation
    on `data.test`), or any clients as `client_fn(cid)` over `client_ids` with `model_fn` or `initial_state`.
    `strategy` (an object or a registered name such as "fedyogi") and `central_eval` replace the app's;
    `aggregator` (a callable or a registered name such as "median", see `fedlearn.aggregators`) replaces the
    strategy's weighted mean.

    The initial model is `initial_state`, or `model_fn()` built under `torch.manual_seed(seed)`. Samples all
    clients each round unless a count or fraction is given.
    With `run_dir`, every round is committed to a run store there, and a run of the same configuration already
    in it is resumed; another configuration is refused (`RunDirConflict`), and `resume=True` may only raise
    `rounds`. The configuration is `run_config` (a front door's settings), or else `Server.describe()` with the
    rounds and client ids.
    `anomaly_checks` screens every update before aggregation (pass None to turn the screening off);
    `max_examples` caps the example count (aggregation weight) any client may claim.
    A multi-stage `protocol` (secure aggregation) needs its client-side `handlers`; `sampler` replaces the
    count / fraction sampler (e.g. Poisson sampling for DP). `backend` picks where clients train
    (sequential, vectorized, process, ray; see `fedlearn.simulation.backends`), `ray_address` a Ray cluster.
    `contributions` scores each round's accepted updates into the run store's contribution ledger.
    With `wire`, every message goes through the real wire format (`WirePool`, with its downlink compression;
    add its uplink compression to `transforms`), and each round records ``bytes_up`` and ``bytes_down``.
    Metric names: see `fedlearn.metrics`."""
    app = _simulation_app(app, data, client_fn, client_ids, model_fn, initial_state)
    strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy or app.build_strategy()
    if aggregator is not None:
        name = aggregator if isinstance(aggregator, str) else getattr(aggregator, "__name__", type(aggregator).__name__)
        strategy = copy.copy(strategy)  # the caller's (or the app's) strategy object keeps its own aggregator
        use_aggregator(strategy, make_aggregator(aggregator) if isinstance(aggregator, str) else aggregator, name)
    client_ids = app.simulated_client_ids
    if clients_per_round is None and fraction is None:
        fraction = 1.0
    sampler = sampler or ClientSampler(clients_per_round, fraction, seed=seed)
    if isinstance(sampler, ClientSampler):
        sampler.size(len(client_ids))  # refuse more clients per round than there are, before any work
    pool = make_pool(backend, app.client, client_ids, faults, handlers=handlers, ray_address=ray_address,
                     transforms=transforms)
    if wire is not None:
        pool = WirePool(pool, downlink=wire.downlink)
    server = Server(
        pool, strategy, app.initial(seed), sampler=sampler, min_clients=min_clients,
        max_failed_rounds=max_failed_rounds, anomaly_checks=anomaly_checks, protocol=protocol, max_examples=max_examples,
        transforms=transforms, central_eval=central_eval or app.central_eval, eval_clients=eval_clients, seed=seed,
        contributions=contributions, fit_config=app.fit_config, evaluate_metrics=app.evaluate_metrics,
    )
    store = None
    start = time.perf_counter()
    try:
        if run_dir is not None:
            store = RunStore(run_dir)
            store.bind_config(run_config or {**server.describe(), "rounds": rounds, "clients": sorted(client_ids)},
                              resume=resume)
            server.attach(store)
        history = _drive(server, rounds, show_progress)
    finally:
        pool.close()
        if store is not None:
            store.close()
    return _result(history, server.state, run_dir, start)


def _drive(server: Server | Any, rounds: int, show_progress: bool) -> History:
    """Run `server` (the round loop or the asynchronous driver) to `rounds`, with a progress bar if asked."""
    if not show_progress:
        return server.run(rounds)
    from .progress import RoundProgress  # rich takes a noticeable part of start-up; only a bar needs it

    with RoundProgress(rounds, server.round) as progress:
        return server.run(rounds, [progress])


def _result(history: History, state: State, run_dir: str | Path | None, start: float) -> SimulationResult:
    """The finished run, with its outputs written to the run directory if there is one."""
    result = SimulationResult(history, state, Path(run_dir) if run_dir else None, time.perf_counter() - start)
    if result.run_dir is not None:
        write_outputs(result)
    return result


def _simulation_app(app: App | None, data: FederatedDataset | None, client_fn: Callable[[str], Client] | None,
                    client_ids: Sequence[str] | None, model_fn: Callable[[], torch.nn.Module] | None,
                    initial_state: State | None) -> App:
    """The app `run_simulation` runs: the one given, or one made of the given parts."""
    parts = {"data": data, "client_fn": client_fn, "client_ids": client_ids, "model_fn": model_fn,
             "initial_state": initial_state}
    if app is not None:
        given = [name for name, value in parts.items() if value is not None]
        if given:
            raise ValueError(f"give either app or its parts, not both (also given: {', '.join(given)})")
        return app
    if data is not None:
        if client_fn is not None or client_ids is not None:
            raise ValueError("give data, or client_fn with client_ids, not both")
        if model_fn is None:
            raise ValueError("run_simulation(data=...) needs model_fn, the model every client trains")
        return App.from_data(data, model_fn, initial_state=initial_state)
    if client_fn is None or not client_ids:
        raise ValueError("say where the clients come from: data=FederatedDataset, or client_fn and client_ids")
    if model_fn is None and initial_state is None:
        raise ValueError("give model_fn or initial_state for the initial global model")
    return App(model_fn=model_fn, initial_state=initial_state, client_fn=client_fn, client_ids=list(client_ids))


def write_outputs(result: SimulationResult) -> None:
    """Final model (fedlearn tensor format, no pickle), metrics CSV and plot into the run directory."""
    assert result.run_dir is not None
    (result.run_dir / FINAL_MODEL).write_bytes(encode_state(result.final_state))
    write_csv(result.history.rounds, result.run_dir / "metrics.csv")
    plot(result.history.rounds, result.run_dir / "metrics.png")
