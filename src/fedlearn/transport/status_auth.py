"""Who may ask a running server for its status (`fedlearn status`): a registered client, with a fresh request
signed by its identity key, or the operator, with the token `fedlearn certs` made. Both travel as gRPC
metadata inside TLS.

The server holds only the token's SHA-256 (`operator.token.sha256`) and compares digests in constant time,
so neither its disk nor the time a comparison takes tells the token. A client's signed request is good for
`MAX_SKEW` seconds and only once (the server remembers its nonce), and with mutual TLS the certificate must
name the client that signed.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from .identity import AllowList, Identity, IdentityError, status_message, verify, write_private

OPERATOR_TOKEN = "operator.token"
OPERATOR_TOKEN_HASH = "operator.token.sha256"
MAX_SKEW = 60.0  # seconds a signed status request stays valid, either side of the server's clock
_TOKEN, _CLIENT, _TIME = "authorization", "fedlearn-client", "fedlearn-time"
_NONCE, _SIGNATURE = "fedlearn-nonce-bin", "fedlearn-signature-bin"
Metadata = list[tuple[str, str | bytes]]


def create_operator_token(folder: Path, *, force: bool = False) -> Path:
    """Write a new operator token (mode 0600) and its SHA-256 for the server; returns the token's path."""
    token = secrets.token_hex(32)
    write_private(folder / OPERATOR_TOKEN, (token + "\n").encode(), force=force)
    (folder / OPERATOR_TOKEN_HASH).write_text(_digest(token) + "\n")
    return folder / OPERATOR_TOKEN


def token_metadata(token_file: str | Path) -> Metadata:
    """Call metadata carrying the operator token read from `token_file`."""
    try:
        token = Path(token_file).read_text().strip()
    except FileNotFoundError:
        raise IdentityError(f"operator token {token_file} does not exist (`fedlearn certs` makes one)") from None
    if not token:
        raise IdentityError(f"operator token file {token_file} is empty")
    return [(_TOKEN, f"Bearer {token}")]


def client_metadata(client_id: str, identity: Identity) -> Metadata:
    """Call metadata carrying a registered client's fresh signed status request."""
    now, nonce = f"{time.time():.3f}", os.urandom(16)
    return [(_CLIENT, client_id), (_TIME, now), (_NONCE, nonce),
            (_SIGNATURE, identity.sign(status_message(client_id, now, nonce)))]


class StatusGate:
    """The server's check of a status call's credentials. The allow-list and the token digest are read
    again on each call, so adding a client or rotating the token needs no restart."""

    def __init__(self, allow_list: str | Path, token_hash_file: str | Path | None) -> None:
        self.allow_list, self.token_hash_file = allow_list, token_hash_file
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> when it expires
        self._lock = threading.Lock()

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]], certificate_names: frozenset[str] | None) -> str | None:
        """None if the caller may see the status, else why not (for the server's log, not the caller)."""
        values: dict[str, str | bytes] = {}
        for key, value in metadata:
            if key in values:
                return f"metadata {key!r} given twice"
            values[key] = value
        if _TOKEN in values:
            return self._token_refusal(values[_TOKEN])
        if _CLIENT in values:
            return self._client_refusal(values, certificate_names)
        return "no credentials: neither an operator token nor a client's signed request"

    def _token_refusal(self, header: str | bytes) -> str | None:
        if self.token_hash_file is None:
            return "operator token given, but the server has no operator_token configured"
        try:
            expected = Path(self.token_hash_file).read_text().strip()
        except OSError as exc:
            return f"operator token digest {self.token_hash_file} is unreadable: {exc}"
        presented = header.removeprefix("Bearer ") if isinstance(header, str) else ""
        if not hmac.compare_digest(_digest(presented).encode(), expected.encode()):
            return "wrong operator token"
        return None

    def _client_refusal(self, values: dict[str, str | bytes], certificate_names: frozenset[str] | None) -> str | None:
        cid, stamp, nonce, signature = (values.get(k) for k in (_CLIENT, _TIME, _NONCE, _SIGNATURE))
        if not (isinstance(cid, str) and isinstance(stamp, str) and isinstance(nonce, bytes)
                and isinstance(signature, bytes) and len(nonce) == 16 and len(stamp) <= 32):
            return "malformed client status request"
        try:
            keys = AllowList.load(self.allow_list).keys
            sent_at = float(stamp)
        except (IdentityError, ValueError) as exc:
            return f"cannot check the request: {exc}"
        now = time.time()
        if not math.isfinite(sent_at) or abs(now - sent_at) > MAX_SKEW:
            return f"client {cid!r}: request time {stamp} is more than {MAX_SKEW:g}s from the server's clock"
        if cid not in keys:
            return f"client {cid!r} is not registered"
        if not verify(keys[cid], signature, status_message(cid, stamp, nonce)):
            return f"client {cid!r}: signature does not match its registered key"
        if certificate_names is not None and cid not in certificate_names:
            return f"client {cid!r} signed, but its TLS certificate names {sorted(certificate_names)}"
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return f"client {cid!r}: replayed status request"
            self._seen[nonce] = now + 2 * MAX_SKEW
        return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
