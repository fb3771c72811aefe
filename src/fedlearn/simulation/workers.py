"""How pools hand work to workers (local processes, Ray actors): a round's fit or evaluation instructions, or
one stage of a multi-stage protocol, in; results, metrics, replies and failures out; all in fedlearn's checked
tensor format (never pickle), and back in the order asked.

A worker holds a local pool (`InProcessPool` or `VectorizedPool`) built before it started, so client data
stays where it is, plus a copy of the run's transforms. Each call sends the global state once and the
worker's share of the work; `serve` answers with one message holding every client's answer, in order.

- `fit`: the share is dealt round-robin. Client-side transforms are not run in the worker: the parent applies
  them in cohort order, so stateful transforms behave as in the sequential pool.
- `evaluate`: dealt round-robin like fit.
- `exchange` (one protocol stage, e.g. secure aggregation): a client's memory across stages lives in the
  worker that first answered for it (its home), so each client always goes back to the same worker. Stages
  that train run the transforms' client halves in the worker, before the handler masks the update; that is
  exact only for transforms whose client half keeps no state (`Transform.stateful_client`), so a chain with
  a stateful one (local DP's noise generator and per-client ledger) runs its stages in this process.
"""
from __future__ import annotations

import itertools
import logging
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from ..client import finish_fit
from ..messages import Message
from ..serialize import SerializationError, decode_state, decode_tensors, encode_state, encode_tensors
from ..server.pool import ClientPool
from ..transforms.base import Transform, runs_in_copies
from ..types import Config, EvalResult, Failure, State, Update
from .inprocess import InProcessPool

log = logging.getLogger(__name__)

_SCALARS = (bool, int, float, str, type(None))
OPERATIONS = ("fit", "evaluate", "exchange")
NO_ANSWER = "the worker gave no answer"


class OffloadingPool(ClientPool):
    """A pool whose workers each hold a copy of `local` and of the run's `transforms`, and answer fit,
    evaluation and protocol stages for their share of the clients. Subclasses say which workers are up
    (`_workers`), how one operation reaches them (`_send`), and release them in `close` before calling this
    one."""

    def __init__(self, local: InProcessPool, transforms: Sequence[Transform] = ()) -> None:
        self.local = local
        self.transforms = tuple(transforms)
        self.placement: dict[str, str] = {}  # client id -> worker that trained it, last fit
        self._home: dict[str, Hashable] = {}  # client id -> worker holding its protocol memory
        self._turn = itertools.count()
        stateful = [t.name for t in self.transforms if not runs_in_copies([t])]
        # why protocol stages run in this process rather than in the workers, or None
        self.stages_here = f"the client half of {', '.join(stateful)} keeps state that copies in workers would " \
            "split" if stateful else None
        self._said_why = False

    @property
    def client_ids(self) -> Sequence[str]:
        return self.local.client_ids

    @abstractmethod
    def _workers(self) -> list[Hashable]:
        """The workers that can take work now."""

    @abstractmethod
    def _send(self, op: str, state: State | None, frames: Mapping[Hashable, bytes]) -> dict[Hashable, bytes | Exception]:
        """Run `op` on each worker with its frame; its answer, or the exception that lost it (a dead worker,
        which the subclass replaces)."""

    def _label(self, worker: Hashable) -> str:
        return str(worker)

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        raw, self.placement = {}, {}
        for worker, share, answer in self._dealt("fit", state, instructions):
            raw.update(_answers(lambda a: dict(zip(share, decode_results(a))), share, answer))
            if isinstance(answer, bytes):
                self.placement.update(dict.fromkeys(share, self._label(worker)))
        return finish_in_order(raw, instructions, transforms)

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        raw: dict[str, EvalResult | Failure] = {}
        for _, share, answer in self._dealt("evaluate", state, instructions):
            raw.update(_answers(lambda a: dict(zip(share, decode_evaluations(a))), share, answer))
        return [raw.get(cid) or Failure(cid, "crash", "its worker returned no result") for cid in instructions]

    def exchange(
        self,
        messages: Mapping[str, Message],
        *,
        state: State | None = None,
        transforms: Sequence[Transform] = (),
        deadline: float | None = None,
    ) -> dict[str, Message | Failure]:
        if state is not None and (len(transforms) != len(self.transforms)
                                  or any(a is not b for a, b in zip(transforms, self.transforms))):
            raise ValueError(f"{type(self).__name__} was given the transforms {[t.name for t in self.transforms]} "
                             f"but a protocol stage trains with {[t.name for t in transforms]}: give the pool the run's "
                             "transforms (make_pool(..., transforms=...)) so its workers run their client halves")
        if self.stages_here:
            if not self._said_why:
                log.warning("protocol stages run in this process, not in the workers: %s", self.stages_here)
                self._said_why = True
            return self.local.exchange(messages, state=state, transforms=transforms, deadline=deadline)
        workers = self._workers()
        if not workers:
            return {cid: Failure(cid, "crash", self._no_worker_reason()) for cid in messages}
        groups: dict[Hashable, dict[str, Message]] = {}
        for cid, message in messages.items():
            groups.setdefault(self._home_of(cid, workers), {})[cid] = message
        answers = self._send("exchange", state, {w: encode_exchange(group, deadline) for w, group in groups.items()})
        replies: dict[str, Message | Failure] = {}
        for worker, group in groups.items():
            replies.update(_answers(decode_replies, group, answers.get(worker) or RuntimeError(NO_ANSWER)))
        return {cid: replies.get(cid) or Failure(cid, "crash", "its worker returned no reply") for cid in messages}

    def close(self) -> None:
        self.local.close()

    def _dealt(self, op: str, state: State, instructions: Mapping[str, Config]):
        """Deal `instructions` round-robin over the workers, run `op`; (worker, share, answer) per share."""
        workers = self._workers()
        if not workers:
            return [(None, dict(instructions), RuntimeError(self._no_worker_reason()))]
        dealt = dict(zip(workers, shares(instructions, len(workers))))
        answers = self._send(op, state, {w: encode_instructions(share) for w, share in dealt.items()})
        return [(w, share, answers.get(w) or RuntimeError(NO_ANSWER)) for w, share in dealt.items()]

    def _no_worker_reason(self) -> str:
        return "no worker is alive"

    def _home_of(self, cid: str, workers: list[Hashable]) -> Hashable:
        """The worker holding `cid`'s protocol memory; a client new to the pool, or whose worker died (its
        memory with it), is given the next worker in turn."""
        home = self._home.get(cid)
        if home not in workers:
            home = self._home[cid] = workers[next(self._turn) % len(workers)]
        return home


def serve(pool: ClientPool, transforms: Sequence[Transform], op: str, head: bytes, payload: bytes) -> bytes:
    """A worker's answer to one operation on its share (`head`: the encoded state, empty for none): run its
    local pool, encode every answer at once."""
    state = decode_state(head) if head else None
    if op == "fit":
        return encode_results(pool.fit(state, decode_instructions(payload)))
    if op == "evaluate":
        return encode_evaluations(pool.evaluate(state, decode_instructions(payload)))
    if op == "exchange":
        messages, deadline = decode_exchange(payload)
        return encode_replies(pool.exchange(messages, state=state, transforms=transforms, deadline=deadline))
    raise SerializationError(f"unknown worker operation {op!r}; expected one of {', '.join(OPERATIONS)}")


def state_frame(state: State | None) -> bytes:
    """The global state as sent to workers once per operation (empty when a stage carries none)."""
    return b"" if state is None else encode_state(state)


def _answers(decode: Callable[[bytes], dict], clients: Iterable[str], answer: bytes | Exception) -> dict:
    """Each client's answer from one worker's message; every client a crash, with the reason, when the worker
    failed or its message does not decode."""
    if isinstance(answer, bytes):
        try:
            return decode(answer)
        except SerializationError as exc:
            answer = exc
    return {cid: Failure(cid, "crash", f"worker failed: {type(answer).__name__}: {answer}") for cid in clients}


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
    return encode_tensors(arrays, {"kind": "instructions", "clients": clients})


def decode_instructions(data: bytes) -> dict[str, Config]:
    tensors, meta = decode_tensors(data)
    clients = meta.get("clients")
    if meta.get("kind") != "instructions" or not isinstance(clients, list):
        raise SerializationError(f"expected instructions, got a message of kind {meta.get('kind')!r}")
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
            entries.append(_failure_entry(result))
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
    tensors, entries = _entries(data, "fit-results")
    return [_result(i, entry, tensors) for i, entry in enumerate(entries)]


def _result(i: int, entry: object, tensors: Mapping[str, np.ndarray]) -> Update | Failure:
    failure = _failure_of(entry)
    if failure is not None:
        return failure
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


def encode_evaluations(results: Sequence[EvalResult | Failure]) -> bytes:
    """A worker's evaluation answers in one message: metric names as JSON, their values as one tensor each."""
    tensors, entries = {}, []
    for i, result in enumerate(results):
        if isinstance(result, Failure):
            entries.append(_failure_entry(result))
            continue
        tensors[f"{i}/metrics"] = np.array(list(result.metrics.values()), dtype=np.float64)
        entries.append({"eval": {"client_id": result.client_id, "num_examples": int(result.num_examples),
                                 "metrics": list(result.metrics)}})
    return encode_tensors(tensors, {"kind": "eval-results", "results": entries})


def decode_evaluations(data: bytes) -> list[EvalResult | Failure]:
    """Inverse of `encode_evaluations`, checking every field."""
    tensors, entries = _entries(data, "eval-results")
    results: list[EvalResult | Failure] = []
    for i, entry in enumerate(entries):
        failure = _failure_of(entry)
        head = entry.get("eval") if isinstance(entry, dict) else None
        if failure is not None:
            results.append(failure)
            continue
        cid, n, names = (head.get(k) for k in ("client_id", "num_examples", "metrics")) if isinstance(head, dict) \
            else (None, None, None)
        values = tensors.get(f"{i}/metrics")
        if not (isinstance(cid, str) and isinstance(n, int) and n >= 0 and isinstance(names, list)
                and all(isinstance(m, str) for m in names) and values is not None and values.shape == (len(names),)):
            raise SerializationError(f"evaluation result {i} is malformed")
        results.append(EvalResult(cid, n, dict(zip(names, values.tolist()))))
    return results


def encode_exchange(messages: Mapping[str, Message], deadline: float | None) -> bytes:
    """One protocol stage for a worker's clients: each client's message (kind, meta, tensors) and the deadline."""
    tensors, clients = _packed(messages)
    return encode_tensors(tensors, {"kind": "exchange", "clients": clients, "deadline": deadline})


def decode_exchange(data: bytes) -> tuple[dict[str, Message], float | None]:
    tensors, meta = decode_tensors(data)
    deadline = meta.get("deadline")
    if meta.get("kind") != "exchange" or not (deadline is None or isinstance(deadline, (int, float))):
        raise SerializationError(f"expected a protocol stage, got a message of kind {meta.get('kind')!r}")
    return dict(_messages(meta.get("clients"), tensors)), deadline


def encode_replies(replies: Mapping[str, Message | Failure]) -> bytes:
    """A worker's replies to one stage: messages as in `encode_exchange`, failures with their reasons."""
    tensors, clients = _packed({cid: r for cid, r in replies.items() if isinstance(r, Message)})
    failures = [_failure_entry(r) for r in replies.values() if isinstance(r, Failure)]
    return encode_tensors(tensors, {"kind": "replies", "clients": clients, "failures": failures})


def decode_replies(data: bytes) -> dict[str, Message | Failure]:
    tensors, meta = decode_tensors(data)
    failures = meta.get("failures")
    if meta.get("kind") != "replies" or not isinstance(failures, list):
        raise SerializationError(f"expected protocol replies, got a message of kind {meta.get('kind')!r}")
    replies: dict[str, Message | Failure] = dict(_messages(meta.get("clients"), tensors))
    for entry in failures:
        failure = _failure_of(entry)
        if failure is None:
            raise SerializationError("a protocol reply's failure entry is malformed")
        replies[failure.client_id] = failure
    return replies


def _packed(messages: Mapping[str, Message]) -> tuple[dict[str, np.ndarray], list[list]]:
    """Messages as tensors named `index/name` and a client list [client id, kind, meta, tensor names]."""
    tensors, clients = {}, []
    for i, (cid, message) in enumerate(messages.items()):
        tensors.update({f"{i}/{name}": value for name, value in message.tensors.items()})
        clients.append([cid, message.kind, message.meta, list(message.tensors)])
    return tensors, clients


def _messages(clients: object, tensors: Mapping[str, np.ndarray]):
    """(client id, message) pairs from an exchange's client list and its tensors named `index/name`."""
    if not isinstance(clients, list):
        raise SerializationError("a protocol stage must list its clients")
    for i, entry in enumerate(clients):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and isinstance(entry[1], str)
                and isinstance(entry[2], dict) and isinstance(entry[3], list)
                and all(isinstance(n, str) and f"{i}/{n}" in tensors for n in entry[3])):
            raise SerializationError(f"protocol message {i} is not [client id, kind, meta, tensor names]")
        yield entry[0], Message(entry[1], {n: tensors[f"{i}/{n}"] for n in entry[3]}, entry[2])


def _entries(data: bytes, kind: str) -> tuple[dict[str, np.ndarray], list]:
    """The tensors and the result entries of a worker's message of `kind`."""
    tensors, meta = decode_tensors(data)
    entries = meta.get("results")
    if meta.get("kind") != kind or not isinstance(entries, list):
        raise SerializationError(f"expected {kind}, got a message of kind {meta.get('kind')!r}")
    return tensors, entries


def _failure_entry(failure: Failure) -> dict:
    return {"failure": [failure.client_id, failure.kind, failure.reason]}


def _failure_of(entry: object) -> Failure | None:
    failure = entry.get("failure") if isinstance(entry, dict) else None
    if isinstance(failure, list) and len(failure) == 3 and all(isinstance(f, str) for f in failure):
        return Failure(*failure)
    return None


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
