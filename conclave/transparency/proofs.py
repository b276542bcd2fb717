"""Signed checkpoints and proofs of the witness tree: building them from entries, and
checking them with nothing but the bundle and the log's public keys.

Checking never trusts the bundle: the checkpoint's signature is verified first, its
origin must be the expected log, the bundle's tree size must be the checkpoint's, the
entry bytes must belong at the proven index, and the path must lead to the signed root.
Every refusal is a :class:`~conclave.errors.WitnessProofError` naming the failed check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from conclave.domain.checkpoint import Checkpoint
from conclave.domain.events import WitnessEntry
from conclave.domain.merkle import (
    InvalidProof,
    MerkleTree,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from conclave.domain.witness import HashedEntry, leaf_bytes, parse_entry_bytes
from conclave.errors import ProofFailure, WitnessProofError
from conclave.transparency.bundle import ConsistencyBundle, InclusionBundle
from conclave.transparency.keys import SignerKey, VerifierKey
from conclave.transparency.note import open_note, parse_note, sign_note

__all__ = [
    "ConsistencyChecked",
    "InclusionChecked",
    "SignedCheckpoint",
    "check_consistency",
    "check_inclusion",
    "check_proof",
    "consistency_bundle",
    "find_entry",
    "inclusion_bundle",
    "open_checkpoint",
    "prove_inclusion",
    "sign_checkpoint",
    "tree_of",
]


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    signed_by: tuple[VerifierKey, ...]
    """The caller's keys whose signatures verified (several during a key rotation)."""

    @property
    def keys(self) -> str:
        return ", ".join(key.label for key in self.signed_by)


def open_checkpoint(
    note: str, verifiers: Sequence[VerifierKey], *, origin: str | None = None
) -> SignedCheckpoint:
    """Verify a signed checkpoint. ``origin`` is the log it must be for; by default the
    name of the key that signed it (the C2SP convention: a log's key is named after
    its origin)."""
    opened, signed_by = open_note(note, verifiers)
    try:
        checkpoint = Checkpoint.parse(opened.text)
    except ValueError as exc:
        raise WitnessProofError(str(exc), reason=ProofFailure.MALFORMED) from None
    expected = {origin} if origin is not None else {key.name for key in signed_by}
    if checkpoint.origin not in expected:
        raise WitnessProofError(
            f"the checkpoint is for {checkpoint.origin!r}, "
            f"expected {' or '.join(sorted(expected))}",
            reason=ProofFailure.WRONG_ORIGIN,
        )
    return SignedCheckpoint(checkpoint, signed_by)


@dataclass(frozen=True, slots=True)
class InclusionChecked:
    entry: HashedEntry
    signed: SignedCheckpoint

    def summary(self) -> str:
        cp = self.signed.checkpoint
        return (
            f"entry {self.entry.sequence} ({self.entry.subject_type} "
            f"{self.entry.subject_event_id}, entry_hash {self.entry.entry_hash.hex()}) "
            f"is in {cp.origin} at tree size {cp.size}, signed by {self.signed.keys}"
        )


@dataclass(frozen=True, slots=True)
class ConsistencyChecked:
    old: SignedCheckpoint
    new: SignedCheckpoint

    def summary(self) -> str:
        old, new = self.old.checkpoint, self.new.checkpoint
        return (
            f"{new.origin} at tree size {new.size} extends tree size {old.size} "
            f"(signed by {self.old.keys}; {self.new.keys})"
        )


def check_inclusion(
    bundle: InclusionBundle, verifiers: Sequence[VerifierKey], *, origin: str | None = None
) -> InclusionChecked:
    signed = open_checkpoint(bundle.checkpoint, verifiers, origin=origin)
    checkpoint = signed.checkpoint
    if bundle.tree_size != checkpoint.size:
        raise WitnessProofError(
            f"the proof is for tree size {bundle.tree_size}, the checkpoint for {checkpoint.size}",
            reason=ProofFailure.WRONG_CHECKPOINT,
        )
    try:
        entry = parse_entry_bytes(bundle.entry)
    except ValueError as exc:
        raise WitnessProofError(str(exc), reason=ProofFailure.MALFORMED) from None
    if entry.sequence != bundle.index + 1:
        raise WitnessProofError(
            f"entry {entry.sequence} belongs at index {entry.sequence - 1}, not {bundle.index}",
            reason=ProofFailure.WRONG_ENTRY,
        )
    try:
        verify_inclusion(
            leaf_hash(bundle.entry), bundle.index, bundle.tree_size, bundle.path, checkpoint.root
        )
    except InvalidProof as exc:
        raise WitnessProofError(str(exc), reason=ProofFailure.BAD_PROOF) from None
    return InclusionChecked(entry, signed)


def check_consistency(
    bundle: ConsistencyBundle, verifiers: Sequence[VerifierKey], *, origin: str | None = None
) -> ConsistencyChecked:
    old = open_checkpoint(bundle.old_checkpoint, verifiers, origin=origin)
    new = open_checkpoint(bundle.new_checkpoint, verifiers, origin=origin)
    if old.checkpoint.origin != new.checkpoint.origin:
        raise WitnessProofError(
            f"the checkpoints are of two logs: {old.checkpoint.origin!r} and "
            f"{new.checkpoint.origin!r}",
            reason=ProofFailure.WRONG_ORIGIN,
        )
    if old.checkpoint.size > new.checkpoint.size:
        raise WitnessProofError(
            f"the old checkpoint (size {old.checkpoint.size}) is larger than the new one "
            f"({new.checkpoint.size})",
            reason=ProofFailure.WRONG_CHECKPOINT,
        )
    try:
        verify_consistency(
            old.checkpoint.size,
            new.checkpoint.size,
            old.checkpoint.root,
            new.checkpoint.root,
            bundle.path,
        )
    except InvalidProof as exc:
        raise WitnessProofError(str(exc), reason=ProofFailure.BAD_PROOF) from None
    return ConsistencyChecked(old, new)


def check_proof(
    bundle: InclusionBundle | ConsistencyBundle,
    verifiers: Sequence[VerifierKey],
    *,
    origin: str | None = None,
) -> InclusionChecked | ConsistencyChecked:
    """Check either kind of bundle; returns what was proven, or raises saying why not."""
    if isinstance(bundle, InclusionBundle):
        return check_inclusion(bundle, verifiers, origin=origin)
    return check_consistency(bundle, verifiers, origin=origin)


# -- building ----------------------------------------------------------------------------


def tree_of(entries: Iterable[WitnessEntry]) -> MerkleTree:
    """The tree over ``entries``, which must be the chain from sequence 1, in order."""
    tree = MerkleTree()
    for entry in entries:
        if entry.sequence != tree.size + 1:
            raise ValueError(f"expected entry {tree.size + 1}, found {entry.sequence}")
        tree.append(leaf_bytes(entry))
    return tree


def sign_checkpoint(
    tree: MerkleTree,
    origin: str,
    signers: Iterable[SignerKey],
    *,
    size: int | None = None,
    extensions: tuple[str, ...] = (),
) -> str:
    """The signed checkpoint note of ``tree`` at ``size`` (its current size by default)."""
    size = tree.size if size is None else size
    checkpoint = Checkpoint(origin=origin, size=size, root=tree.root(size), extensions=extensions)
    return sign_note(checkpoint.text(), signers)


def _checkpoint_of(tree: MerkleTree, note: str) -> Checkpoint:
    """The checkpoint in a note this log signed; refuses one that is not of ``tree``."""
    checkpoint = Checkpoint.parse(parse_note(note).text)
    if checkpoint.size > tree.size or tree.root(checkpoint.size) != checkpoint.root:
        raise ValueError(f"the checkpoint of size {checkpoint.size} is not of this tree")
    return checkpoint


def inclusion_bundle(
    tree: MerkleTree, entry_bytes: bytes, signed_checkpoint: str
) -> InclusionBundle:
    """Prove that the entry with hashed bytes ``entry_bytes`` is in ``tree`` as of the
    signed checkpoint (which must be of ``tree`` and include the entry)."""
    checkpoint = _checkpoint_of(tree, signed_checkpoint)
    index = parse_entry_bytes(entry_bytes).sequence - 1
    if tree.leaf_hash(index) != leaf_hash(entry_bytes):
        raise ValueError(f"entry {index + 1} of the tree has other bytes")
    return InclusionBundle(
        entry=entry_bytes,
        index=index,
        tree_size=checkpoint.size,
        path=tuple(tree.inclusion_proof(index, checkpoint.size)),
        checkpoint=signed_checkpoint,
    )


def consistency_bundle(
    tree: MerkleTree, old_checkpoint: str, new_checkpoint: str
) -> ConsistencyBundle:
    """Prove that the log at ``new_checkpoint`` extends the log at ``old_checkpoint``
    (both signed notes of ``tree``)."""
    old = _checkpoint_of(tree, old_checkpoint)
    new = _checkpoint_of(tree, new_checkpoint)
    return ConsistencyBundle(
        old_checkpoint=old_checkpoint,
        new_checkpoint=new_checkpoint,
        path=tuple(tree.consistency_proof(old.size, new.size)),
    )


def prove_inclusion(
    entries: Sequence[WitnessEntry], sequence: int, origin: str, signers: Iterable[SignerKey]
) -> InclusionBundle:
    """From the chain ``entries`` (sequence 1 first): sign a checkpoint of all of them and
    prove entry ``sequence`` against it."""
    if not 1 <= sequence <= len(entries):
        raise ValueError(f"no entry {sequence} among {len(entries)}")
    tree = tree_of(entries)
    note = sign_checkpoint(tree, origin, signers)
    return inclusion_bundle(tree, leaf_bytes(entries[sequence - 1]), note)


def find_entry(entries: Sequence[WitnessEntry], ref: str) -> int:
    """The sequence ``ref`` names: a sequence number, or a task id (the entry of its
    latest witnessed output)."""
    if ref.isdigit():
        if not 1 <= int(ref) <= len(entries):
            raise ValueError(f"no entry {ref} among {len(entries)}")
        return int(ref)
    for entry in reversed(entries):
        if entry.task_id == ref and entry.subject_type == "agent.output":
            return entry.sequence
    raise ValueError(f"no witnessed output of task {ref!r}")
