"""Serialization: round trips, and every kind of bad input raises a clear SerializationError."""
import hashlib
import json
import struct
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn import Layout, LayoutError, SerializationError, Update, decode_state, decode_update, encode_state, encode_update
from fedlearn.serialize import decode_tensors, encode_tensors


def _state():
    rng = np.random.default_rng(0)
    return OrderedDict(w=rng.normal(size=(3, 4)).astype(np.float32), b=np.arange(4, dtype=np.int64),
                       s=np.float64(2.5) * np.ones(()))


def _rewrite_header(data: bytes, edit) -> bytes:
    head_len = struct.unpack_from("<I", data, 4)[0]
    header = json.loads(data[8 : 8 + head_len])
    payload = data[8 + head_len :]
    edit(header)
    head = json.dumps(header).encode()
    return data[:4] + struct.pack("<I", len(head)) + head + payload


def test_state_round_trip_keeps_names_order_dtypes_shapes():
    state = _state()
    back = decode_state(encode_state(state))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
        np.testing.assert_array_equal(back[k], state[k])


def test_update_round_trip():
    u = Update("c7", 3, np.linspace(-1, 1, 11), 42, {"train_loss": 0.5}, partial=True)
    back = decode_update(encode_update(u))
    assert (back.client_id, back.round, back.num_examples, back.partial) == ("c7", 3, 42, True)
    np.testing.assert_array_equal(back.delta, u.delta)
    assert back.metrics == {"train_loss": 0.5}


def test_truncated_input_is_rejected():
    data = encode_state(_state())
    for cut in (0, 3, 7, 20, len(data) - 1):
        with pytest.raises(SerializationError, match="truncated|corrupt"):
            decode_state(data[:cut])


def test_corrupted_payload_fails_checksum():
    data = bytearray(encode_state(_state()))
    data[-5] ^= 0xFF
    with pytest.raises(SerializationError, match="checksum"):
        decode_state(bytes(data))


def test_bad_magic_is_rejected():
    data = encode_state(_state())
    with pytest.raises(SerializationError, match="not a fedlearn"):
        decode_state(b"PK\x03\x04" + data[4:])


def test_disallowed_dtype_in_header_is_rejected():
    data = _rewrite_header(encode_state(_state()), lambda h: h["tensors"][0].update(dtype="|O"))
    with pytest.raises(SerializationError, match="dtype"):
        decode_state(data)


def test_shape_that_disagrees_with_payload_is_rejected():
    data = _rewrite_header(encode_state(_state()), lambda h: h["tensors"][0].update(shape=[3, 5]))
    with pytest.raises(SerializationError, match="bytes"):
        decode_state(data)


def test_oversized_message_is_rejected_before_parsing():
    data = encode_state(OrderedDict(w=np.zeros(1000, dtype=np.float32)))
    with pytest.raises(SerializationError, match="exceeds the limit"):
        decode_state(data, max_bytes=1000)


def test_integer_delta_update_is_rejected():
    payload = np.arange(3, dtype=np.int32).tobytes()
    data = encode_tensors({"delta": np.arange(3, dtype=np.int32)},
                          {"kind": "update", "client_id": "a", "round": 1, "num_examples": 1})
    assert payload in data
    with pytest.raises(SerializationError, match="floating point"):
        decode_update(data)


def test_state_and_update_kinds_are_not_confused():
    with pytest.raises(SerializationError, match="expected an update"):
        decode_update(encode_state(_state()))


def test_object_arrays_cannot_be_encoded():
    with pytest.raises(SerializationError, match="cannot be serialized"):
        encode_tensors({"x": np.array([object()])})


def _message(head: bytes, payload: bytes = b"") -> bytes:
    return b"FLT1" + struct.pack("<I", len(head)) + head + payload


def _header(shape, meta: str = "{}") -> bytes:
    """A header of one tensor; `shape` and `meta` are JSON text, so they may hold what Python cannot print."""
    return (f'{{"tensors": [{{"name": "x", "dtype": "<f4", "shape": {shape}}}], "meta": {meta}, '
            f'"payload_bytes": 0, "sha256": "{hashlib.sha256(b"").hexdigest()}"}}').encode()


HOSTILE_HEADERS = {
    "100k nested lists": (b"[" * 100_000 + b"]" * 100_000, "nested 100000 levels deep"),
    "5k nested objects": (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested 5000 levels deep"),
    "deep meta": (_header("[1]", '{"x": ' + "[" * 40 + "]" * 40 + "}"), "nested 42 levels deep"),  # header, meta, 40 lists
    "5000-digit integer": (_header("[1]", '{"n": ' + "9" * 5000 + "}"), "longer than 20 digits"),
    "100 dimensions": (_header([1] * 100), "at most 32"),
    "0 x 10^30": (_header([0, 10**30]), "longer than 20 digits"),
    "0 x 10^18 x 10^18": (_header([0, 10**18, 10**18]), "larger than the limit"),
    "2^40 x 2^40": (_header([2**40, 2**40]), "larger than the limit"),
    "1 MiB of 10k huge dimensions": (_header("[" + ",".join(["9" * 100] * 10_000) + "]")[: 1 << 20],
                                     "longer than 20 digits"),
    "NaN": (_header("[1]", '{"loss": NaN}'), "NaN is not a number"),
    "1e400": (b'{"tensors":[],"meta":{"x":1e400},"payload_bytes":0,"sha256":""}', "out of the float range"),
    "not UTF-8": (b'{"tensors":[],"meta":{"x":"\xff\xfe"}}', "not UTF-8"),
}


@pytest.mark.parametrize("name", list(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_before_they_cost_anything(name):
    """Each of these once escaped the decoder as RecursionError or ValueError, or held the CPU for seconds."""
    head, reason = HOSTILE_HEADERS[name]
    with pytest.raises(SerializationError, match=reason):
        decode_tensors(_message(head))


def test_brackets_and_quotes_inside_strings_do_not_count_as_nesting():
    meta = {"name": "[[[[" * 20 + '\\"' + "{" * 40, "q": '"]]]' * 10, "list": [[[1]]]}
    tensors, back = decode_tensors(encode_tensors({"w[0]{": np.ones(2)}, meta))
    assert back == meta and list(tensors) == ["w[0]{"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**18), 10**18) | st.text(alphabet='[]{}"\\ab,:', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner,
                                                                 max_size=3),
    max_leaves=40)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_nesting_depth_matches_the_parsed_structure(value):
    from fedlearn.serialize import _nesting_depth

    assert _nesting_depth(json.dumps(value).encode()) == _depth(value)


@st.composite
def _hostile_headers(draw):
    """Headers with the shapes attackers use: deep nesting, long integers, many or huge dimensions."""
    depth = draw(st.integers(0, 200))
    digits = draw(st.integers(1, 6000))
    dims = draw(st.lists(st.one_of(st.integers(0, 4), st.integers(0, 2**64), st.just(10**30)), max_size=120))
    dtype = draw(st.sampled_from(["<f4", "<f8", "|u1", "|O", "<f4"]))
    head = json.dumps({"tensors": [{"name": "x", "dtype": dtype, "shape": dims}], "meta": {"n": 1},
                       "payload_bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()})
    head = head.replace('"meta": {"n": 1}', '"meta": {"n": ' + "[" * depth + "9" * digits + "]" * depth + "}")
    return _message(head.encode())


@settings(max_examples=300, deadline=2000)
@given(_hostile_headers())
def test_fuzz_hostile_headers_fail_with_a_serialization_error_or_decode(data):
    try:
        tensors, _ = decode_tensors(data)
    except SerializationError:
        return
    assert tensors["x"].size == 0  # only an empty tensor can match an empty payload


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(blob):
    with pytest.raises(SerializationError):
        decode_tensors(blob)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255))
def test_single_byte_mutations_are_detected(position, value):
    data = bytearray(encode_update(Update("c", 1, np.ones(8), 3)))
    position %= len(data)
    if data[position] == value:
        return
    data[position] = value
    try:
        u = decode_update(bytes(data))
    except SerializationError:
        return
    # A mutation inside the JSON header can still be a valid message (e.g. another digit in num_examples),
    # but the payload is covered by the checksum and must be intact.
    np.testing.assert_array_equal(u.delta, np.ones(8))


def test_layout_round_trip_and_mismatch():
    state = _state()
    layout = Layout.of(state)
    flat = layout.flatten(state)
    assert flat.shape == (12 + 4 + 1,) and flat.dtype == np.float64
    back = layout.unflatten(flat)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
        assert back[k].dtype == state[k].dtype
    with pytest.raises(LayoutError, match="shape"):
        layout.unflatten(flat[:-1])
    bad = OrderedDict(state)
    bad["w"] = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(LayoutError, match="'w'"):
        layout.flatten(bad)
    assert Layout.from_json(layout.to_json()) == layout
    assert hashlib.sha256(encode_state(state)).digest() == hashlib.sha256(encode_state(back)).digest()


def test_a_cut_or_padded_payload_is_named_as_such_before_the_checksum():
    """Two float64 values: a 16-byte payload. One byte fewer or more is reported with both sizes, so an operator
    sees a transfer that was cut, not a vague corruption."""
    from fedlearn.serialize import SerializationError, decode_tensors, encode_tensors

    data = encode_tensors({"x": np.array([1.0, 2.0])}, {})
    with pytest.raises(SerializationError, match="payload is 15 bytes, header says 16"):
        decode_tensors(data[:-1])
    with pytest.raises(SerializationError, match="payload is 17 bytes, header says 16"):
        decode_tensors(data + b"\x00")
