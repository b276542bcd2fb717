"""The witness Merkle tree: RFC 6962/9162 published vectors, proofs for random trees,
the stored-levels tree against the definition, and corrupted proofs rejected.

Vectors: the eight leaves, tree heads for sizes 0..8 and the inclusion and consistency
proofs below are those of RFC 6962's reference test data as published in
transparency-dev/merkle, ``proof/verify_test.go`` (``leaves``, ``roots``,
``inclusionProofs``, ``consistencyProofs``; its leaf numbers are 1-based, ours
0-based). RFC 9162 keeps RFC 6962's hashing, so they apply unchanged.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain.merkle import (
    EMPTY_ROOT,
    CompactRange,
    InvalidProof,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
ROOTS = [
    bytes.fromhex(h)
    for h in (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]


def _hashes(*hexes: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


# (index, size, path)
INCLUSION = [
    (
        0,
        8,
        _hashes(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        5,
        8,
        _hashes(
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (2, 3, _hashes("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")),
    (
        1,
        5,
        _hashes(
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
    (0, 1, []),
]
# (old size, new size, path)
CONSISTENCY = [
    (
        1,
        8,
        _hashes(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        6,
        8,
        _hashes(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (
        2,
        5,
        _hashes(
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
    (
        6,
        7,
        _hashes(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (1, 1, []),
]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def test_hashing_is_rfc_9162() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == ROOTS[0]
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = b"L" * 32, b"R" * 32
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()


def test_published_roots_for_every_size() -> None:
    tree = MerkleTree()
    assert tree.root() == ROOTS[0]
    for data in LEAVES:
        tree.append(data)
        assert tree.root() == ROOTS[tree.size], f"size {tree.size}"
    for size, root in enumerate(ROOTS):
        assert tree.root(size) == root
        assert root_from_leaf_hashes([leaf_hash(d) for d in LEAVES[:size]]) == root


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_published_inclusion_proofs(index: int, size: int, path: list[bytes]) -> None:
    tree = MerkleTree(LEAVES)
    assert tree.inclusion_proof(index, size) == path
    verify_inclusion(leaf_hash(LEAVES[index]), index, size, path, ROOTS[size])


@pytest.mark.parametrize(("old", "new", "path"), CONSISTENCY)
def test_published_consistency_proofs(old: int, new: int, path: list[bytes]) -> None:
    tree = MerkleTree(LEAVES)
    assert tree.consistency_proof(old, new) == path
    verify_consistency(old, new, ROOTS[old], ROOTS[new], path)


def _inclusion_probes(
    index: int, size: int, path: list[bytes], root: bytes, leaf: bytes
) -> dict[str, tuple[int, int, list[bytes], bytes, bytes]]:
    """Each way of getting an inclusion proof wrong, after transparency-dev's list.

    A size of the same depth and shape (5 and 6 for leaf 1) is not among them: the path
    alone cannot tell those apart. The signed checkpoint binds the size to the root, and
    the bundle check compares the two (tests/unit/test_witness_proofs.py)."""
    probes = {
        "index - 1": (index - 1, size, path, root, leaf),
        "index + 1": (index + 1, size, path, root, leaf),
        "index ^ 2": (index ^ 2, size, path, root, leaf),
        "size * 2": (index, size * 2, path, root, leaf),
        "size // 2": (index, size // 2, path, root, leaf),
        "wrong leaf": (index, size, path, root, leaf_hash(b"WrongLeaf")),
        "empty root": (index, size, path, EMPTY_ROOT, leaf),
        "random root": (index, size, path, SOME_HASH, leaf),
        "trailing garbage": (index, size, [*path, b""], root, leaf),
        "trailing root": (index, size, [*path, root], root, leaf),
        "preceding garbage": (index, size, [b"", *path], root, leaf),
        "preceding root": (index, size, [root, *path], root, leaf),
    }
    for i in range(len(path)):
        flipped = list(path)
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        probes[f"path[{i}] bit 3 flipped"] = (index, size, flipped, root, leaf)
    if path:
        probes["truncated path"] = (index, size, path[:-1], root, leaf)
    if len(path) > 1:
        probes["inserted node"] = (index, size, [path[0], SOME_HASH, *path[1:]], root, leaf)
    return probes


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_corrupted_inclusion_proofs_are_rejected(index: int, size: int, path: list[bytes]) -> None:
    leaf = leaf_hash(LEAVES[index])
    wrongly_accepted = []
    probes = _inclusion_probes(index, size, path, ROOTS[size], leaf)
    for name, (i, n, p, root, lf) in probes.items():
        if (i, n) == (index, size) and p == path and root == ROOTS[size] and lf == leaf:
            continue  # the probe happens to be the genuine proof (e.g. index ^ 2 == index)
        try:
            verify_inclusion(lf, i, n, p, root)
        except InvalidProof:
            continue
        wrongly_accepted.append(name)
    assert wrongly_accepted == []


@pytest.mark.parametrize(("old", "new", "path"), [c for c in CONSISTENCY if c[2]])
def test_corrupted_consistency_proofs_are_rejected(old: int, new: int, path: list[bytes]) -> None:
    r1, r2 = ROOTS[old], ROOTS[new]
    probes: dict[str, tuple[int, int, bytes, bytes, list[bytes]]] = {
        "old - 1": (old - 1, new, r1, r2, path),
        "old + 1": (old + 1, new, r1, r2, path),
        "old ^ 2": (old ^ 2, new, r1, r2, path),
        "new * 2": (old, new * 2, r1, r2, path),
        "new // 2": (old, new // 2, r1, r2, path),
        "wrong old root": (old, new, SOME_HASH, r2, path),
        "wrong new root": (old, new, r1, SOME_HASH, path),
        "swapped roots": (old, new, r2, r1, path),
        "empty path": (old, new, r1, r2, []),
        "trailing garbage": (old, new, r1, r2, [*path, b""]),
        "trailing old root": (old, new, r1, r2, [*path, r1]),
        "trailing new root": (old, new, r1, r2, [*path, r2]),
        "preceding garbage": (old, new, r1, r2, [b"", *path]),
        "preceding old root": (old, new, r1, r2, [r1, *path]),
        "preceding new root": (old, new, r1, r2, [r2, *path]),
        "preceding path[0]": (old, new, r1, r2, [path[0], *path]),
        "truncated path": (old, new, r1, r2, path[:-1]),
    }
    for i in range(len(path)):
        flipped = list(path)
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        probes[f"path[{i}] bit 4 flipped"] = (old, new, r1, r2, flipped)
    wrongly_accepted = []
    for name, (s1, s2, a, b, p) in probes.items():
        try:
            verify_consistency(s1, s2, a, b, p)
        except InvalidProof:
            continue
        wrongly_accepted.append(name)
    assert wrongly_accepted == []


@pytest.mark.parametrize(
    ("old", "new", "old_root", "new_root", "path", "ok"),
    [
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
        (0, 1, EMPTY_ROOT, ROOTS[1], [], True),
        (1, 1, ROOTS[1], ROOTS[1], [], True),
        (1, 1, ROOTS[1], ROOTS[2], [], False),  # same size, different roots
        (1, 0, ROOTS[1], EMPTY_ROOT, [], False),  # back in time
        (2, 1, ROOTS[2], ROOTS[1], [], False),
        (1, 2, ROOTS[1], ROOTS[2], [], False),  # empty proof
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),  # not empty when it must be
        (0, 1, EMPTY_ROOT, ROOTS[1], [EMPTY_ROOT], False),
        (1, 1, ROOTS[1], ROOTS[1], [EMPTY_ROOT], False),
        (0, 1, SOME_HASH, ROOTS[1], [], False),  # size 0 with a root that is not MTH({})
    ],
)
def test_consistency_edge_cases(
    old: int, new: int, old_root: bytes, new_root: bytes, path: list[bytes], ok: bool
) -> None:
    if ok:
        verify_consistency(old, new, old_root, new_root, path)
    else:
        with pytest.raises(InvalidProof):
            verify_consistency(old, new, old_root, new_root, path)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 4)])
def test_inclusion_outside_the_tree_is_rejected(index: int, size: int) -> None:
    with pytest.raises(InvalidProof, match="not below the tree size"):
        verify_inclusion(leaf_hash(b""), index, size, [], ROOTS[1])


def test_a_single_leaf_tree_proves_with_an_empty_path() -> None:
    tree = MerkleTree([b"data"])
    assert tree.root() == leaf_hash(b"data")
    assert tree.inclusion_proof(0) == []
    verify_inclusion(leaf_hash(b"data"), 0, 1, [], tree.root())
    with pytest.raises(InvalidProof):
        verify_inclusion(leaf_hash(b"data"), 0, 1, [], EMPTY_ROOT)
    with pytest.raises(InvalidProof, match="not 32"):
        verify_inclusion(b"", 0, 1, [], tree.root())


def test_proofs_outside_the_tree_are_refused_when_built() -> None:
    tree = MerkleTree(LEAVES[:3])
    for call in (
        lambda: tree.root(4),
        lambda: tree.inclusion_proof(3, 3),
        lambda: tree.inclusion_proof(0, 4),
        lambda: tree.consistency_proof(2, 4),
        lambda: tree.consistency_proof(3, 2),
    ):
        with pytest.raises(ValueError, match=r"not between|not in a tree"):
            call()
    with pytest.raises(IndexError):
        tree.leaf_hash(3)


# -- random trees ------------------------------------------------------------------------

leaf_lists = st.lists(st.binary(max_size=8), min_size=1, max_size=70)
distinct_leaf_lists = st.lists(st.binary(max_size=8), min_size=2, max_size=70, unique=True)


@settings(max_examples=40, deadline=None)
@given(leaf_lists)
def test_incremental_tree_equals_the_definition_at_every_size(leaves: list[bytes]) -> None:
    tree = MerkleTree()
    hashes = [leaf_hash(d) for d in leaves]
    for n, data in enumerate(leaves, start=1):
        assert tree.append(data) == n - 1
        assert tree.root() == root_from_leaf_hashes(hashes[:n])
    for size in range(len(leaves) + 1):
        assert tree.root(size) == root_from_leaf_hashes(hashes[:size])
    assert [tree.leaf_hash(i) for i in range(len(leaves))] == hashes


@settings(max_examples=30, deadline=None)
@given(leaf_lists)
def test_every_leaf_proves_against_every_later_size(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)
    for size in range(1, tree.size + 1):
        root = tree.root(size)
        for index in range(size):
            path = tree.inclusion_proof(index, size)
            verify_inclusion(tree.leaf_hash(index), index, size, path, root)


@settings(max_examples=60, deadline=None)
@given(distinct_leaf_lists, st.data())
def test_an_inclusion_proof_fails_for_any_other_leaf_index_or_depth(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree(leaves)
    size = data.draw(st.integers(1, tree.size), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    path = tree.inclusion_proof(index, size)
    root = tree.root(size)
    other = data.draw(st.integers(0, tree.size - 1).filter(lambda i: i != index), label="other")
    with pytest.raises(InvalidProof):
        verify_inclusion(tree.leaf_hash(other), index, size, path, root)
    if other < size:
        with pytest.raises(InvalidProof):
            verify_inclusion(tree.leaf_hash(index), other, size, path, root)
    # Another depth (see _inclusion_probes for why not any other size).
    for wrong_size in (2 * size, size // 2):
        with pytest.raises(InvalidProof):
            verify_inclusion(tree.leaf_hash(index), index, wrong_size, path, root)


@settings(max_examples=60, deadline=None)
@given(leaf_lists, st.data())
def test_consistency_between_random_pairs_of_sizes(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree(leaves)
    new = data.draw(st.integers(0, tree.size), label="new")
    old = data.draw(st.integers(0, new), label="old")
    path = tree.consistency_proof(old, new)
    verify_consistency(old, new, tree.root(old), tree.root(new), path)
    if 0 < old < new:
        # A forked tree (one old leaf rewritten) has a different new root: the proof fails.
        forked = MerkleTree([*leaves[: old - 1], leaves[old - 1] + b"!", *leaves[old:]])
        with pytest.raises(InvalidProof):
            verify_consistency(old, new, tree.root(old), forked.root(new), path)
        flipped = list(path)
        at = data.draw(st.integers(0, len(path) - 1), label="at")
        flipped[at] = bytes([flipped[at][0] ^ 1]) + flipped[at][1:]
        with pytest.raises(InvalidProof):
            verify_consistency(old, new, tree.root(old), tree.root(new), flipped)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65])
def test_powers_of_two_and_one_past_them(size: int) -> None:
    leaves = [i.to_bytes(2, "big") for i in range(size)]
    tree = MerkleTree(leaves)
    hashes = [leaf_hash(d) for d in leaves]
    assert tree.root() == root_from_leaf_hashes(hashes)
    for index in (0, size // 2, size - 1):  # first, middle, last leaf
        verify_inclusion(hashes[index], index, size, tree.inclusion_proof(index), tree.root())
    for old in (1, size // 2, size - 1, size):
        if old:
            verify_consistency(
                old, size, tree.root(old), tree.root(), tree.consistency_proof(old, size)
            )


@given(st.lists(st.binary(max_size=8), max_size=300))
def test_a_compact_range_has_the_root_of_the_full_tree_at_every_size(leaves: list[bytes]) -> None:
    tree = MerkleTree()
    compact = CompactRange()
    assert compact.root() == tree.root() == EMPTY_ROOT
    for data in leaves:
        tree.append(data)
        compact.append_hash(leaf_hash(data))
        assert compact.size == tree.size
        assert len(compact.peaks) == tree.size.bit_count()  # O(log n), whatever n
        assert compact.root() == tree.root()
    # What a snapshot keeps (size and peaks) is enough to go on appending.
    resumed = CompactRange(compact.size, compact.peaks)
    resumed.append_hash(leaf_hash(b"next"))
    tree.append(b"next")
    assert resumed.root() == tree.root()


def test_a_compact_range_refuses_peaks_that_do_not_fit_its_size() -> None:
    with pytest.raises(ValueError, match="3 peaks"):
        CompactRange(7, [b"\x00" * 32] * 2)
