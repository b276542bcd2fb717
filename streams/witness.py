"""The witness processor: appends one hash-chained entry per witnessed event.

Witnessed: agent outputs and failures (from the outputs topic) and halt/resume
(from the control topic). The chain head and the set of witnessed event ids are
a fold of the witness topic itself, so a restarted or redelivered processor
never witnesses an event twice and never leaves a gap.
"""

from __future__ import annotations

from opentelemetry import trace

from conclave.bus import EventProducer, read_history
from conclave.domain import witness
from conclave.domain.events import (
    AgentOutput,
    Event,
    Halt,
    Resume,
    TaskFailed,
    WitnessEntry,
    now_us,
)
from conclave.errors import SchemaError, WitnessChainError
from conclave.records import DeadLetters, Record, decode_or_dead_letter
from conclave.topics import Topics
from conclave.tracing import context_from, headers_for, tracer

__all__ = ["WitnessProcessor"]

WITNESS_KEY = "witness"


class WitnessProcessor:
    name = "witness"

    def __init__(self, producer: EventProducer, topics: Topics) -> None:
        self.producer = producer
        self.topics = topics
        self.head = witness.ChainHead()
        self.witnessed: set[str] = set()
        self.dead_letters = DeadLetters(producer, topics, self.name)

    @property
    def inputs(self) -> list[str]:
        return [self.topics.outputs, self.topics.control]

    async def recover(self) -> int:
        """Rebuild the head and the witnessed set from the witness topic."""
        codec = self.producer.codec
        async for message in read_history(self.producer.settings, [self.topics.witness]):
            try:
                _, entry = codec.decode(message.value)
            except SchemaError as exc:
                raise WitnessChainError(
                    f"witness record at offset {message.offset} does not decode: {exc}",
                    sequence=self.head.sequence + 1,
                ) from exc
            if not isinstance(entry, WitnessEntry):
                continue
            # Never extend a chain that does not verify: stop loudly instead.
            if (violation := witness.check_next(self.head, entry)) is not None:
                raise WitnessChainError(
                    f"witness chain broken at sequence {violation.sequence}: {violation.reason}",
                    sequence=violation.sequence,
                )
            self.head = self.head.advance(entry)
            self.witnessed.add(entry.subject_event_id)
        return self.head.sequence

    async def handle(self, record: Record) -> None:
        decoded = await decode_or_dead_letter(self.producer.codec, record, self.dead_letters)
        if decoded is None:
            return
        envelope, event = decoded
        # Witness only what the rest of the system acts on from the same topic: a HALT
        # on the outputs topic would be in the log while the scheduler never saw it.
        expected = (
            (Halt, Resume) if record.topic == self.topics.control else (AgentOutput, TaskFailed)
        )
        if not isinstance(event, expected):
            await self.dead_letters.put(
                record,
                reason=f"{event.TYPE} is not witnessed from {record.topic}",
                error_type="InvalidEvent",
            )
            return
        if envelope.event_id in self.witnessed:
            return  # a redelivery: witnessed exactly once
        with tracer().start_as_current_span(
            "witness", context=context_from(record.headers), kind=trace.SpanKind.CONSUMER
        ):
            entry = witness.next_entry(
                self.head,
                subject_type=event.TYPE,
                subject_event_id=envelope.event_id,
                subject_digest=witness.digest(record.value or b""),  # decoded, so not null
                recorded_at=now_us(),
                task_id=getattr(event, "task_id", None),
                agent_id=getattr(event, "agent_id", None),
                detail=_detail(event),
                attempt=getattr(event, "attempt", None),
            )
            # Advance before awaiting the send: the next record must chain onto this one.
            self.head = self.head.advance(entry)
            self.witnessed.add(envelope.event_id)
            await self.producer.send(
                self.topics.witness, WITNESS_KEY, entry, causation=envelope, headers=headers_for()
            )


def _detail(event: Event) -> str:
    match event:
        case TaskFailed():
            return event.error_type
        case Halt() | Resume():
            return event.reason
        case _:
            return ""
