"""The audit log of a real run: every round committed with its record and signed head, and every kind of
tampering with a copy of the run store detected by `fedlearn audit verify` (edited, deleted, reordered and
truncated records, a forged signature, a log rewritten and re-signed after a client kept its receipt)."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedlearn import simulate
from fedlearn.audit import AuditError, AuditLog, Receipt, check_extends, check_receipt
from fedlearn.audit.log import KEY_FILE, load_or_create_key, public_hex
from fedlearn.audit.verify import consistency, prove, verify_run
from fedlearn.cli import main
from fedlearn.server.store import RoundEvidence, RunStore

ROUNDS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("audited") / "run"
    simulate({"num_clients": 8, "rounds": ROUNDS, "clients_per_round": 5, "local_epochs": 1, "eval_clients": 0,
              "attack": "sign_flip", "attack_fraction": 0.25, "attack_params": {"scale": 20.0}}, run_dir=run_dir)
    return run_dir


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def sql(run_dir: Path, *statements: tuple) -> None:
    conn = sqlite3.connect(run_dir / "run.sqlite")
    with conn:
        for statement in statements:
            conn.execute(*statement)
    conn.close()


def records(run_dir: Path) -> list[dict]:
    conn = sqlite3.connect(run_dir / "run.sqlite")
    rows = conn.execute("SELECT record FROM audit_leaves ORDER BY idx").fetchall()
    conn.close()
    return [json.loads(r[0]) for r in rows]


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def test_every_round_has_a_record_that_matches_the_store(run: Path) -> None:
    result = verify_run(run)
    assert result.ok, result.problems
    assert result.size == ROUNDS + 1  # round 0 (the initial model) and every round
    recs = records(run)
    store = RunStore(run, readonly=True)
    history = store.history()
    assert [r["round"] for r in recs] == list(range(ROUNDS + 1))
    for rec, rnd in zip(recs[1:], history):
        model = dict((r, m) for r, m, _ in store.committed())[rnd.round]
        assert rec["model_after"] == hashlib.sha256(model).hexdigest()
        assert sorted(rec["accepted"]) == sorted(rnd.participants)
        assert all(len(h) == 64 for h in rec["accepted"].values())
        assert [(f["client"], f["kind"]) for f in rec["refused"]] == [(f.client_id, f.kind) for f in rnd.failures]
        assert rec["fedlearn"] and rec["config"] == hashlib.sha256(canonical(store.get_meta("config"))).hexdigest()
    store.close()
    for before, after in zip(recs, recs[1:]):
        assert after["model_before"] == before["model_after"]
    flagged = [f for rec in recs for f in rec["refused"] if f["kind"] == "flagged"]
    assert flagged and all(f["reason"] for f in flagged)  # the sign-flipping attackers are named with reasons
    assert main(["audit", "verify", str(run)]) == 0


def test_edited_record_is_detected(copy: Path) -> None:
    rec = records(copy)[2]
    rec["epsilon"] = 0.01  # claim less privacy was spent
    sql(copy, ("UPDATE audit_leaves SET record = ? WHERE idx = 2", (canonical(rec),)))
    problems = verify_run(copy).problems
    assert any("not extended by the log" in p for p in problems), problems
    assert main(["audit", "verify", str(copy)]) == 1


def test_edited_model_is_detected(copy: Path) -> None:
    conn = sqlite3.connect(copy / "run.sqlite")
    model = bytearray(conn.execute("SELECT model FROM rounds WHERE round = 3").fetchone()[0])
    conn.close()
    model[-1] ^= 1
    sql(copy, ("UPDATE rounds SET model = ? WHERE round = 3", (bytes(model),)))
    assert any("model stored for round 3" in p for p in verify_run(copy).problems)


def test_deleted_record_is_detected(copy: Path) -> None:
    sql(copy, ("DELETE FROM audit_leaves WHERE idx = 2",))
    problems = verify_run(copy).problems
    assert any("deleted or renumbered" in p for p in problems), problems
    assert any("round 2 is committed in the store but has no audit record" in p for p in problems)


def test_deleted_and_renumbered_record_is_detected(copy: Path) -> None:
    sql(copy, ("DELETE FROM audit_leaves WHERE idx = 2",), ("UPDATE audit_leaves SET idx = idx - 1 WHERE idx > 2",),
        ("DELETE FROM rounds WHERE round = 2",))
    problems = verify_run(copy).problems
    assert any("not extended by the log" in p for p in problems), problems
    assert any("does not start from the model" in p for p in problems)


def test_reordered_records_are_detected(copy: Path) -> None:
    conn = sqlite3.connect(copy / "run.sqlite")
    (r2, b2), (r3, b3) = conn.execute("SELECT round, record FROM audit_leaves WHERE idx IN (2, 3) ORDER BY idx").fetchall()
    conn.close()
    sql(copy, ("UPDATE audit_leaves SET round = ?, record = ? WHERE idx = 2", (r3, b3)),
        ("UPDATE audit_leaves SET round = ?, record = ? WHERE idx = 3", (r2, b2)))
    problems = verify_run(copy).problems
    assert any("out of order" in p for p in problems), problems
    assert any("not extended by the log" in p for p in problems)


def test_truncated_log_is_detected(copy: Path) -> None:
    sql(copy, ("DELETE FROM audit_leaves WHERE idx >= 4",))
    problems = verify_run(copy).problems
    assert any("larger than the log" in p for p in problems), problems
    assert any(f"round {ROUNDS} is committed in the store but has no audit record" in p for p in problems)


def test_consistent_truncation_is_caught_by_a_head_held_elsewhere(copy: Path, tmp_path: Path) -> None:
    held = tmp_path / "receipt.json"
    held.write_text(json.dumps(prove(copy, records(copy)[ROUNDS]["refused"][0]["client"] if records(copy)[ROUNDS]["refused"]
                                     else next(iter(records(copy)[ROUNDS]["accepted"])), ROUNDS).to_json()))
    # the operator removes the last two rounds everywhere: rows, records and heads
    sql(copy, ("DELETE FROM audit_leaves WHERE idx >= 4",), ("DELETE FROM audit_heads WHERE size > 4",),
        ("DELETE FROM rounds WHERE round >= 4",))
    assert verify_run(copy).ok  # self-consistent without outside evidence...
    assert main(["audit", "verify", str(copy), "--head", str(held)]) == 1  # ...but the client's receipt proves it
    assert any("larger than the log" in p for p in verify_run(copy, heads=[Receipt.from_json(json.loads(held.read_text())).head]).problems)


def rewrite(run_dir: Path, edit, key_path: Path | None = None) -> None:
    """What an operator with the signing key could do: edit records and re-sign a fresh log of them."""
    recs = records(run_dir)
    edit(recs)
    conn = sqlite3.connect(run_dir / "run.sqlite")
    log_id = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()[0])
    with conn:
        conn.execute("DELETE FROM audit_leaves")
        conn.execute("DELETE FROM audit_heads")
        log = AuditLog(conn, log_id, load_or_create_key(key_path or run_dir / KEY_FILE))
        for rec in recs:
            log.append(rec["round"], rec)
        if key_path is not None:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_public_key'", (json.dumps(log.public_key),))
    conn.close()


def test_resigned_rewrite_does_not_extend_a_clients_earlier_head(copy: Path, tmp_path: Path) -> None:
    cid = next(iter(records(copy)[2]["accepted"]))
    receipt = prove(copy, cid, 2)
    check_receipt(receipt, client_id=cid)

    def drop_client(recs: list[dict]) -> None:  # erase the client's part in round 2
        recs[2]["accepted"].pop(cid)

    rewrite(copy, drop_client)
    sql(copy, ("UPDATE rounds SET participants = ? WHERE round = 2", (json.dumps(sorted(records(copy)[2]["accepted"])),)))
    assert verify_run(copy).ok  # re-signed with the run's own key, the log is consistent with itself
    problems = verify_run(copy, heads=[receipt.head]).problems
    assert any("given head of size" in p and "not extended" in p for p in problems), problems
    head, proof = consistency(copy, receipt.head.size)
    with pytest.raises(AuditError):
        check_extends(receipt.head, head, proof)


def test_log_resigned_with_another_key_fails_against_the_pinned_key(run: Path, copy: Path, tmp_path: Path) -> None:
    pinned = (run / "audit_public_key.txt").read_text().strip()
    rewrite(copy, lambda recs: None, key_path=tmp_path / "other.pem")
    assert verify_run(copy).ok
    problems = verify_run(copy, public_key=pinned).problems
    assert "not the expected" in problems[0] and all("invalid signature" in p for p in problems[1:])
    assert main(["audit", "verify", str(copy), "--key", pinned]) == 1


def test_forged_signature_is_detected(copy: Path) -> None:
    conn = sqlite3.connect(copy / "run.sqlite")
    sig = bytearray(conn.execute("SELECT signature FROM audit_heads WHERE size = 3").fetchone()[0])
    conn.close()
    sig[0] ^= 1
    sql(copy, ("UPDATE audit_heads SET signature = ? WHERE size = 3", (bytes(sig),)))
    assert any("invalid signature" in p for p in verify_run(copy).problems)


def test_prove_prints_a_receipt_a_client_can_check(run: Path, capsys: pytest.CaptureFixture) -> None:
    cid = next(iter(records(run)[3]["accepted"]))
    assert main(["audit", "prove", str(run), "--client", cid, "--round", "3"]) == 0
    receipt = Receipt.from_json(json.loads(capsys.readouterr().out))
    check_receipt(receipt, client_id=cid, public_key=(run / "audit_public_key.txt").read_text().strip())
    receipt.record["accepted"][cid] = "0" * 64  # a doctored record no longer matches the proof
    with pytest.raises(AuditError, match="does not lead to the root"):
        check_receipt(receipt, client_id=cid)
    absent = next(f"{i}" for i in range(8) if f"{i}" not in records(run)[3]["accepted"]
                  and all(r["client"] != f"{i}" for r in records(run)[3]["refused"]))
    assert main(["audit", "prove", str(run), "--client", absent, "--round", "3"]) == 2


def test_round_and_record_commit_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlearn.types import new_state
    import numpy as np

    store = RunStore(tmp_path)
    state = new_state({"w": np.zeros(3, np.float32)})
    store.commit_round(0, state, {}, {}, [], [])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(AuditLog, "append", broken)
    with pytest.raises(OSError):
        store.commit_round(1, state, {}, {}, ["a"], [])
    monkeypatch.undo()
    assert store.last_round() == 0  # the round was rolled back with its record
    with pytest.raises(ValueError):  # fails after the record was appended, inside the same transaction
        store.commit_round(1, state, {}, {}, ["a"], [], evidence=RoundEvidence({"a": "0" * 64}, {"a": {"gtg": "x"}}))
    assert store.last_round() == 0
    store.commit_round(1, state, {}, {}, ["a"], [])
    store.close()
    assert verify_run(tmp_path).ok and verify_run(tmp_path).size == 2
    assert public_hex(load_or_create_key(tmp_path / KEY_FILE)) == (tmp_path / "audit_public_key.txt").read_text().strip()


def test_consistency_command_proves_the_log_extends_a_held_head(run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    old = prove(run, next(iter(records(run)[1]["accepted"])), 1).head
    held = tmp_path / "head.json"
    # a head of 3 records, as a client would have kept it earlier in the run
    conn = sqlite3.connect(run / "run.sqlite")
    size, root, stamp, signature = conn.execute("SELECT size, root, timestamp_ms, signature FROM audit_heads "
                                                "WHERE size = 3").fetchone()
    conn.close()
    earlier = type(old)(old.log_id, size, bytes(root).hex(), stamp, old.public_key, bytes(signature).hex())
    held.write_text(json.dumps(earlier.to_json()))
    assert main(["audit", "consistency", str(run), "--head", str(held)]) == 0
    out = json.loads(capsys.readouterr().out)
    from fedlearn.audit.log import TreeHead
    from fedlearn.audit.receipts import hashes

    check_extends(earlier, TreeHead.from_json(out["head"]), hashes(out["proof"], "proof"))
    assert main(["audit", "verify", str(run), "--head", str(held)]) == 0
