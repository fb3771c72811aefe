"""Registered clients that send hostile values, against a real `fedlearn server` process on loopback with
real `fedlearn client` processes beside them: every bad value costs only its sender (rejected with the
reason), a protocol failure costs only its round, and the run completes. Each hostile client is
`hostile_client.py`, a real process with its own credentials that signs what it sends."""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct

import numpy as np
import pytest

from fedlearn import Failure, Update
from fedlearn.serialize import decode_tensors, encode_update
from fedlearn.secagg import SecAggConfig
from fedlearn.transport import certs
from test_transport_security import CODEC, SIZE, STATE, Served, send
from transport_support import Deployment

CLIENTS = 5


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "creds"
    certs.create(out, [str(k) for k in range(CLIENTS)])
    return out


def moved(models, a: int, b: int) -> np.ndarray:
    """Every coordinate's change of the global model from round a to round b."""
    return np.concatenate([(models[b][k].astype(np.float64) - models[a][k]).ravel() for k in models[a]])


def failure(record, cid: str):
    [found] = [f for f in record.failures if f.client_id == cid]
    return found


def test_impossible_counts_are_rejected_and_a_huge_claim_moves_the_model_no_more_than_its_cap(tmp_path, creds):
    """Client 3 claims 10**400 examples (it crashed the server with OverflowError); client 4 sends a step of
    50 and claims 10**15 examples (it took over FedAvg). With max_examples = 10 the honest clients' +1 steps
    (10 examples each) and client 4's capped weight give (3 * 10 * 1 + 10 * 50) / 40 = 13.25 per round."""
    run = Deployment(tmp_path, creds, rounds=2, clients=CLIENTS, sampling="max_examples = 10")
    for k in range(3):
        run.honest(k)
    run.hostile(3, f"count={10**400}@all")
    run.hostile(4, "--step", "50", f"count={10**15}@all")
    history, models = run.finish()
    assert [r.round for r in history] == [1, 2]
    for record in history:
        assert record.participants == ["0", "1", "2", "4"]
        rejected = failure(record, "3")  # refused by the count check, or already by the header parser
        assert rejected.kind == "rejected" and re.search(r"num_examples must be in \[1, 2\*\*53\], got an integer of "
                                                         r"1329 bits|integer .* longer than", rejected.reason)
    np.testing.assert_allclose(moved(models, 0, 1), 13.25, atol=1e-4)
    np.testing.assert_allclose(moved(models, 1, 2), 13.25, atol=1e-4)
    assert "claims 1000000000000000 examples; its weight is capped at max_examples=10" in \
        (tmp_path / "server.log").read_text()


def test_forged_adaptive_clipping_indicators_are_rejected_and_the_clip_norm_stays_put(tmp_path, creds):
    """dp_unclipped is a 0/1 indicator (Andrew et al.); -1e4 overflowed the clip update and +20 moved the clip
    norm to 361 within three rounds. Honest clients' updates are all clipped (indicator 0), so the next clip
    norm is C * exp(-0.2 * (f - 0.5)) with f the noised fraction (count noise std 0.25 over 5 expected
    clients, so f ~ N(0, 0.05)): far within a factor exp(+-0.2) per round."""
    privacy = "[privacy]\ndp_clip = 1.0\ndp_noise = 0.3\nadaptive_clip = true"
    run = Deployment(tmp_path, creds, rounds=3, clients=CLIENTS, sections=privacy)
    for k in range(3):
        run.honest(k, "--central-dp")
    run.hostile(3, "--central-dp", "unclipped=-10000@all")
    run.hostile(4, "--central-dp", "unclipped=20@all")
    history, _ = run.finish()
    clip = 1.0
    for record in history:
        assert record.participants == ["0", "1", "2"]
        for cid, value in (("3", "-10000.0"), ("4", "20.0")):
            rejected = failure(record, cid)
            assert rejected.kind == "rejected" and f"'dp_unclipped' must be 0 or 1" in rejected.reason \
                and value in rejected.reason
        assert record.metrics["dp_clip"] == pytest.approx(clip)
        ratio = record.metrics["dp_clip_next"] / clip
        assert math.exp(-0.2) < ratio < math.exp(0.2), ratio
        clip = record.metrics["dp_clip_next"]


def test_bad_secure_aggregation_replies_cost_their_sender_and_aborts_cost_only_their_round(tmp_path, creds):
    """Five clients, full graph, threshold 3 of 5. Round 1: client 3 leaves c_pk out of its key
    advertisement (a KeyError that ended the run), client 4 adds num_examples="x" to its masked reply (a
    ValueError that ended the run; the count now travels inside the masked vector, and the text is never
    read). Round 2:
    client 0 reveals corrupt shares (SecAggAbort ended the run). Round 4: three clients drop out in training,
    below the threshold. Rounds 3 and 5 are clean, and the run completes."""
    privacy = "[privacy]\nsecagg = true\nsecagg_graph = \"full\"\nsecagg_range = 1.0"
    run = Deployment(tmp_path, creds, rounds=5, clients=CLIENTS, sections=privacy)
    run.hostile(0, "--step", "0.5", "corrupt_shares@2")
    run.hostile(1, "--step", "0.5", "fail_training@4")
    run.hostile(2, "--step", "0.5", "fail_training@4")
    run.hostile(3, "--step", "0.5", "no_c_pk@1", "fail_training@4")
    run.hostile(4, "--step", "0.5", "count_text@1")
    history, models = run.finish()
    first, second, third, fourth, fifth = history
    assert first.participants == ["0", "1", "2", "4"] and not first.note
    assert "secagg/advertise: 'c_pk' must be 32 bytes (a 1-D uint8 tensor), got nothing" in failure(first, "3").reason
    assert second.participants == [] and second.metrics["round_failed"] == 1.0
    assert "aborted by the secagg protocol" in second.note and "are corrupt" in second.note
    assert fourth.participants == [] and fourth.metrics["round_failed"] == 1.0
    assert "only 2 clients completed secagg/masked, fewer than the 3" in fourth.note
    assert third.participants == fifth.participants == ["0", "1", "2", "3", "4"]
    step = SecAggConfig(clip_range=1.0).quantizer(CLIENTS).step + 1e-6  # quantisation and float32 rounding
    for a, b, expected in ((0, 1, 0.5), (1, 2, 0.0), (2, 3, 0.5), (3, 4, 0.0), (4, 5, 0.5)):
        np.testing.assert_allclose(moved(models, a, b), expected, atol=step if expected else 0)
    notes = [r.note for r in history]  # the reasons are in the run store, not only in this process
    assert notes[1] and notes[3] and not notes[0] and not notes[2] and not notes[4]


@pytest.fixture
def served(tmp_path):
    """An in-process server (pool + gRPC service, TLS) for one registered client, alice."""
    certs.create(tmp_path / "creds", ["alice"])
    server = Served(tmp_path / "creds")
    yield server
    server.close()


def _forged_payload(tensors: dict, meta: dict) -> bytes:
    """A tensor message as a hostile client can write it: JSON that Python reads back (NaN, Infinity, huge
    integers) but that `encode_tensors` never writes."""
    payload = b"".join(np.ascontiguousarray(v).tobytes() for v in tensors.values())
    header = {"tensors": [{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)} for k, v in tensors.items()],
              "meta": meta, "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    head = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<4sI", b"FLT1", len(head)) + head + payload


DECODER = "|corrupt header"  # NaN, Infinity and huge integers may already be refused by the header parser


@pytest.mark.parametrize("kind, meta, reason", [
    ("fit", {"num_examples": 10, "metrics": {"train_loss": math.nan}}, "metric 'train_loss' must be finite" + DECODER),
    ("fit", {"num_examples": 10**400, "metrics": {}}, r"num_examples must be in \[1, 2\*\*53\]" + DECODER),
    ("fit", {"num_examples": 2**60, "metrics": {}}, r"num_examples must be in \[1, 2\*\*53\], got 1152921504606846976"),
    ("fit", {"num_examples": 10, "metrics": {"loss": 1e300, "x": True}}, "metric 'x' must be a number, got bool"),
    ("evaluate", {"metrics": {"accuracy": 0.5, "num_examples": math.inf}}, "metric 'num_examples' must be finite"
     + DECODER),
    ("evaluate", {"metrics": {"accuracy": 0.5, "num_examples": 10**400}}, r"could not be decoded \(OverflowError"
     + DECODER),
    ("evaluate", {"metrics": {"accuracy": 0.5, "num_examples": 2.5}}, "num_examples must be a count, got 2.5"),
    ("evaluate", {"metrics": {"accuracy": 0.5, "num_examples": 1e300}}, "num_examples must be a count, got 1e"),
])
def test_values_json_can_carry_but_the_encoder_never_writes_are_rejected_where_decoded(served, kind, meta, reason):
    """Over real gRPC: each is refused with its reason on the client's Ack, and its task fails alone."""
    conn = served.connect("alice")
    if kind == "fit":
        future = served.fit(["alice"], 1)
        task = conn.next_task()
        tensors, honest = decode_tensors(encode_update(Update("alice", 1, np.full(SIZE, 0.5), 10), codec=CODEC))
        payload = _forged_payload(tensors, {**honest, **meta})
    else:
        future = served.executor.submit(served.pool.evaluate, STATE, {"alice": {"round": 1}})
        task = conn.next_task()
        payload = _forged_payload({}, {"kind": "metrics", **meta})
    ack = send(conn, conn.result_header(task.header, payload), payload)
    assert not ack.accepted and re.search(reason, ack.reason), ack.reason
    [result] = future.result(5)
    assert isinstance(result, Failure) and result.kind == "rejected" and re.search(reason, result.reason)
