"""Deployment security on loopback: only registered clients get in, and an outsider cannot tell an unknown id
from a wrong key; TLS is required (mutual TLS on request, binding the certificate to the client id); every
bad result is rejected with its reason while the server keeps serving the other clients; connections that
never authenticate cannot crowd out registered clients; status needs credentials."""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from fedlearn import FedAvg, Transform, Update
from fedlearn.compression import update_codec
from fedlearn.params import Layout
from fedlearn.serialize import encode_update
from fedlearn.server import ClientSampler, Server
from fedlearn.transport import certs
from fedlearn.transport import fedlearn_pb2 as pb
from fedlearn.transport.certs import ClientBundle
from fedlearn.transport.channels import ClientTLS, ServerTLS, open_channel, start_server
from fedlearn.transport.client_process import Connection
from fedlearn.transport.identity import Identity
from fedlearn.transport.remote_pool import RemotePool
from fedlearn.transport.service import Service
from fedlearn.transport.admission import Admission, Busy
from fedlearn.transport.identity import hello_message, status_message
from fedlearn.transport.service import AUTH_FAILED, STATUS_REFUSED
from fedlearn.transport.status import query_status
from fedlearn.transport.status_auth import client_metadata, token_metadata
from fedlearn.transport.wire import CONNECT_METHOD, MAX_MESSAGE_BYTES, PROTOCOL, encode_metrics
from transport_support import wait_for

STATE = OrderedDict(w=np.zeros((4, 3), np.float32), b=np.zeros(3, np.float32))
SIZE = 15
CODEC = update_codec((), Layout.of(STATE))  # updates travel in the model's dtype


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("creds")
    certs.create(out, ["alice", "bob"])
    return out


class Served:
    """An in-process server (pool + service) at a free port, TLS on."""

    def __init__(self, creds, *, deadline=3.0, max_connections=16, handshake_timeout=5.0, mutual=False,
                 per_peer=8):
        self.creds = creds
        self.pool = RemotePool("run-A", round_deadline=deadline, wait_timeout=10)
        self.service = Service(self.pool, creds / "allowlist.txt", lambda: pb.StatusReply(run_id="run-A"),
                               handshake_timeout=handshake_timeout, max_clients=max_connections,
                               max_unauthenticated_per_peer=per_peer, operator_token=creds / "operator.token.sha256")
        tls = ServerTLS(creds / "server.pem", creds / "server.key", creds / "ca.pem" if mutual else None)
        self.grpc, self.port = start_server([self.service.handler()], "127.0.0.1:0", tls,
                                            self.service.admission.capacity)
        self.address = f"127.0.0.1:{self.port}"
        self.executor = ThreadPoolExecutor(2)

    def connect(self, cid, identity=None, tls="bundle") -> Connection:
        bundle = ClientBundle.load(self.creds / "clients" / cid)
        channel = open_channel(self.address, bundle.tls if tls == "bundle" else tls)
        return Connection(channel, cid, identity or bundle.identity)

    def fit(self, cids, rnd):
        """Start one fit dispatch in the background; returns a future of the pool's results."""
        return self.executor.submit(self.pool.fit, STATE, {c: {"round": rnd, "seed": 1} for c in cids})

    def close(self):
        self.grpc.stop(0)
        self.executor.shutdown(wait=False)


@pytest.fixture
def served(creds):
    server = Served(creds)
    yield server
    server.close()


class RawCodec:
    """Packs a delta as the dense codec would, but without converting it: floats become float32, the rest
    (and every shape) stay as given."""

    name = CODEC.name

    def encode(self, vector, key=""):
        return {"values": vector.astype(np.float32) if vector.dtype.kind == "f" else vector}


def answer(conn: Connection, task, delta=None, *, client_id=None):
    """The payload and signed header of a result for `task` (honest unless told otherwise)."""
    codec = CODEC if delta is None else RawCodec()  # a hostile client packs whatever it likes
    delta = np.full(SIZE, 0.5) if delta is None else delta
    payload = encode_update(Update(client_id or conn.client_id, task.header.round, delta, 10), codec=codec)
    return conn.result_header(task.header, payload), payload


def send(conn, header, payload) -> pb.Ack:
    conn.send_result(header, payload)
    return conn.read_ack()


def _hello_then_proof(address, tls, cid, identity):
    """Play the handshake by hand; returns (first server message kind, RpcError ending the stream)."""
    channel = open_channel(address, tls)
    outbox = queue.Queue()
    call = channel.stream_stream(CONNECT_METHOD, request_serializer=None,
                                 response_deserializer=pb.ServerMessage.FromString)(iter(outbox.get, None))
    outbox.put(pb.ClientMessage(hello=pb.Hello(protocol=PROTOCOL, client_id=cid)).SerializeToString())
    first = next(call)
    signature = identity.sign(hello_message(first.challenge.run_id, cid, first.challenge.nonce))
    outbox.put(pb.ClientMessage(proof=pb.Proof(signature=signature)).SerializeToString())
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    outbox.put(None)
    channel.close()
    return first.WhichOneof("body"), err.value


def test_unknown_id_and_wrong_key_are_indistinguishable(served, creds, caplog):
    """The attacker learns nothing about which ids are registered: both get a challenge, then the same refusal;
    the server's log keeps the real reasons."""
    tls = ClientBundle.load(creds / "clients" / "alice").tls  # real CA: anyone with ca.pem gets this far
    with caplog.at_level(logging.WARNING, logger="fedlearn.transport"):
        unknown = _hello_then_proof(served.address, tls, "eve", Identity.generate())
        wrong_key = _hello_then_proof(served.address, tls, "alice", Identity.generate())
    assert unknown[0] == wrong_key[0] == "challenge"
    assert unknown[1].code() == wrong_key[1].code() == grpc.StatusCode.PERMISSION_DENIED
    assert unknown[1].details() == wrong_key[1].details() == AUTH_FAILED
    assert "'eve' is not registered" in caplog.text and "'alice' failed authentication" in caplog.text
    assert served.pool.connected() == []


def test_an_empty_half_closed_stream_costs_one_short_log_line(served, creds, caplog):
    tls = ClientBundle.load(creds / "clients" / "alice").tls
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            channel = open_channel(served.address, tls)
            call = channel.stream_stream(CONNECT_METHOD)(iter([]))  # opens the stream and closes its side at once
            assert list(call) == []  # the server ends the stream cleanly
            channel.close()
        wait_for(lambda: caplog.text.count("event=stream_closed") == 3, 5, "three log lines")
    assert "Traceback" not in caplog.text and "StopIteration" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    lines = [r.getMessage() for r in caplog.records if "event=stream_closed" in r.getMessage()]
    assert all(len(line) < 200 and "where hello was expected" in line for line in lines)


def test_tls_is_required_and_checks_the_server_certificate(served, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        Connection(open_channel(served.address, None), "alice", Identity.generate())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = tmp_path / "other"
    certs.create(other_ca, ["alice"])  # a different CA: the server's certificate must not verify
    with pytest.raises(grpc.RpcError) as err:
        served.connect("alice", tls=ClientTLS(other_ca / "ca.pem"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(creds):
    server = Served(creds, mutual=True)
    try:
        with pytest.raises(grpc.RpcError) as err:
            server.connect("alice", tls=ClientTLS(creds / "ca.pem"))  # no client certificate
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        conn = server.connect("alice")  # the bundle has one
        assert conn.run_id == "run-A"
        conn.close()
    finally:
        server.close()


def test_honest_result_is_accepted(served):
    conn = served.connect("alice")
    future = served.fit(["alice"], 1)
    task = conn.next_task()
    assert task.config == {"round": 1, "seed": 1} and task.state["w"].shape == (4, 3)
    ack = send(conn, *answer(conn, task))
    assert ack.accepted, ack.reason
    [update] = future.result(5)
    assert isinstance(update, Update) and np.all(update.delta == 0.5)
    future = served.executor.submit(served.pool.evaluate, STATE, {"alice": {"round": 1}})
    task = conn.next_task()
    payload = encode_metrics({"accuracy": 0.75, "num_examples": 8})
    assert send(conn, conn.result_header(task.header, payload), payload).accepted
    [evaluation] = future.result(5)
    assert evaluation.num_examples == 8 and evaluation.metrics["accuracy"] == 0.75


def test_client_without_the_servers_client_side_transforms_is_refused_its_task(served):
    class Clip(Transform):
        name = "clip"

    served.connect("alice")  # announces no transforms
    [failure] = served.pool.fit(STATE, {"alice": {"round": 1}}, [Clip()])
    assert failure.kind == "rejected" and "client applies transforms [], the server expects ['clip']" in failure.reason


@pytest.mark.parametrize("attack, reason", [
    ("forged", "forged: signature does not verify"),
    ("cross-run", "cross-run: result is for run 'run-B'"),
    ("other-client", "claims to be client 'bob'"),
    ("wrong-round", "result is for round 9"),
    ("train-seconds", "forged: signature does not verify"),
])
def test_forged_cross_run_and_misdirected_results_are_rejected(served, caplog, attack, reason):
    conn = served.connect("alice")
    future = served.fit(["alice"], 1)
    task = conn.next_task()
    header, payload = answer(conn, task)
    if attack == "forged":
        header.signature = Identity.generate().sign(b"anything")
    elif attack == "cross-run":
        header.run_id = "run-B"
        conn.sign(header)  # properly signed, but for another run
    elif attack == "train-seconds":
        header.train_seconds = 0.001  # a straggler claiming to be quick, after signing
    elif attack == "other-client":
        header.client_id = "bob"
        conn.sign(header)
    else:
        header.round = 9
        conn.sign(header)
    with caplog.at_level(logging.WARNING, logger="fedlearn.transport"):
        ack = send(conn, header, payload)
    assert not ack.accepted and reason in ack.reason
    assert reason in served.pool.rejections[-1].reason
    assert "event=result_rejected" in caplog.text and reason in caplog.text
    assert send(conn, *answer(conn, task)).accepted  # the honest result still counts
    assert isinstance(future.result(5)[0], Update)


def test_replayed_result_is_rejected(served):
    conn = served.connect("alice")
    future = served.fit(["alice"], 1)
    first = answer(conn, conn.next_task())
    assert send(conn, *first).accepted
    future.result(5)
    future = served.fit(["alice"], 2)
    task = conn.next_task()
    ack = send(conn, *first)  # round 1's result again, byte for byte
    assert not ack.accepted and ack.reason.startswith("replay")
    assert send(conn, *answer(conn, task)).accepted
    assert future.result(5)[0].round == 2


def test_late_result_is_rejected_and_does_not_stall_the_round(creds):
    server = Served(creds, deadline=0.5)
    try:
        conn = server.connect("alice")
        future = server.fit(["alice"], 1)
        task = conn.next_task()
        [failure] = future.result(5)  # the round ends at its deadline without alice
        assert failure.kind == "timeout" and "deadline of 0.5s" in failure.reason
        ack = send(conn, *answer(conn, task))
        assert not ack.accepted and ack.reason.startswith("late: round 1's deadline")
    finally:
        server.close()


@pytest.mark.parametrize("delta, reason", [
    (np.arange(SIZE), "'values' is int64 (15,), expected float32 (15,)"),
    (np.full(SIZE, np.nan), "non-finite values"),
    (np.full(SIZE, np.inf), "non-finite values"),
    (np.zeros(SIZE + 2), "'values' is float32 (17,), expected float32 (15,)"),
])
def test_bad_updates_are_rejected_and_the_round_goes_on(served, delta, reason):
    alice, bob = served.connect("alice"), served.connect("bob")
    server = Server(served.pool, FedAvg(), STATE, sampler=ClientSampler(fraction=1.0), anomaly_checks=None)
    record = served.executor.submit(server.run_round, 1)
    tasks = {c.client_id: c.next_task() for c in (alice, bob)}
    send(alice, *answer(alice, tasks["alice"], delta))
    assert send(bob, *answer(bob, tasks["bob"])).accepted
    record = record.result(5)
    assert record.participants == ["bob"]
    [failure] = record.failures
    assert failure.client_id == "alice" and failure.kind == "rejected" and reason in failure.reason


def _oversized_declaration(conn, task) -> bytes:
    header, _ = answer(conn, task)
    header.payload_bytes = 10**10  # declares more than any update of this model could be
    return pb.ClientMessage(result=header).SerializeToString()


@pytest.mark.parametrize("garbage, code, reason", [
    (lambda conn, task: b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "malformed protobuf"),
    (lambda conn, task: pb.ClientMessage(chunk=pb.Chunk(index=0, data=b"x")).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT, "expected result, got chunk"),
    (lambda conn, task: pb.ClientMessage(hello=pb.Hello(protocol=7, client_id="alice")).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT, "protocol version 7 is not supported"),
    (lambda conn, task: b"\x00" * (MAX_MESSAGE_BYTES + 10), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    (_oversized_declaration, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
])
def test_malformed_and_oversized_messages_end_only_their_own_stream(served, garbage, code, reason):
    alice, bob = served.connect("alice"), served.connect("bob")
    future = served.fit(["alice", "bob"], 1)
    alice.send(garbage(alice, alice.next_task()))
    with pytest.raises(grpc.RpcError) as err:
        alice.read_ack()
    assert err.value.code() == code and reason in err.value.details()
    assert send(bob, *answer(bob, bob.next_task())).accepted  # bob is served all along
    results = future.result(5)
    assert results[0].kind == "drop" and isinstance(results[1], Update)  # alice's task failed at once


def test_idle_connections_cannot_crowd_out_registered_clients(creds):
    """40 streams from the clients' own address that never send a byte: they share a budget of 8 waiting
    streams, each newcomer pushing out the oldest, so registered clients still get in and are served, and
    status is answered; gRPC's own cap is never what refuses anyone."""
    server = Served(creds, max_connections=2, handshake_timeout=1.0, per_peer=8)
    try:
        codes, lock, stop, peak = [], threading.Lock(), threading.Event(), []

        def idle_stream():
            channel = open_channel(server.address, ClientBundle.load(creds / "clients" / "bob").tls)
            call = channel.stream_stream(CONNECT_METHOD)(iter(stop.wait, True))  # sends nothing until stop
            try:
                next(call)
            except grpc.RpcError as exc:
                with lock:
                    codes.append(exc.code())
            channel.close()

        flood = [threading.Thread(target=idle_stream) for _ in range(40)]
        for t in flood:
            t.start()
        wait_for(lambda: peak.append(server.service.admission.counts()) or
                 peak[-1]["evicted"] + peak[-1]["waiting"] + peak[-1]["timed_out"] >= 40, 20, "the flood to arrive")
        alice = server.connect("alice")  # pushes out the oldest idle stream
        future = server.fit(["alice"], 1)
        assert send(alice, *answer(alice, alice.next_task())).accepted
        assert isinstance(future.result(5)[0], Update)
        bob = server.connect("bob")
        assert server.pool.connected() == ["alice", "bob"]
        assert query_status(server.address, ClientTLS(creds / "ca.pem"), token_metadata(creds / "operator.token"),
                            timeout=5).run_id == "run-A"
        for t in flood:
            t.join(10)
        assert len(codes) == 40 and set(codes) == {grpc.StatusCode.CANCELLED}  # pushed out or timed out
        assert max(c["waiting"] for c in peak) <= 8
        counts = server.service.admission.counts()
        assert counts["evicted"] >= 32 and counts["evicted"] + counts["timed_out"] == 40
        assert counts["clients"] == 2 and counts["waiting"] == 0
        bob.close()
    finally:
        stop.set()
        server.close()


def test_streams_over_the_client_budget_are_refused_after_authenticating(creds):
    server = Served(creds, max_connections=1)
    try:
        alice = server.connect("alice")
        with pytest.raises(grpc.RpcError) as err:
            server.connect("bob")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum of 1 client connections" in err.value.details()
        assert server.pool.connected() == ["alice"] and alice.run_id == "run-A"
    finally:
        server.close()


def test_mutual_tls_binds_the_certificate_to_the_client_id(creds, caplog):
    """Someone holding alice's certificate and bob's stolen identity key cannot connect as bob."""
    server = Served(creds, mutual=True)
    alice_tls = ClientBundle.load(creds / "clients" / "alice").tls
    bob = ClientBundle.load(creds / "clients" / "bob")
    try:
        with caplog.at_level(logging.WARNING, logger="fedlearn.transport"), pytest.raises(grpc.RpcError) as err:
            Connection(open_channel(server.address, alice_tls), "bob", bob.identity)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and err.value.details() == AUTH_FAILED
        assert "certificate that names ['alice']" in caplog.text
        with pytest.raises(grpc.RpcError) as err:  # and cannot read the status as bob either
            query_status(server.address, alice_tls, client_metadata("bob", bob.identity), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "its TLS certificate names ['alice']" in caplog.text
        assert server.connect("alice").run_id == "run-A"
        assert server.pool.connected() == ["alice"]
    finally:
        server.close()


def _signed_status(cid, identity, sent_at):
    """A client's status request made by hand, at a chosen time."""
    stamp, nonce = f"{sent_at:.3f}", os.urandom(16)
    return [("fedlearn-client", cid), ("fedlearn-time", stamp), ("fedlearn-nonce-bin", nonce),
            ("fedlearn-signature-bin", identity.sign(status_message(cid, stamp, nonce)))]


def test_status_needs_a_clients_or_the_operators_credentials(served, creds, caplog):
    tls = ClientTLS(creds / "ca.pem")
    alice = ClientBundle.load(creds / "clients" / "alice")
    token = (creds / "operator.token").read_text().strip()
    assert query_status(served.address, tls, token_metadata(creds / "operator.token"), timeout=5).run_id == "run-A"
    once = client_metadata("alice", alice.identity)
    assert query_status(served.address, tls, once, timeout=5).run_id == "run-A"
    attacks = {
        "no credentials": ([], "no credentials"),
        "wrong token": ([("authorization", "Bearer " + "0" * 64)], "wrong operator token"),
        "token's digest as token": ([("authorization", "Bearer " + hashlib.sha256(token.encode()).hexdigest())],
                                    "wrong operator token"),
        "unknown client": (client_metadata("eve", Identity.generate()), "'eve' is not registered"),
        "wrong key": (client_metadata("alice", Identity.generate()), "signature does not match"),
        "replayed request": (once, "replayed status request"),
        "stale request": (_signed_status("alice", alice.identity, time.time() - 3600), "from the server's clock"),
    }
    for name, (metadata, reason) in attacks.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedlearn.transport"), pytest.raises(grpc.RpcError) as err:
            query_status(served.address, tls, metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and err.value.details() == STATUS_REFUSED, name
        assert "event=status_refused" in caplog.text and reason in caplog.text, name


def test_operator_token_is_private_and_the_server_holds_only_its_digest(creds):
    token_file = creds / "operator.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(bytes.fromhex(token)) == 32
    digest = (creds / "operator.token.sha256").read_text().strip()
    assert digest == hashlib.sha256(token.encode()).hexdigest() and token not in digest


def test_admission_budgets_per_peer_in_total_and_in_time():
    cancelled = []
    gate = Admission(max_clients=1, total=3, per_peer=2, status_calls=1, handshake_timeout=0.3)
    a1, a2, a3 = (gate.enter("ipv4:10.0.0.1:%d" % p, lambda p=p: cancelled.append(p)) for p in (1, 2, 3))
    assert cancelled == [1] and a1.state == "out"  # a third from the same address pushes out its oldest
    b1 = gate.enter("ipv4:10.0.0.2:1", lambda: cancelled.append("b1"))
    assert cancelled == [1] and gate.counts()["waiting"] == 3  # another address is not pushed out by it
    gate.enter("ipv4:10.0.0.3:1", lambda: cancelled.append("c1"))
    assert cancelled == [1, 2]  # over the total: the oldest of all goes
    with pytest.raises(Busy, match="pushed out"):
        gate.authenticated(a1)
    gate.authenticated(a3)
    with pytest.raises(Busy, match="maximum of 1 client"):
        gate.authenticated(b1)
    gate.leave(a3)
    assert gate.counts()["clients"] == 0
    wait_for(lambda: "c1" in cancelled, 3, "the handshake timeout")  # b1 left when refused; c1 times out
    assert gate.counts() == {"waiting": 0, "clients": 0, "status": 0, "evicted": 2, "timed_out": 1}
    with gate.status_call():
        with pytest.raises(Busy, match="status calls"):
            with gate.status_call():
                pass
    with gate.status_call():
        pass


def test_protocol_stages_reach_client_handlers_over_the_wire(served):
    """Multi-exchange protocols (secure aggregation) run remotely as in simulation: a stage is a message kind
    and a client-side handler; memory lasts across stages and `session.fit` trains on the carried model."""
    from fedlearn import Client
    from fedlearn.messages import Message
    from fedlearn.transport.client_process import run_client

    class Steady(Client):
        def fit(self, state, config):
            return Update(self.cid, config["round"], np.full(SIZE, 2.0), 4)

    def remember(session, message):
        session.memory["x"] = message.tensors["x"]
        return Message("remember", meta={"seen": session.cid})

    def train(session, message):
        update = session.fit({"round": message.meta["round"]})
        return Message("train", {"masked": update.delta + session.memory["x"].sum()})

    handlers = {"remember": remember, "train": train}
    threads = []
    for cid in ("alice", "bob"):
        bundle = ClientBundle.load(served.creds / "clients" / cid)
        thread = threading.Thread(target=run_client, args=(Steady(cid), served.address),
                                  kwargs={"identity": bundle.identity, "tls": bundle.tls,
                                          "handlers": handlers if cid == "alice" else {}})
        thread.start()
        threads.append(thread)
    served.pool.min_available = 2
    assert list(served.pool.client_ids) == ["alice", "bob"]
    first = served.pool.exchange({c: Message("remember", {"x": np.arange(3.0)}) for c in ("alice", "bob")})
    assert first["alice"].meta == {"seen": "alice"}
    assert first["bob"].kind == "crash" and "no handler for stage 'remember'" in first["bob"].reason
    second = served.pool.exchange({"alice": Message("train", meta={"round": 1})}, state=STATE, deadline=5)
    np.testing.assert_array_equal(second["alice"].tensors["masked"], np.full(SIZE, 5.0))  # 2 + (0 + 1 + 2)
    served.pool.finish("done")
    for thread in threads:
        thread.join(5)


def _message_of_exactly(size: int) -> bytes:
    """An encoded protocol message of exactly `size` bytes (a uint8 tensor sized to fill it)."""
    from fedlearn.messages import Message, encode_message

    def encoded(n):
        return encode_message(Message("stage", {"blob": np.zeros(n, np.uint8)}))

    guess = size - len(encoded(size))  # the header's length depends on the digits of the shape only
    data = encoded(size + guess)
    assert len(data) == size
    return data


def test_a_stage_reply_of_64_mib_is_accepted_and_one_byte_more_is_refused_before_it_is_read(served):
    """A protocol stage without a model may answer with up to 64 MiB (MAX_REPLY_BYTES, written out here by hand):
    exactly that much arrives and decodes; a declaration one byte larger ends the stream with the reason before
    a single chunk is read (the client sends no chunk, so a server with a larger limit would leave it waiting)."""
    from fedlearn.messages import Message

    limit = 64 * 1024 * 1024
    alice = served.connect("alice")
    stage = {"alice": Message("stage", meta={"round": 1})}
    future = served.executor.submit(served.pool.exchange, stage, deadline=20)
    task = alice.next_task()
    payload = _message_of_exactly(limit)
    assert send(alice, alice.result_header(task.header, payload), payload).accepted
    reply = future.result(20)["alice"]
    assert reply.kind == "stage" and limit - 4096 < reply.tensors["blob"].nbytes < limit
    assert not reply.tensors["blob"].any()
    del payload, reply

    future = served.executor.submit(served.pool.exchange, {"alice": Message("stage", meta={"round": 2})}, deadline=5)
    task = alice.next_task()
    header = alice.result_header(task.header, b"")
    header.payload_bytes = limit + 1
    alice.send(pb.ClientMessage(result=alice.sign(header)))
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(alice.read_ack)
        try:
            with pytest.raises(grpc.RpcError) as err:
                pending.result(10)  # a TimeoutError here: the server is still waiting for the chunks
        finally:
            alice.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"payload of {limit + 1} bytes exceeds the limit of {limit} bytes" in err.value.details()
    failure = future.result(10)["alice"]
    assert failure.kind == "drop"
