"""Invariants 3 and 8 across a restart: the witness processor recovers its head from
the witness topic, witnesses a redelivered output no second time, and refuses to
extend a chain that does not verify."""

from __future__ import annotations

import secrets

import pytest

from conclave.bus import EventProducer, ensure_topics, read_history, topics_for
from conclave.domain import witness
from conclave.domain.events import AgentOutput, DeadLetterRecord, Halt, WitnessEntry
from conclave.errors import WitnessChainError
from conclave.records import Record
from conclave.settings import Settings
from conclave.verify import verify_sources
from schemas.codec import default_codec
from streams.witness import WITNESS_KEY, WitnessProcessor

pytestmark = pytest.mark.integration


async def fresh(settings: Settings) -> tuple[Settings, EventProducer]:
    own = settings.with_(topic_prefix=f"{settings.topic_prefix}w{secrets.token_hex(3)}")
    await ensure_topics(own)
    producer = EventProducer(own, producer="test")
    await producer.start()
    return own, producer


async def entries(settings: Settings) -> list[WitnessEntry]:
    codec = default_codec()
    found = []
    async for record in read_history(settings, [topics_for(settings).witness]):
        _, event = codec.decode(record.value)
        assert isinstance(event, WitnessEntry)
        found.append(event)
    return found


def output_record(producer: EventProducer, topic: str, offset: int, task_id: str) -> Record:
    event = AgentOutput(
        task_id=task_id, agent_id="a", attempt=1, content="yes", latency_us=1, deliberation_id=None
    )
    value = producer.codec.encode(producer.envelope(event), event)
    return Record(topic=topic, partition=0, offset=offset, key=None, value=value, headers=[])


async def test_restarted_witness_does_not_witness_twice_and_continues_the_chain(
    settings: Settings,
) -> None:
    own, producer = await fresh(settings)
    topics = topics_for(own)
    try:
        first = output_record(producer, topics.outputs, 0, "t1")
        before = WitnessProcessor(producer, topics)
        await before.recover()
        await before.handle(first)
        await producer.flush()

        after = WitnessProcessor(producer, topics)  # a restart: state only from the topic
        assert await after.recover() == 1
        await after.handle(first)  # redelivered
        await after.handle(output_record(producer, topics.outputs, 1, "t2"))
        await producer.flush()
    finally:
        await producer.stop()

    chain = await entries(own)
    assert [e.task_id for e in chain] == ["t1", "t2"]
    assert witness.first_violation(chain) is None


async def test_recovery_refuses_to_extend_a_broken_chain(settings: Settings) -> None:
    own, producer = await fresh(settings)
    topics = topics_for(own)
    try:
        head = witness.ChainHead()
        for i in range(1, 4):
            entry = witness.next_entry(
                head,
                subject_type="agent.output",
                subject_event_id=f"e{i}",
                subject_digest=witness.digest(b"x"),
                recorded_at=i,
            )
            if i == 3:  # tampered: no longer links to entry 2
                entry = witness.next_entry(
                    witness.ChainHead(2, bytes(32)),
                    subject_type="agent.output",
                    subject_event_id="e3",
                    subject_digest=witness.digest(b"x"),
                    recorded_at=3,
                )
            await producer.send(topics.witness, WITNESS_KEY, entry)
            head = head.advance(entry)
        await producer.flush()
        with pytest.raises(WitnessChainError) as raised:
            await WitnessProcessor(producer, topics).recover()
    finally:
        await producer.stop()
    assert raised.value.sequence == 3
    assert "previous_hash" in str(raised.value)


async def test_only_what_a_topic_may_carry_is_witnessed(settings: Settings) -> None:
    own, producer = await fresh(settings)
    topics = topics_for(own)
    halt = Halt(reason="on the wrong topic", operator="x")
    value = producer.codec.encode(producer.envelope(halt), halt)
    try:
        processor = WitnessProcessor(producer, topics)
        await processor.recover()
        await processor.handle(
            Record(topic=topics.outputs, partition=0, offset=7, key=None, value=value, headers=[])
        )
        await producer.flush()
    finally:
        await producer.stop()
    assert await entries(own) == []
    letters = [r async for r in read_history(own, [topics.deadletter])]
    assert len(letters) == 1
    _, letter = default_codec().decode(letters[0].value)
    assert isinstance(letter, DeadLetterRecord)
    assert (letter.original, letter.source_offset) == (value, 7)
    assert letter.reason == f"system.halt is not witnessed from {topics.outputs}"


async def test_verify_checks_the_witnessed_records_bytes(settings: Settings) -> None:
    own, producer = await fresh(settings)
    topics = topics_for(own)
    try:
        processor = WitnessProcessor(producer, topics)
        await processor.recover()
        good = output_record(producer, topics.outputs, 0, "t1")
        await producer.send_raw(topics.outputs, "t1", good.value)
        await processor.handle(good)
        await producer.flush()
        assert [r.violation for r in await verify_sources(own, "topic")] == [None]

        # A chain-valid entry whose digest does not match the record on the topic:
        # what an altered output (or an entry forged for another record) looks like.
        forged = output_record(producer, topics.outputs, 1, "t2")
        await producer.send_raw(topics.outputs, "t2", forged.value)
        entry = witness.next_entry(
            processor.head,
            subject_type="agent.output",
            subject_event_id=producer.codec.decode(forged.value)[0].event_id,
            subject_digest=witness.digest(b"something else"),
            recorded_at=1,
        )
        await producer.send(topics.witness, WITNESS_KEY, entry)
        await producer.flush()
        (result,) = await verify_sources(own, "topic")
    finally:
        await producer.stop()
    assert result.violation is not None
    assert result.violation.sequence == 2
    assert "do not match its digest" in result.violation.reason
