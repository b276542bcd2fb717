"""The witness chain: hashing rule, appending, verification. Pure; no I/O.

The byte-level rule is specified in ``docs/witness.md`` so that anyone can
verify a chain without this code. In short::

    entry_hash = SHA-256(
        b"conclave.witness.v1\\x00"
        || u64be(sequence)
        || previous_hash                       (32 bytes)
        || u32be(len(subject_type))     || subject_type      (UTF-8)
        || u32be(len(subject_event_id)) || subject_event_id  (UTF-8)
        || subject_digest                      (32 bytes, SHA-256 of the witnessed record's bytes)
        || i64be(recorded_at)                  (microseconds since the epoch)
    )
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from conclave.domain.events import WitnessEntry

__all__ = [
    "DOMAIN_TAG",
    "GENESIS_HASH",
    "ChainHead",
    "ChainViolation",
    "HashedEntry",
    "check_next",
    "check_subjects",
    "digest",
    "entry_bytes",
    "entry_hash",
    "failure_detail",
    "first_violation",
    "is_permanent_failure",
    "leaf_bytes",
    "next_entry",
    "parse_entry_bytes",
]

DOMAIN_TAG = b"conclave.witness.v1\x00"
GENESIS_HASH = bytes(32)
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


PERMANENT_MARK = " (permanent)"


def failure_detail(error_type: str, *, permanent: bool) -> str:
    """The ``detail`` of a ``task.failed`` entry: the error type, marked when the agent
    said retrying cannot help. The scheduler decides a retry from the entry alone."""
    return error_type + PERMANENT_MARK if permanent else error_type


def is_permanent_failure(detail: str) -> bool:
    return detail.endswith(PERMANENT_MARK)


def digest(record: bytes) -> bytes:
    """SHA-256 of a witnessed record's exact bytes."""
    return hashlib.sha256(record).digest()


def entry_bytes(
    *,
    sequence: int,
    previous_hash: bytes,
    subject_type: str,
    subject_event_id: str,
    subject_digest: bytes,
    recorded_at: int,
) -> bytes:
    """The exact bytes that ``entry_hash`` covers (docs/witness.md, "The hashing rule").

    They are also the entry's leaf in the Merkle tree: one byte string serves the chain
    and the tree, and a third party holding it can read every hashed field back
    (:func:`parse_entry_bytes`)."""
    if len(previous_hash) != 32 or len(subject_digest) != 32:
        raise ValueError("previous_hash and subject_digest must be 32 bytes")
    kind = subject_type.encode()
    subject = subject_event_id.encode()
    return b"".join(
        (
            DOMAIN_TAG,
            _U64.pack(sequence),
            previous_hash,
            _U32.pack(len(kind)),
            kind,
            _U32.pack(len(subject)),
            subject,
            subject_digest,
            _I64.pack(recorded_at),
        )
    )


def entry_hash(
    *,
    sequence: int,
    previous_hash: bytes,
    subject_type: str,
    subject_event_id: str,
    subject_digest: bytes,
    recorded_at: int,
) -> bytes:
    """The hash of one witness entry, covering the previous entry's hash."""
    return hashlib.sha256(
        entry_bytes(
            sequence=sequence,
            previous_hash=previous_hash,
            subject_type=subject_type,
            subject_event_id=subject_event_id,
            subject_digest=subject_digest,
            recorded_at=recorded_at,
        )
    ).digest()


def leaf_bytes(entry: WitnessEntry) -> bytes:
    """``entry``'s hashed bytes: its leaf in the Merkle tree (docs/witness.md)."""
    return entry_bytes(
        sequence=entry.sequence,
        previous_hash=entry.previous_hash,
        subject_type=entry.subject_type,
        subject_event_id=entry.subject_event_id,
        subject_digest=entry.subject_digest,
        recorded_at=entry.recorded_at,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HashedEntry:
    """The hashed fields of an entry, read back from its bytes; enough to recompute its
    ``entry_hash`` and to say which event it witnessed."""

    sequence: int
    previous_hash: bytes
    subject_type: str
    subject_event_id: str
    subject_digest: bytes
    recorded_at: int

    @property
    def entry_hash(self) -> bytes:
        return entry_hash(
            sequence=self.sequence,
            previous_hash=self.previous_hash,
            subject_type=self.subject_type,
            subject_event_id=self.subject_event_id,
            subject_digest=self.subject_digest,
            recorded_at=self.recorded_at,
        )


def parse_entry_bytes(data: bytes) -> HashedEntry:
    """Read the hashed fields back from an entry's bytes; ``ValueError`` unless ``data``
    is exactly one well-formed encoding (so one entry has one byte string)."""
    at = 0

    def take(size: int) -> bytes:
        nonlocal at
        part = data[at : at + size]
        if len(part) != size:
            raise ValueError("entry bytes are truncated")
        at += size
        return part

    if take(len(DOMAIN_TAG)) != DOMAIN_TAG:
        raise ValueError("entry bytes do not start with the conclave.witness.v1 tag")
    (sequence,) = _U64.unpack(take(8))
    previous_hash = take(32)
    kind = take(_U32.unpack(take(4))[0])
    subject = take(_U32.unpack(take(4))[0])
    subject_digest = take(32)
    (recorded_at,) = _I64.unpack(take(8))
    if at != len(data):
        raise ValueError("entry bytes have trailing bytes")
    try:
        return HashedEntry(
            sequence=sequence,
            previous_hash=previous_hash,
            subject_type=kind.decode(),
            subject_event_id=subject.decode(),
            subject_digest=subject_digest,
            recorded_at=recorded_at,
        )
    except UnicodeDecodeError:
        raise ValueError("entry bytes hold text that is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where the chain stands: the last sequence number and its hash."""

    sequence: int = 0
    hash: bytes = GENESIS_HASH

    def advance(self, entry: WitnessEntry) -> ChainHead:
        return ChainHead(entry.sequence, entry.entry_hash)


def next_entry(
    head: ChainHead,
    *,
    subject_type: str,
    subject_event_id: str,
    subject_digest: bytes,
    recorded_at: int,
    task_id: str | None = None,
    agent_id: str | None = None,
    detail: str = "",
    attempt: int | None = None,
    source: tuple[str, int, int] | None = None,
) -> WitnessEntry:
    """The entry that extends the chain at ``head`` by one witnessed event, read at
    ``source`` (topic, partition, offset)."""
    topic, partition, offset = source if source is not None else (None, None, None)
    sequence = head.sequence + 1
    return WitnessEntry(
        sequence=sequence,
        previous_hash=head.hash,
        entry_hash=entry_hash(
            sequence=sequence,
            previous_hash=head.hash,
            subject_type=subject_type,
            subject_event_id=subject_event_id,
            subject_digest=subject_digest,
            recorded_at=recorded_at,
        ),
        subject_type=subject_type,
        subject_event_id=subject_event_id,
        subject_digest=subject_digest,
        recorded_at=recorded_at,
        task_id=task_id,
        agent_id=agent_id,
        detail=detail,
        attempt=attempt,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
    )


@dataclass(frozen=True, slots=True)
class ChainViolation:
    """The first place a chain fails to verify."""

    sequence: int
    reason: str


def check_next(head: ChainHead, entry: WitnessEntry) -> ChainViolation | None:
    """Whether ``entry`` correctly extends the chain at ``head``."""
    expected = head.sequence + 1
    if entry.sequence != expected:
        return ChainViolation(expected, f"expected sequence {expected}, found {entry.sequence}")
    if entry.previous_hash != head.hash:
        return ChainViolation(entry.sequence, "previous_hash does not match the prior entry")
    if len(entry.previous_hash) != 32 or len(entry.subject_digest) != 32:
        return ChainViolation(entry.sequence, "a hash field is not 32 bytes")
    recomputed = entry_hash(
        sequence=entry.sequence,
        previous_hash=entry.previous_hash,
        subject_type=entry.subject_type,
        subject_event_id=entry.subject_event_id,
        subject_digest=entry.subject_digest,
        recorded_at=entry.recorded_at,
    )
    if recomputed != entry.entry_hash:
        return ChainViolation(entry.sequence, "entry_hash does not match its contents")
    return None


def first_violation(entries: Iterable[WitnessEntry]) -> ChainViolation | None:
    """Check sequence continuity, links and hashes; ``None`` when the chain is sound.

    ``entries`` must be in the order they were appended.
    """
    head = ChainHead()
    for entry in entries:
        if (violation := check_next(head, entry)) is not None:
            return violation
        head = head.advance(entry)
    return None


def check_subjects(
    entries: Iterable[WitnessEntry], digests: Mapping[str, bytes]
) -> ChainViolation | None:
    """Whether every witnessed event still exists with the bytes that were witnessed.

    ``digests`` maps an event id to the SHA-256 of its record bytes as they are now
    (from the outputs and control topics). The chain alone proves the entries were not
    changed; this proves the witnessed events were not changed or removed either.
    """
    for entry in entries:
        found = digests.get(entry.subject_event_id)
        if found is None:
            return ChainViolation(
                entry.sequence, f"witnessed event {entry.subject_event_id} is missing"
            )
        if found != entry.subject_digest:
            return ChainViolation(
                entry.sequence,
                f"witnessed event {entry.subject_event_id} bytes do not match its digest",
            )
    return None
