"""The witness log's Merkle tree: RFC 9162 (Certificate Transparency v2) hashing,
inclusion and consistency proofs. Pure; no I/O.

Hashing (RFC 9162 §2.1.1)::

    leaf     = SHA-256(0x00 || entry bytes)
    node     = SHA-256(0x01 || left || right)
    MTH({})  = SHA-256("")
    MTH(D[n]) = node(MTH(D[0:k]), MTH(D[k:n]))   k = the largest power of two < n

The leaf of witness entry ``sequence`` is at index ``sequence - 1`` and its bytes are
the entry's hashed bytes (``conclave.domain.witness.entry_bytes``); docs/witness.md
gives the byte rules for third parties.

:class:`MerkleTree` keeps every complete subtree ("stored levels"): level 0 holds the
leaf hashes, level ``h`` the root of every complete, aligned run of ``2**h`` leaves.
An append adds one leaf hash and at most ``log2(n)`` parents; the root of any earlier
size and the nodes of any proof are then read, or combined from the O(log n) stored
roots of the complete subtrees that make up that size, never recomputed from the
leaves. Each level is one ``bytearray`` of 32-byte
hashes: 64 bytes per leaf in all, about 64 MB for a million entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "InvalidProof",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF = b"\x00"
_NODE = b"\x01"


class InvalidProof(ValueError):
    """A proof does not verify; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH straight from the definition (recursive, O(n)): the reference the tree is
    tested against, and a verifier for a whole export."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(root_from_leaf_hashes(hashes[:k]), root_from_leaf_hashes(hashes[k:]))


class MerkleTree:
    """An append-only RFC 9162 tree over leaf hashes, keeping every complete subtree."""

    __slots__ = ("_levels",)

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        for data in leaves:
            self.append(data)

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def __len__(self) -> int:
        return self.size

    @property
    def stored_bytes(self) -> int:
        """Bytes of hashes kept: about 64 per leaf."""
        return sum(len(level) for level in self._levels)

    def append(self, data: bytes) -> int:
        """Add the leaf whose bytes are ``data``; returns its index."""
        return self.append_hash(leaf_hash(data))

    def append_hash(self, leaf: bytes) -> int:
        """Add a leaf by its hash; returns its index. Amortised O(1), at most
        ``log2(size)`` node hashes."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        index = position = self.size
        node, level = leaf, 0
        while True:
            self._levels[level] += node
            if position % 2 == 0:
                return index
            # A right child completes its parent: store the parent one level up.
            start = (position - 1) * HASH_SIZE
            node = node_hash(bytes(self._levels[level][start : start + HASH_SIZE]), node)
            position //= 2
            level += 1
            if level == len(self._levels):
                self._levels.append(bytearray())

    def leaf_hash(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise IndexError(f"no leaf {index} in a tree of {self.size}")
        return self._stored(0, index)

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (all of them by default)."""
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._ragged(size)[0]

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 PATH(index, D[size]): sibling hashes from the leaf up."""
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of size {size}")
        ragged = self._ragged(size)
        path: list[bytes] = []
        start, n, m = 0, size, index
        while n > 1:  # top-down; the RFC lists the path bottom-up, hence the reverse
            k = _split(n)
            if m < k:
                path.append(self._subtree(start + k, n - k, ragged))
                n = k
            else:
                path.append(self._subtree(start, k, ragged))
                start, m, n = start + k, m - k, n - k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 PROOF(old_size, D[new_size]); empty when ``old_size`` is 0
        or equal to ``new_size``."""
        new_size = self.size if new_size is None else new_size
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old size {old_size} is not between 0 and {new_size}")
        if old_size in (0, new_size):
            return []
        ragged = self._ragged(new_size)
        path: list[bytes] = []
        start, n, m, whole = 0, new_size, old_size, True
        while m != n:  # SUBPROOF(m, D[start:start+n], whole), top-down
            k = _split(n)
            if m <= k:
                path.append(self._subtree(start + k, n - k, ragged))
                n = k
            else:
                path.append(self._subtree(start, k, ragged))
                start, m, n, whole = start + k, m - k, n - k, False
        if not whole:  # SUBPROOF(m, D[m], false) = {MTH(D[m])}
            path.append(self._subtree(start, n, ragged))
        path.reverse()
        return path

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is not between 0 and {self.size}")

    def _stored(self, level: int, index: int) -> bytes:
        at = index * HASH_SIZE
        return bytes(self._levels[level][at : at + HASH_SIZE])

    def _ragged(self, size: int) -> dict[int, bytes]:
        """MTH(D[start:size]) for each ``start`` where one of the complete subtrees that
        make up a tree of ``size`` begins (one per 1-bit of ``size``, largest first):
        ``popcount(size) - 1`` node hashes in all, and key 0 is the root."""
        peaks: list[tuple[int, int]] = []
        start, rest = 0, size
        while rest:
            k = 1 << (rest.bit_length() - 1)
            peaks.append((start, k))
            start, rest = start + k, rest - k
        suffixes: dict[int, bytes] = {}
        right = b""
        for begin, k in reversed(peaks):
            peak = self._stored(k.bit_length() - 1, begin // k)
            right = node_hash(peak, right) if right else peak
            suffixes[begin] = right
        return suffixes

    def _subtree(self, start: int, n: int, ragged: dict[int, bytes]) -> bytes:
        """MTH(D[start:start+n]) for a range the RFC recursion visits: a power-of-two range
        is aligned, so one stored node; any other ends at the proof's tree size and begins
        where a complete subtree of it does, so it is in ``ragged``."""
        if _is_power_of_two(n):
            level = n.bit_length() - 1
            return self._stored(level, start >> level)
        return ragged[start]


class CompactRange:
    """The right edge of a tree: the roots of the complete subtrees that make up its size
    (one per set bit, largest first). Enough to append and to compute the root, in
    O(log n) memory: what the witness processor keeps to sign checkpoints, where
    :class:`MerkleTree` keeps everything needed to prove."""

    __slots__ = ("peaks", "size")

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        if len(peaks) != size.bit_count() or any(len(p) != HASH_SIZE for p in peaks):
            raise ValueError(f"a range of size {size} has {size.bit_count()} peaks of 32 bytes")
        self.size = size
        self.peaks = list(peaks)

    def append_hash(self, leaf: bytes) -> None:
        """Add a leaf by its hash: merges the equal-sized subtrees it completes."""
        node, size = leaf, self.size
        while size & 1:  # the lowest peak is as large as the new node: merge them
            node = node_hash(self.peaks.pop(), node)
            size >>= 1
        self.peaks.append(node)
        self.size += 1

    def root(self) -> bytes:
        """MTH of the leaves appended so far."""
        if not self.peaks:
            return EMPTY_ROOT
        node = self.peaks[-1]
        for peak in reversed(self.peaks[:-1]):
            node = node_hash(peak, node)
        return node


def _check_hashes(what: str, hashes: Iterable[bytes]) -> None:
    for value in hashes:
        if len(value) != HASH_SIZE:
            raise InvalidProof(f"{what} holds a hash of {len(value)} bytes, not 32")


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: ``leaf`` (a leaf hash) is at ``index`` in the tree of ``size``
    leaves whose head is ``root``; raises :class:`InvalidProof` saying why not."""
    _check_hashes("the leaf or root", (leaf, root))
    _check_hashes("the inclusion path", path)
    if not 0 <= index < size:
        raise InvalidProof(f"leaf index {index} is not below the tree size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise InvalidProof("the inclusion path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("the inclusion path is shorter than the tree is deep")
    if r != root:
        raise InvalidProof("the inclusion path does not lead to the root hash")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: the tree of ``new_size`` leaves with head ``new_root`` extends
    the tree of ``old_size`` with head ``old_root``; raises :class:`InvalidProof`."""
    _check_hashes("a root", (old_root, new_root))
    _check_hashes("the consistency path", path)
    if not 0 <= old_size <= new_size:
        raise InvalidProof(f"old size {old_size} is not between 0 and new size {new_size}")
    if old_size == new_size:
        if path:
            raise InvalidProof("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise InvalidProof("two different roots for the same tree size")
        return
    if old_size == 0:
        if path:
            raise InvalidProof("a proof from the empty tree must be empty")
        if old_root != EMPTY_ROOT:
            raise InvalidProof("the root of the empty tree is not SHA-256 of nothing")
        return
    if not path:
        raise InvalidProof("the consistency path is empty")
    nodes = list(path)
    if _is_power_of_two(old_size):
        nodes.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            raise InvalidProof("the consistency path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("the consistency path is shorter than the tree is deep")
    if fr != old_root:
        raise InvalidProof("the consistency path does not lead to the old root")
    if sr != new_root:
        raise InvalidProof("the consistency path does not lead to the new root")
