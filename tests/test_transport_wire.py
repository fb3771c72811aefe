"""The wire layer: chunked payloads round-trip and refuse every kind of tampering, and the decoder that sees
every client byte survives thousands of random and mutated inputs with a reason, never a crash or a hang."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlearn import Update
from fedlearn.serialize import SerializationError, decode_update, encode_update
from fedlearn.transport import fedlearn_pb2 as pb
from test_serialize import HOSTILE_HEADERS, _message
from fedlearn.transport.identity import CLIENT_ID_PATTERN, AllowList, Identity, IdentityError, result_message, verify
from fedlearn.transport.wire import (
    CHUNK_BYTES,
    MAX_TRANSFORMS,
    PROTOCOL,
    WireError,
    chunks,
    collect,
    decode_client_message,
    decode_config,
    decode_metrics,
    encode_config,
    encode_metrics,
)

FUZZ = settings(max_examples=2500, deadline=500, suppress_health_check=[HealthCheck.too_slow])


def _messages(payload: bytes) -> list[pb.ClientMessage]:
    return [pb.ClientMessage(chunk=c) for c in chunks(payload)]


def _valid_stream() -> list[bytes]:
    """What an honest client sends for one result: header, then chunks."""
    payload = encode_update(Update("alice", 3, np.linspace(-1, 1, 50), 12, {"train_loss": 0.5}))
    header = pb.ResultHeader(run_id="run", round=3, nonce=b"n" * 16, client_id="alice", kind=pb.FIT,
                             payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).digest(),
                             signature=b"s" * 64, train_seconds=0.25)
    return [pb.ClientMessage(result=header).SerializeToString()] + [m.SerializeToString() for m in _messages(payload)]


def _decode_result(stream: list[bytes], limit: int = 1 << 20) -> Update:
    """The server's whole decoding path for one result."""
    messages = iter([decode_client_message(m) for m in stream])
    header = next(messages)
    if header.WhichOneof("body") != "result":
        raise WireError("not a result")
    payload = collect(messages, header.result.payload_bytes, header.result.payload_sha256, limit=limit)
    return decode_update(payload)


def test_chunked_payload_round_trips_across_chunk_boundaries():
    payload = np.random.default_rng(0).bytes(2 * CHUNK_BYTES + 7)
    messages = _messages(payload)
    assert [len(m.chunk.data) for m in messages] == [CHUNK_BYTES, CHUNK_BYTES, 7]
    assert collect(iter(messages), len(payload), hashlib.sha256(payload).digest(), limit=len(payload)) == payload
    assert collect(iter([]), 0, hashlib.sha256(b"").digest(), limit=0) == b""


@pytest.mark.parametrize("tamper, reason", [
    (lambda ms: ms[:-1], "stream ended after"),
    (lambda ms: [ms[1], ms[0], *ms[2:]], "out of order"),
    (lambda ms: ms + ms[-1:], None),  # extra chunks are left for the next read, never appended
    (lambda ms: [*ms[:-1], pb.ClientMessage(chunk=pb.Chunk(index=2, data=b"x" * 8))], "more than the declared"),
    (lambda ms: [*ms[:-1], pb.ClientMessage(chunk=pb.Chunk(index=2, data=b"y" * 7))], "checksum mismatch"),
    (lambda ms: [ms[0], pb.ClientMessage(hello=pb.Hello()), *ms[1:]], "expected payload chunk 1, got hello"),
])
def test_tampered_chunk_streams_are_refused(tamper, reason):
    payload = np.random.default_rng(1).bytes(2 * CHUNK_BYTES + 7)
    digest = hashlib.sha256(payload).digest()
    stream = tamper(_messages(payload))
    if reason is None:
        assert collect(iter(stream), len(payload), digest, limit=len(payload)) == payload
        return
    with pytest.raises(WireError, match=reason):
        collect(iter(stream), len(payload), digest, limit=len(payload))


def test_declared_size_over_the_limit_is_refused_before_reading():
    def never():
        raise AssertionError("read a chunk of an oversized payload")
        yield

    with pytest.raises(WireError, match="exceeds the limit of 100 bytes"):
        collect(never(), 101, b"0" * 32, limit=100)


def test_config_and_metrics_codecs_round_trip():
    config = {"round": 4, "seed": np.int64(9), "lr": 0.1, "name": "x", "control": np.arange(3.0)}
    back = decode_config(encode_config(config))
    assert back["round"] == 4 and back["seed"] == 9 and back["name"] == "x"
    np.testing.assert_array_equal(back["control"], np.arange(3.0))
    assert decode_metrics(encode_metrics({"accuracy": 0.75, "num_examples": 12})) == {"accuracy": 0.75,
                                                                                      "num_examples": 12.0}
    with pytest.raises(SerializationError, match="not a metrics message"):
        decode_metrics(encode_config({"a": 1}))


@pytest.mark.parametrize("message, reason", [
    (pb.ClientMessage(), "empty message"),
    (pb.ClientMessage(hello=pb.Hello(protocol=1, client_id="../etc")), "not a valid client id"),
    (pb.ClientMessage(proof=pb.Proof(signature=b"short")), "proof signature must be 64 bytes"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 64,
                                             payload_sha256=b"d" * 32, kind=5)), "not fit, evaluate or exchange"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 64, kind=pb.FIT,
                                             payload_sha256=b"d" * 32, train_seconds=float("nan"))), "train_seconds"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 3, signature=b"s" * 64, kind=pb.FIT,
                                             payload_sha256=b"d" * 32)), "nonce must be 16 bytes"),
    (pb.ClientMessage(chunk=pb.Chunk(data=b"x" * (CHUNK_BYTES + 1))), "exceeds the chunk size"),
])
def test_decoder_names_what_is_wrong(message, reason):
    with pytest.raises(WireError, match=reason):
        decode_client_message(message.SerializeToString())


def test_valid_stream_decodes():
    update = _decode_result(_valid_stream())
    assert update.client_id == "alice" and update.round == 3 and update.delta.shape == (50,)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_never_crash_the_decoder(data):
    try:
        message = decode_client_message(data)
    except WireError:
        return
    _assert_checked(message)


def _assert_checked(message: pb.ClientMessage) -> None:
    """What a message that passed `decode_client_message` is guaranteed to satisfy, checked field by field."""
    kind = message.WhichOneof("body")
    body = getattr(message, kind)
    if kind == "hello":
        assert body.protocol == PROTOCOL and CLIENT_ID_PATTERN.match(body.client_id)
        assert len(body.transforms) <= MAX_TRANSFORMS and all(len(t) <= 128 for t in body.transforms)
    elif kind == "proof":
        assert len(body.signature) == 64
    elif kind == "result":
        assert CLIENT_ID_PATTERN.match(body.client_id) and len(body.run_id) <= 128
        assert (len(body.nonce), len(body.signature), len(body.payload_sha256)) == (16, 64, 32)
        assert body.kind in (pb.FIT, pb.EVALUATE, pb.EXCHANGE) and math.isfinite(body.train_seconds)
        assert body.train_seconds >= 0 and len(body.error) <= 4096 and not (body.error and body.payload_bytes)
    else:
        assert len(body.data) <= CHUNK_BYTES


@pytest.mark.parametrize("message", [
    pb.ClientMessage(hello=pb.Hello(protocol=1, client_id="alice", transforms=["central_dp"])),
    pb.ClientMessage(proof=pb.Proof(signature=b"s" * 64)),
    pb.ClientMessage(result=pb.ResultHeader(run_id="r" * 128, client_id="a", nonce=b"n" * 16, signature=b"s" * 64,
                                            payload_sha256=b"d" * 32, kind=pb.EVALUATE, train_seconds=0.0,
                                            error="x" * 4096)),
    pb.ClientMessage(chunk=pb.Chunk(index=3, data=b"x" * CHUNK_BYTES)),
])
def test_messages_at_every_limit_are_accepted(message):
    _assert_checked(decode_client_message(message.SerializeToString()))


@pytest.mark.parametrize("message, reason", [
    (pb.ClientMessage(hello=pb.Hello(protocol=1, client_id="a", transforms=["t"] * 65)), "too many or too long"),
    (pb.ClientMessage(hello=pb.Hello(protocol=1, client_id="a", transforms=["t" * 129])), "too many or too long"),
    (pb.ClientMessage(result=pb.ResultHeader(run_id="r" * 129, client_id="a")), "run id is longer than 128"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 64, kind=pb.FIT,
                                             payload_sha256=b"d" * 32, train_seconds=-1.0)), "train_seconds"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 64, kind=pb.FIT,
                                             payload_sha256=b"d" * 32, error="x" * 4097)), "error text is longer"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 63, kind=pb.FIT,
                                             payload_sha256=b"d" * 32)), "result signature must be 64 bytes"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 64, kind=pb.FIT,
                                             payload_sha256=b"d" * 31)), "checksum must be 32 bytes"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="a", nonce=b"n" * 16, signature=b"s" * 64, kind=pb.FIT,
                                             payload_sha256=b"d" * 32, error="boom", payload_bytes=3)),
     "must not carry a payload"),
    (pb.ClientMessage(result=pb.ResultHeader(client_id="-a", nonce=b"n" * 16)), "not a valid client id"),
])
def test_decoder_refuses_each_field_just_past_its_limit(message, reason):
    with pytest.raises(WireError, match=reason):
        decode_client_message(message.SerializeToString())


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(WireError, match="exceeds the limit of 10 bytes"):
        decode_client_message(b"\x00" * 11, max_bytes=10)


@st.composite
def _mutated_streams(draw):
    stream = _valid_stream()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(stream) - 1))
        data = bytearray(stream[i])
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "drop", "duplicate"]))
        if op == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            pos = draw(st.integers(0, len(data) - 1))
            del data[pos : pos + draw(st.integers(1, 16))]
        if op == "drop" and len(stream) > 1:
            del stream[i]
        elif op == "duplicate":
            stream.insert(i, bytes(data))
        else:
            stream[i] = bytes(data)
    return stream


@FUZZ
@given(_mutated_streams())
def test_fuzz_mutated_results_fail_with_a_reason_or_decode_consistently(stream):
    try:
        update = _decode_result(stream)
    except (WireError, SerializationError):
        return
    # Survivors changed nothing the checksums protect: the update is the honest one.
    assert update.client_id == "alice" and update.delta.shape == (50,)
    np.testing.assert_array_equal(update.delta, np.linspace(-1, 1, 50))


@pytest.mark.parametrize("name", list(HOSTILE_HEADERS))
def test_hostile_tensor_headers_in_a_result_fail_with_a_reason(name):
    """The headers that once escaped the decoder, sent as a result's payload through the server's whole path."""
    payload = _message(HOSTILE_HEADERS[name][0])
    header = pb.ResultHeader(run_id="run", round=3, nonce=b"n" * 16, client_id="alice", kind=pb.FIT,
                             payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).digest(),
                             signature=b"s" * 64)
    stream = [pb.ClientMessage(result=header).SerializeToString()] + [m.SerializeToString() for m in _messages(payload)]
    with pytest.raises(SerializationError, match=HOSTILE_HEADERS[name][1]):
        _decode_result(stream, limit=2 << 20)


def _changed(header: pb.ResultHeader, field) -> pb.ResultHeader:
    """A copy of `header` with one field given another valid value."""
    other = pb.ResultHeader()
    other.CopyFrom(header)
    value = getattr(header, field.name)
    if field.type == field.TYPE_DOUBLE:
        setattr(other, field.name, value + 0.5)
    elif field.type == field.TYPE_STRING:
        setattr(other, field.name, value + "x")
    elif field.type == field.TYPE_BYTES:
        setattr(other, field.name, bytes([value[0] ^ 1]) + value[1:])
    else:  # integers and the task kind
        setattr(other, field.name, value + 1 if field.name != "kind" else pb.EVALUATE)
    return other


def test_signatures_bind_every_field():
    """Every field of a result header but the signature is signed: one field changed, and the signature no
    longer verifies (the loop runs over the schema, so a field added later is covered too)."""
    identity = Identity.generate()
    header = pb.ResultHeader(run_id="run", round=3, nonce=b"n" * 16, client_id="alice", kind=pb.FIT,
                             payload_bytes=120, payload_sha256=b"d" * 32, train_seconds=0.25, error="boom")
    signature = identity.sign(result_message(header))
    assert verify(identity.public_hex, signature, result_message(header))
    fields = [f for f in pb.ResultHeader.DESCRIPTOR.fields if f.name != "signature"]
    assert {f.name for f in fields} >= {"train_seconds", "payload_bytes", "error"}
    for field in fields:
        assert not verify(identity.public_hex, signature, result_message(_changed(header, field))), (
            f"field {field.name} is not signed")
    assert not verify(Identity.generate().public_hex, signature, result_message(header))


def test_allow_list_rejects_malformed_lines(tmp_path):
    path = tmp_path / "allow.txt"
    key = Identity.generate().public_hex
    path.write_text(f"# comment\nalice {key}\n\nbob {key}  # trailing comment\n")
    assert list(AllowList.load(path).keys) == ["alice", "bob"]
    for bad, reason in [(f"alice {key}\nalice {key}\n", "listed twice"), ("alice 1234\n", "64 hex digits"),
                        (f"a/b {key}\n", "not allowed")]:
        path.write_text(bad)
        with pytest.raises(IdentityError, match=reason):
            AllowList.load(path)
