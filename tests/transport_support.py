"""Helpers for the deployment tests: free ports, client processes, a cuttable TCP proxy, small clients.

The clients here are also loaded by client processes through `--client-module transport_support:...`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedlearn import Client, Layout, Update

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fedlearn_process(args: list[str], log: Path) -> subprocess.Popen:
    """`fedlearn ARGS` as a separate process, output to `log`."""
    return python_process(["-m", "fedlearn.cli", *args], log)


def hostile_process(args: list[str], log: Path) -> subprocess.Popen:
    """`hostile_client.py ARGS` (a registered client that misbehaves) as a separate process, output to `log`."""
    return python_process([str(TESTS / "hostile_client.py"), *args], log)


def python_process(args: list[str], log: Path) -> subprocess.Popen:
    """`python ARGS` with fedlearn and the test helpers importable, output to `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=TESTS)


SERVER_SECTION = """[server]
address = "127.0.0.1:{port}"
run_dir = "run"
certificate = "creds/server.pem"
private_key = "creds/server.key"
allow_list = "creds/allowlist.txt"
round_deadline = {deadline}
"""
DIGITS_TOML = """
seed = 0
rounds = {rounds}
[data]
dataset = "digits"
num_clients = {clients}
[sampling]
clients_per_round = {clients}
eval_clients = 0
[client]
local_epochs = 1
{privacy}
""" + SERVER_SECTION.replace("{deadline}", "60")


def server_toml(rounds: int, clients: int, *, port: int = 0, privacy: str = "") -> str:
    """A server.toml for the built-in digits task, with credentials in `creds/` beside it."""
    return DIGITS_TOML.format(rounds=rounds, clients=clients, port=port, privacy=privacy)


class ServerThread:
    """`serve_app(cfg, settings)` in a thread: `start()` returns the port once it listens, `join()` the
    run's result (None if it failed)."""

    def __init__(self, cfg, settings) -> None:
        self.outcome: dict = {}
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(cfg, settings))

    def _serve(self, cfg, settings) -> None:
        from fedlearn.transport.server_process import serve_app
        try:
            self.outcome["result"] = serve_app(
                cfg, settings, on_listening=lambda port: (self.outcome.update(port=port), self._listening.set()))
        finally:
            self._listening.set()

    def start(self, timeout: float = 30) -> int:
        self._thread.start()
        assert self._listening.wait(timeout) and "port" in self.outcome, "the server did not start listening"
        return self.outcome["port"]

    def join(self, timeout: float):
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self.outcome.get("result")


def client_threads(creds: Path, port: int, receipts: Path, ids: tuple[str, ...] = ("0", "1")) -> list[threading.Thread]:
    """`run_client` in a daemon thread for each of `ids` (`ConstantClient`, step 0.1), with its credentials from
    `creds/clients/<id>`, keeping its audit receipts in `receipts/<id>`; already started."""
    from fedlearn.audit import ReceiptBook
    from fedlearn.transport.certs import ClientBundle
    from fedlearn.transport.client_process import run_client

    threads = []
    for k in ids:
        bundle = ClientBundle.load(creds / "clients" / k)
        thread = threading.Thread(target=run_client, args=(ConstantClient(k, step=0.1), f"127.0.0.1:{port}"),
                                  kwargs={"identity": bundle.identity, "tls": bundle.tls,
                                          "receipts": ReceiptBook(receipts / k)}, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def mark_and_wait(cid: str, rnd: int, marker_dir: str, delay: float, slow_rounds: str) -> None:
    """Leave a marker file `<cid>-round<rnd>` in `marker_dir` (if given) when training starts, then wait
    `delay` seconds in the rounds listed in `slow_rounds` ("2,3"; every round when empty), so that a test
    can kill the client mid-training."""
    if marker_dir:
        Path(marker_dir, f"{cid}-round{rnd}").touch()
    slow = {int(r) for r in str(slow_rounds).split(",") if r}
    if not slow or rnd in slow:
        time.sleep(delay)


class ConstantClient(Client):
    """Numpy-only client: its update is `step` in every coordinate; it can wait before answering and leave
    a marker file when a round's training starts (so a test can kill it mid-round)."""

    def __init__(self, cid: str, step: float = 1.0, delay: float = 0.0, marker_dir: str = "",
                 slow_rounds: str = "") -> None:
        super().__init__(cid)
        self.step, self.delay, self.marker_dir, self.slow_rounds = step, delay, marker_dir, slow_rounds

    def fit(self, state, config):
        rnd = int(config["round"])
        mark_and_wait(self.cid, rnd, self.marker_dir, self.delay, self.slow_rounds)
        size = Layout.of(state).size
        return Update(self.cid, rnd, np.full(size, self.step), 10, {"train_loss": 1.0})

    def evaluate(self, state, config):
        return {"accuracy": 1.0, "num_examples": 5.0}


def make_constant_client(client_id: str, **kwargs) -> ConstantClient:
    return ConstantClient(client_id, **kwargs)


class MarkedDigitsClient(Client):
    """Partition `index` of the built-in digits data, training as a simulation's client does, with the
    marker and wait of `mark_and_wait` before training."""

    def __init__(self, cid: str, index: int, num_clients: int, delay: float = 0.0, marker_dir: str = "",
                 slow_rounds: str = "") -> None:
        from fedlearn.config import SimulationConfig
        from fedlearn.transport.client_factory import builtin_client

        super().__init__(cid)
        self.inner = builtin_client(SimulationConfig.from_dict({"dataset": "digits", "num_clients": num_clients}),
                                    index, cid)
        self.delay, self.marker_dir, self.slow_rounds = delay, marker_dir, slow_rounds

    def fit(self, state, config):
        mark_and_wait(self.cid, int(config["round"]), self.marker_dir, self.delay, self.slow_rounds)
        return self.inner.fit(state, config)

    def evaluate(self, state, config):
        return self.inner.evaluate(state, config)


def make_digits_client(client_id: str, **kwargs) -> MarkedDigitsClient:
    return MarkedDigitsClient(client_id, **kwargs)


def big_state(megabytes: float) -> "OrderedDict[str, np.ndarray]":
    """A float64 model of the given size (float64, so that its update, a float64 delta, is the same size)."""
    n = int(megabytes * 2**20 / 8)
    return OrderedDict(embedding=np.zeros(n - 1000), head=np.zeros(1000))


class TcpProxy:
    """Forwards 127.0.0.1:port to a target port; `cut()` drops every open connection (the listener stays),
    like a network failure between a client and the server. The server sees the forwarded connections come
    from `source` (another loopback address stands for another machine)."""

    def __init__(self, target_port: int, source: str = "127.0.0.1") -> None:
        self.target, self.source = target_port, source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), source_address=(self.source, 0))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


SERVER_TOML = """
seed = 0
rounds = {rounds}
[data]
dataset = "digits"
num_clients = {clients}
[model]
name = "logreg"
[sampling]
clients_per_round = {clients}
eval_clients = 0
{sampling}
[client]
local_epochs = 1
[anomaly]
enabled = false
{sections}
""" + SERVER_SECTION.replace("{deadline}", "30") + "{server}\n"


class Deployment:
    """A `fedlearn server` process (digits, logistic regression, `clients` per round, the given extra lines
    in [sampling], [server] and other sections) and its clients: honest `fedlearn client` processes
    (constant updates of +1 from 10 examples) and hostile ones (`hostile_client.py`). `finish` waits for
    all of them and returns the committed rounds and every round's model."""

    def __init__(self, folder: Path, creds: Path, *, rounds: int, clients: int, sampling: str = "",
                 sections: str = "", server: str = "") -> None:
        self.folder, self.creds, self.port = folder, creds, free_port()
        (folder / "creds").symlink_to(creds)
        self.config = folder / "server.toml"
        self.config.write_text(SERVER_TOML.format(rounds=rounds, clients=clients, port=self.port, sampling=sampling,
                                                  sections=sections, server=server))
        self.servers: list[subprocess.Popen] = []
        self.clients: dict[int, subprocess.Popen] = {}
        self.start_server("server")

    def start_server(self, log: str) -> subprocess.Popen:
        """A (new) server process on the same config and run directory, output to `<log>.log`."""
        self.server_log = log
        self.servers.append(fedlearn_process(["server", "--config", str(self.config), "--quiet"],
                                             self.folder / f"{log}.log"))
        return self.servers[-1]

    def honest(self, k: int, *flags: str) -> subprocess.Popen:
        self.clients[k] = fedlearn_process(
            ["client", "--server", f"127.0.0.1:{self.port}", "--credentials", str(self.creds / "clients" / str(k)),
             "--client-module", "transport_support:make_constant_client", *flags], self.folder / f"client{k}.log")
        return self.clients[k]

    def hostile(self, k: int, *args: str) -> subprocess.Popen:
        self.clients[k] = hostile_process(
            ["--server", f"127.0.0.1:{self.port}", "--credentials", str(self.creds / "clients" / str(k)), *args],
            self.folder / f"client{k}.log")
        return self.clients[k]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def kill(self) -> None:
        for p in [*self.servers, *self.clients.values()]:
            p.kill()

    def finish(self, timeout: float = 300):
        """Wait for the last server and every client to exit with 0; the committed rounds and models."""
        from fedlearn import RunStore

        try:
            self.servers[-1].wait(timeout)
            assert self.servers[-1].returncode == 0, self.log(self.server_log)
            for p in self.clients.values():
                p.wait(30)
            codes = {k: p.returncode for k, p in self.clients.items()}
            assert all(c == 0 for c in codes.values()), (codes, {k: self.log(f"client{k}") for k in codes})
        finally:
            self.kill()
        store = RunStore(self.folder / "run")
        try:
            models = [store.load_round(r)[0] for r in range(store.last_round() + 1)]
            return store.history(), models
        finally:
            store.close()
