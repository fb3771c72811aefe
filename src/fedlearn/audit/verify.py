"""`fedlearn audit verify` and `prove`: recompute a run's audit log from its store and say what does not
hold, and make the inclusion proof of one client's round.

Verification reads every record and checks, in order: leaf indices run 0..n-1 (a deleted record leaves a
gap); each record is canonical JSON of this log, for the round its row says (an edited record); rounds
increase (a reordered log); each record's `model_before` is the previous `model_after` and its
`model_after` is the hash of the model the store holds for that round, its accepted clients the round's
participants (an edited round); every round in the store has a record; every stored head is signed by the
run's key and its root is the root of the first `size` records, and the newest head covers all records (a
truncated or rewritten log); heads held elsewhere (`--head`, e.g. a client's receipt) are signed and
extended by the log through a consistency proof (a log rewritten after that head was handed out).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..server.store import RunStore
from . import merkle
from .log import AuditError, TreeHead, canonical
from .receipts import Receipt, check_extends, names
from .record import digest


@dataclass
class Verification:
    """The outcome of `verify_run`: the log's size and root, its newest head, and every problem found."""

    size: int = 0
    root: str = merkle.EMPTY_ROOT.hex()
    head: TreeHead | None = None
    public_key: str = ""
    pinned: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_run(run_dir: str | Path, *, heads: list[TreeHead] = (), public_key: str | None = None) -> Verification:
    """Check the audit log of the run in `run_dir` (read-only). `public_key` pins the signer (hex); without
    it the key recorded in the run store is used, which shows tampering by anyone who lacks the key."""
    store = RunStore(run_dir, readonly=True)
    try:
        return _verify(store, list(heads), public_key)
    finally:
        store.close()


def _verify(store: RunStore, external: list[TreeHead], pinned: str | None) -> Verification:
    key = pinned or store.get_meta("audit_public_key") or ""
    out = Verification(public_key=key, pinned=bool(pinned))
    problems = out.problems
    if not key:
        problems.append("the run store names no audit key (audit_public_key) and none was given with --key")
    elif pinned and store.get_meta("audit_public_key") != pinned:
        problems.append(f"the run store names audit key {store.get_meta('audit_public_key')}, not the expected {pinned}")
    log_id = store.audit.log_id
    rows = store.audit.records()
    hashes = [merkle.leaf_hash(bytes(data)) for _, _, data in rows]
    stored_rounds = {r: (digest(model), participants) for r, model, participants in store.committed()}
    previous: dict[str, Any] | None = None
    for position, (idx, rnd, data) in enumerate(rows):
        if idx != position:
            problems.append(f"record {position} is stored at index {idx}: records were deleted or renumbered")
        record = _parse(bytes(data), position, problems)
        if record is None:
            previous = None
            continue
        if record.get("log") != log_id:
            problems.append(f"record {position} belongs to log {record.get('log')!r}, not {log_id!r}")
        if record.get("round") != rnd:
            problems.append(f"record {position} says round {record.get('round')} but is filed under round {rnd}")
        if previous is not None:
            if not isinstance(record.get("round"), int) or record["round"] <= previous.get("round", -1):
                problems.append(f"record {position} (round {record.get('round')}) comes after round "
                                f"{previous.get('round')}: records are out of order")
            if record.get("model_before") != previous.get("model_after"):
                problems.append(f"record {position} (round {record.get('round')}) does not start from the model "
                                f"the previous record ended with")
        stored = stored_rounds.pop(record.get("round"), None)
        if stored is None:
            problems.append(f"round {record.get('round')} has a record but no committed round in the store")
        else:
            if stored[0] != record.get("model_after"):
                problems.append(f"the model stored for round {record['round']} is not the one its record hashes")
            # a set: an asynchronous step may aggregate two results of one client, its record names it once
            if sorted(set(stored[1])) != sorted(record.get("accepted") or {}):
                problems.append(f"the participants stored for round {record['round']} differ from its record")
        previous = record
    for rnd in sorted(stored_rounds):
        problems.append(f"round {rnd} is committed in the store but has no audit record (log truncated or deleted)")
    roots = merkle.prefix_roots(hashes)
    out.size, out.root = len(hashes), (roots[-1] if roots else merkle.EMPTY_ROOT).hex()
    stored_heads = store.audit.heads(key) if key else []
    last_time = 0
    for head in stored_heads:
        _check_head(head, key, hashes, roots, problems, "stored head")
        if head.timestamp_ms < last_time:
            problems.append(f"stored head of size {head.size} is older than the head before it")
        last_time = max(last_time, head.timestamp_ms)
    out.head = stored_heads[-1] if stored_heads else None
    if hashes and (out.head is None or out.head.size != len(hashes)):
        problems.append(f"the newest signed head covers {out.head.size if out.head else 0} of {len(hashes)} records")
    for head in external:
        if head.log_id != log_id:
            problems.append(f"head of size {head.size} is for log {head.log_id!r}, not this run's {log_id!r}")
            continue
        _check_head(head, key, hashes, roots, problems, "given head")
    return out


def _parse(data: bytes, position: int, problems: list[str]) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        problems.append(f"record {position} is not JSON")
        return None
    if not isinstance(record, dict) or canonical(record) != data:
        problems.append(f"record {position} is not a canonical record (edited by hand?)")
        return record if isinstance(record, dict) else None
    return record


def _check_head(head: TreeHead, key: str, hashes: list[bytes], roots: list[bytes], problems: list[str], what: str) -> None:
    try:
        head.check(key or None)
    except AuditError as exc:
        problems.append(f"{what}: {exc}")
        return
    if head.size > len(hashes):
        problems.append(f"{what} of size {head.size} is larger than the log ({len(hashes)} records): the log was truncated")
        return
    if head.size == 0:
        return
    proof = merkle.consistency_proof(head.size, hashes)
    try:
        merkle.verify_consistency(head.size, len(hashes), head.root_bytes, roots[-1], proof)
    except merkle.ProofError:
        problems.append(f"{what} of size {head.size} is not extended by the log: records up to {head.size} were "
                        f"changed, removed or reordered after it was signed")


def prove(run_dir: str | Path, client_id: str, rnd: int) -> Receipt:
    """The receipt (newest signed head, record, inclusion proof) of `client_id`'s part in round `rnd`."""
    store = RunStore(run_dir, readonly=True)
    try:
        key = store.get_meta("audit_public_key") or ""
        head = store.audit.latest_head(key)
        if head is None:
            raise AuditError(f"the run in {run_dir} has no signed tree head yet")
        index = store.audit.index_of_round(rnd)
        record = json.loads(bytes(store.audit.records()[index][2]))
        receipt = Receipt(head, index, record, store.audit.inclusion(index, head.size))
    finally:
        store.close()
    if not names(record, client_id):
        raise AuditError(f"client {client_id!r} took no part in round {rnd}")
    return receipt


def consistency(run_dir: str | Path, old_size: int) -> tuple[TreeHead, list[bytes]]:
    """The newest head and the proof that the tree of `old_size` records is a prefix of it."""
    store = RunStore(run_dir, readonly=True)
    try:
        head = store.audit.latest_head(store.get_meta("audit_public_key") or "")
        if head is None:
            raise AuditError(f"the run in {run_dir} has no signed tree head yet")
        return head, store.audit.consistency(old_size, head.size)
    finally:
        store.close()


__all__ = ["Verification", "verify_run", "prove", "consistency", "check_extends"]
