"""The witness transparency log alone, no broker: ``python -m bench.witness_tree [N]``.

For a chain of N entries (default 1,000,000; entries built once, not timed):

* append: entries/s appending each entry's leaf to the stored-levels tree (the
  entry bytes encoded and leaf-hashed included), and the tree's memory;
* root: the tree head of the full size, and of an arbitrary earlier size;
* inclusion proof: generation and RFC 9162 verification, µs each (random leaves);
* consistency proof: generation and verification between random sizes;
* signed checkpoint: Ed25519 sign and verify (parse included), µs each;
* bundle check: ``check_proof`` on a JSON inclusion bundle (signature, parse, path);
* export verify: entries/s for an offline verifier given every entry's bytes:
  sequence and previous_hash links, each entry_hash, and the tree rebuilt to its root.

CPU time of this process, so other processes on a shared machine do not count.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Callable

from conclave.domain.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from conclave.domain.witness import entry_bytes
from conclave.transparency.bundle import load_bundle
from conclave.transparency.keys import SignerKey
from conclave.transparency.note import open_note
from conclave.transparency.proofs import check_proof, inclusion_bundle, sign_checkpoint

PROBES = 2_000


def _cpu(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _leaves(n: int) -> list[bytes]:
    """The hashed bytes of a chain of ``n`` agent outputs (chained, as the processor
    makes them)."""
    previous, out = bytes(32), []
    for i in range(1, n + 1):
        data = entry_bytes(
            sequence=i,
            previous_hash=previous,
            subject_type="agent.output",
            subject_event_id=f"00000000-0000-4000-8000-{i:012d}",
            subject_digest=leaf_hash(i.to_bytes(8, "big")),
            recorded_at=1_700_000_000_000_000 + i,
        )
        out.append(data)
        previous = hashlib.sha256(data).digest()  # = entry_hash
    return out


def main(n: int) -> None:
    rng = random.Random(9)
    print(f"building {n:,} chained entries (not timed) ...", flush=True)
    leaves = _leaves(n)

    tree = MerkleTree()
    append = tree.append
    seconds = _cpu(lambda: [append(data) for data in leaves])
    print(
        f"append           {n / seconds:>12,.0f} entries/s   ({seconds:.2f} s CPU, "
        f"tree {tree.stored_bytes / 2**20:.0f} MiB of hashes)"
    )

    seconds = _cpu(lambda: [tree.root() for _ in range(PROBES)])
    print(f"root (size n)    {seconds / PROBES * 1e6:>12.1f} µs")
    sizes = [rng.randint(1, n) for _ in range(PROBES)]
    seconds = _cpu(lambda: [tree.root(s) for s in sizes])
    print(f"root (any size)  {seconds / PROBES * 1e6:>12.1f} µs")

    root = tree.root()
    indexes = [rng.randrange(n) for _ in range(PROBES)]
    proofs: list[list[bytes]] = []
    seconds = _cpu(lambda: proofs.extend(tree.inclusion_proof(i) for i in indexes))
    print(
        f"inclusion prove  {seconds / PROBES * 1e6:>12.1f} µs   "
        f"({len(proofs[0])} hashes at size {n:,})"
    )
    hashes = [tree.leaf_hash(i) for i in indexes]

    def verify_all_inclusions() -> None:
        for h, i, p in zip(hashes, indexes, proofs, strict=True):
            verify_inclusion(h, i, n, p, root)

    seconds = _cpu(verify_all_inclusions)
    print(f"inclusion verify {seconds / PROBES * 1e6:>12.1f} µs")

    pairs = [tuple(sorted((rng.randint(1, n), rng.randint(1, n)))) for _ in range(PROBES)]
    cproofs: list[list[bytes]] = []
    seconds = _cpu(lambda: cproofs.extend(tree.consistency_proof(a, b) for a, b in pairs))
    print(f"consistency prove{seconds / PROBES * 1e6:>12.1f} µs")
    roots = [(tree.root(a), tree.root(b)) for a, b in pairs]

    def verify_all_consistency() -> None:
        for (a, b), (ra, rb), p in zip(pairs, roots, cproofs, strict=True):
            verify_consistency(a, b, ra, rb, p)

    seconds = _cpu(verify_all_consistency)
    print(f"consistency check{seconds / PROBES * 1e6:>12.1f} µs")

    key = SignerKey.generate("bench.example/witness")
    notes: list[str] = []
    rounds = PROBES // 4
    seconds = _cpu(
        lambda: notes.extend(sign_checkpoint(tree, key.name, [key]) for _ in range(rounds))
    )
    print(f"checkpoint sign  {seconds / rounds * 1e6:>12.1f} µs")
    seconds = _cpu(lambda: [open_note(note, [key.verifier]) for note in notes])
    print(f"checkpoint open  {seconds / rounds * 1e6:>12.1f} µs")
    bundle = inclusion_bundle(tree, leaves[indexes[0]], notes[0]).to_json()
    seconds = _cpu(
        lambda: [check_proof(load_bundle(bundle), [key.verifier]) for _ in range(rounds)]
    )
    print(f"bundle check     {seconds / rounds * 1e6:>12.1f} µs   (JSON, signature, path)")

    fresh: list[bytes] = []
    seconds = _cpu(lambda: fresh.append(_verify_export(leaves)))
    assert fresh[0] == root
    print(f"export verify    {n / seconds:>12,.0f} entries/s   (chain links, hashes, tree root)")


def _verify_export(leaves: list[bytes]) -> bytes:
    """What an offline verifier does with exported entry bytes: each entry's sequence and
    previous_hash (read from the bytes) must follow on, and the root must be rebuilt.
    (The length-prefixed fields are checked by parse_entry_bytes in the real checker;
    the fixed offsets of sequence and previous_hash are enough here.)"""
    tree, previous = MerkleTree(), bytes(32)
    append, sha256 = tree.append, hashlib.sha256
    for expected, data in enumerate(leaves, start=1):
        if int.from_bytes(data[20:28], "big") != expected or data[28:60] != previous:
            raise AssertionError(f"export broken at {expected}")
        previous = sha256(data).digest()
        append(data)
    return tree.root()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
