"""What binds a result to its task on the wire, each played by an attacker: a nonce is good only on the
connection of the client it was issued to, the round and client named inside the signed payload must be the
task's, and the serializer's dtype allow-list refuses every dtype outside it, in the header and when encoding."""
from __future__ import annotations

import numpy as np
import pytest

from fedlearn import Update
from fedlearn.serialize import SerializationError, decode_tensors, decode_update, encode_tensors, encode_update
from fedlearn.transport import certs
from test_serialize import _rewrite_header
from test_transport_security import CODEC, Served, answer, send

# The allow-list, written out independently of fedlearn.serialize: little-endian floats and integers, bytes, bools.
ALLOWED = {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("creds")
    certs.create(out, ["alice", "bob"])
    return out


@pytest.fixture
def served(creds):
    server = Served(creds)
    yield server
    server.close()


def test_a_nonce_is_accepted_only_from_the_client_it_was_issued_to(served):
    alice, bob = served.connect("alice"), served.connect("bob")
    future = served.fit(["alice", "bob"], 1)
    tasks = {"alice": alice.next_task(), "bob": bob.next_task()}
    # bob answers alice's task: properly signed by bob, for this run and round, but with alice's nonce
    stolen, payload = answer(bob, tasks["alice"])
    ack = send(bob, stolen, payload)
    assert not ack.accepted and "nonce was issued to client 'alice', not to this connection" in ack.reason
    assert send(alice, *answer(alice, tasks["alice"])).accepted  # alice's task is still open for her
    assert send(bob, *answer(bob, tasks["bob"])).accepted
    results = future.result(5)
    assert [u.client_id for u in results] == ["alice", "bob"] and all(isinstance(u, Update) for u in results)


@pytest.mark.parametrize("inside, reason", [
    (dict(round=5), "it names client 'alice' round 5, the task was for 'alice' round 1"),
    (dict(client_id="bob"), "it names client 'bob' round 1, the task was for 'alice' round 1"),
])
def test_the_round_and_client_inside_the_signed_payload_must_be_the_tasks(served, inside, reason):
    alice = served.connect("alice")
    future = served.fit(["alice"], 1)
    task = alice.next_task()
    fields = {"client_id": "alice", "round": 1, **inside}
    payload = encode_update(Update(fields["client_id"], fields["round"], np.full(15, 0.5), 10), codec=CODEC)
    ack = send(alice, alice.result_header(task.header, payload), payload)  # header honest and signed
    assert not ack.accepted and reason in ack.reason
    [failure] = future.result(5)
    assert failure.kind == "rejected" and reason in failure.reason
    assert reason in served.pool.rejections[-1].reason


def _candidate_dtypes() -> set[str]:
    """Every dtype string numpy can make from its type codes, in every byte order, plus a few spellings."""
    names = set()
    for code in np.typecodes["All"] + "?":
        for order in "<>|=":
            try:
                names.add(np.dtype(order + code).str)
            except TypeError:
                continue
    return names | {"|O", "float32", "f4", "=f8", ">f4", ">i8", "<c8", "<f16", "", "<f4 ", "<M8[s]", ">m8[ns]",
                    "<U3", "|S3", "|V4"}


def test_every_dtype_outside_the_allow_list_is_refused_in_the_header():
    base = encode_tensors({"x": np.zeros(2, np.float32)})
    refused = sorted(_candidate_dtypes() - ALLOWED)
    assert len(refused) > 30 and {"|O", ">f4", "<c16", "<M8[s]", "<U3", "|V4"} <= set(refused)
    for dtype in refused:
        data = _rewrite_header(base, lambda h: h["tensors"][0].update(dtype=dtype))
        with pytest.raises(SerializationError, match="is not allowed"):
            decode_tensors(data)


def test_every_dtype_outside_the_allow_list_is_refused_when_encoding():
    for dtype in sorted(_candidate_dtypes() - ALLOWED):
        try:
            value = np.zeros(2, dtype=dtype)
        except TypeError:
            continue
        if value.dtype.newbyteorder("<").str in ALLOWED:  # big-endian numbers travel little-endian
            back, _ = decode_tensors(encode_tensors({"x": value}))
            assert back["x"].dtype.str in ALLOWED and np.array_equal(back["x"], value)
            continue
        with pytest.raises(SerializationError, match="cannot be serialized"):
            encode_tensors({"x": value})


@pytest.mark.parametrize("dtype", sorted(ALLOWED))
def test_every_allowed_dtype_round_trips(dtype):
    value = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    back, _ = decode_tensors(encode_tensors({"x": value}))
    assert back["x"].dtype.str == dtype and np.array_equal(back["x"], value)


def test_an_update_with_an_integer_or_half_extra_is_refused():
    update = Update("c", 1, np.ones(3), 2, extras={"mean_gradient": np.ones(3, dtype=np.int32)})
    with pytest.raises(SerializationError, match="extra 'mean_gradient' must be floating point, got int32"):
        decode_update(encode_update(update))


# ---------------------------------------------------------------- every refusal of the tensor decoder, by its reason

def _update_message(tensors=None, **meta):
    fields = {"kind": "update", "client_id": "a", "round": 1, "num_examples": 3, **meta}
    return encode_tensors({"delta": np.ones(2)} if tensors is None else tensors, fields)


@pytest.mark.parametrize("data, reason", [
    (b"FLT1" + (2**20 + 1).to_bytes(4, "little") + b" " * (2**20 + 1), "header length 1048577 does not fit"),
    (b"FLT1" + (2**20).to_bytes(4, "little") + b" " * (2**20 - 2) + b"{}", "missing tensor list"),  # 1 MiB fits
    (b"FLT1" + (50).to_bytes(4, "little") + b"{}", "header length 50 does not fit"),
    (b"FLT1" + (2).to_bytes(4, "little") + b"[]", "missing tensor list"),
    (b"FLT1" + (2).to_bytes(4, "little") + b"\xff\xfe", "corrupt header"),
])
def test_decoder_refuses_bad_prefixes_and_headers(data, reason):
    with pytest.raises(SerializationError, match=reason):
        decode_tensors(data)


@pytest.mark.parametrize("edit, reason", [
    (lambda h: h["tensors"][0].update(shape=[-1]), r"invalid shape \[-1\]"),
    (lambda h: h["tensors"][0].update(shape=[True, 2]), r"invalid shape \[True, 2\]"),
    (lambda h: h["tensors"][0].update(shape="2"), "invalid shape '2'"),
    (lambda h: h["tensors"][0].update(name=7), "missing or duplicate name"),
    (lambda h: h["tensors"].append(dict(h["tensors"][0])), "missing or duplicate name"),
    (lambda h: h["tensors"].append(3), "tensor entry 1 is not an object"),
    (lambda h: h.update(payload_bytes="16"), "missing payload length or checksum"),
    (lambda h: h.update(sha256=None), "missing payload length or checksum"),
    (lambda h: h.update(meta=[1]), "meta must be an object"),
    (lambda h: h.update(payload_bytes=17), "tensors need 16 bytes but payload_bytes is 17"),
])
def test_decoder_refuses_each_corrupt_header_field(edit, reason):
    with pytest.raises(SerializationError, match=reason):
        decode_tensors(_rewrite_header(encode_tensors({"x": np.zeros(2)}), edit))


def test_a_zero_size_and_a_scalar_tensor_decode():
    back, meta = decode_tensors(encode_tensors({"empty": np.zeros((0, 3)), "s": np.float32(2.5)}, {"k": 1}))
    assert back["empty"].shape == (0, 3) and back["s"].shape == () and back["s"] == 2.5 and meta == {"k": 1}


@pytest.mark.parametrize("data, reason", [
    (lambda: _update_message({"x": np.ones(2)}), "must hold a tensor 'delta'"),
    (lambda: _update_message({"delta": np.ones(2), "control": np.ones(2)}), "must hold a tensor 'delta'"),
    (lambda: _update_message({"delta": np.ones((2, 1))}), r"delta must be 1-D, got shape \(2, 1\)"),
    (lambda: _update_message(client_id=5), "update metadata needs client_id"),
    (lambda: _update_message(round="1"), "update metadata needs client_id"),
    (lambda: _update_message(num_examples=2.0), "update metadata needs client_id"),
    (lambda: _update_message(num_examples=-1), "update metadata needs client_id"),
    (lambda: _update_message(metrics=[1.0]), "update metrics must map names to numbers"),
    (lambda: _update_message(metrics={"loss": "low"}), "update metrics must map names to numbers"),
    (lambda: _update_message(kind="state"), "expected an update, got a message of kind 'state'"),
])
def test_update_decoder_refuses_bad_names_shapes_and_metadata(data, reason):
    with pytest.raises(SerializationError, match=reason):
        decode_update(data())


def test_update_metadata_edges_that_are_valid():
    update = decode_update(_update_message(num_examples=0, metrics={"n": 3}))
    assert update.num_examples == 0 and update.metrics == {"n": 3} and update.partial is False
    with pytest.raises(SerializationError, match="cannot be serialized"):
        encode_update(Update("a", 1, np.ones(2), 1, {"loss": float("nan")}))


def test_an_identity_key_of_another_kind_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedlearn.transport.identity import Identity, IdentityError

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "ec.pem").write_bytes(pem)
    with pytest.raises(IdentityError, match="is not an Ed25519 key"):
        Identity.load(tmp_path / "ec.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(IdentityError, match="is not a readable PEM private key"):
        Identity.load(tmp_path / "junk.pem")
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "missing.pem")
    ours = Identity.generate()
    ours.save(tmp_path / "id.pem")
    assert Identity.load(tmp_path / "id.pem").public_hex == ours.public_hex
    assert (tmp_path / "id.pem").stat().st_mode & 0o777 == 0o600
