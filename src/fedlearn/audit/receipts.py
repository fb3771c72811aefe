"""Receipts: what a client keeps to prove, later and to anyone, that its part in a round is in the log.

A receipt is a signed tree head, the round's record and its inclusion proof. `check_receipt` verifies all
three (signature, record bytes, Merkle path) and that the client is named in the record; `check_extends`
verifies a consistency proof between an older head and a newer one, so a client that kept an early
receipt detects a server that later rewrote or truncated its log. In a deployment the server's
`ReceiptIssuer` sends them with each fit task (or secure aggregation's training stage) and with the message
that ends the run, and the client's `accept_bundle` checks and keeps them.
Everything a client receives is parsed as untrusted input.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import merkle
from .log import AuditError, AuditLog, TreeHead, canonical

MAX_PROOF = 64  # a Merkle path of a tree with up to 2^64 leaves
AUDIT_KEY = "audit"  # the fit task config entry that carries a client's audit bundle


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
        if not names(receipt.record, client_id):
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


class ReceiptIssuer:
    """Server side: the audit bundle that goes to a client with its next fit task or training stage (under
    the fit config's "audit" key): the newest signed head, a receipt for every record naming the client that
    it has not been sent yet, and the consistency proof from the head it was sent last time, or from the head
    it said it holds when it connected (`holds`). A record is appended after the round's tasks went out, so
    the receipt of a client's last round reaches it with its next task, or, after the run's final round, with
    the message that ends the run. A client that said nothing starts from the last record naming it, whose
    task carried the head of that size. An asynchronous server,
    whose clients' tasks span many records, passes `sent` (the sizes sent to each client, as saved) and
    `on_sent`, which saves them after every bundle, so a restarted server goes on from there."""

    def __init__(self, log: AuditLog, sent: dict[str, int] | None = None,
                 on_sent: Callable[[dict[str, int]], None] | None = None) -> None:
        self.log = log
        self._sent: dict[str, int] = {str(k): int(v) for k, v in (sent or {}).items()}
        self._on_sent = on_sent
        self._lock = threading.Lock()  # tasks of one round, and the run's end, are sent from several threads

    def bundle(self, client_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._bundle(client_id)

    def holds(self, client_id: str, size: int) -> None:
        """The client says (when it connects) that the newest head it holds has `size` records: its next bundle
        proves consistency from there, so a bundle lost with a connection does not leave it unable to check the
        next. A size larger than the log is ignored when the bundle is made (a client can only mislead itself)."""
        with self._lock:
            self._sent[client_id] = size

    def _bundle(self, client_id: str) -> dict[str, Any] | None:
        head = self.log.latest_head(self.log.public_key)
        if head is None:
            return None
        records = [(idx, json.loads(bytes(data))) for idx, _, data in self.log.records()[:head.size]]
        named = [(idx, record) for idx, record in records if names(record, client_id)]
        since = self._sent.get(client_id, -1)
        if not 0 <= since <= head.size:
            since = named[-1][0] if named else 0
        receipts = [Receipt(head, idx, record, self.log.inclusion(idx, head.size)).to_json()
                    for idx, record in named if idx >= since]
        proof = self.log.consistency(since, head.size) if 0 < since < head.size else []
        self._sent[client_id] = head.size
        if self._on_sent is not None:
            self._on_sent(dict(self._sent))
        return {"head": head.to_json(), "receipts": receipts, "from_size": since, "consistency": [p.hex() for p in proof]}


def names(record: dict[str, Any], client_id: str) -> bool:
    """True when an audit record lists the client among the accepted, refused or flagged."""
    accepted, refused = record.get("accepted"), record.get("refused")
    return (isinstance(accepted, dict) and client_id in accepted) or (isinstance(refused, list) and any(
        isinstance(r, dict) and r.get("client") == client_id for r in refused))


def accept_bundle(book: ReceiptBook, bundle: Any, client_id: str, public_key: str | None = None) -> list[Path]:
    """Client side: check an audit bundle from the server and keep its receipts; returns the files written.

    The signing key is `public_key` when given, else the one this book pinned when it first met the log
    (trust on first use). Raises `AuditError` on a bad signature, a receipt that does not verify or does not
    name this client, or a head that does not extend (or goes back behind) the head kept from before."""
    if not isinstance(bundle, dict) or set(bundle) != {"head", "receipts", "from_size", "consistency"}:
        raise AuditError("audit bundle needs exactly head, receipts, from_size, consistency")
    head = TreeHead.from_json(bundle["head"])
    known = book.latest_head(head.log_id)
    key = public_key or (known.public_key if known else head.public_key)
    head.check(key)
    if not isinstance(bundle["receipts"], list) or len(bundle["receipts"]) > 10_000:
        raise AuditError("audit bundle receipts must be a list")
    receipts = [Receipt.from_json(r) for r in bundle["receipts"]]
    for receipt in receipts:
        if receipt.head != head:
            raise AuditError("a receipt in the bundle is not under the bundle's head")
        check_receipt(receipt, client_id=client_id, public_key=key)
    if known is not None:
        if head.size < known.size:
            raise AuditError(f"the server's log shrank from {known.size} to {head.size} records")
        if head.size == known.size and head.root != known.root:
            raise AuditError(f"two different roots for {head.size} records: the log was rewritten")
        if head.size > known.size:
            if bundle["from_size"] != known.size:
                raise AuditError(f"the server proved consistency from {bundle['from_size']} records, but this client "
                                 f"last saw {known.size}")
            check_extends(known, head, hashes(bundle["consistency"], "consistency proof"), key)
    paths = [book.keep(r) for r in receipts]
    book.set_latest_head(head)
    return paths
