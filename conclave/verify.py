"""Verification and rebuild: the witness chain from Kafka and from PostgreSQL,
and rebuilding the read models from offset 0 (:mod:`projections.rebuild`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from conclave.bus import read_history, topics_for
from conclave.domain.events import WitnessCheckpoint, WitnessEntry
from conclave.domain.witness import ChainViolation, check_subjects, digest, first_violation
from conclave.errors import SchemaError
from conclave.settings import Settings
from projections.database import connect
from projections.queries import witness_entries
from schemas.codec import default_codec

__all__ = ["VerifyResult", "rebuild", "verify_entries", "verify_sources"]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    source: str
    entries: int
    head_hex: str
    violation: ChainViolation | None
    findings: tuple[str, ...] = ()
    """Records on the witness topic that are not entries (a null value, garbage, another
    event type): never part of the chain, dead-lettered by the processors, listed here."""


def verify_entries(
    source: str, entries: Iterable[WitnessEntry], findings: Iterable[str] = ()
) -> VerifyResult:
    listed = list(entries)
    violation = first_violation(listed)
    head = listed[-1].entry_hash.hex() if listed else "0" * 64
    return VerifyResult(source, len(listed), head, violation, tuple(findings))


async def published_checkpoints(settings: Settings) -> list[WitnessCheckpoint]:
    """The signed checkpoints on the checkpoints topic, oldest first (unreadable records
    are skipped: a checkpoint is only ever trusted after its signature is checked)."""
    codec = default_codec()
    found: list[WitnessCheckpoint] = []
    async for record in read_history(settings, [topics_for(settings).checkpoints]):
        with contextlib.suppress(SchemaError):
            _, event = codec.decode(record.value)
            if isinstance(event, WitnessCheckpoint):
                found.append(event)
    return found


async def topic_entries(settings: Settings) -> tuple[list[WitnessEntry], list[str]]:
    """The entries on the witness topic in order, and a finding for every other record."""
    codec = default_codec()
    entries: list[WitnessEntry] = []
    findings: list[str] = []
    async for record in read_history(settings, [topics_for(settings).witness]):
        try:
            _, event = codec.decode(record.value)
        except SchemaError as exc:
            findings.append(f"offset {record.offset}: {exc}")
            continue
        if isinstance(event, WitnessEntry):
            entries.append(event)
        else:
            findings.append(f"offset {record.offset}: {event.TYPE} is not a witness entry")
    return entries, findings


async def subject_digests(settings: Settings) -> dict[str, bytes]:
    """Event id -> SHA-256 of its record bytes, for everything that can be witnessed."""
    topics = topics_for(settings)
    codec = default_codec()
    digests: dict[str, bytes] = {}
    async for record in read_history(settings, [topics.outputs, topics.control]):
        try:
            envelope, _ = codec.decode(record.value)
        except SchemaError:
            continue  # never witnessed: dead-lettered instead
        digests.setdefault(envelope.event_id, digest(record.value))
    return digests


async def verify_sources(settings: Settings, source: str = "both") -> list[VerifyResult]:
    results = []
    if source in ("topic", "both"):
        entries, findings = await topic_entries(settings)
        result = verify_entries("topic", entries, findings)
        if result.violation is None:
            # Kafka still holds the witnessed records themselves: check their bytes too.
            violation = check_subjects(entries, await subject_digests(settings))
            result = dataclasses.replace(result, violation=violation)
        results.append(result)
    if source in ("db", "both"):
        pool = await connect(settings)
        try:
            results.append(verify_entries("db", await witness_entries(pool)))
        finally:
            await pool.close()
    return results


async def rebuild(settings: Settings) -> int:
    """Rebuild every read model in a shadow schema and swap it in (see
    :mod:`projections.rebuild`); returns the records folded."""
    from projections.rebuild import rebuild as shadow_rebuild

    return (await shadow_rebuild(settings)).events
