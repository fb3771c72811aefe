"""Secure aggregation and central DP in a deployment: a TLS + authenticated server from server.toml with
[privacy], five client processes on loopback signing with their own identity keys, one SIGKILLed mid-training
after it shared its keys, so the server must reconstruct its mask key from the others' Shamir shares."""
from __future__ import annotations

import hashlib
import json
import signal

import numpy as np
import pytest

from fedlearn import FedAvg, Layout, RunStore, Update, simulate
from fedlearn.audit import Receipt, check_receipt
from fedlearn.strategies.scaffold import Scaffold
from fedlearn.config import ConfigError
from fedlearn.messages import ClientSession, Message, as_bytes
from fedlearn.privacy.central import CentralDPClient
from fedlearn.secagg import SecAggConfig, SecAggError, SecAggProtocol, keys
from fedlearn.secagg.protocol import ADVERTISE, IDENTITY_KEYS, MASKED
from fedlearn.transport import certs
from fedlearn.transport.client_process import _Worker
from fedlearn.transport.identity import Identity
from fedlearn.transport.remote_pool import RemotePool
from fedlearn.transport.secagg_handlers import load_peer_keys, secagg_handlers
from fedlearn.transport.server_process import deployment_privacy, load_server_config
from transport_support import ServerThread, fedlearn_process, server_toml, wait_for

CLIENTS, ROUNDS, KILLED, KILL_ROUND = 5, 3, "4", 3
PRIVACY = {"dp_clip": 2.0, "dp_noise": 0.01}
PRIVACY_TOML = """[privacy]
dp_clip = 2.0
dp_noise = 0.01
secagg = true
secagg_graph = "full"
{extra}"""


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg") / "creds"
    certs.create(out, [str(k) for k in range(CLIENTS)])
    return out


def _config(tmp_path, creds, extra=""):
    (tmp_path / "creds").symlink_to(creds)
    path = tmp_path / "server.toml"
    path.write_text(server_toml(ROUNDS, CLIENTS, privacy=PRIVACY_TOML.format(extra=extra)))
    return load_server_config(path)


def test_secure_aggregation_over_grpc_survives_a_client_killed_mid_training(tmp_path, creds, monkeypatch):
    cfg, settings = _config(tmp_path, creds)
    seen: list[tuple[dict, dict]] = []  # (the model sent, each client's reply) of every training stage
    original = RemotePool.exchange

    def spy(self, messages, **kwargs):
        replies = original(self, messages, **kwargs)
        if next(iter(messages.values())).kind == MASKED:
            seen.append((kwargs["state"], replies))
        return replies

    monkeypatch.setattr(RemotePool, "exchange", spy)
    marks = tmp_path / "marks"
    marks.mkdir()
    server = ServerThread(cfg, settings)
    clients = []
    try:
        port = server.start()
        for k in range(CLIENTS):
            args = [f"index={k}", f"num_clients={CLIENTS}"]
            if str(k) == KILLED:
                args += [f"marker_dir='{marks}'", "delay=60", f"slow_rounds='{KILL_ROUND}'"]
            clients.append(fedlearn_process(
                ["client", "--server", f"127.0.0.1:{port}", "--credentials", str(creds / "clients" / str(k)),
                 "--central-dp", "--client-module", "transport_support:make_digits_client",
                 *[a for kv in args for a in ("--client-arg", kv)]], tmp_path / f"client{k}.log"))
        # killed after it shared its keys, before its masked update: its pairwise masks must be recovered
        wait_for(lambda: (marks / f"{KILLED}-round{KILL_ROUND}").exists(), 240, "the client to start its last round")
        clients[int(KILLED)].send_signal(signal.SIGKILL)
        result = server.join(60)
        assert result is not None
        assert [p.wait(30) for p in clients] == [0, 0, 0, 0, -signal.SIGKILL]
    finally:
        for p in clients:
            p.kill()
        server.join(5)
    expected = simulate({"seed": 0, "rounds": ROUNDS, "dataset": "digits", "num_clients": CLIENTS,
                         "clients_per_round": CLIENTS, "eval_clients": 0, "local_epochs": 1, "privacy": PRIVACY})

    rounds = result.history.rounds
    assert [r.participants for r in rounds] == [[str(k) for k in range(CLIENTS)]] * 2 + [["0", "1", "2", "3"]]
    assert [(f.client_id, f.kind) for f in rounds[-1].failures] == [(KILLED, "drop")]
    assert "secagg/masked" in rounds[-1].failures[0].reason
    # the dropout round still moved the model, and the run learns as well as without secure aggregation
    layout = Layout.of(seen[-1][0])
    moved = layout.flatten(result.final_state) - layout.flatten(seen[-1][0])
    assert np.linalg.norm(moved) > 0.01
    accuracy = rounds[-1].metrics["test_accuracy"]
    assert expected.accuracy > 0.7 and abs(accuracy - expected.accuracy) <= 0.05
    assert rounds[-1].metrics["dp_rounds"] == ROUNDS
    # the server held only masked vectors: an unmasked encoding stays below `levels`, while a masked one is
    # uniform on the 2^32 ring, so about 1 - 1/10 of its coordinates lie above every possible encoding (levels
    # leave half the ring as headroom for 5 clients)
    levels = SecAggConfig(clip_range=2.0).quantizer(CLIENTS).levels
    replies = [reply for _, replies in seen for reply in replies.values() if isinstance(reply, Message)]
    masked = [reply.tensors["masked"] for reply in replies]
    fields = len(SecAggConfig().fields)  # train_loss and dp_unclipped travel masked, summed with the update
    assert len(masked) == CLIENTS * ROUNDS - 1 and all(y.size == layout.size + fields for y in masked)
    # no per-client metadata in the clear: no example count, no metrics
    assert all(set(reply.meta) == {"round", "partial"} and set(reply.tensors) == {"masked"} for reply in replies)
    assert 0 < rounds[-1].metrics["train_loss"] < 3  # the cohort mean, from the masked sum
    assert all(0.85 < np.mean(y >= levels) < 0.95 for y in masked)
    assert "round=3 kind=exchange" in (tmp_path / "client0.log").read_text()
    # receipts as in plain rounds: with its next training stage, or with the end of the run, every client got the
    # signed head and inclusion proof of each round it took part in, whose record names the hash of the masked
    # input the server saw from it (float64 little-endian, as the aggregator received it)
    run_dir = tmp_path / "run"
    key, run_id = (run_dir / "audit_public_key.txt").read_text().strip(), RunStore(run_dir, readonly=True).run_id
    masked_hashes = [{cid: hashlib.sha256(np.asarray(reply.tensors["masked"][: layout.size], "<f8").tobytes()).hexdigest()
                      for cid, reply in replies.items() if isinstance(reply, Message)} for _, replies in seen]
    for k in range(CLIENTS):
        kept = sorted((creds / "clients" / str(k) / "receipts").glob(f"{run_id}-round-*.json"))
        receipts = [Receipt.from_json(json.loads(path.read_text())) for path in kept]
        # the killed client kept those of rounds 1 and 2, which came with round 3's training stage
        assert [r.record["round"] for r in receipts] == ([1, 2] if str(k) == KILLED else [1, 2, 3])
        for receipt in receipts:
            check_receipt(receipt, client_id=str(k), public_key=key)
            assert receipt.record["accepted"][str(k)] == masked_hashes[receipt.record["round"] - 1][str(k)]


def test_a_deployment_refuses_local_dp_and_strategies_that_upload_extras(tmp_path, creds):
    cfg, settings = _config(tmp_path, creds, extra="local_dp_clip = 1.0\nlocal_dp_noise = 1.0")
    with pytest.raises(ConfigError, match="local DP .* is simulation-only"):
        deployment_privacy(cfg, settings, FedAvg())
    cfg.privacy = {"secagg": True}
    setup = deployment_privacy(cfg, settings, FedAvg())
    assert setup.handlers == {}  # the clients sign with their own identity keys
    assert setup.protocol.registry == load_peer_keys(creds / "allowlist.txt")
    with pytest.raises(ValueError, match="also upload mean_gradient"):
        deployment_privacy(cfg, settings, Scaffold())


def test_secagg_handlers_sign_with_the_clients_identity_and_check_the_announced_registry(creds):
    identity = Identity.load(creds / "clients" / "0" / "identity.key")
    registry = load_peer_keys(creds / "allowlist.txt")
    plan = SecAggProtocol(SecAggConfig(), registry).plan(1, ["0", "1", "2"])
    honest = SecAggProtocol(SecAggConfig(), registry).plan_meta(plan)
    worker = _Worker(client=None, transforms=(), handlers={})
    session = ClientSession("0", worker.memory, fit=None)
    reply = secagg_handlers("0", identity)[ADVERTISE](session, Message(ADVERTISE, meta=honest))
    c_pk, s_pk = (as_bytes(reply.tensors[k]) for k in ("c_pk", "s_pk"))
    keys.verify(registry, "0", as_bytes(reply.tensors["signature"]), keys.advertisement(plan.digest(), "0", c_pk, s_pk))
    forged = {**honest, IDENTITY_KEYS: {**honest[IDENTITY_KEYS], "0": Identity.generate().public_hex}}
    with pytest.raises(SecAggError, match="not this client's own"):
        secagg_handlers("0", identity)[ADVERTISE](session, Message(ADVERTISE, meta=forged))
    # a client with pinned keys ignores what the server announces
    assert secagg_handlers("0", identity, registry)[ADVERTISE](session, Message(ADVERTISE, meta=forged)).kind == ADVERTISE
    worker.join("run-A")
    worker.memory["secagg"] = "secrets of run A"
    worker.join("run-A")  # a reconnection to the same run keeps them
    assert worker.memory == {"secagg": "secrets of run A"}
    worker.join("run-B")
    assert worker.memory == {}  # a new run starts without the old run's secrets


def test_the_central_dp_client_half_clips_to_the_servers_norm():
    update = Update("a", 1, np.full(4, 3.0), 10)  # norm 6
    clipped = CentralDPClient().client(update, {"dp_clip": 1.5})
    assert np.linalg.norm(clipped.delta) == pytest.approx(1.5) and clipped.metrics["dp_unclipped"] == 0.0
    with pytest.raises(ValueError, match="sent no clip norm"):
        CentralDPClient().client(update, {})
