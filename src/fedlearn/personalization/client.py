"""`PersonalTorchClient`: one client class for the personalisation methods that keep something local.

- ``fedper`` (Arivazhagan et al. 2019): the parameters named in `local` (the head) never leave the client;
  the body is federated. Body and head train together each round.
- ``fedrep`` (Collins et al. 2021): the same split, but each round first trains the head alone
  (`head_epochs`, body frozen) and then the body alone (`local_epochs`, head frozen).
- ``ditto`` (Li et al. 2021): the whole model is federated as in FedAvg, and each client also keeps a
  personal model v, trained on the same batches with the proximal term lambda/2 * ||v - w_global||^2.
- ``finetune``: FedAvg during training; the personal model is the global one fine-tuned for
  `finetune_epochs` local epochs when evaluated. With `finetune_validation` > 0 that fraction of the
  client's training data is held out and the number of epochs (0 to `finetune_epochs`, 0 being the global
  model itself) is the one that scores best on it, so a client whose data would pull the model the wrong
  way keeps the global model (fewer clients hurt, as Motley's "selective personalisation").

A client sampled in few rounds has a stale head or personal model by the end of training. `personalize`
is the final local adaptation every client runs once on the final global model (a cohort of all
clients): the head retrained on the final body (fedper / fedrep), the personal model trained towards the
final global one (ditto). It trains on the client's training split only.

The global state a server holds is the *shared* part only (`shared_state`): for fedper / fedrep it lacks the
head, so the head is never sent in either direction. Personal parts are saved per round in a
`ClientStateStore` (on disk; in a deployment, the client's own disk) and read back as they were before the
round being trained, which keeps resumed runs exact. `evaluate(state, {"personalized": False})` measures the
global model where one exists, so global and personalised accuracy can be compared client by client.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch

from ..params import Layout
from ..types import Config, Metrics, State, Update
from ..torch.adapters import load_state, state_of
from ..torch.client import TorchClient
from ..torch.train import evaluate_model, train_local
from .state_store import ClientStateStore

METHODS = ("fedper", "fedrep", "ditto", "finetune")


def local_names(model: torch.nn.Module, local: Sequence[str]) -> list[str]:
    """Entries of the model's state named by `local`: an exact name or a module prefix ('head' covers
    'head.weight' and 'head.bias'). Raises if a pattern names nothing, so a typo cannot federate the head."""
    names = list(model.state_dict())
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in local)]
    unmatched = [p for p in local if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched:
        raise ValueError(f"local parameters {unmatched} match nothing in the model; its entries are {names}")
    return chosen


def shared_state(model_fn: Callable[[], torch.nn.Module], local: Sequence[str] = (), seed: int = 0) -> State:
    """The initial global state of a personalised model: `model_fn()` under `torch.manual_seed(seed)`, without
    the local entries. Give it to `run_simulation(initial_state=...)` or a server app."""
    torch.manual_seed(seed)
    model = model_fn()
    keep = set(model.state_dict()) - set(local_names(model, local))
    return state_of(model, keep)


class PersonalTorchClient(TorchClient):
    """A `TorchClient` that personalises with `method` (see the module docstring) and keeps its personal
    part in `store`. `local` names the head for fedper / fedrep; `ditto_lambda` is Ditto's lambda;
    `head_epochs` is FedRep's head phase; `finetune_epochs` the fine-tuning of ``finetune``.
    Local parts start from `model_fn()` built under `torch.manual_seed(init_seed)`, the same for every client."""

    def __init__(self, cid: str, model_fn: Callable[[], torch.nn.Module], x: np.ndarray, y: np.ndarray, *,
                 store: ClientStateStore, method: str = "fedper", local: Sequence[str] = (),
                 ditto_lambda: float = 0.1, head_epochs: int = 1, finetune_epochs: int = 1,
                 finetune_lr: float | None = None, finetune_validation: float = 0.0, init_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(cid, model_fn, x, y, **kwargs)
        if method not in METHODS:
            raise ValueError(f"unknown personalisation method {method!r}; choose one of {', '.join(METHODS)}")
        if method in ("fedper", "fedrep") and not local:
            raise ValueError(f"{method} needs `local`: the names of the parameters that stay on the client")
        if ditto_lambda < 0 or head_epochs < 0 or finetune_epochs < 0:
            raise ValueError("ditto_lambda, head_epochs and finetune_epochs must be >= 0")
        if not 0 <= finetune_validation < 1 or (finetune_lr is not None and not finetune_lr > 0):
            raise ValueError(f"finetune_validation must be in [0, 1) and finetune_lr > 0, got "
                             f"{finetune_validation} and {finetune_lr}")
        self.store, self.method, self.ditto_lambda = store, method, float(ditto_lambda)
        self.head_epochs, self.finetune_epochs, self.init_seed = int(head_epochs), int(finetune_epochs), init_seed
        self.finetune_lr, self.finetune_validation = finetune_lr, float(finetune_validation)
        self.local = list(local) if method in ("fedper", "fedrep") else []

    # -- building the full model ------------------------------------------------------------------------
    def _initial_local(self) -> State:
        torch.manual_seed(self.init_seed)
        model = self.model_fn()
        return state_of(model, local_names(model, self.local))

    def full_model(self, global_state: State, before: int | None) -> torch.nn.Module:
        """The client's module holding the global (shared) entries and, for fedper / fedrep, its own head as
        saved before round `before` (any round when None; the initial head when it has none yet)."""
        self.model(global_state)
        if self.local:
            load_state(self._model, self.store.load(self.cid, before) or self._initial_local(), partial=True)
        return self._model

    # -- training ---------------------------------------------------------------------------------------
    def _train(self, model: torch.nn.Module, settings: dict[str, Any], config: Config, *,
               trainable: Collection[str] | None = None, epochs: int | None = None,
               anchor: list[torch.Tensor] | None = None, mu: float | None = None,
               rows: torch.Tensor | None = None) -> Metrics:
        """`train_local` on this client's training data (the `rows` of it, when given) with only the
        parameters in `trainable` (all when None)."""
        params = dict(model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(trainable is None or name in trainable)
        seed = self.shuffle_seed(config)
        opts = {**settings, "epochs": settings["epochs"] if epochs is None else epochs}
        if mu is not None:
            opts["proximal_mu"] = mu
        try:
            x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
            return train_local(model, x, y, **opts, loss_fn=self.loss_fn, proximal_anchor=anchor,
                               generator=torch.Generator().manual_seed(seed) if seed is not None else None)
        finally:
            for p in params.values():
                p.requires_grad_(True)

    def fit(self, state: State, config: Config) -> Update:
        rnd = int(config.get("round", 0))
        settings = self.sgd_settings(config)
        model = self.full_model(state, rnd)
        head = set(local_names(model, self.local))
        if self.method == "fedrep":
            body = [n for n, _ in model.named_parameters() if n not in head]
            if self.head_epochs > 0:
                self._train(model, settings, config, trainable=head, epochs=self.head_epochs)
            metrics = self._train(model, settings, config, trainable=body)
        else:
            metrics = self._train(model, settings, config)
        layout = Layout.of(state)
        delta = layout.flatten(state_of(model, set(state))) - layout.flatten(state)
        if self.local:
            self.store.save(self.cid, rnd, state_of(model, head))
        elif self.method == "ditto":
            self._fit_personal(state, settings, config, rnd)
        return Update(self.cid, rnd, delta, len(self.x), metrics, partial=settings["work_fraction"] < 1.0)

    def _fit_personal(self, state: State, settings: dict[str, Any], config: Config, rnd: int) -> None:
        """Ditto's personal step: v (the saved personal model, or the global one at first) trained with the
        proximal pull towards this round's global model, then saved."""
        anchor = [torch.as_tensor(state[name]).clone() for name, _ in self.model(state).named_parameters()]
        model = self.full_model(self.store.load(self.cid, rnd) or state, rnd)
        self._train(model, settings, config, anchor=anchor, mu=self.ditto_lambda)
        self.store.save(self.cid, rnd, state_of(model))

    def personalize(self, state: State, config: Config) -> None:
        """The final local adaptation on the final global `state` (see the module docstring), saved as this
        client's state of round ``config["round"]`` (one past the last training round)."""
        rnd = int(config.get("round", 0))
        settings = self.sgd_settings(config)
        if self.method == "ditto":
            self._fit_personal(state, settings, config, rnd)
        elif self.local:
            model = self.full_model(state, rnd)
            head = local_names(model, self.local)
            self._train(model, settings, config, trainable=set(head), epochs=max(1, self.head_epochs))
            self.store.save(self.cid, rnd, state_of(model, set(head)))

    # -- evaluation -------------------------------------------------------------------------------------
    def personal_model(self, state: State, config: Config) -> torch.nn.Module:
        """The model this client would use: its head on the global body (fedper / fedrep), its personal
        model (ditto), or the global model fine-tuned on its training data (finetune)."""
        if self.method == "ditto":
            return self.full_model(self.store.load(self.cid) or state, None)
        model = self.full_model(state, None)
        if self.method == "finetune" and self.finetune_epochs > 0:
            self._finetune(model, config)
        return model

    def _finetune(self, model: torch.nn.Module, config: Config) -> None:
        """Fine-tune `model` in place for `finetune_epochs` (lr `finetune_lr`), or, with a validation share,
        for the number of epochs that scores best on the held-out part (ties go to fewer epochs)."""
        settings = self.sgd_settings(config)
        if self.finetune_lr is not None:
            settings["lr"] = self.finetune_lr
        config = {**config, "seed": config.get("seed", 0)}
        held = int(round(self.finetune_validation * len(self.x)))
        if held == 0 or held == len(self.x):
            self._train(model, settings, config, epochs=self.finetune_epochs)
            return
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(int(config["seed"])))
        val, fit = order[:held], order[held:]

        def score() -> float:
            return evaluate_model(model, self.x[val], self.y[val], loss_fn=self.loss_fn)["accuracy"]

        best, best_state = score(), copy.deepcopy(model.state_dict())
        for epoch in range(self.finetune_epochs):
            self._train(model, settings, {**config, "seed": int(config["seed"]) + epoch}, epochs=1, rows=fit)
            if (now := score()) > best:
                best, best_state = now, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)

    def evaluate(self, state: State, config: Config) -> Metrics:
        """Metrics of the personal model (default) or, with ``personalized`` False, of the global model."""
        if config.get("personalized", True):
            model = self.personal_model(state, config)
        elif self.local:
            raise ValueError(f"{self.method} has no global model to evaluate: its head is local to each client")
        else:
            model = self.full_model(state, None)
        return evaluate_model(model, self.x_test, self.y_test, loss_fn=self.loss_fn)
