"""Mask expansion: a 32-byte seed stretched into uniform ring elements by AES-256 in counter mode.

A cryptographic PRG, so masks are indistinguishable from uniform to anyone without the seed; the whole
256-bit seed keys the cipher (no truncation to a smaller integer seed).
"""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)  # every seed is used for exactly one mask, so a fixed counter start is safe


def expand(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 values (elements of the ring Z_{2^32}) from `seed`."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise ValueError(f"mask length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
