"""Client identities: Ed25519 keys, the server's allow-list of registered clients, and the exact bytes each
signature covers.

A client proves who it is by signing the server's fresh challenge, and signs every field of every result it
sends: the run id, its client id, the round, the task's nonce and kind, the payload's size and SHA-256, its
training time and its error text. The
allow-list is a text file, one registered client per line::

    # client_id  ed25519-public-key-hex
    hospital-a   3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import fedlearn_pb2 as pb

CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class IdentityError(ValueError):
    """A key file, allow-list or client id that cannot be used; the message says which and why."""


def check_client_id(client_id: str) -> str:
    """Return `client_id` if it is a usable name (letters, digits, '.', '_', '-'; at most 128), else raise."""
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.match(client_id):
        raise IdentityError(
            f"client id {client_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return client_id


class Identity:
    """A client's Ed25519 signing key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        """Read an unencrypted PKCS#8 PEM private key written by `save`."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except FileNotFoundError:
            raise IdentityError(f"identity key {path} does not exist (create one with `fedlearn certs`)") from None
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"identity key {path} is not a readable PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity key {path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: str | Path, *, force: bool = False) -> None:
        """Write the private key as PEM, readable by its owner only; an existing key is kept unless `force`."""
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        write_private(Path(path), pem, force=force)

    @property
    def public_hex(self) -> str:
        """The public key as 64 hex digits, the form the allow-list holds."""
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw.hex()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Create `path` with mode 0600 and write a secret to it. The file must not exist: an existing file (whose
    mode may let others read what we write) or a symlink (which would write elsewhere) is refused, unless
    `force`, which first removes it (a symlink itself, never its target)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if force:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; refusing to overwrite a private key "
                            "(move it away, or pass --force to replace it)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def verify(public_hex: str, signature: bytes, message: bytes) -> bool:
    """True iff `signature` is the Ed25519 signature of `message` under the hex public key."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class AllowList:
    """Registered clients: client id -> hex public key. Read from the file again on each use by the server,
    so adding or removing a line takes effect for the next connection without a restart."""

    keys: dict[str, str]

    @classmethod
    def load(cls, path: str | Path) -> "AllowList":
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise IdentityError(f"allow-list {path} does not exist (create one with `fedlearn certs`)") from None
        keys: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[1]):
                raise IdentityError(f"{path}:{number}: expected 'client_id public-key-hex' (64 hex digits)")
            cid = check_client_id(parts[0])
            if cid in keys:
                raise IdentityError(f"{path}:{number}: client {cid!r} is listed twice")
            keys[cid] = parts[1].lower()
        return cls(keys)

    @staticmethod
    def line(client_id: str, public_hex: str) -> str:
        """One allow-list entry."""
        return f"{check_client_id(client_id)} {public_hex}\n"


def _transcript(tag: bytes, *parts: bytes) -> bytes:
    """Length-prefix every part so no two different field tuples sign the same bytes."""
    return tag + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def hello_message(run_id: str, client_id: str, challenge: bytes) -> bytes:
    """What a client signs to prove its identity on a new connection."""
    return _transcript(b"fedlearn/hello/v1", run_id.encode(), client_id.encode(), challenge)


def result_message(header: pb.ResultHeader) -> bytes:
    """What a client signs for each result: every field of its header, which binds the result to this run,
    client, round, task and payload, and covers what it reports (its size, training time and error)."""
    return _transcript(b"fedlearn/result/v2", header.run_id.encode(), header.client_id.encode(),
                       struct.pack(">Q", header.round), header.nonce, struct.pack(">I", header.kind),
                       struct.pack(">Q", header.payload_bytes), header.payload_sha256,
                       struct.pack(">d", header.train_seconds), header.error.encode())


def status_message(client_id: str, timestamp: str, nonce: bytes) -> bytes:
    """What a client signs to ask for a server's status."""
    return _transcript(b"fedlearn/status/v1", client_id.encode(), timestamp.encode(), nonce)
