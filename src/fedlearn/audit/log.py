"""The audit log of a run: one record per committed round, kept as the leaves of an RFC 9162 Merkle tree in
the run store, and a signed tree head (size, root, time) after every commit.

`AuditLog.append` runs inside the run store's round transaction (`RunStore.commit_round`), so a round and
its record are committed together or not at all. A record is canonical JSON (sorted keys, no spaces): the
bytes that are hashed are the bytes that are stored. Heads are signed with the server's Ed25519 key; in a
simulation the key is made for the run and kept in the run directory, so only a head held elsewhere (a
client's receipt, `fedlearn audit verify --head`) or a pinned public key (`--key`) protects against someone
who can rewrite the whole directory.
"""
from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import merkle

KEY_FILE = "audit_key.pem"
PUBLIC_KEY_FILE = "audit_public_key.txt"
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_leaves (idx INTEGER PRIMARY KEY, round INTEGER NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_heads (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, timestamp_ms INTEGER NOT NULL, signature BLOB NOT NULL
);
"""


class AuditError(ValueError):
    """An audit log, head or receipt that does not check out; the message says what and where."""


def canonical(record: dict[str, Any]) -> bytes:
    """The exact bytes of a record that become a Merkle leaf."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def head_message(log_id: str, size: int, root: bytes, timestamp_ms: int) -> bytes:
    """What a tree head's signature covers, every field length-prefixed."""
    parts = [log_id.encode(), struct.pack(">Q", size), root, struct.pack(">Q", timestamp_ms)]
    return b"fedlearn/audit-head/v1" + b"".join(struct.pack(">I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the log (run id), its size, root and time, the signer's public key (hex) and the
    Ed25519 signature (hex). Written to and read from JSON as is."""

    log_id: str
    size: int
    root: str
    timestamp_ms: int
    public_key: str
    signature: str

    def check(self, public_key: str | None = None) -> None:
        """Raise `AuditError` unless the signature is valid (under `public_key` when given, else the head's own)."""
        key = public_key or self.public_key
        if public_key and public_key != self.public_key:
            raise AuditError(f"tree head of size {self.size} is signed by key {self.public_key[:16]}..., "
                             f"not the expected {public_key[:16]}...")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(
                bytes.fromhex(self.signature), head_message(self.log_id, self.size, self.root_bytes, self.timestamp_ms))
        except (InvalidSignature, ValueError):
            raise AuditError(f"tree head of size {self.size} has an invalid signature") from None

    @property
    def root_bytes(self) -> bytes:
        return bytes.fromhex(self.root)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> "TreeHead":
        """Parse an untrusted head (from a file or the network): every field checked for type and form."""
        if not isinstance(value, dict) or set(value) != {f for f in cls.__dataclass_fields__}:
            raise AuditError(f"a tree head needs exactly the fields {sorted(cls.__dataclass_fields__)}")
        ints, hexes = ("size", "timestamp_ms"), {"root": 32, "public_key": 32, "signature": 64}
        for name in ints:
            if not isinstance(value[name], int) or isinstance(value[name], bool) or not 0 <= value[name] < 2**63:
                raise AuditError(f"tree head field {name} must be a non-negative integer")
        for name, size in hexes.items():
            if not isinstance(value[name], str) or len(value[name]) != 2 * size:
                raise AuditError(f"tree head field {name} must be {2 * size} hex digits")
            try:
                bytes.fromhex(value[name])
            except ValueError:
                raise AuditError(f"tree head field {name} must be {2 * size} hex digits") from None
        if not isinstance(value["log_id"], str) or len(value["log_id"]) > 256:
            raise AuditError("tree head field log_id must be a string of at most 256 characters")
        return cls(**value)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in `path`; a fresh one is made (mode 0600) when the file does not exist."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"audit key {path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as fh:
        fh.write(pem)
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class AuditLog:
    """The audit tables of one run store (`conn`), signing with `key`. Not thread-safe: the store's lock applies."""

    def __init__(self, conn: sqlite3.Connection, log_id: str, key: Ed25519PrivateKey | None = None) -> None:
        self._conn, self.log_id, self._key = conn, log_id, key
        self._hashes: list[bytes] | None = None  # leaf hashes, read once on first use

    @property
    def public_key(self) -> str:
        if self._key is None:
            raise AuditError("this audit log was opened without its signing key (read-only)")
        return public_hex(self._key)

    def leaf_hashes(self) -> list[bytes]:
        if self._hashes is None:
            rows = self._conn.execute("SELECT record FROM audit_leaves ORDER BY idx").fetchall()
            self._hashes = [merkle.leaf_hash(r[0]) for r in rows]
        return self._hashes

    def append(self, rnd: int, record: dict[str, Any]) -> TreeHead:
        """Add the record of round `rnd` and sign the new head. Call inside the store's transaction: both
        rows are written with the round, or none is."""
        if self._key is None:
            raise AuditError("cannot append to an audit log opened without its signing key")
        data = canonical(record)
        hashes = self.leaf_hashes()
        size = len(hashes) + 1
        new_root = merkle.root([*hashes, merkle.leaf_hash(data)])
        stamp = time.time_ns() // 1_000_000
        signature = self._key.sign(head_message(self.log_id, size, new_root, stamp))
        self._conn.execute("INSERT INTO audit_leaves VALUES (?, ?, ?)", (size - 1, rnd, data))
        self._conn.execute("INSERT INTO audit_heads VALUES (?, ?, ?, ?)", (size, new_root, stamp, signature))
        hashes.append(merkle.leaf_hash(data))
        return TreeHead(self.log_id, size, new_root.hex(), stamp, self.public_key, signature.hex())

    def forget_cache(self) -> None:
        """Drop the cached leaf hashes (after a rolled-back transaction)."""
        self._hashes = None

    def records(self) -> list[tuple[int, int, bytes]]:
        """(index, round, record bytes) of every leaf, in index order."""
        return self._conn.execute("SELECT idx, round, record FROM audit_leaves ORDER BY idx").fetchall()

    def heads(self, public_key: str) -> list[TreeHead]:
        """Every stored head, by size; `public_key` is the key they claim to be signed with."""
        rows = self._conn.execute("SELECT size, root, timestamp_ms, signature FROM audit_heads ORDER BY size").fetchall()
        return [TreeHead(self.log_id, s, bytes(r).hex(), t, public_key, bytes(sig).hex()) for s, r, t, sig in rows]

    def latest_head(self, public_key: str) -> TreeHead | None:
        row = self._conn.execute(
            "SELECT size, root, timestamp_ms, signature FROM audit_heads ORDER BY size DESC LIMIT 1").fetchone()
        return self._head(row, public_key)

    def head(self, size: int, public_key: str) -> TreeHead | None:
        """The stored head of `size` records, if there is one."""
        row = self._conn.execute("SELECT size, root, timestamp_ms, signature FROM audit_heads WHERE size = ?",
                                 (size,)).fetchone()
        return self._head(row, public_key)

    def _head(self, row: tuple | None, public_key: str) -> TreeHead | None:
        return None if row is None else TreeHead(self.log_id, row[0], bytes(row[1]).hex(), row[2], public_key,
                                                 bytes(row[3]).hex())

    def index_of_round(self, rnd: int) -> int:
        row = self._conn.execute("SELECT idx FROM audit_leaves WHERE round = ? ORDER BY idx DESC", (rnd,)).fetchone()
        if row is None:
            raise AuditError(f"round {rnd} has no record in the audit log")
        return row[0]

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return merkle.inclusion_proof(index, self.leaf_hashes()[:size])

    def consistency(self, old_size: int, size: int) -> list[bytes]:
        """The proof that the first `old_size` records are a prefix of the first `size` (empty from the empty tree)."""
        return merkle.consistency_proof(old_size, self.leaf_hashes()[:size]) if old_size else []
