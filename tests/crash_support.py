"""A small stateful run for the crash-consistency tests, and (run as a script) the same run killed by a real
SIGKILL at a chosen point of one round's commit to the run store:

    python crash_support.py RUN_DIR STRATEGY KILL_ROUND MODE

MODE "at-commit": killed as the round's COMMIT statement starts, so the round must not be in the store;
"after-commit": killed right after the round's first transaction committed, before anything else runs (a
second transaction of the same round, if there were one, would be cut off).
"""
from __future__ import annotations

import os
import signal
import sys
from collections import OrderedDict

import numpy as np

from fedlearn import Client, Update
from fedlearn.params import Layout
from fedlearn.server import ClientSampler, RunStore, Server
from fedlearn.simulation import InProcessPool
from fedlearn.strategies import make_strategy

CLIENTS = [str(i) for i in range(6)]
STRATEGY_PARAMS = {"fedadam": {"server_lr": 0.1}, "scaffold": {"server_lr": 0.8}, "fedavgm": {"momentum": 0.9}}


class QuadraticClient(Client):
    """One step towards its own target t_i: delta = -0.5 (w - t_i), with i + 1 examples (unequal weights);
    its 'mean gradient' for SCAFFOLD is w - t_i."""

    def fit(self, state, config):
        layout = Layout.of(state)
        w = layout.flatten(state)
        target = np.random.default_rng(int(self.cid)).normal(size=w.size)
        return Update(self.cid, int(config["round"]), -0.5 * (w - target), int(self.cid) + 1,
                      extras={"mean_gradient": w - target})


def build_server(run_dir: str, strategy: str) -> Server:
    state = OrderedDict(w=np.zeros(7), b=np.zeros(2, dtype=np.float32))
    return Server(InProcessPool(QuadraticClient, CLIENTS), make_strategy(strategy, **STRATEGY_PARAMS[strategy]), state,
                  sampler=ClientSampler(count=3, seed=1), store=RunStore(run_dir), seed=1, anomaly_checks=None)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_until_killed(run_dir: str, strategy: str, kill_round: int, mode: str) -> None:
    server = build_server(run_dir, strategy)
    store = server.store
    inside = {"round": False, "committed": False}

    def trace(statement: str) -> None:
        if not inside["round"]:
            return
        if inside["committed"]:
            _kill()  # a later statement of the same commit: cut it off
        if statement.strip().upper().startswith("COMMIT"):
            if mode == "at-commit":
                _kill()
            inside["committed"] = True

    original = store.commit_round

    def commit_round(rnd, *args, **kwargs):
        inside["round"] = rnd == kill_round
        original(rnd, *args, **kwargs)
        if inside["round"]:
            _kill()

    store._conn.set_trace_callback(trace)
    store.commit_round = commit_round
    server.run(kill_round + 5)
    raise SystemExit("the run was not killed")


if __name__ == "__main__":
    run_until_killed(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
