"""Homomorphic-encryption aggregation as a `RoundProtocol`.

Stages (message kinds, each with a client handler in `HEClient`):

1. ``he/encrypted``  clients train, build [w * delta, w * metrics..., w] (w = the example count capped at
                     `max_examples`, or 1 when unweighted), and send it CKKS-encrypted in chunks of 4096 slots.
2. ``he/decrypt``    the server adds the ciphertexts of the clients the round accepted and sends the encrypted
                     sum to `decryptors` of them; each decrypts it (once per round, and only in a round it
                     contributed to) and returns the plaintext sum. Decryptions that disagree abort the round.

A client that drops before step 2 is simply not in the sum: nothing needs recovering, so any number of
dropouts is tolerated as long as one contributor is left to decrypt. The server learns the sum (and the sums
of the weights and metrics), never one client's vector, and never holds the secret key.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from ..messages import ClientSession, Handler, Message, as_bytes, from_bytes
from ..params import Layout
from ..privacy.central import CLIP_KEY
from ..secagg.protocol import DEFAULT_FIELDS
from ..secagg.server import refuse_extras, refuse_strategy
from ..server.pool import ClientPool
from ..server.protocol import RoundAborted, RoundProtocol, exchange_stage
from ..server.validate import sum_norm_problem
from ..strategies.base import Strategy
from ..transforms.base import Transform
from ..types import Config, Failure, State, Update
from .context import SLOTS, load_public, load_secret

ENCRYPTED = "he/encrypted"
DECRYPT = "he/decrypt"
MAX_CIPHERTEXT_BYTES = 2**21  # a fresh 4096-slot ciphertext is about 240 KB


class HEAbort(RoundAborted):
    """HE aggregation could not finish (no decryption, or decryptions that disagree); the model is unchanged."""


class HEError(RuntimeError):
    """A client refused an HE stage (out of order, a second decryption, a malformed ciphertext)."""


@dataclass(frozen=True)
class HEConfig:
    """`weighted`: weight clients by example count (capped at `max_examples`) inside the encrypted vector, so
    the server learns only the total weight; off under central DP (equal weights). `decryptors`: contributors
    asked to decrypt the sum; their answers must agree to `tolerance` (absolute, per value).
    `fields`: metrics summed alongside (their names; the server learns their weighted cohort mean)."""

    weighted: bool = True
    max_examples: int = 10**6
    decryptors: int = 2
    tolerance: float = 1e-4
    fields: tuple[str, ...] = tuple(name for name, _, _ in DEFAULT_FIELDS)
    deadline: float = 60.0
    train_deadline: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_examples <= 2**40:
            raise ValueError(f"HE max_examples must be in [1, 2**40], got {self.max_examples}")
        if self.decryptors < 1:
            raise ValueError(f"HE needs at least one decryptor, got {self.decryptors}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"HE tolerance must be a positive number, got {self.tolerance}")
        if self.deadline <= 0 or self.train_deadline <= 0:
            raise ValueError("HE deadlines must be positive")


def _chunks(length: int) -> int:
    return max(1, math.ceil(length / SLOTS))


class HEProtocol(RoundProtocol):
    """The server side: holds the public CKKS context only (`public_context`, bytes from `create_keys`)."""

    name = "he"

    def __init__(self, config: HEConfig, public_context: bytes) -> None:
        self.config, self.context = config, load_public(public_context)
        self.last_sum: np.ndarray | None = None
        self.last_metrics: dict[str, float] = {}
        self._round: tuple[int, int, float | None, dict[str, list[bytes]]] | None = None

    def check(self, strategy: Strategy) -> None:
        refuse_strategy(strategy, "homomorphic-encryption aggregation")
        refuse_extras(strategy, "homomorphic-encryption aggregation")

    def collect(
        self, pool: ClientPool, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform]
    ) -> list[Update | Failure]:
        if not instructions:
            return []
        rnd = int(next(iter(instructions.values()))["round"])
        dim = Layout.of(state).size
        clip = next(iter(instructions.values())).get(CLIP_KEY)
        length = dim + len(self.config.fields) + 1
        meta = {"round": rnd, "length": length, "fields": list(self.config.fields),
                "weighted": self.config.weighted and clip is None, "max_examples": self.config.max_examples}
        failures: list[Failure] = []
        answers = exchange_stage(pool, ENCRYPTED, {c: Message(ENCRYPTED, meta={**meta, "config": instructions[c]})
                                                   for c in instructions}, failures,
                                 deadline=self.config.train_deadline, state=state, transforms=transforms)
        received: dict[str, list[bytes]] = {}
        updates: list[Update | Failure] = []
        for cid, reply in answers.items():
            blobs, problem = self._ciphertexts(reply, length, rnd)
            if problem is not None:
                failures.append(Failure(cid, "rejected", f"{ENCRYPTED}: {problem}"))
                continue
            received[cid] = blobs
            # the round loop checks sender, round and shape; the update itself stays encrypted
            updates.append(Update(cid, rnd, np.zeros(dim), 1, {}, reply.meta.get("partial", False)))
        self._round = (rnd, dim, None if clip is None else float(clip), received)
        return updates + failures

    def aggregate(self, pool: ClientPool, strategy: Strategy, updates: list[Update], rnd: int) -> np.ndarray:
        if self._round is None or self._round[0] != rnd:
            raise HEAbort(f"round {rnd}: no HE state for this round")
        _, dim, clip, received = self._round
        self._round = None
        contributors = sorted(u.client_id for u in updates if u.client_id in received)
        total = self._add(contributors, received)
        plain = self._decrypt(pool, rnd, contributors, [c.serialize() for c in total], dim + len(self.config.fields) + 1)
        weight = float(plain[-1])
        count = len(contributors)
        if not count * (1 - 1e-3) <= weight <= count * self.config.max_examples * (1 + 1e-3) + 1:
            raise HEAbort(f"round {rnd}: the decrypted total weight {weight:.6g} is impossible for {count} clients; "
                          "the global model is unchanged.")
        self.last_sum = plain[:dim]
        if clip is not None:
            problem = sum_norm_problem(self.last_sum, count, clip, slack=self.config.tolerance * math.sqrt(dim))
            if problem is not None:
                raise HEAbort(f"round {rnd}: {problem}; the round is refused and the global model is unchanged.")
        self.last_metrics = {name: float(v) for name, v in zip(self.config.fields, plain[dim:-1])}
        for u in updates:
            if u.client_id in received:
                u.metrics = {name: value / weight for name, value in self.last_metrics.items()}
        return self.last_sum / weight

    def _ciphertexts(self, reply: Message, length: int, rnd: int) -> tuple[list[bytes], str | None]:
        """The reply's ciphertexts, each parsed under the public context to check it, or why they are unusable."""
        if reply.meta.get("round") != rnd or not isinstance(reply.meta.get("partial", False), bool):
            return [], f"reply must carry round {rnd} and a true/false partial flag"
        blobs = []
        for i in range(_chunks(length)):
            value = reply.tensors.get(f"ct/{i}")
            if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or not 0 < value.size <= MAX_CIPHERTEXT_BYTES:
                return [], f"ciphertext {i} missing or not a byte string of at most {MAX_CIPHERTEXT_BYTES} bytes"
            blob = as_bytes(value)
            try:
                size = ts.ckks_vector_from(self.context, blob).size()
            except (ValueError, RuntimeError, TypeError) as exc:
                return [], f"ciphertext {i} does not parse: {exc}"
            if size != min(SLOTS, length - i * SLOTS):
                return [], f"ciphertext {i} holds {size} values, expected {min(SLOTS, length - i * SLOTS)}"
            blobs.append(blob)
        return blobs, None

    def _add(self, contributors: list[str], received: Mapping[str, list[bytes]]) -> list[ts.CKKSVector]:
        if not contributors:
            raise HEAbort("no encrypted update to add; the global model is unchanged.")
        total = [ts.ckks_vector_from(self.context, blob) for blob in received[contributors[0]]]
        for cid in contributors[1:]:
            for i, blob in enumerate(received[cid]):
                try:
                    total[i] += ts.ckks_vector_from(self.context, blob)
                except (ValueError, RuntimeError, TypeError) as exc:  # parameters or scale mismatch
                    raise HEAbort(f"client {cid}'s ciphertext cannot be added ({exc}); the global model is "
                                  "unchanged.") from None
        return total

    def _decrypt(self, pool: ClientPool, rnd: int, contributors: list[str], blobs: list[bytes], length: int) -> np.ndarray:
        """Ask contributors in turn until `decryptors` of them returned the plaintext sum; they must agree."""
        tensors = {f"ct/{i}": from_bytes(b) for i, b in enumerate(blobs)}
        answers: list[np.ndarray] = []
        failures: list[Failure] = []
        for cid in contributors:
            if len(answers) == self.config.decryptors:
                break
            reply = exchange_stage(pool, DECRYPT, {cid: Message(DECRYPT, tensors, {"round": rnd})}, failures,
                                   deadline=self.config.deadline).get(cid)
            plain = None if reply is None else reply.tensors.get("sum")
            if isinstance(plain, np.ndarray) and plain.dtype == np.float64 and plain.shape == (length,) \
                    and np.isfinite(plain).all():
                answers.append(plain)
        if not answers:
            raise HEAbort(f"round {rnd}: no contributor decrypted the sum; the global model is unchanged.")
        spread = max(float(np.abs(a - answers[0]).max()) for a in answers)
        if spread > self.config.tolerance:
            raise HEAbort(f"round {rnd}: decryptions of the sum differ by {spread:.3g} (> {self.config.tolerance:g}): "
                          "a decrypting client lied; the global model is unchanged.")
        return answers[0]


class HEClient:
    """Client side: holds the secret CKKS context (`secret_context`, bytes from `create_keys`)."""

    def __init__(self, secret_context: bytes) -> None:
        self.secret_context = secret_context
        self.context = load_secret(secret_context)

    def __reduce__(self):
        """Rebuilt from the context's bytes, so a simulation can hand its clients to Ray's workers (TenSEAL
        contexts cannot be copied by Ray's serializer)."""
        return HEClient, (self.secret_context,)

    def handlers(self) -> dict[str, Handler]:
        return {ENCRYPTED: self.encrypt, DECRYPT: self.decrypt}

    def encrypt(self, session: ClientSession, message: Message) -> Message:
        meta = message.meta
        try:
            rnd, length, fields = int(meta["round"]), int(meta["length"]), [str(f) for f in meta["fields"]]
            weighted, cap = bool(meta["weighted"]), int(meta["max_examples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HEError(f"malformed HE request: {exc}") from None
        config = meta.get("config", {})
        update = session.fit(dict(config) if isinstance(config, dict) else {})
        if length != update.delta.size + len(fields) + 1:
            raise HEError(f"the server asks for {length} values, this update has {update.delta.size} plus "
                          f"{len(fields)} metrics and the weight")
        weight = float(min(max(update.num_examples, 1), cap)) if weighted else 1.0
        metrics = [float(update.metrics.get(name, 0.0)) for name in fields]
        vector = np.concatenate([np.asarray(update.delta, dtype=np.float64), np.nan_to_num(metrics), [1.0]]) * weight
        session.memory["he"] = {"round": rnd, "decrypted": False}
        tensors = {f"ct/{i}": from_bytes(ts.ckks_vector(self.context, vector[i * SLOTS:(i + 1) * SLOTS]).serialize())
                   for i in range(_chunks(length))}
        return Message(ENCRYPTED, tensors, {"round": update.round, "partial": bool(update.partial)})

    def decrypt(self, session: ClientSession, message: Message) -> Message:
        st = session.memory.get("he")
        if st is None or st["round"] != message.meta.get("round") or st["decrypted"]:
            raise HEError("decryption refused: one decryption per round, and only in a round this client "
                          "contributed to")
        st["decrypted"] = True
        parts = []
        for i in range(sum(name.startswith("ct/") for name in message.tensors)):
            try:
                vector = ts.ckks_vector_from(self.context, as_bytes(message.tensors[f"ct/{i}"]))
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise HEError(f"ciphertext {i} of the sum is missing or malformed: {exc}") from None
            parts.append(np.asarray(vector.decrypt(), dtype=np.float64))
        return Message(DECRYPT, {"sum": np.concatenate(parts) if parts else np.zeros(0)})
