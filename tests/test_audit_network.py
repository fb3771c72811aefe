"""Receipts and consistency proofs over the network: client processes end a run holding a checked receipt for
every round they took part in, the last included; a client asks the running server for a consistency proof
from the head it holds (`fedlearn audit consistency --server`) and catches a server that rewrote or truncated
its log and re-signed it with its own key; hostile Audit requests are refused with their reasons."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedlearn import FedAvg
from fedlearn.audit import Receipt, ReceiptBook, TreeHead, check_receipt
from fedlearn.audit.log import KEY_FILE, canonical, head_message, load_or_create_key
from fedlearn.audit.verify import verify_run
from fedlearn.cli import main
from fedlearn.server.store import RunStore
from fedlearn.transport import DeploymentServer, ServerSettings, certs
from fedlearn.transport import fedlearn_pb2 as pb
from fedlearn.transport.audit_rpc import fetch_consistency
from fedlearn.transport.certs import ClientBundle
from fedlearn.transport.channels import open_channel
from fedlearn.audit.receipts import AUDIT_KEY
from fedlearn.transport.client_process import Connection
from fedlearn.transport.status_auth import client_metadata
from fedlearn.transport.wire import AUDIT_METHOD, decode_config
from fedlearn.types import new_state
from test_audit_log import records, rewrite, sql
from transport_support import Deployment, client_threads

ROUNDS = 3
STATE = new_state({"w": np.zeros(4, np.float32)})


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit-net") / "creds"
    certs.create(out, ["0", "1"])
    return out


def settings(creds: Path, run_dir: Path) -> ServerSettings:
    return ServerSettings(address="127.0.0.1:0", run_dir=str(run_dir), certificate=str(creds / "server.pem"),
                          private_key=str(creds / "server.key"), allow_list=str(creds / "allowlist.txt"),
                          round_deadline=30, wait_for_clients=2)


@pytest.fixture(scope="module")
def served(creds: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished run whose server still listens: (server, address, run dir, receipts folder)."""
    folder = tmp_path_factory.mktemp("audit-served")
    server = DeploymentServer(STATE, FedAvg(), rounds=ROUNDS, settings=settings(creds, folder / "run"),
                              anomaly_checks=None)
    port = server.start()
    try:
        threads = client_threads(creds, port, folder / "receipts")
        server.run()
        for thread in threads:
            thread.join(30)
        yield server, f"127.0.0.1:{port}", folder / "run", folder / "receipts"
    finally:
        server.stop()


def receipt_file(receipts: Path, run_dir: Path, client: str, rnd: int) -> Path:
    return receipts / client / f"{RunStore(run_dir, readonly=True).run_id}-round-{rnd:06d}.json"


def held_head(path: Path) -> TreeHead:
    return Receipt.from_json(json.loads(path.read_text())).head


def ask(address: str, creds: Path, request: bytes, client: str = "0", signed: bool = True) -> pb.AuditReply:
    """A raw Audit call, as a hostile or careless caller could make it."""
    bundle = ClientBundle.load(creds / "clients" / client)
    with open_channel(address, bundle.tls) as channel:
        call = channel.unary_unary(AUDIT_METHOD, request_serializer=None, response_deserializer=pb.AuditReply.FromString)
        return call(request, timeout=10, metadata=client_metadata(client, bundle.identity) if signed else None)


def test_a_client_proves_over_the_network_that_the_log_extends_its_receipt(served, creds, capsys) -> None:
    server, address, run_dir, receipts = served
    early = receipt_file(receipts, run_dir, "0", 1)  # the receipt of round 1, under the head of 2 records
    assert held_head(early).size == 2
    assert main(["audit", "consistency", "--server", address, "--head", str(early),
                 "--credentials", str(creds / "clients" / "0")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["head"]["size"] == ROUNDS + 1
    assert verify_run(run_dir, heads=[TreeHead.from_json(out["head"])]).ok
    # the Python API, up to a chosen stored head, with the key pinned from the run
    key = (run_dir / "audit_public_key.txt").read_text().strip()
    bundle = ClientBundle.load(creds / "clients" / "1")
    head = fetch_consistency(address, bundle.tls, client_metadata("1", bundle.identity), held_head(early),
                             to_size=3, public_key=key)
    assert head.size == 3 and head.public_key == key


def test_a_reconnecting_client_gets_its_receipts_from_the_head_it_holds(served, creds) -> None:
    server, address, run_dir, _ = served
    bundle = ClientBundle.load(creds / "clients" / "0")
    for held, rounds in ((2, [2, 3]), (ROUNDS + 1, [])):
        with open_channel(address, bundle.tls) as channel:
            connection = Connection(channel, "0", bundle.identity, held=lambda run_id: held)
            try:
                assert "is over" in connection.next_task()  # the run is over: it says so at once...
                audit = decode_config(connection.finished.audit)[AUDIT_KEY]  # ...with receipts from `held` on
            finally:
                connection.close()
        assert audit["from_size"] == held and [r["record"]["round"] for r in audit["receipts"]] == rounds
        assert audit["head"]["size"] == ROUNDS + 1


def signed_head(run_dir: Path, size: int, root: bytes, log_id: str | None = None) -> TreeHead:
    """A head signed with the run's own key: what only the server (or whoever holds its key) can make."""
    key = load_or_create_key(run_dir / KEY_FILE)
    log_id = log_id or RunStore(run_dir, readonly=True).run_id
    signature = key.sign(head_message(log_id, size, root, 1))
    return TreeHead(log_id, size, root.hex(), 1, (run_dir / "audit_public_key.txt").read_text().strip(),
                    signature.hex())


def test_hostile_audit_requests_are_refused_with_reasons(served, creds) -> None:
    server, address, run_dir, receipts = served
    held = held_head(receipt_file(receipts, run_dir, "0", 1))
    good = pb.AuditRequest(head=canonical(held.to_json()))

    def refused(request: bytes, signed: bool = True) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            ask(address, creds, request, signed=signed)
        return caught.value

    error = refused(good.SerializeToString(), signed=False)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "credentials" in error.details()
    cases = {
        b"\x00" * 5000: "exceeds 4096 bytes",
        b"\xff\xff\xff": "not an AuditRequest",
        pb.AuditRequest(head=b"{not json").SerializeToString(): "malformed head: the held head is not JSON",
        pb.AuditRequest(head=b'{"size": 2}').SerializeToString(): "malformed head: a tree head needs exactly",
        pb.AuditRequest(head=canonical({**held.to_json(), "size": -1})).SerializeToString():
            "malformed head: tree head field size must be a non-negative integer",
        pb.AuditRequest(head=canonical(signed_head(run_dir, 2, held.root_bytes, "another-run").to_json()))
        .SerializeToString(): "is for log 'another-run'",
        pb.AuditRequest(head=canonical({**held.to_json(), "signature": "00" * 64})).SerializeToString():
            "not signed by this server's audit key",
        # an absurd size, validly signed: more records than the log has
        pb.AuditRequest(head=canonical(signed_head(run_dir, 10**12, held.root_bytes).to_json())).SerializeToString():
            "a head of 1000000000000 records cannot be a prefix of the head of 4",
        pb.AuditRequest(head=good.head, to_size=2**63).SerializeToString(): "it has no head of 9223372036854775808",
        pb.AuditRequest(head=good.head, to_size=1).SerializeToString(): "smaller than the held head's 2 records",
    }
    for request, reason in cases.items():
        error = refused(request)
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
        assert reason in error.details(), (reason, error.details())
    assert TreeHead.from_json(json.loads(ask(address, creds, good.SerializeToString()).head)).size == ROUNDS + 1


@pytest.fixture
def dishonest(served, creds, tmp_path):
    """A copy of the run served by a second server whose operator rewrites the log with the run's own key."""
    _, _, run_dir, _ = served
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    servers = []

    def serve() -> str:
        server = DeploymentServer(STATE, FedAvg(), rounds=ROUNDS, settings=settings(creds, copy), anomaly_checks=None,
                                  resume=True)
        servers.append(server)
        return f"127.0.0.1:{server.start()}"

    yield copy, serve
    for server in servers:
        server.stop()


def consistent(address: str, creds: Path, receipt: Path) -> int:
    return main(["audit", "consistency", "--server", address, "--head", str(receipt),
                 "--credentials", str(creds / "clients" / "0")])


def test_a_server_that_rewrote_its_log_is_caught(served, creds, dishonest, capsys) -> None:
    _, _, run_dir, receipts = served
    copy, serve = dishonest

    def erase_client_0(recs: list[dict]) -> None:  # as if client 0 had no part in round 1
        recs[1]["accepted"].pop("0")

    rewrite(copy, erase_client_0)
    sql(copy, ("UPDATE rounds SET participants = ? WHERE round = 1", (json.dumps(["1"]),)))
    assert verify_run(copy).ok  # re-signed with the run's own key, the log agrees with itself
    address = serve()
    capsys.readouterr()
    assert consistent(address, creds, receipt_file(receipts, run_dir, "0", 1)) == 1
    assert "does not extend the head of size 2" in capsys.readouterr().out


def test_a_server_that_truncated_its_log_is_caught(served, creds, dishonest, capsys) -> None:
    _, _, run_dir, receipts = served
    copy, serve = dishonest
    rewrite(copy, lambda recs: recs.pop())  # the last round's record is gone, the rest re-signed
    assert len(records(copy)) == ROUNDS
    address = serve()
    capsys.readouterr()
    last = receipt_file(receipts, run_dir, "0", ROUNDS)  # the receipt that came with the end of the run
    assert consistent(address, creds, last) == 1
    assert f"a head of {ROUNDS + 1} records cannot be a prefix of the head of {ROUNDS}" in capsys.readouterr().out
    # the records before the cut are untouched: only a head from after it shows the truncation
    early = held_head(receipt_file(receipts, run_dir, "0", 1))
    bundle = ClientBundle.load(creds / "clients" / "0")
    assert fetch_consistency(address, bundle.tls, client_metadata("0", bundle.identity), early).size == ROUNDS


def test_client_processes_hold_a_receipt_for_every_round_including_the_last(tmp_path, creds) -> None:
    deployment = Deployment(tmp_path, creds, rounds=ROUNDS, clients=2)
    for k in (0, 1):
        deployment.honest(k, "--receipts", str(tmp_path / "receipts" / str(k)))
    deployment.finish(240)
    run_dir = tmp_path / "run"
    key = (run_dir / "audit_public_key.txt").read_text().strip()
    run_id = RunStore(run_dir, readonly=True).run_id
    for k in ("0", "1"):
        book = ReceiptBook(tmp_path / "receipts" / k)
        kept = sorted(book.folder.glob(f"{run_id}-round-*.json"))
        assert [json.loads(p.read_text())["record"]["round"] for p in kept] == list(range(1, ROUNDS + 1))
        for path in kept:
            check_receipt(Receipt.from_json(json.loads(path.read_text())), client_id=k, public_key=key)
        assert book.latest_head(run_id).size == ROUNDS + 1
        assert verify_run(run_dir, heads=[book.latest_head(run_id)], public_key=key).ok
        assert "at='end of run' kept=1" in deployment.log(f"client{k}")
