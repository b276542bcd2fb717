"""A consumed Kafka record, independent of the client library, and dead-lettering.

Processors receive a :class:`Record` with everything explicit (topic,
partition, offset, key, value, headers) instead of reaching for ambient
"current event" context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conclave.bus import EventProducer
from conclave.domain.events import DeadLetterRecord, Envelope, Event
from conclave.errors import SchemaError
from conclave.topics import Topics
from schemas.codec import Codec

__all__ = ["DeadLetters", "Record", "decode_or_dead_letter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    """``None`` for a null value (a tombstone), which is not the same as ``b""``."""
    headers: Sequence[tuple[str, bytes]]

    @classmethod
    def of(cls, message: Any) -> Record:
        """From an aiokafka ``ConsumerRecord`` or a faust ``Message`` (same attribute names)."""
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            headers=list(message.headers or ()),
        )


class DeadLetters:
    """Writes records a processor cannot use to the dead-letter topic; loses nothing."""

    def __init__(self, producer: EventProducer, topics: Topics, processor: str) -> None:
        self._producer = producer
        self._topics = topics
        self._processor = processor

    async def put(self, record: Record, *, reason: str, error_type: str) -> None:
        log.warning(
            "%s dead-lettered %s/%d@%d: %s",
            self._processor,
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        await self._producer.send(
            self._topics.deadletter,
            f"{record.topic}/{record.partition}/{record.offset}",
            DeadLetterRecord(
                reason=reason,
                error_type=error_type,
                original=record.value,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                processor=self._processor,
            ),
            headers=list(record.headers),
        )


async def decode_or_dead_letter(
    codec: Codec, record: Record, dead_letters: DeadLetters
) -> tuple[Envelope, Event] | None:
    """The decoded event, or ``None`` after dead-lettering undecodable bytes."""
    try:
        return codec.decode(record.value)
    except SchemaError as exc:
        await dead_letters.put(record, reason=str(exc), error_type="SchemaError")
        return None
