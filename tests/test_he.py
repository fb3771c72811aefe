"""Homomorphic-encryption aggregation (CKKS via TenSEAL): the sum within CKKS precision against a plain
computation, dropouts at both stages, a lying decryptor, a malformed ciphertext, and a server that holds only
the public key."""
from __future__ import annotations

import numpy as np
import pytest

ts = pytest.importorskip("tenseal")

from fedlearn import InProcessPool, Update, simulate  # noqa: E402
from fedlearn.he import DECRYPT, ENCRYPTED, HEClient, HEConfig, HEProtocol, create_keys  # noqa: E402
from fedlearn.he.context import HEKeyError  # noqa: E402
from fedlearn.messages import Message, as_bytes  # noqa: E402
from fedlearn.server import ClientSampler, Server  # noqa: E402
from fedlearn.strategies import make_strategy  # noqa: E402
from vector_clients import VectorClient, known_delta, zero_state  # noqa: E402

DIM = 5000  # two ciphertexts of 4096 slots
SECRET, PUBLIC = create_keys()


class WeightedClient(VectorClient):
    def fit(self, state, config):
        update = super().fit(state, config)
        return Update(self.cid, update.round, update.delta, 5 + 3 * int(self.cid), {"train_loss": 0.5 + int(self.cid)})


def he_server(n: int, *, failing: dict | None = None, wrap=None, config: HEConfig = HEConfig()):
    ids = [str(i) for i in range(n)]
    handlers = HEClient(SECRET).handlers()
    for stage, gone in (failing or {}).items():
        handlers[stage] = _vanishing(handlers[stage], set(gone))
    if wrap:
        handlers = wrap(handlers)
    protocol = HEProtocol(config, PUBLIC)
    pool = InProcessPool(lambda cid: WeightedClient(cid, DIM), ids, handlers=handlers)
    server = Server(pool, make_strategy("fedavg"), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                    protocol=protocol, anomaly_checks=None)
    return server, protocol


def _vanishing(handler, gone):
    def handle(session, message):
        if session.cid in gone:
            raise ConnectionError("client vanished")
        return handler(session, message)
    return handle


def weighted_mean_of(ids):
    weights = np.array([5 + 3 * int(c) for c in ids], dtype=float)
    return sum(w * known_delta(c, DIM) for w, c in zip(weights, ids)) / weights.sum(), weights


def test_the_weighted_mean_matches_the_plain_one_within_ckks_precision():
    server, protocol = he_server(6)
    [record] = server.run(1).rounds
    expected, weights = weighted_mean_of([str(i) for i in range(6)])
    assert np.abs(server.params - expected).max() < 1e-6
    assert np.abs(protocol.last_sum - sum(w * known_delta(str(i), DIM) for i, w in enumerate(weights))).max() < 1e-5
    losses = 0.5 + np.arange(6)
    assert record.metrics["train_loss"] == pytest.approx(np.average(losses, weights=weights), abs=1e-6)


def test_dropouts_while_training_and_while_decrypting_are_tolerated():
    server, _ = he_server(6, failing={ENCRYPTED: {"1", "4"}, DECRYPT: {"0"}})
    [record] = server.run(1).rounds
    expected, _ = weighted_mean_of(["0", "2", "3", "5"])  # "0" contributed, then vanished before decrypting
    assert record.participants == ["0", "2", "3", "5"]
    assert np.abs(server.params - expected).max() < 1e-6


def test_a_lying_decryptor_fails_the_round_and_a_malformed_ciphertext_costs_only_its_sender():
    def lie(handlers):
        honest = handlers[DECRYPT]

        def decrypt(session, message):
            reply = honest(session, message)
            if session.cid == "1":
                reply.tensors["sum"] = reply.tensors["sum"] + 0.01
            return reply
        return {**handlers, DECRYPT: decrypt}

    server, _ = he_server(4, wrap=lie)
    [record] = server.run(1).rounds
    assert record.metrics["round_failed"] == 1.0 and "a decrypting client lied" in record.note
    assert not server.params.any()

    def garble(handlers):
        honest = handlers[ENCRYPTED]

        def encrypt(session, message):
            reply = honest(session, message)
            if session.cid == "2":
                reply.tensors["ct/0"] = reply.tensors["ct/0"][:1000]
            return reply
        return {**handlers, ENCRYPTED: encrypt}

    server, _ = he_server(4, wrap=garble)
    [record] = server.run(1).rounds
    assert [(f.client_id, f.kind) for f in record.failures] == [("2", "rejected")]
    assert np.abs(server.params - weighted_mean_of(["0", "1", "3"])[0]).max() < 1e-6


def test_the_server_holds_only_the_public_key(monkeypatch):
    with pytest.raises(HEKeyError, match="holds the secret key"):
        HEProtocol(HEConfig(), SECRET)
    with pytest.raises(HEKeyError, match="no secret key"):
        HEClient(PUBLIC)
    server, protocol = he_server(3)
    assert not protocol.context.is_private()
    crossing: list[Message] = []
    original = InProcessPool.exchange

    def spy(self, messages, **kwargs):
        replies = original(self, messages, **kwargs)
        crossing.extend(messages.values())
        crossing.extend(r for r in replies.values() if isinstance(r, Message))
        return replies

    monkeypatch.setattr(InProcessPool, "exchange", spy)
    server.run(1)
    ciphertexts = [as_bytes(m.tensors["ct/0"]) for m in crossing if m.kind == ENCRYPTED and "ct/0" in m.tensors]
    assert len(ciphertexts) == 3
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(protocol.context, ciphertexts[0]).decrypt()  # the server cannot read an update
    for message in crossing:  # no message between server and clients carries a secret context
        for blob in message.tensors.values():
            try:
                assert not ts.context_from(as_bytes(blob)).is_private()
            except (ValueError, RuntimeError, TypeError):
                pass
    # a client decrypts once per round, and only in a round it contributed to
    second = server.pool.exchange({"0": Message(DECRYPT, {"ct/0": crossing[-1].tensors.get("ct/0", np.zeros(1, np.uint8))},
                                                {"round": 1})})["0"]
    assert "one decryption per round" in second.reason


def test_simulate_with_he_learns_like_the_plain_run():
    base = {"dataset": "digits", "num_clients": 10, "partition": "iid", "clients_per_round": 5, "rounds": 3,
            "local_epochs": 2, "batch_size": 8, "eval_clients": 0, "seed": 0, "model": "logreg"}
    plain = simulate(base)
    encrypted = simulate({**base, "privacy": {"he": True}})
    assert abs(encrypted.accuracy - plain.accuracy) < 0.01  # the same weighted FedAvg, up to CKKS rounding


def test_he_in_a_deployment_keeps_the_secret_key_in_the_client_processes(tmp_path):
    """A TLS server whose [privacy] names only the public context, three client processes with the secret one."""
    import subprocess
    import sys

    from fedlearn.transport import certs
    from fedlearn.transport.server_process import load_server_config
    from transport_support import SRC, ServerThread, fedlearn_process, server_toml

    clients, rounds = 3, 2
    certs.create(tmp_path / "creds", [str(k) for k in range(clients)])
    subprocess.run([sys.executable, "-m", "fedlearn.cli", "he-keys", "--out", str(tmp_path / "he")], check=True,
                   env={"PYTHONPATH": str(SRC), "PATH": ""}, capture_output=True)
    privacy = f'[privacy]\nhe = true\nhe_public_key = "{tmp_path / "he" / "he_public.ctx"}"'
    (tmp_path / "server.toml").write_text(server_toml(rounds, clients, privacy=privacy))
    server = ServerThread(*load_server_config(tmp_path / "server.toml"))
    procs = []
    try:
        port = server.start()
        for k in range(clients):
            procs.append(fedlearn_process(
                ["client", "--server", f"127.0.0.1:{port}", "--credentials", str(tmp_path / "creds" / "clients" / str(k)),
                 "--client-index", str(k), "--dataset", "digits", "--num-clients", str(clients),
                 "--he-key", str(tmp_path / "he" / "he_secret.ctx")], tmp_path / f"client{k}.log"))
        result = server.join(120)
        assert result is not None
        assert [p.wait(30) for p in procs] == [0] * clients
    finally:
        for p in procs:
            p.kill()
        server.join(5)
    history = result.history.rounds
    assert len(history) == rounds and all(r.participants == ["0", "1", "2"] for r in history)
    expected = simulate({"seed": 0, "rounds": rounds, "dataset": "digits", "num_clients": clients,
                         "clients_per_round": clients, "eval_clients": 0, "local_epochs": 1})
    assert expected.accuracy > 0.7 and abs(history[-1].metrics["test_accuracy"] - expected.accuracy) < 0.02


def test_a_deployment_server_refuses_a_secret_context(tmp_path):
    from fedlearn.privacy import PrivacyConfig, build_privacy
    (tmp_path / "secret.ctx").write_bytes(SECRET)
    cfg = PrivacyConfig(he=True, he_public_key=str(tmp_path / "secret.ctx"))
    with pytest.raises(HEKeyError, match="give the server the public context only"):
        build_privacy(cfg, client_ids=["0", "1"], cohort=2, rounds=1, strategy=make_strategy("fedavg"),
                      registry={"0": b"k", "1": b"k"})
    with pytest.raises(ValueError, match="choose one of secagg and he"):
        PrivacyConfig(he=True, secagg=True)
