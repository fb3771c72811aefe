"""Tensors on the wire and on disk: dtype + shape + raw bytes behind a validated header. Never pickle.

Format (little-endian)::

    b"FLT1" | u32 header_length | header (UTF-8 JSON) | payload

The header lists each tensor's name, dtype, shape, and the payload's length and SHA-256. Every field is
checked before any byte of the payload is interpreted, so truncated, corrupted, oversized or mistyped input
raises `SerializationError` with the reason instead of producing garbage.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from .types import State, Update

MAGIC = b"FLT1"
DEFAULT_MAX_BYTES = 2**31  # 2 GiB: larger payloads must be streamed in chunks
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 32  # nesting of JSON objects and lists in a header
MAX_DIMS = 32  # numpy allows 64
MAX_INT_DIGITS = 20  # any int64 or uint64
ALLOWED_DTYPES = frozenset(
    np.dtype(d).str for d in ("<f2", "<f4", "<f8", "<i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1")
)
_PREFIX = struct.Struct("<4sI")


class SerializationError(ValueError):
    """Bytes that are not a valid, complete, within-limits fedlearn tensor message."""


def _le(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def encode_tensors(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode named arrays (and small JSON metadata) into one message."""
    entries, chunks = [], []
    for name, value in tensors.items():
        arr = np.asarray(value)  # not ascontiguousarray: it turns 0-d scalars into shape (1,)
        arr = arr.astype(_le(arr.dtype), order="C", copy=False)
        if arr.dtype.str not in ALLOWED_DTYPES:
            raise SerializationError(f"tensor {name!r}: dtype {arr.dtype} cannot be serialized")
        entries.append({"name": str(name), "dtype": arr.dtype.str, "shape": list(arr.shape)})
        chunks.append(arr.tobytes())
    payload = b"".join(chunks)
    header = {
        "tensors": entries,
        "meta": dict(meta or {}),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return _PREFIX.pack(MAGIC, len(head)) + head + payload


def decode_tensors(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple["OrderedDict[str, np.ndarray]", dict]:
    """Decode a message from `encode_tensors`, validating it completely first. Returns (tensors, meta)."""
    data = memoryview(data)
    if len(data) > max_bytes:
        raise SerializationError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) < _PREFIX.size:
        raise SerializationError("message truncated: shorter than its fixed prefix")
    magic, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SerializationError(f"not a fedlearn tensor message (magic {bytes(magic)!r})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(data):
        raise SerializationError(f"message truncated or corrupt: header length {head_len} does not fit")
    header = _parse_header(bytes(data[_PREFIX.size : _PREFIX.size + head_len]))
    entries, meta = _check_header(header, max_bytes)
    payload = data[_PREFIX.size + head_len :]
    if len(payload) != header["payload_bytes"]:
        raise SerializationError(
            f"message truncated or padded: payload is {len(payload)} bytes, header says {header['payload_bytes']}"
        )
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise SerializationError("payload checksum mismatch: the message was corrupted")
    tensors: OrderedDict[str, np.ndarray] = OrderedDict()
    pos = 0
    for name, dtype, shape, nbytes in entries:
        tensors[name] = np.frombuffer(payload[pos : pos + nbytes], dtype=dtype).reshape(shape).copy()
        pos += nbytes
    return tensors, meta


def _parse_header(raw: bytes) -> Any:
    """Parse a JSON header whose size the caller has bounded, refusing before parsing what would make the
    parser recurse deeply, and refusing while parsing integers longer than `MAX_INT_DIGITS` digits and
    non-finite numbers; every failure is a `SerializationError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SerializationError(f"corrupt header: not UTF-8 ({exc})") from None
    depth = _nesting_depth(raw)
    if depth > MAX_HEADER_DEPTH:
        raise SerializationError(f"corrupt header: nested {depth} levels deep, more than {MAX_HEADER_DEPTH}")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise SerializationError(f"corrupt header: {str(exc)[:200]}") from None


def _nesting_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside JSON strings, found with array operations in linear time (a
    quote preceded by an odd run of backslashes is escaped)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0:
        return 0
    quote = b == 0x22
    if b"\\" in raw:  # only then can a quote be escaped
        index = np.arange(b.size, dtype=np.int32)
        last_other = np.maximum.accumulate(np.where(b == 0x5C, -1, index))  # last non-backslash at or before i
        escaped = np.zeros(b.size, dtype=bool)
        escaped[1:] = (index[:-1] - last_other[:-1]) % 2 == 1  # an odd run of backslashes ends just before i
        quote &= ~escaped
    outside = (np.cumsum(quote, dtype=np.int32) & 1) == 0  # an opening quote is inside, a closing one outside
    outside &= ~quote
    step = ((b == 0x5B) | (b == 0x7B)).view(np.int8) - ((b == 0x5D) | (b == 0x7D)).view(np.int8)
    return int(np.cumsum(np.where(outside, step, 0), dtype=np.int32).max(initial=0))


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:  # + 1 for a sign
        raise ValueError(f"integer of {len(text)} characters is longer than {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _element_count(shape: list[int], limit: int) -> int | None:
    """Elements of `shape`, or None if the product of its non-zero dimensions exceeds `limit` (a zero dimension
    makes the array empty, but numpy still refuses shapes whose other dimensions overflow)."""
    count, nonzero = 1, 1
    for size in shape:
        if size:
            nonzero *= size
            if nonzero > limit:
                return None
        count *= size
    return count


def _check_header(header: Any, max_bytes: int) -> tuple[list[tuple[str, np.dtype, tuple[int, ...], int]], dict]:
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise SerializationError("corrupt header: missing tensor list")
    if not isinstance(header.get("payload_bytes"), int) or not isinstance(header.get("sha256"), str):
        raise SerializationError("corrupt header: missing payload length or checksum")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise SerializationError("corrupt header: meta must be an object")
    entries, seen, total = [], set(), 0
    for i, entry in enumerate(header["tensors"]):
        if not isinstance(entry, dict):
            raise SerializationError(f"corrupt header: tensor entry {i} is not an object")
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        if not isinstance(name, str) or name in seen:
            raise SerializationError(f"corrupt header: tensor entry {i} has a missing or duplicate name")
        if dtype not in ALLOWED_DTYPES:
            raise SerializationError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise SerializationError(f"tensor {name!r}: invalid shape {repr(shape)[:200]} (at most {MAX_DIMS} "
                                     "non-negative integer dimensions)")
        count = _element_count(shape, max_bytes // np.dtype(dtype).itemsize)
        if count is None:
            raise SerializationError(f"tensor {name!r}: shape {repr(shape)[:200]} is larger than the limit of "
                                     f"{max_bytes} bytes")
        nbytes = count * np.dtype(dtype).itemsize
        total += nbytes
        seen.add(name)
        entries.append((name, np.dtype(dtype), tuple(shape), nbytes))
    if total != header["payload_bytes"]:
        raise SerializationError(f"corrupt header: tensors need {total} bytes but payload_bytes is {header['payload_bytes']}")
    return entries, meta


def encode_state(state: State) -> bytes:
    """Serialize a model state."""
    return encode_tensors(state, {"kind": "state"})


def decode_state(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> State:
    """Deserialize a model state written by `encode_state`."""
    tensors, meta = decode_tensors(data, max_bytes=max_bytes)
    if meta.get("kind") != "state":
        raise SerializationError(f"expected a model state, got a message of kind {meta.get('kind')!r}")
    return tensors


EXTRA_PREFIX = "extra/"  # tensor-name prefix of an update's `extras`
CODEC_PREFIX = "delta/"  # tensor-name prefix of a delta packed by a codec


class DeltaCodec(Protocol):
    """How a flat delta is packed (see `fedlearn.compression.codecs`); `decode` validates hostile input."""

    name: str

    def encode(self, vector: np.ndarray, key: str = "") -> dict[str, np.ndarray]: ...

    def decode(self, tensors: Mapping[str, np.ndarray], key: str = "") -> np.ndarray: ...


def update_key(client_id: str, rnd: int) -> str:
    """What names one update to a codec (a seeded mask both sides derive from it): its client and round."""
    return f"{client_id}/{int(rnd)}"


def encode_update(update: Update, codec: DeltaCodec | None = None, extras_dtype: str | None = None) -> bytes:
    """Serialize a client update (flat delta, extras and bookkeeping). With a `codec` the delta travels packed
    by it (the model's dtype, or compressed); without one, as the float64 vector it is. With `extras_dtype`
    (the model's dtype) the extras (e.g. SCAFFOLD's control variates) travel in it instead of float64."""
    meta = {
        "kind": "update",
        "client_id": update.client_id,
        "round": int(update.round),
        "num_examples": int(update.num_examples),
        "metrics": {k: float(v) for k, v in update.metrics.items()},
        "partial": bool(update.partial),
    }
    try:
        if codec is None:
            tensors = {"delta": update.delta}
        else:
            meta["codec"] = codec.name
            tensors = {CODEC_PREFIX + k: v for k, v in codec.encode(update.delta, update_key(update.client_id, update.round)).items()}
        tensors.update({EXTRA_PREFIX + k: np.asarray(v, dtype=extras_dtype) if extras_dtype else v
                        for k, v in update.extras.items()})
        return encode_tensors(tensors, meta)
    except ValueError as exc:  # NaN metrics are not valid JSON; a delta its codec cannot carry
        raise SerializationError(f"update from {update.client_id!r} cannot be serialized: {exc}") from None


def decode_update(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, codec: DeltaCodec | None = None) -> Update:
    """Deserialize and type-check a client update. With a `codec`, the update must have been packed by that
    very codec (the server's, not one the client names) and is unpacked to a float64 delta."""
    tensors, meta = decode_tensors(data, max_bytes=max_bytes)
    if meta.get("kind") != "update":
        raise SerializationError(f"expected an update, got a message of kind {meta.get('kind')!r}")
    extras = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    rest = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    if codec is None:
        if meta.get("codec") is not None or list(rest) != ["delta"]:
            raise SerializationError(f"update must hold a tensor 'delta' and optional '{EXTRA_PREFIX}*' ones, "
                                     f"got {list(tensors)}")
        delta = rest["delta"]
    else:
        if meta.get("codec") != codec.name:
            raise SerializationError(f"update is packed as {meta.get('codec')!r}, this run expects {codec.name!r}")
        if not all(k.startswith(CODEC_PREFIX) for k in rest):
            raise SerializationError(f"update carries unexpected tensors {sorted(rest)}")
        cid, rnd = meta.get("client_id"), meta.get("round")
        if not isinstance(cid, str) or not isinstance(rnd, int):
            raise SerializationError("update metadata needs client_id (str) and round (int)")
        delta = codec.decode({k[len(CODEC_PREFIX):]: v for k, v in rest.items()}, update_key(cid, rnd))
    if delta.ndim != 1:
        raise SerializationError(f"update delta must be 1-D, got shape {delta.shape}")
    for what, value in {"delta": delta, **{f"extra {k!r}": v for k, v in extras.items()}}.items():
        if value.shape != delta.shape:
            raise SerializationError(f"update {what} has shape {value.shape}, the delta {delta.shape}")
        if value.dtype.kind != "f":
            raise SerializationError(f"update {what} must be floating point, got {value.dtype}")
    cid, rnd, n = meta.get("client_id"), meta.get("round"), meta.get("num_examples")
    metrics = meta.get("metrics", {})
    if not isinstance(cid, str) or not isinstance(rnd, int) or not isinstance(n, int) or n < 0:
        raise SerializationError("update metadata needs client_id (str), round (int), num_examples (int >= 0)")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise SerializationError("update metrics must map names to numbers")
    extras = {k: v.astype(np.float64) for k, v in extras.items()}  # what the strategies compute in
    return Update(cid, rnd, delta, n, dict(metrics), bool(meta.get("partial", False)), extras)
