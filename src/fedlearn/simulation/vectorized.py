"""`VectorizedPool`: the sequential pool's results, with each cohort of `TorchClient`s trained in one batch.

Clients that share a model, loss and SGD settings are trained together by `cohort_sgd.train_cohort`;
every other client (another client class, a config key the cohort engine does not know, a model with
buffers or random layers) runs through the sequential path, and a log line says why, once per reason.
Faults, client-side transforms and the order of results are those of `InProcessPool`.

The clients that joined a cohort are kept (up to `client_cache` of them) instead of being rebuilt by
`client_fn` every round: the cohort engine reads only what a `TorchClient` is built with (data, model
function, loss, SGD defaults), never state a client keeps between rounds, so a kept client trains exactly as a
fresh one. A client that takes the sequential path is always built anew, as `InProcessPool` does.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..client import Client
from ..messages import Handler
from ..params import Layout
from ..torch.adapters import load_state
from ..torch.client import TorchClient
from ..torch.train import local_steps
from ..transforms.base import Transform
from ..types import Config, Failure, State, Update
from .cohort_sgd import Member, SGDSettings, train_cohort
from .faults import FaultInjector
from .inprocess import ClientFn, InProcessPool
from .workers import finish_in_order

log = logging.getLogger(__name__)

# Config keys whose meaning the cohort engine reproduces; any other key sends the client down the sequential path.
COHORT_KEYS = frozenset({"round", "seed", "work_fraction", "proximal_mu", "local_epochs", "lr", "batch_size",
                         "momentum", "weight_decay"})

Task = tuple[str, TorchClient, Config, dict[str, Any]]  # id, client, config, its `sgd_settings`


class VectorizedPool(InProcessPool):
    """In-process pool that trains up to `max_cohort` compatible clients per batched call."""

    def __init__(
        self,
        client_fn: ClientFn,
        client_ids: Sequence[str],
        faults: FaultInjector | None = None,
        handlers: Mapping[str, Handler] | None = None,
        *,
        max_cohort: int = 1024,
        client_cache: int = 100_000,
    ) -> None:
        super().__init__(client_fn, client_ids, faults, handlers)
        if max_cohort < 1:
            raise ValueError(f"max_cohort must be >= 1, got {max_cohort}")
        if client_cache < 0:
            raise ValueError(f"client_cache must be >= 0, got {client_cache}")
        self.max_cohort, self.client_cache = max_cohort, client_cache
        self._clients: dict[str, TorchClient] = {}  # cohort clients kept between rounds, oldest first
        self._models: dict[Callable[[], torch.nn.Module], torch.nn.Module] = {}
        self._model_problems: dict[tuple, str | None] = {}
        self._reported: set[str] = set()

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        raw: dict[str, Update | Failure] = {}
        groups: dict[tuple, list[Task]] = {}
        for cid, config in instructions.items():
            task = self._guarded(cid, lambda c: self._prepare(c, config))
            if isinstance(task, Failure):
                raw[cid] = task
                continue
            client, config = task
            reason = self._why_sequential(client, config, state)
            if reason is None:
                self._keep(cid, client)
                settings = client.sgd_settings(config)
                groups.setdefault(_group_key(client, settings), []).append((cid, client, config, settings))
            else:
                self._report(reason)
                if self._clients.pop(cid, None) is client:  # the sequential path trains a client built anew
                    client = self.client_fn(cid)
                raw[cid] = self._guarded(cid, lambda c: client.fit(state, config))
        for tasks in groups.values():
            raw.update(self._fit_group(state, tasks))
        return finish_in_order(raw, instructions, transforms)

    def _prepare(self, cid: str, config: Config) -> tuple[Client, Config]:
        config = self._inject_fault(cid, config)
        client = self._clients.get(cid)
        return (client if client is not None else self.client_fn(cid)), config

    def _keep(self, cid: str, client: TorchClient) -> None:
        """Keep a cohort client for the next rounds, dropping the oldest beyond `client_cache`."""
        if self.client_cache and cid not in self._clients:
            if len(self._clients) >= self.client_cache:
                del self._clients[next(iter(self._clients))]
            self._clients[cid] = client

    def _why_sequential(self, client: Client, config: Config, state: State) -> str | None:
        """Why this client cannot join a cohort, or None when it can."""
        if not isinstance(client, TorchClient) or type(client).fit is not TorchClient.fit:
            return f"{type(client).__name__} is not a TorchClient, so it trains on its own"
        if client.class_weights is not None:
            return "class-weighted clients train one by one"
        unknown = config.keys() - COHORT_KEYS
        if unknown:
            return f"config keys {sorted(unknown)} are not reproduced by the cohort engine, so clients train alone"
        key = (client.model_fn, tuple(state))
        if key not in self._model_problems:
            self._model_problems[key] = self._model_problem(self._model(client.model_fn), state)
        return self._model_problems[key]

    @staticmethod
    def _model_problem(model: torch.nn.Module, state: State) -> str | None:
        name = type(model).__name__
        params = [n for n, _ in model.named_parameters()]
        if set(model.state_dict()) - set(params):
            return f"{name} has buffers (e.g. batch-norm statistics), so its clients train one by one"
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if [n for n in params if n in state] != list(state) or not trainable <= set(state):
            return (f"the model state does not list {name}'s trainable parameters in order (frozen ones may be "
                    f"left out), so its clients train one by one")
        return None

    def _model(self, model_fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """One module per model function, built once: it only lends its structure to the cohort engine."""
        if model_fn not in self._models:
            self._models[model_fn] = model_fn()
        return self._models[model_fn]

    def _fit_group(self, state: State, tasks: list[Task]) -> dict[str, Update | Failure]:
        """Raw updates of clients sharing model and settings, `max_cohort` at a time; the sequential path
        takes over if torch cannot batch the model."""
        first = tasks[0][1]
        sgd, epochs = _settings(tasks[0][3])
        model = self._model(first.model_fn)
        load_state(model, state, partial=True)  # frozen parameters in the state take the global values
        start = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        steps = [local_steps(c.x.shape[0], sgd.batch_size, epochs, st["work_fraction"]) for _, c, _, st in tasks]
        ranked = sorted(range(len(tasks)), key=lambda i: -steps[i])  # similar lengths batch together
        layout = Layout.of(state)
        results: dict[str, Update | Failure] = {}
        for lo in range(0, len(ranked), self.max_cohort):
            chunk = [tasks[i] for i in ranked[lo : lo + self.max_cohort]]
            chunk_steps = [steps[i] for i in ranked[lo : lo + self.max_cohort]]
            members = [Member(c.x, c.y, s, c.shuffle_seed(cfg)) for (_, c, cfg, _), s in zip(chunk, chunk_steps)]
            try:
                final, losses = train_cohort(model, start, members, sgd, first.loss_fn)
            except Exception as exc:  # torch could not batch this model: its clients train one by one from now on
                reason = (f"cannot vectorise {type(model).__name__} ({type(exc).__name__}: {exc}); "
                          "its clients train one by one")
                self._model_problems[(first.model_fn, tuple(state))] = reason
                self._report(reason)
                for cid, client, cfg, _ in chunk:
                    results[cid] = self._guarded(cid, lambda c: client.fit(state, cfg))
                continue
            deltas = _deltas(layout, state, final)
            for i, ((cid, client, cfg, settings), s) in enumerate(zip(chunk, chunk_steps)):
                metrics = {"train_loss": float(losses[i]) / s, "steps": float(s)}
                results[cid] = Update(cid, int(cfg.get("round", 0)), deltas[i], client.x.shape[0], metrics,
                                      partial=settings["work_fraction"] < 1.0)
        return results

    def _report(self, reason: str) -> None:
        if reason not in self._reported:
            self._reported.add(reason)
            log.warning("vectorized pool: %s", reason)


def _settings(s: Mapping[str, Any]) -> tuple[SGDSettings, int]:
    """A client's `sgd_settings` as the cohort's shared settings and local epochs."""
    return SGDSettings(s["batch_size"], s["lr"], s["momentum"], s["weight_decay"], s["proximal_mu"]), s["epochs"]


def _group_key(client: TorchClient, settings: Mapping[str, Any]) -> tuple[Any, ...]:
    """Clients with equal keys can be stacked: same model, loss, sample shape and SGD settings."""
    return (client.model_fn, client.loss_fn, tuple(client.x.shape[1:]), client.x.dtype, client.y.dtype,
            *_settings(settings))


def _deltas(layout: Layout, state: State, final: Mapping[str, torch.Tensor]) -> np.ndarray:
    """(K, d) float64 deltas, new - old in layout order, as `TorchClient.fit` computes them one by one
    (float32 values widened to float64, then subtracted), written in one pass into one array."""
    k = next(iter(final.values())).shape[0]
    out = np.empty((k, layout.size))
    pos = 0
    for name, size in zip(layout.names, layout.sizes):
        if name in final:
            np.subtract(final[name].reshape(k, size).numpy(), np.ravel(state[name]), out=out[:, pos : pos + size],
                        dtype=np.float64)
        else:  # frozen: the global value comes back unchanged
            out[:, pos : pos + size] = 0.0
        pos += size
    return out
