"""Invariants 3 and 8 across a restart: the witness shard recovers its head and its input
positions from the witness topic, witnesses a re-sent output no second time, and refuses
to extend a chain that does not verify."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import pytest

from conclave.bus import EventProducer, ensure_topics, read_history, topics_for
from conclave.domain import witness
from conclave.domain.events import AgentOutput, DeadLetterRecord, Halt, WitnessEntry
from conclave.errors import WitnessChainError
from conclave.settings import Settings
from conclave.verify import verify_sources
from schemas.codec import default_codec
from streams.core import Emitter, ShardRunner
from streams.witness import WITNESS_KEY, WitnessShard
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration


async def fresh(settings: Settings) -> tuple[Settings, EventProducer]:
    own = settings.with_(topic_prefix=f"{settings.topic_prefix}w{secrets.token_hex(3)}")
    await ensure_topics(own)
    producer = EventProducer(own, producer="test")
    await producer.start()
    return own, producer


def witness_runner(settings: Settings) -> ShardRunner:
    topics = topics_for(settings)
    emitter = Emitter(default_codec(), topics, "witness", settings.tenant)
    return ShardRunner(settings, WitnessShard(topics, 1, emitter))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[ShardRunner]:
    """The witness shard running for the block, as a worker would run it."""
    runner = witness_runner(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    ready = asyncio.create_task(runner.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()  # recovery failed: raise its error
    try:
        yield runner
    finally:
        stop.set()
        await task


async def entries(settings: Settings) -> list[WitnessEntry]:
    codec = default_codec()
    found = []
    async for record in read_history(settings, [topics_for(settings).witness]):
        _, event = codec.decode(record.value)
        assert isinstance(event, WitnessEntry)
        found.append(event)
    return found


def output_bytes(producer: EventProducer, task_id: str) -> bytes:
    event = AgentOutput(
        task_id=task_id, agent_id="a", attempt=1, content="yes", latency_us=1, deliberation_id=None
    )
    return producer.codec.encode(producer.envelope(event), event)


async def count_entries(settings: Settings, n: int) -> list[WitnessEntry]:
    async def probe() -> list[WitnessEntry] | None:
        found = await entries(settings)
        return found if len(found) >= n else None

    found: list[WitnessEntry] = await eventually(probe)
    return found


async def test_restarted_witness_resumes_after_its_last_entry_and_witnesses_once(
    settings: Settings,
) -> None:
    own, producer = await fresh(settings)
    topics = topics_for(own)
    first = output_bytes(producer, "t1")
    try:
        await producer.send_raw(topics.outputs, "t1", first, partition=0)
        async with running(own):
            await count_entries(own, 1)
        # While it is down: the same record sent again (a producer's retry), and a new one.
        await producer.send_raw(topics.outputs, "t1", first, partition=0)
        await producer.send_raw(topics.outputs, "t2", output_bytes(producer, "t2"), partition=0)
        async with running(own) as restarted:
            chain = await count_entries(own, 2)
            await asyncio.sleep(0.5)  # time for a wrong third entry to show up
        assert restarted.recovered_events == 1  # the one entry, not all history again
    finally:
        await producer.stop()
    chain = await entries(own)
    assert [e.task_id for e in chain] == ["t1", "t2"]
    assert [e.source_offset for e in chain] == [0, 2]  # where each witnessed record was read
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
            await producer.send(topics.witness, WITNESS_KEY, entry, partition=0)
            head = head.advance(entry)
        with pytest.raises(WitnessChainError) as raised:
            async with running(own):
                pass
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
        offset = await producer.send_raw(topics.outputs, "x", value, partition=0)
        async with running(own):

            async def letters() -> list[object]:
                return [r async for r in read_history(own, [topics.deadletter])]

            (record,) = await eventually(letters)
    finally:
        await producer.stop()
    assert await entries(own) == []
    _, letter = default_codec().decode(record.value)  # type: ignore[attr-defined]
    assert isinstance(letter, DeadLetterRecord)
    assert (letter.original, letter.source_offset) == (value, offset)
    assert letter.reason == f"system.halt is not witnessed from {topics.outputs}"


async def test_verify_checks_the_witnessed_records_bytes(settings: Settings) -> None:
    own, producer = await fresh(settings)
    topics = topics_for(own)
    try:
        await producer.send_raw(topics.outputs, "t1", output_bytes(producer, "t1"), partition=0)
        async with running(own):
            (first,) = await count_entries(own, 1)
        assert [r.violation for r in await verify_sources(own, "topic")] == [None]

        # A chain-valid entry whose digest does not match the record on the topic:
        # what an altered output (or an entry forged for another record) looks like.
        forged = output_bytes(producer, "t2")
        await producer.send_raw(topics.outputs, "t2", forged, partition=0)
        entry = witness.next_entry(
            witness.ChainHead(first.sequence, first.entry_hash),
            subject_type="agent.output",
            subject_event_id=producer.codec.decode(forged)[0].event_id,
            subject_digest=witness.digest(b"something else"),
            recorded_at=1,
        )
        await producer.send(topics.witness, WITNESS_KEY, entry, partition=0)
        (result,) = await verify_sources(own, "topic")
    finally:
        await producer.stop()
    assert result.violation is not None
    assert result.violation.sequence == 2
    assert "do not match its digest" in result.violation.reason
