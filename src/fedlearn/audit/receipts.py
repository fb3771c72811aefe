"""Receipts: what a client keeps to prove, later and to anyone, that its part in a round is in the log.

A receipt is a signed tree head, the round's record and its inclusion proof. `check_receipt` verifies all
three (signature, record bytes, Merkle path) and that the client is named in the record; `check_extends`
verifies a consistency proof between an older head and a newer one, so a client that kept an early
receipt detects a server that later rewrote or truncated its log. Everything here parses untrusted input.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import merkle
from .log import AuditError, TreeHead, canonical

MAX_PROOF = 64  # a Merkle path of a tree with up to 2^64 leaves


@dataclass(frozen=True)
class Receipt:
    head: TreeHead
    index: int
    record: dict[str, Any]
    proof: list[bytes]

    def to_json(self) -> dict[str, Any]:
        return {"head": self.head.to_json(), "index": self.index, "record": self.record,
                "proof": [p.hex() for p in self.proof]}

    @classmethod
    def from_json(cls, value: Any) -> "Receipt":
        if not isinstance(value, dict) or set(value) != {"head", "index", "record", "proof"}:
            raise AuditError("a receipt needs exactly the fields head, index, record, proof")
        if not isinstance(value["index"], int) or isinstance(value["index"], bool) or value["index"] < 0:
            raise AuditError("receipt index must be a non-negative integer")
        if not isinstance(value["record"], dict):
            raise AuditError("receipt record must be a JSON object")
        return cls(TreeHead.from_json(value["head"]), value["index"], value["record"], hashes(value["proof"], "receipt proof"))


def hashes(value: Any, what: str) -> list[bytes]:
    """A list of hex SHA-256 hashes from untrusted JSON."""
    if not isinstance(value, list) or len(value) > MAX_PROOF:
        raise AuditError(f"{what} must be a list of at most {MAX_PROOF} hashes")
    out = []
    for item in value:
        try:
            raw = bytes.fromhex(item) if isinstance(item, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != merkle.HASH_SIZE:
            raise AuditError(f"{what} holds something that is not a 64-hex-digit hash")
        out.append(raw)
    return out


def check_receipt(receipt: Receipt, *, client_id: str | None = None, public_key: str | None = None) -> None:
    """Raise `AuditError` unless the receipt's head is validly signed (by `public_key` when given), its record
    is leaf `index` of that head's tree, and (with `client_id`) the record names the client."""
    receipt.head.check(public_key)
    if receipt.record.get("log") != receipt.head.log_id:
        raise AuditError(f"receipt record belongs to log {receipt.record.get('log')!r}, its head to {receipt.head.log_id!r}")
    try:
        leaf = merkle.leaf_hash(canonical(receipt.record))
        merkle.verify_inclusion(receipt.index, receipt.head.size, leaf, receipt.proof, receipt.head.root_bytes)
    except (merkle.ProofError, ValueError, TypeError) as exc:
        raise AuditError(f"receipt for round {receipt.record.get('round')}: {exc}") from None
    if client_id is not None:
        named = set(receipt.record.get("accepted") or {}) | {
            r.get("client") for r in receipt.record.get("refused") or [] if isinstance(r, dict)}
        if client_id not in named:
            raise AuditError(f"receipt for round {receipt.record.get('round')} does not name client {client_id!r}")


def check_extends(old: TreeHead, new: TreeHead, proof: list[bytes], public_key: str | None = None) -> None:
    """Raise `AuditError` unless both heads are validly signed for the same log and `proof` shows the tree of
    `old` is a prefix of the tree of `new` (the log only grew)."""
    old.check(public_key)
    new.check(public_key)
    if old.log_id != new.log_id:
        raise AuditError(f"heads of different logs ({old.log_id!r}, {new.log_id!r})")
    try:
        merkle.verify_consistency(old.size, new.size, old.root_bytes, new.root_bytes, proof)
    except merkle.ProofError as exc:
        raise AuditError(f"head of size {new.size} does not extend the head of size {old.size}: {exc}") from None


class ReceiptBook:
    """A client's receipts in a folder: one JSON file per round, plus the newest head it has checked."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, log_id: str, rnd: int) -> Path:
        return self.folder / f"{log_id}-round-{rnd:06d}.json"

    def keep(self, receipt: Receipt) -> Path:
        path = self.path(receipt.head.log_id, int(receipt.record.get("round", -1)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(receipt.to_json(), indent=1))
        return path

    def latest_head(self, log_id: str) -> TreeHead | None:
        path = self.folder / f"{log_id}-head.json"
        return TreeHead.from_json(json.loads(path.read_text())) if path.exists() else None

    def set_latest_head(self, head: TreeHead) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{head.log_id}-head.json").write_text(json.dumps(head.to_json(), indent=1))


def load_head(path: str | Path) -> TreeHead:
    """A tree head from a JSON file holding either a head or a receipt."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"cannot read a tree head from {path}: {exc}") from None
    return TreeHead.from_json(value["head"] if isinstance(value, dict) and "head" in value else value)
