"""RFC 9162 (Certificate Transparency 2.0, section 2.1) Merkle tree over SHA-256: leaf hashes are
H(0x00 || leaf), interior nodes H(0x01 || left || right), and a tree of n leaves splits at the largest power
of two below n. Inclusion proofs show one leaf is in a tree of a given size; consistency proofs show a tree
of size m is a prefix of one of size n (the log only grew). Verification follows RFC 9162 sections 2.1.3.2
and 2.1.4.2 step by step, so a proof is checked without trusting the one who made it."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not verify; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash of the leaves whose leaf hashes are `hashes`."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(root(hashes[:k]), root(hashes[k:]))


def prefix_roots(hashes: Sequence[bytes]) -> list[bytes]:
    """Roots of the trees of sizes 1..n in one pass (a stack of perfect subtrees, O(n log n) hashes)."""
    stack: list[tuple[int, bytes]] = []  # (subtree size, hash), sizes strictly decreasing
    roots = []
    for i, h in enumerate(hashes, start=1):
        stack.append((1, h))
        while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
            (size, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * size, node_hash(left, right)))
        acc = stack[-1][1]
        for _, left in reversed(stack[:-1]):
            acc = node_hash(left, acc)
        roots.append(acc)
    return roots


def inclusion_proof(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """Audit path of leaf `index` in the tree of the leaves `hashes` (RFC 9162 2.1.3.1)."""
    if not 0 <= index < len(hashes):
        raise ValueError(f"leaf {index} is not in a tree of size {len(hashes)}")
    if len(hashes) == 1:
        return []
    k = _split(len(hashes))
    if index < k:
        return inclusion_proof(index, hashes[:k]) + [root(hashes[k:])]
    return inclusion_proof(index - k, hashes[k:]) + [root(hashes[:k])]


def consistency_proof(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    """Proof that the tree of the first `m` leaves is a prefix of the tree of all `hashes` (RFC 9162 2.1.4.1)."""
    if not 0 < m <= len(hashes):
        raise ValueError(f"no consistency proof from size {m} to size {len(hashes)}")
    return _subproof(m, hashes, True)


def _subproof(m: int, hashes: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [root(hashes)]
    k = _split(n)
    if m <= k:
        return _subproof(m, hashes[:k], complete) + [root(hashes[k:])]
    return _subproof(m - k, hashes[k:], False) + [root(hashes[:k])]


def _check_hashes(*items: bytes) -> None:
    for h in items:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise ProofError(f"a hash must be {HASH_SIZE} bytes, got {len(h) if isinstance(h, bytes) else type(h).__name__}")


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` leads to from leaf hash `leaf` at `index` in a tree of `size` (RFC 9162 2.1.3.2)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hashes(leaf, *proof)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes) -> None:
    """Raise `ProofError` unless `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `expected_root`."""
    _check_hashes(expected_root)
    if root_from_inclusion(index, size, leaf, proof) != expected_root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root of the tree of size {size}")


def verify_consistency(m: int, n: int, root_m: bytes, root_n: bytes, proof: Sequence[bytes]) -> None:
    """Raise `ProofError` unless `proof` shows the tree of size `m` (root `root_m`) is a prefix of the tree of
    size `n` (root `root_n`) (RFC 9162 2.1.4.2)."""
    _check_hashes(root_m, root_n, *proof)
    if not 0 <= m <= n:
        raise ProofError(f"a tree of size {m} cannot be a prefix of one of size {n}")
    if m == n:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if root_m != root_n:
            raise ProofError(f"two different roots for the same tree size {m}")
        return
    if m == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError(f"empty consistency proof from size {m} to {n}")
    path = list(proof)
    if m & (m - 1) == 0:  # m is a power of two: the old root is itself a node of the new tree
        path.insert(0, root_m)
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than needed")
    if fr != root_m:
        raise ProofError(f"consistency proof does not reproduce the old root of size {m}")
    if sr != root_n:
        raise ProofError(f"consistency proof does not reproduce the new root of size {n}")
