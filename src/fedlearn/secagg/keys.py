"""Key material of secure aggregation: long-term identity keys that sign advertisements (Ed25519),
per-round X25519 key agreement expanded by HKDF, and authenticated encryption of shares (ChaCha20-Poly1305).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32
NONCE_BYTES = 12


class SecAggKeyError(ValueError):
    """A key, signature or ciphertext failed verification: the message was forged, swapped or corrupted."""


def public_bytes(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    """Raw 32-byte public key."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte private key (what is secret-shared for dropout recovery)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise SecAggKeyError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte secret shared with the peer: X25519 then HKDF-SHA256 bound to `info` (purpose, round, pair)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggKeyError(f"invalid peer public key: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pair_info(purpose: str, rnd: int, a: str, b: str) -> bytes:
    """HKDF context for a pair of clients; symmetric in (a, b) so both ends derive the same key."""
    lo, hi = sorted((a, b))
    return "|".join(("fedlearn-secagg", purpose, str(rnd), lo, hi)).encode()


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305 ciphertext; `associated` (round, sender, recipient) is authenticated."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, blob: bytes, associated: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise SecAggKeyError("a share ciphertext failed authentication (tampered, misrouted or replayed)") from None


def advertisement(plan_digest: bytes, cid: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """The bytes a client signs when it advertises its round keys: bound to the round plan it was shown, so
    a client shown another plan (another cohort, graph or threshold) refuses the keys."""
    return b"fedlearn-secagg-advertise|" + plan_digest + f"|{cid}|".encode() + c_pk + s_pk


def consistency_statement(plan_digest: bytes, sharers: Iterable[str], survivors: Iterable[str]) -> bytes:
    """The bytes a client signs in the consistency round: the plan, sharer set and survivor set it was shown."""
    return (b"fedlearn-secagg-consistency|" + plan_digest + b"|" + "\n".join(sorted(sharers)).encode() + b"|"
            + "\n".join(sorted(survivors)).encode())


def verify(registry: Mapping[str, bytes], cid: str, signature: bytes, message: bytes) -> None:
    """Check `signature` on `message` by client `cid`'s registered identity key."""
    if cid not in registry:
        raise SecAggKeyError(f"client {cid!r} has no registered identity key")
    try:
        Ed25519PublicKey.from_public_bytes(registry[cid]).verify(signature, message)
    except InvalidSignature:
        raise SecAggKeyError(f"signature of client {cid!r} does not verify: keys or survivor set were swapped") from None


@dataclass
class Identities:
    """Long-term Ed25519 identity keys: the private halves live on the clients, the public registry is the
    PKI every client trusts (in deployment: keys registered at enrolment)."""

    private: dict[str, Ed25519PrivateKey]

    @classmethod
    def generate(cls, client_ids: Iterable[str]) -> "Identities":
        return cls({str(c): Ed25519PrivateKey.generate() for c in client_ids})

    @property
    def registry(self) -> dict[str, bytes]:
        return {cid: public_bytes(key) for cid, key in self.private.items()}

    def __reduce__(self):
        """Simulated clients' keys as raw bytes, so a simulation can hand its clients to Ray's workers (which copy
        them with their serializer); `cryptography` key objects cannot be copied that way."""
        raw = {cid: key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) for cid, key in self.private.items()}
        return _identities_from_raw, (raw,)

    def sign(self, cid: str, message: bytes) -> bytes:
        if cid not in self.private:
            raise SecAggKeyError(f"client {cid!r} holds no identity key")
        return self.private[cid].sign(message)


def _identities_from_raw(raw: Mapping[str, bytes]) -> Identities:
    return Identities({cid: Ed25519PrivateKey.from_private_bytes(key) for cid, key in raw.items()})
