"""The Merkle tree against the published RFC 6962 / 9162 test vectors (the eight standard leaves, their roots,
inclusion and consistency proofs, as used by Certificate Transparency implementations: transparency-dev/merkle
proof/verify_test.go, formerly Trillian's), plus the corruptions those suites probe."""
from __future__ import annotations

import hashlib

import pytest

from fedlearn.audit import merkle
from fedlearn.audit.merkle import ProofError

LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                      "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (leaf index, tree size, audit path)
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
# (old size, new size, proof)
CONSISTENCY = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
HASHES = [merkle.leaf_hash(x) for x in LEAVES]


def test_hashing_uses_the_rfc_prefixes() -> None:
    assert merkle.leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert merkle.node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert merkle.root([]) == bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_published_vectors(size: int) -> None:
    assert merkle.root(HASHES[:size]) == ROOTS[size - 1]


def test_prefix_roots_match_published_vectors() -> None:
    assert merkle.prefix_roots(HASHES) == ROOTS


@pytest.mark.parametrize("index,size,path", INCLUSION)
def test_inclusion_proofs_match_and_verify(index: int, size: int, path: list[str]) -> None:
    proof = [bytes.fromhex(p) for p in path]
    assert merkle.inclusion_proof(index, HASHES[:size]) == proof
    merkle.verify_inclusion(index, size, HASHES[index], proof, ROOTS[size - 1])
    root = ROOTS[size - 1]
    corrupt = [(index + 1, size, HASHES[index], proof, root), (index ^ 2, size, HASHES[index], proof, root),
               (index, size * 2, HASHES[index], proof, root), (index, size, merkle.leaf_hash(b"x"), proof, root),
               (index, size, HASHES[index], proof, merkle.EMPTY_ROOT), (index, size, HASHES[index], proof + [root], root),
               (index, size, HASHES[index], [root] + proof, root), (index, size, HASHES[index], proof[:-1], root)]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([proof[i][0] ^ 8]) + proof[i][1:]
        corrupt.append((index, size, HASHES[index], flipped, root))
    for args in corrupt:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(*args)


@pytest.mark.parametrize("m,n,path", CONSISTENCY)
def test_consistency_proofs_match_and_verify(m: int, n: int, path: list[str]) -> None:
    proof = [bytes.fromhex(p) for p in path]
    assert merkle.consistency_proof(m, HASHES[:n]) == proof
    merkle.verify_consistency(m, n, ROOTS[m - 1], ROOTS[n - 1], proof)
    r1, r2 = ROOTS[m - 1], ROOTS[n - 1]
    corrupt = [(m - 1, n, r1, r2, proof), (m + 1, n, r1, r2, proof), (m, n * 2, r1, r2, proof),
               (m, n, r2, r1, proof), (m, n, r1, merkle.EMPTY_ROOT, proof), (m, n, r1, r2, []),
               (m, n, r1, r2, proof + [r1]), (m, n, r1, r2, [r2] + proof), (m, n, r1, r2, proof[:-1])]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([proof[i][0] ^ 16]) + proof[i][1:]
        corrupt.append((m, n, r1, r2, flipped))
    for args in corrupt:
        with pytest.raises(ProofError):
            merkle.verify_consistency(*args)


def test_all_generated_proofs_verify_for_every_size() -> None:
    hashes = [merkle.leaf_hash(bytes([i])) for i in range(33)]
    roots = merkle.prefix_roots(hashes)
    for n in range(1, 34):
        assert roots[n - 1] == merkle.root(hashes[:n])
        for i in range(n):
            merkle.verify_inclusion(i, n, hashes[i], merkle.inclusion_proof(i, hashes[:n]), roots[n - 1])
        for m in range(1, n + 1):
            merkle.verify_consistency(m, n, roots[m - 1], roots[n - 1], merkle.consistency_proof(m, hashes[:n]))
