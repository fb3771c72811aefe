"""Front door for simulations: `simulate(config)` for the built-in tasks, `run_simulation(...)` for any
user-defined clients. Both run the same `Server` round loop over an in-process pool and write a run
directory (SQLite store, final model, metrics CSV, plot)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
from .simulation import FaultInjector
from .simulation.backends import make_pool
from .simulation.robustness import Robustness, robustness_setup
from .strategies import Strategy, make_strategy
from .torch import TorchClient, state_of
from .torch.models import build_model
from .transforms.base import Transform
from .types import State

FINAL_MODEL = "final_model.flt"
log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What a finished simulation returns."""

    history: History
    final_state: State
    run_dir: Path | None
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.history.last.get("test_accuracy", float("nan"))


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


@dataclass
class BuiltinTask:
    """A built-in task's parts, the same for a simulation and for a deployment's server and client processes."""

    cfg: SimulationConfig
    data: FederatedDataset
    model_fn: Callable[[], torch.nn.Module]
    robust: Robustness  # its `data` has the attackers' training data poisoned
    strategy: Strategy

    def client(self, cid: str) -> TorchClient:
        """Client `cid` on its partition, with the configured local training settings."""
        cfg = self.cfg
        x, y = self.robust.data.clients[cid]
        x_test, y_test = (self.data.client_test or {}).get(cid, (None, None))
        return TorchClient(cid, self.model_fn, x, y, x_test=x_test, y_test=y_test, local_epochs=cfg.local_epochs,
                           batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum)


def builtin_task(cfg: SimulationConfig) -> BuiltinTask:
    """Load the configured data; build the model factory, robustness settings and strategy."""
    data = load_task_data(cfg)
    in_features = int(torch.tensor(data.input_shape).prod())

    def model_fn() -> torch.nn.Module:
        return build_model(cfg.model, in_features, data.num_classes)

    robust = robustness_setup(cfg, data, model_fn)  # attackers' data poisoned, aggregator, anomaly checks
    strategy = make_strategy(cfg.strategy, **cfg.strategy_params)
    if robust.aggregator is not None:
        if not strategy.takes_aggregator:
            raise ConfigError(f"strategy {strategy.name!r} combines updates by its own rule and cannot use the "
                              f"{cfg.aggregator!r} aggregator; use fedavg, fedprox, a FedOpt strategy or scaffold")
        strategy.aggregator = robust.aggregator
    return BuiltinTask(cfg, data, model_fn, robust, strategy)


def initial_model_state(model_fn: Callable[[], torch.nn.Module], seed: int) -> State:
    """The initial global model: `model_fn()` built under `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return state_of(model_fn())


def simulate(
    config: SimulationConfig | dict[str, Any] | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
) -> SimulationResult:
    """Run a built-in simulation. With `resume`, continue the run stored in `run_dir` from its last round:
    with its stored configuration when `config` is None, or with `config`, which may differ from it only in a
    higher `rounds`. Without `resume`, a `run_dir` holding a run of another configuration is refused."""
    if resume:
        if run_dir is None:
            raise ConfigError("cannot resume without the run directory (run_dir)")
        config = stored_config(run_dir) if config is None else config
    cfg = config if isinstance(config, SimulationConfig) else SimulationConfig.from_dict(dict(config or {}))
    task = builtin_task(cfg)
    robust = task.robust
    privacy = build_privacy(PrivacyConfig.from_dict(cfg.privacy), client_ids=task.data.client_ids,
                            cohort=ClientSampler(cfg.clients_per_round, cfg.fraction).size(len(task.data.client_ids)),
                            rounds=cfg.rounds, strategy=task.strategy, seed=cfg.seed)
    for line in privacy.summary:
        log.info("privacy: %s", line)
        if show_progress:
            print(f"privacy: {line}")
    # secure aggregation hides individual updates, so the anomaly checks have nothing to screen
    anomaly_checks = None if privacy.protocol is not None else robust.anomaly_checks
    return run_simulation(
        task.client, task.data.client_ids, task.model_fn, strategy=task.strategy,
        rounds=cfg.rounds, clients_per_round=cfg.clients_per_round, fraction=cfg.fraction,
        min_clients=robust.min_clients, eval_clients=cfg.eval_clients, max_examples=cfg.max_examples,
        central_eval=robust.central_eval, transforms=[*robust.transforms, *privacy.transforms],
        anomaly_checks=anomaly_checks, protocol=privacy.protocol, handlers=privacy.handlers, sampler=privacy.sampler,
        faults=FaultInjector(cfg.crash_rate, cfg.drop_rate, cfg.straggler_rate, seed=cfg.seed),
        seed=cfg.seed, run_dir=run_dir, run_config=cfg.to_dict(), resume=resume, show_progress=show_progress,
        backend=cfg.backend, ray_address=cfg.ray_address or None,
        contributions=contribution_accounting(cfg, task, privacy.protocol is not None or bool(privacy.transforms)),
    )


def contribution_accounting(cfg: SimulationConfig, task: "BuiltinTask", private: bool) -> ContributionAccounting | None:
    """The configured contribution accounting on the task's held-out data, or None when it is off. Refused with
    secure aggregation (no individual updates to score) and DP (scores of raw updates would leak)."""
    if not cfg.contributions:
        return None
    if private:
        raise ConfigError("contribution accounting scores individual updates, which secure aggregation hides and "
                          "differential privacy must not publish; turn off [contributions] or [privacy]")
    from .torch.train import central_evaluator

    x, y = task.data.test
    try:
        return ContributionAccounting(central_evaluator(task.model_fn, x, y), seed=cfg.seed, **cfg.contributions)
    except TypeError as exc:
        raise ConfigError(f"bad [contributions] setting: {exc}") from None


def run_simulation(
    client_fn: Callable[[str], Client],
    client_ids: Sequence[str],
    model_fn: Callable[[], torch.nn.Module] | None = None,
    *,
    initial_state: State | None = None,
    strategy: Strategy | None = None,
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
) -> SimulationResult:
    """Simulate federated training of any clients. The initial model is `initial_state`, or `model_fn()`
    built under `torch.manual_seed(seed)`. Samples all clients each round unless a count or fraction is given.
    With `run_dir`, every round is committed to a run store there, and a run of the same configuration already
    in it is resumed; another configuration is refused (`RunDirConflict`), and `resume=True` may only raise
    `rounds`. The configuration is `run_config` (a front door's settings), or else `Server.describe()` with the
    rounds and client ids.
    `anomaly_checks` screens every update before aggregation (pass None to turn the screening off);
    `max_examples` caps the example count (aggregation weight) any client may claim.
    A multi-stage `protocol` (secure aggregation) needs its client-side `handlers`; `sampler` replaces the
    count / fraction sampler (e.g. Poisson sampling for DP). `backend` picks where clients train
    (sequential, vectorized, process, ray; see `fedlearn.simulation.backends`), `ray_address` a Ray cluster.
    `contributions` scores each round's accepted updates into the run store's contribution ledger."""
    if initial_state is None:
        if model_fn is None:
            raise ValueError("give model_fn or initial_state for the initial global model")
        initial_state = initial_model_state(model_fn, seed)
    if clients_per_round is None and fraction is None:
        fraction = 1.0
    sampler = sampler or ClientSampler(clients_per_round, fraction, seed=seed)
    if isinstance(sampler, ClientSampler):
        sampler.size(len(client_ids))  # refuse more clients per round than there are, before any work
    pool = make_pool(backend, client_fn, client_ids, faults, handlers=handlers, ray_address=ray_address)
    server = Server(
        pool, strategy or make_strategy("fedavg"), initial_state, sampler=sampler, min_clients=min_clients,
        max_failed_rounds=max_failed_rounds, anomaly_checks=anomaly_checks, protocol=protocol, max_examples=max_examples,
        transforms=transforms, central_eval=central_eval, eval_clients=eval_clients, seed=seed,
        contributions=contributions,
    )
    store = None
    start = time.perf_counter()
    try:
        if run_dir is not None:
            store = RunStore(run_dir)
            store.bind_config(run_config or {**server.describe(), "rounds": rounds, "clients": sorted(client_ids)},
                              resume=resume)
            server.attach(store)
        if show_progress:
            from .progress import RoundProgress  # rich takes a noticeable part of start-up; only a bar needs it

            with RoundProgress(rounds, server.round) as progress:
                history = server.run(rounds, [progress])
        else:
            history = server.run(rounds)
    finally:
        pool.close()
        if store is not None:
            store.close()
    result = SimulationResult(history, server.state, Path(run_dir) if run_dir else None, time.perf_counter() - start)
    if result.run_dir is not None:
        write_outputs(result)
    return result


def write_outputs(result: SimulationResult) -> None:
    """Final model (fedlearn tensor format, no pickle), metrics CSV and plot into the run directory."""
    assert result.run_dir is not None
    (result.run_dir / FINAL_MODEL).write_bytes(encode_state(result.final_state))
    write_csv(result.history.rounds, result.run_dir / "metrics.csv")
    plot(result.history.rounds, result.run_dir / "metrics.png")
