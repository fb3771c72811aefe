"""Shamir t-of-n secret sharing of byte strings over the prime field GF(2^521 - 1).

Any `threshold` shares recover the secret by Lagrange interpolation at zero; fewer reveal nothing about it.
Share holders are identified by distinct nonzero x-coordinates (the protocol uses cohort positions).
"""
from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 64-byte secret
SHARE_BYTES = 66
MAX_SECRET_BYTES = 64


class ShamirError(ValueError):
    """Shares that cannot recover a secret (too few, duplicated, malformed)."""


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` for the holders at `xs`; any `threshold` of them recover it."""
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in [1, {len(xs)}] for {len(xs)} holders, got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share x-coordinates must be distinct and nonzero")
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret of {len(secret)} bytes exceeds {MAX_SECRET_BYTES}")
    # a length prefix keeps leading zero bytes of the secret
    coeffs = [int.from_bytes(bytes([len(secret)]) + secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the secret from at least `threshold` shares (x -> share bytes)."""
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to recover the secret, got {len(shares)}")
    points = [(x, int.from_bytes(y, "big")) for x, y in list(shares.items())[:threshold]]
    if any(len(y) != SHARE_BYTES for y in shares.values()) or any(y >= PRIME for _, y in points):
        raise ShamirError("malformed share")
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    raw = value.to_bytes(SHARE_BYTES, "big").lstrip(b"\0")
    if not raw or raw[0] != len(raw) - 1:
        raise ShamirError("shares are inconsistent: the recovered value is not a secret of this protocol")
    return raw[1:]


def _evaluate(coeffs: list[int], x: int) -> int:
    """Horner evaluation of the polynomial with `coeffs` (constant first) at x, mod PRIME."""
    value = 0
    for c in reversed(coeffs):
        value = (value * x + c) % PRIME
    return value
