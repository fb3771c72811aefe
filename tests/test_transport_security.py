"""Deployment security on loopback: only registered clients get in, TLS is required (mutual TLS on request),
and every bad result is rejected with its reason while the server keeps serving the other clients."""
from __future__ import annotations

import logging
import threading
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
from fedlearn.transport.wire import CONNECT_METHOD, MAX_MESSAGE_BYTES, encode_metrics

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

    def __init__(self, creds, *, deadline=3.0, max_connections=16, handshake_timeout=5.0, mutual=False):
        self.creds = creds
        self.pool = RemotePool("run-A", round_deadline=deadline, wait_timeout=10)
        service = Service(self.pool, creds / "allowlist.txt", pb.StatusReply, handshake_timeout=handshake_timeout)
        tls = ServerTLS(creds / "server.pem", creds / "server.key", creds / "ca.pem" if mutual else None)
        self.grpc, self.port = start_server([service.handler()], "127.0.0.1:0", tls, max_connections)
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

    def encode(self, vector):
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


def test_unregistered_client_and_wrong_key_are_refused(served, creds):
    outsider = creds / "clients" / "alice"  # real CA, but an id the allow-list does not hold
    with pytest.raises(grpc.RpcError) as err:
        Connection(open_channel(served.address, ClientBundle.load(outsider).tls), "eve", Identity.generate())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'eve' is not registered" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        served.connect("alice", identity=Identity.generate())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not match its registered key" in err.value.details()
    assert served.pool.connected() == []


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


def test_connection_flood_is_refused_while_registered_clients_are_served(creds):
    server = Served(creds, max_connections=12, handshake_timeout=1.0)
    try:
        alice = server.connect("alice")
        codes, lock, stop = [], threading.Lock(), threading.Event()

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
        future = server.fit(["alice"], 1)
        assert send(alice, *answer(alice, alice.next_task())).accepted
        assert isinstance(future.result(5)[0], Update)
        for t in flood:
            t.join(10)
        assert len(codes) == 40
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 25  # over the cap: refused at once
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}  # the rest timed out
        bob = server.connect("bob")  # the slots are free again
        assert server.pool.connected() == ["alice", "bob"]
        bob.close()
    finally:
        stop.set()
        server.close()


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
