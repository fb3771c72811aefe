"""How pools hand a cohort to workers (local processes, Ray actors): the round's fit instructions in, raw
updates and failures out, all in fedlearn's checked tensor format (never pickle), and back in cohort order.

A worker holds a local pool (`InProcessPool` or `VectorizedPool`) built before it started, so client data
stays where it is; each round it receives the global state once and its share of the cohort's instructions,
and `serve_fit` answers with one message holding every client's result, in instruction order. Client-side transforms are not run
here: the parent applies them in cohort order, so stateful transforms behave as in the sequential pool.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..client import finish_fit
from ..messages import Message
from ..serialize import SerializationError, decode_state, decode_tensors, encode_tensors
from ..server.pool import ClientPool
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update
from .inprocess import InProcessPool

_SCALARS = (bool, int, float, str, type(None))


class OffloadingPool(ClientPool):
    """A pool that sends `fit` to workers holding a copy of `local`, and runs everything else (evaluation,
    protocol stages) on `local` in this process. Subclasses implement `fit` and release their workers in
    `close` before calling this one."""

    def __init__(self, local: InProcessPool) -> None:
        self.local = local

    @property
    def client_ids(self) -> Sequence[str]:
        return self.local.client_ids

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        return self.local.evaluate(state, instructions)

    def exchange(
        self,
        messages: Mapping[str, Message],
        *,
        state: State | None = None,
        transforms: Sequence[Transform] = (),
        deadline: float | None = None,
    ) -> dict[str, Message | Failure]:
        return self.local.exchange(messages, state=state, transforms=transforms, deadline=deadline)

    def close(self) -> None:
        self.local.close()


def encode_instructions(instructions: Mapping[str, Config]) -> bytes:
    """Client id -> config, with scalar values as JSON and numpy arrays as tensors."""
    clients, arrays = [], {}
    for i, (cid, config) in enumerate(instructions.items()):
        scalars = {}
        for key, value in config.items():
            if isinstance(value, np.ndarray):
                arrays[f"{i}/{key}"] = value
            elif isinstance(value, (_SCALARS, np.generic)):
                scalars[key] = value.item() if isinstance(value, np.generic) else value
            else:
                raise SerializationError(
                    f"config value {key!r} for client {cid!r} is a {type(value).__name__}; configs sent to worker "
                    "processes may hold numbers, strings, booleans and numpy arrays only"
                )
        clients.append([cid, scalars])
    return encode_tensors(arrays, {"kind": "fit-instructions", "clients": clients})


def decode_instructions(data: bytes) -> dict[str, Config]:
    tensors, meta = decode_tensors(data)
    clients = meta.get("clients")
    if meta.get("kind") != "fit-instructions" or not isinstance(clients, list):
        raise SerializationError(f"expected fit instructions, got a message of kind {meta.get('kind')!r}")
    instructions: dict[str, Config] = {}
    for i, entry in enumerate(clients):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], dict)):
            raise SerializationError(f"fit instruction {i} is not a [client id, config] pair")
        instructions[entry[0]] = dict(entry[1])
    for name, value in tensors.items():
        index, _, key = name.partition("/")
        if not index.isdigit() or int(index) >= len(clients):
            raise SerializationError(f"config tensor {name!r} names no client")
        instructions[clients[int(index)][0]][key] = value
    return instructions


def encode_results(results: Sequence[Update | Failure]) -> bytes:
    """A worker's answers in one message: every delta, extra and metric vector as a tensor named by the
    result's position, the rest as JSON (one header and one checksum for the whole share)."""
    tensors: dict[str, np.ndarray] = {}
    entries: list[dict] = []
    for i, result in enumerate(results):
        if isinstance(result, Failure):
            entries.append({"failure": [result.client_id, result.kind, result.reason]})
            continue
        tensors[f"{i}/delta"] = result.delta
        tensors.update({f"{i}/extra/{name}": value for name, value in result.extras.items()})
        tensors[f"{i}/metrics"] = np.array(list(result.metrics.values()), dtype=np.float64)  # NaN survives
        entries.append({"update": {"client_id": result.client_id, "round": int(result.round),
                                   "num_examples": int(result.num_examples), "partial": bool(result.partial),
                                   "metrics": list(result.metrics), "extras": list(result.extras)}})
    return encode_tensors(tensors, {"kind": "fit-results", "results": entries})


def decode_results(data: bytes) -> list[Update | Failure]:
    """Inverse of `encode_results`, checking every field before it becomes an `Update` or `Failure`."""
    tensors, meta = decode_tensors(data)
    entries = meta.get("results")
    if meta.get("kind") != "fit-results" or not isinstance(entries, list):
        raise SerializationError(f"expected fit results, got a message of kind {meta.get('kind')!r}")
    return [_result(i, entry, tensors) for i, entry in enumerate(entries)]


def _result(i: int, entry: object, tensors: Mapping[str, np.ndarray]) -> Update | Failure:
    failure = entry.get("failure") if isinstance(entry, dict) else None
    if isinstance(failure, list) and len(failure) == 3 and all(isinstance(f, str) for f in failure):
        return Failure(*failure)
    head = entry.get("update") if isinstance(entry, dict) else None
    if not isinstance(head, dict):
        raise SerializationError(f"result {i} is neither an update nor a failure")
    cid, rnd, n, partial = (head.get(k) for k in ("client_id", "round", "num_examples", "partial"))
    names, extras = head.get("metrics"), head.get("extras")
    if not (isinstance(cid, str) and isinstance(rnd, int) and isinstance(n, int) and isinstance(partial, bool)
            and isinstance(names, list) and all(isinstance(m, str) for m in names)
            and isinstance(extras, list) and all(isinstance(e, str) for e in extras)):
        raise SerializationError(f"result {i}: update fields have the wrong types")
    delta, values = tensors.get(f"{i}/delta"), tensors.get(f"{i}/metrics")
    if delta is None or delta.ndim != 1 or delta.dtype.kind != "f":
        raise SerializationError(f"result {i}: the delta must be a 1-D floating-point tensor")
    if values is None or values.shape != (len(names),):
        raise SerializationError(f"result {i}: {len(names)} metric names but no matching values")
    extra = {e: tensors[f"{i}/extra/{e}"] for e in extras if f"{i}/extra/{e}" in tensors}
    if len(extra) != len(extras):
        raise SerializationError(f"result {i}: extras {extras} are not all present")
    return Update(cid, rnd, delta, n, dict(zip(names, values.tolist())), partial, extra)


def serve_fit(pool: ClientPool, state_frame: bytes, instructions_frame: bytes) -> bytes:
    """A worker's answer to one round: run its local pool (no transforms), encode all results at once."""
    return encode_results(pool.fit(decode_state(state_frame), decode_instructions(instructions_frame)))


def shares(instructions: Mapping[str, Config], workers: int) -> list[dict[str, Config]]:
    """Deal the cohort round-robin over `workers` (sizes of neighbouring clients are unrelated, so this
    balances work better than contiguous blocks); empty shares are dropped."""
    items = list(instructions.items())
    dealt = [dict(items[w::workers]) for w in range(workers)]
    return [share for share in dealt if share]


def finish_in_order(
    raw: Mapping[str, Update | Failure], instructions: Mapping[str, Config], transforms: Sequence[Transform]
) -> list[Update | Failure]:
    """Results in instruction order (what the sequential pool returns), each update checked and passed
    through the client-side transforms there, as `run_fit` would have; a client without an answer is a crash."""
    results = []
    for cid, config in instructions.items():
        raw_result = raw.get(cid) or Failure(cid, "crash", "its worker returned no result")
        if isinstance(raw_result, Update):
            raw_result = InProcessPool._guarded(cid, lambda c: finish_fit(c, raw_result, config, transforms))
        results.append(raw_result)
    return results
