"""Deployment overhead on loopback: seconds per round beyond local training, and bytes on the wire per round
beside the model's size, for 5 and 50 remote clients (TLS and authentication on).

The server is the real stack in this process (`Server` round loop, `RemotePool`, gRPC service). Clients run
in 5 worker processes, each holding one connection per client in its own thread. Local "training" is a
fixed sleep, so `overhead = round seconds - slowest client's training time` is the cost of the transport:
encoding, TLS, chunking, signing, verification, scheduling.

    PYTHONPATH=src python benchmarks/transport_overhead.py                 # 5 and 50 clients, digits MLP
    PYTHONPATH=src python benchmarks/transport_overhead.py --model-mb 10   # a 10 MB model
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedlearn import Client, FedAvg, Layout, Update
from fedlearn.server import ClientSampler, Server
from fedlearn.torch import state_of
from fedlearn.torch.models import build_model
from fedlearn.transport import certs
from fedlearn.transport.certs import ClientBundle
from fedlearn.transport.channels import ServerTLS, start_server
from fedlearn.transport.client_process import run_client
from fedlearn.transport.remote_pool import RemotePool
from fedlearn.transport.service import Service
from fedlearn.transport import fedlearn_pb2 as pb

WORKERS = 5


class SleepClient(Client):
    """Trains by sleeping `seconds`, then returns a small step in every coordinate."""

    def __init__(self, cid: str, seconds: float) -> None:
        super().__init__(cid)
        self.seconds = seconds

    def fit(self, state, config):
        time.sleep(self.seconds)
        return Update(self.cid, int(config["round"]), np.full(Layout.of(state).size, 1e-3), 10)


def worker(address: str, creds: Path, ids: list[str], train_seconds: float) -> None:
    threads = []
    for cid in ids:
        bundle = ClientBundle.load(creds / "clients" / cid)
        thread = threading.Thread(target=run_client, args=(SleepClient(cid, train_seconds), address),
                                  kwargs={"identity": bundle.identity, "tls": bundle.tls})
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


def model_state(model_mb: float) -> "OrderedDict[str, np.ndarray]":
    if model_mb <= 0:
        return state_of(build_model("mlp", 64, 10))  # the digits task's model
    return OrderedDict(w=np.zeros(int(model_mb * 2**20 / 4), dtype=np.float32))


def measure(num_clients: int, rounds: int, train_seconds: float, model_mb: float, creds: Path) -> dict:
    pool = RemotePool("bench", round_deadline=600, min_available=num_clients, wait_timeout=300)
    service = Service(pool, creds / "allowlist.txt", pb.StatusReply)
    grpc_server, port = start_server([service.handler()], "127.0.0.1:0",
                                     ServerTLS(creds / "server.pem", creds / "server.key"), num_clients + 16)
    ids = [str(i) for i in range(num_clients)]
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", f"127.0.0.1:{port}", "--creds", str(creds),
                                 "--ids", ",".join(ids[w::WORKERS]), "--train-seconds", str(train_seconds)])
               for w in range(WORKERS)]
    state = model_state(model_mb)
    server = Server(pool, FedAvg(), state, sampler=ClientSampler(fraction=1.0), anomaly_checks=None)
    rows = []
    try:
        server.run_round(1)  # warm-up: connections, first-use costs
        for rnd in range(2, rounds + 2):
            start = time.perf_counter()
            server.run_round(rnd)
            seconds = time.perf_counter() - start
            stats = pool.last_stats["fit"]
            rows.append((seconds, stats.max_train_seconds, stats.bytes_down, stats.bytes_up))
    finally:
        pool.finish("benchmark over")
        for w in workers:
            w.wait(60)
        grpc_server.stop(1)
    seconds, train, down, up = (float(np.mean(c)) for c in zip(*rows))
    model_bytes = sum(v.nbytes for v in state.values())
    return {"clients": num_clients, "model_bytes": model_bytes, "round_s": seconds, "train_s": train,
            "overhead_s": seconds - train, "down": down, "up": up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-seconds", type=float, default=0.2)
    parser.add_argument("--model-mb", type=float, default=0.0, help="0: the digits MLP")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--creds", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.creds, args.ids.split(","), args.train_seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        creds = Path(tmp)
        certs.create(creds, [str(i) for i in range(max(args.clients))])
        print(f"loopback, TLS + Ed25519 auth, {args.rounds} rounds after a warm-up, local training = "
              f"{args.train_seconds}s sleep, {WORKERS} client processes")
        print(f"{'clients':>7} {'model':>10} {'round s':>8} {'train s':>8} {'overhead s':>10} "
              f"{'down/round':>11} {'up/round':>11} {'down/model':>10} {'up/model':>9}")
        for n in args.clients:
            r = measure(n, args.rounds, args.train_seconds, args.model_mb, creds)
            per_model = r["model_bytes"] * n
            print(f"{n:>7} {_size(r['model_bytes']):>10} {r['round_s']:>8.3f} {r['train_s']:>8.3f} "
                  f"{r['overhead_s']:>10.3f} {_size(r['down']):>11} {_size(r['up']):>11} "
                  f"{r['down'] / per_model:>10.3f} {r['up'] / per_model:>9.3f}")
        print("down/model and up/model: bytes per round / (model bytes x clients); updates are float64 deltas")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


if __name__ == "__main__":
    main()
