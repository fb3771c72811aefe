"""A federated task written once: `App`.

An app holds what the server side of a task needs (the model or its initial state, the strategy, a central
evaluation, the rule that combines clients' evaluation metrics, the settings sent with every fit task) and,
for simulation, where its clients come from (a `FederatedDataset`, or a `client_fn` with client ids).
`run_simulation(app=...)`, `fedlearn simulate --app pkg.mod:make_app` and `fedlearn server --app ...` take
the same object, so a task moves from simulation to deployment by changing one command. The built-in tasks
(`--dataset digits ...`) are apps too (`simulate.builtin_app`).

Run settings (rounds, sampling, faults, privacy, robust aggregation) are not part of an app: they come
from the config file and flags of each front door.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .client import Client
from .data import FederatedDataset
from .plugins import load_object
from .server.round_loop import CentralEval
from .strategies import Strategy, make_strategy
from .metrics import MetricAggregation, weighted_mean_metrics
from .types import Config, State

ModelFn = Callable[[], torch.nn.Module]
TRAINING_KEYS = ("local_epochs", "batch_size", "lr", "momentum", "weight_decay")


@dataclass
class App:
    """One federated task. Give the model (`model_fn`, built under `torch.manual_seed(seed)`) or its
    `initial_state`; the strategy as an object or a registered name (`strategy_params` are then its
    keyword parameters); optionally `central_eval(state) -> metrics` on server-held data, a replacement
    `evaluate_metrics` rule for clients' evaluation metrics (default `weighted_mean_metrics`), and
    `fit_config`, sent to every client with every fit task (`TorchClient` reads local_epochs, batch_size,
    lr, momentum, weight_decay from it).

    For simulation the clients come from `client_fn(cid)` over `client_ids`, or, when `client_fn` is None,
    from `data`: a `TorchClient` of `model_fn` on `data.clients[cid]` (evaluating on its `client_test` part
    when there is one), built with `client_kwargs` (e.g. ``class_weights``, ``loss_fn``). A deployment's
    server ignores the clients: they connect with `fedlearn client`.
    """

    model_fn: ModelFn | None = None
    initial_state: State | None = None
    strategy: Strategy | str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    central_eval: CentralEval | None = None
    evaluate_metrics: MetricAggregation = weighted_mean_metrics
    fit_config: Config = field(default_factory=dict)
    data: FederatedDataset | None = None
    client_fn: Callable[[str], Client] | None = None
    client_ids: Sequence[str] = ()
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_fn is None and self.initial_state is None:
            raise ValueError("an App needs model_fn or initial_state for the initial global model")
        if not isinstance(self.strategy, (Strategy, str)):
            raise TypeError(f"App.strategy must be a Strategy or a strategy name, got {type(self.strategy).__name__}")
        if isinstance(self.strategy, Strategy) and self.strategy_params:
            raise ValueError("strategy_params apply to a strategy given by name; this App's strategy is an object")

    @classmethod
    def from_data(cls, data: FederatedDataset, model_fn: ModelFn, *, central_eval: bool = True,
                  **kwargs: Any) -> "App":
        """The app of a `FederatedDataset`: a `TorchClient` per client, and (unless `central_eval` is False)
        the server's evaluation on `data.test`. `kwargs` are other `App` fields."""
        evaluation = None
        if central_eval and len(data.test[1]):
            from .torch.train import central_evaluator

            evaluation = central_evaluator(model_fn, *data.test)
        return cls(model_fn=model_fn, data=data, central_eval=evaluation, **kwargs)

    def build_strategy(self) -> Strategy:
        """The strategy object (a name is looked up in the registry, with `strategy_params`)."""
        if isinstance(self.strategy, Strategy):
            return self.strategy
        return make_strategy(self.strategy, **self.strategy_params)

    def initial(self, seed: int = 0) -> State:
        """The initial global model: `initial_state`, else `model_fn()` built under `torch.manual_seed(seed)`."""
        if self.initial_state is not None:
            return self.initial_state
        from .torch import state_of

        assert self.model_fn is not None
        torch.manual_seed(seed)
        return state_of(self.model_fn())

    @property
    def simulated_client_ids(self) -> list[str]:
        """The ids of the simulated clients: `client_ids`, else those of `data`."""
        if self.client_ids:
            return [str(c) for c in self.client_ids]
        if self.data is not None:
            return self.data.client_ids
        raise ValueError("this App has no clients to simulate: give it data (a FederatedDataset) or client_fn "
                         "and client_ids")

    def client(self, cid: str) -> Client:
        """Simulated client `cid`: `client_fn(cid)`, or a `TorchClient` on its part of `data`."""
        if self.client_fn is not None:
            return self.client_fn(cid)
        if self.data is None or self.model_fn is None:
            raise ValueError("this App has no clients to simulate: give it data and model_fn, or client_fn")
        from .torch import TorchClient

        x, y = self.data.clients[cid]
        x_test, y_test = (self.data.client_test or {}).get(cid, (None, None))
        training = {k: self.fit_config[k] for k in TRAINING_KEYS if k in self.fit_config}
        return TorchClient(cid, self.model_fn, x, y, x_test=x_test, y_test=y_test,
                           **{**training, **self.client_kwargs})


def app_from_settings(settings: dict[str, Any]) -> App:
    """The app an ``[app]`` section names: ``factory = "package.module:function"``, optionally ``dir`` (the
    folder to import it from), and any other keys as the factory's keyword arguments."""
    args = dict(settings)
    factory = args.pop("factory", None)
    if not isinstance(factory, str) or not factory:
        raise ValueError("[app] needs factory = \"package.module:function\" (or --app package.module:function)")
    return load_app(factory, args, str(args.pop("dir", ".")))


def load_app(spec: str, args: dict[str, Any] | None = None, app_dir: str = ".") -> App:
    """Call the user's `package.module:function` (importable from `app_dir`) with `args`; it must return an
    `App`. This is what `--app` and the `[app]` section of a config name."""
    factory = load_object(spec, app_dir, "--app")
    try:
        app = factory(**(args or {}))
    except TypeError as exc:
        raise ValueError(f"{spec}: {exc} (app arguments given: {sorted(args or {})})") from None
    if not isinstance(app, App):
        raise ValueError(f"{spec} returned {type(app).__name__}, not a fedlearn.App")
    return app

