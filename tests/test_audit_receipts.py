"""Receipts: the server sends each client, with its next fit task and at the end of the run, a signed head,
inclusion proofs of the records naming it and a consistency proof from the head it holds; the client checks
and keeps them, and refuses a bundle whose record was doctored, whose log was rewritten or shrank, or that
another key signed.
Also the deployment server's own dashboard behind the operator token."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedlearn import FedAvg
from fedlearn.audit import AuditError, AuditLog, Receipt, ReceiptBook, check_receipt
from fedlearn.audit.log import load_or_create_key
from fedlearn.audit.receipts import ReceiptIssuer, accept_bundle
from fedlearn.audit.verify import verify_run
from fedlearn.server.store import RunStore
from fedlearn.transport import DeploymentServer, ServerSettings, certs
from fedlearn.types import Failure, new_state
from transport_support import ConstantClient, client_threads, wait_for

STATE = new_state({"w": np.zeros(4, np.float32)})


def commit(store: RunStore, rnd: int, participants: list[str], failures: list[Failure] = ()) -> None:
    store.commit_round(rnd, new_state({"w": np.full(4, rnd, np.float32)}), {}, {}, participants, list(failures))


@pytest.fixture
def store(tmp_path: Path):
    s = RunStore(tmp_path / "run")
    commit(s, 0, [])
    yield s
    s.close()


def test_bundles_carry_receipts_and_consistency(store: RunStore, tmp_path: Path) -> None:
    issuer, book = ReceiptIssuer(store.audit), ReceiptBook(tmp_path / "alice")
    assert accept_bundle(book, issuer.bundle("alice"), "alice") == []  # round 1's task: nothing to receipt yet
    commit(store, 1, ["alice", "bob"])
    commit(store, 2, ["bob"], [Failure("alice", "flagged", "norm outlier")])  # named with its reason, too
    bundle = issuer.bundle("alice")
    assert bundle["from_size"] == 1 and bundle["head"]["size"] == 3 and len(bundle["consistency"]) > 0
    kept = accept_bundle(book, bundle, "alice")
    assert [json.loads(p.read_text())["record"]["round"] for p in kept] == [1, 2]
    for path in kept:
        check_receipt(Receipt.from_json(json.loads(path.read_text())), client_id="alice")
    commit(store, 3, ["bob"])
    assert accept_bundle(book, issuer.bundle("alice"), "alice") == []  # not named in round 3
    assert book.latest_head(store.run_id).size == 4


def test_a_doctored_record_is_refused(store: RunStore, tmp_path: Path) -> None:
    issuer = ReceiptIssuer(store.audit)
    issuer.bundle("alice")
    commit(store, 1, ["alice", "bob"])
    bundle = issuer.bundle("alice")
    bundle["receipts"][0]["record"]["accepted"]["alice"] = "0" * 64
    with pytest.raises(AuditError, match="does not lead to the root"):
        accept_bundle(ReceiptBook(tmp_path / "a"), bundle, "alice")
    other = issuer.bundle("bob")  # a receipt that does not name the client
    other["receipts"][0]["record"]["accepted"].pop("alice")
    with pytest.raises(AuditError):
        accept_bundle(ReceiptBook(tmp_path / "b"), other, "carol")


def test_a_rewritten_or_shrunk_log_is_refused(store: RunStore, tmp_path: Path) -> None:
    issuer, book = ReceiptIssuer(store.audit), ReceiptBook(tmp_path / "alice")
    for rnd in (1, 2):
        commit(store, rnd, ["alice"])
    accept_bundle(book, issuer.bundle("alice"), "alice")
    # the operator, holding the key, rewrites round 1 without alice and re-signs a longer log
    records = [json.loads(bytes(r[2])) for r in store.audit.records()]
    records[1]["accepted"] = {}
    store._conn.execute("DELETE FROM audit_leaves")
    store._conn.execute("DELETE FROM audit_heads")
    store.audit = AuditLog(store._conn, store.run_id, load_or_create_key(store.run_dir / "audit_key.pem"))
    for rec in records:
        store.audit.append(rec["round"], rec)
    store.audit.append(3, {**records[2], "round": 3})
    store._conn.commit()
    with pytest.raises(AuditError, match="does not extend"):
        accept_bundle(book, ReceiptIssuer(store.audit).bundle("alice") | {"from_size": 3}, "alice")
    store._conn.execute("DELETE FROM audit_heads WHERE size > 2")
    store._conn.commit()
    with pytest.raises(AuditError, match="shrank"):
        accept_bundle(book, ReceiptIssuer(store.audit).bundle("alice"), "alice")


def test_a_head_signed_by_another_key_is_refused(store: RunStore, tmp_path: Path) -> None:
    issuer, book = ReceiptIssuer(store.audit), ReceiptBook(tmp_path / "alice")
    accept_bundle(book, issuer.bundle("alice"), "alice")
    commit(store, 1, ["alice"])
    store.audit = AuditLog(store._conn, store.run_id, load_or_create_key(tmp_path / "other.pem"))
    commit(store, 2, ["alice"])
    with pytest.raises(AuditError, match="signed by key"):
        accept_bundle(book, ReceiptIssuer(store.audit).bundle("alice"), "alice")  # pinned on first use


def test_deployed_clients_keep_receipts_and_the_operator_dashboard_needs_the_token(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    creds = tmp_path / "creds"
    certs.create(creds, ["0", "1"])
    rounds = 3
    settings = ServerSettings(address="127.0.0.1:0", run_dir=str(tmp_path / "run"), certificate=str(creds / "server.pem"),
                              private_key=str(creds / "server.key"), allow_list=str(creds / "allowlist.txt"),
                              round_deadline=30, wait_for_clients=2, dashboard="127.0.0.1:0",
                              operator_token=str(creds / "operator.token.sha256"))
    server = DeploymentServer(STATE, FedAvg(), rounds=rounds, settings=settings, anomaly_checks=None)
    port = server.start()
    threads = []
    try:
        threads = client_threads(creds, port, tmp_path / "receipts")
        base = f"http://127.0.0.1:{server.dashboard.port}/api/state"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=10)
        assert refused.value.code == 401
        token = (creds / "operator.token").read_text().strip()  # the same token `fedlearn status --token` uses
        request = urllib.request.Request(base, headers={"Authorization": f"Bearer {token}"})
        live = wait_for(lambda: json.loads(urllib.request.urlopen(request, timeout=10).read())["live"], 30, "live state")
        assert live["total_rounds"] == rounds
        server.run()
        state = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert state["live"]["phase"] == "finished" and len(state["rounds"]) == rounds and state["audit"]["ok"]
    finally:
        for thread in threads:
            thread.join(30)
        server.stop()
    run_id = RunStore(tmp_path / "run", readonly=True).run_id
    for k in ("0", "1"):
        book = ReceiptBook(tmp_path / "receipts" / k)
        kept = sorted(book.folder.glob(f"{run_id}-round-*.json"))
        # round r's record is appended after round r's tasks went out: it rides with round r + 1's task, and
        # the last round's with the message that ends the run
        assert [json.loads(p.read_text())["record"]["round"] for p in kept] == list(range(1, rounds + 1))
        for path in kept:
            check_receipt(Receipt.from_json(json.loads(path.read_text())), client_id=k,
                          public_key=(tmp_path / "run" / "audit_public_key.txt").read_text().strip())
        head = book.latest_head(run_id)
        assert head.size == rounds + 1  # the head of the whole log (round 0 and every round), sent at the end
        assert verify_run(tmp_path / "run", heads=[head]).ok


def test_a_client_that_lost_a_bundle_says_what_it_holds_and_checks_the_next(store: RunStore, tmp_path: Path) -> None:
    issuer, book = ReceiptIssuer(store.audit), ReceiptBook(tmp_path / "alice")
    commit(store, 1, ["alice"])
    accept_bundle(book, issuer.bundle("alice"), "alice")  # alice holds the head of 2 records
    commit(store, 2, ["alice"])
    issuer.bundle("alice")  # lost with a connection: alice never saw it
    commit(store, 3, ["alice"])
    with pytest.raises(AuditError, match="but this client last saw 2"):
        accept_bundle(book, issuer.bundle("alice"), "alice")
    issuer.holds("alice", book.latest_head(store.run_id).size)  # it reconnects, saying it holds 2
    kept = accept_bundle(book, issuer.bundle("alice"), "alice")
    assert [json.loads(p.read_text())["record"]["round"] for p in kept] == [2, 3]
    issuer.holds("alice", 10**9)  # a claim beyond the log is ignored: back to the last record naming alice
    assert issuer.bundle("alice")["from_size"] == 3


def test_a_bad_bundle_at_the_end_of_the_run_is_refused(store: RunStore, tmp_path: Path) -> None:
    from fedlearn.audit.receipts import AUDIT_KEY
    from fedlearn.transport import fedlearn_pb2 as pb
    from fedlearn.transport.client_process import _Worker
    from fedlearn.transport.wire import encode_config

    issuer = ReceiptIssuer(store.audit)
    worker = _Worker(client=ConstantClient("alice"), transforms=(), handlers={}, receipts=ReceiptBook(tmp_path / "a"))
    worker.final_receipts(pb.Finished(reason="over", audit=encode_config({AUDIT_KEY: issuer.bundle("alice")})))
    commit(store, 1, ["alice"])
    doctored = issuer.bundle("alice")
    doctored["receipts"][0]["record"]["accepted"]["alice"] = "0" * 64
    with pytest.raises(AuditError, match="does not lead to the root"):
        worker.final_receipts(pb.Finished(reason="over", audit=encode_config({AUDIT_KEY: doctored})))
    with pytest.raises(AuditError, match="malformed"):
        worker.final_receipts(pb.Finished(reason="over", audit=b"\x00garbage"))
    assert worker.receipts.latest_head(store.run_id).size == 1  # nothing of the bad bundles was kept
