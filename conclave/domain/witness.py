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
    "check_next",
    "check_subjects",
    "digest",
    "entry_hash",
    "first_violation",
    "next_entry",
]

DOMAIN_TAG = b"conclave.witness.v1\x00"
GENESIS_HASH = bytes(32)
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


def digest(record: bytes) -> bytes:
    """SHA-256 of a witnessed record's exact bytes."""
    return hashlib.sha256(record).digest()


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
    if len(previous_hash) != 32 or len(subject_digest) != 32:
        raise ValueError("previous_hash and subject_digest must be 32 bytes")
    kind = subject_type.encode()
    subject = subject_event_id.encode()
    h = hashlib.sha256(DOMAIN_TAG)
    h.update(_U64.pack(sequence))
    h.update(previous_hash)
    h.update(_U32.pack(len(kind)))
    h.update(kind)
    h.update(_U32.pack(len(subject)))
    h.update(subject)
    h.update(subject_digest)
    h.update(_I64.pack(recorded_at))
    return h.digest()


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
