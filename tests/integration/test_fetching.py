"""The patient fetcher on the embedded broker (which answers an empty fetch at once):
beats are handed over at once but do not keep a reader hot; a task's records do."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from conclave.bus import ensure_topics, new_consumer, topics_for
from conclave.fetching import PatientFetcher
from conclave.settings import Settings

pytestmark = pytest.mark.integration

BACKED_OFF_S = 1.5


async def _arrival(settings: Settings, topic: str) -> tuple[float, float]:
    """A reader that has backed off to its longest wait gets one record on ``topic``:
    how long after the broker's answer it had it, and the fetcher's wait after."""
    tp = TopicPartition(topic, 0)
    consumer = new_consumer(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    await producer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.getmany(timeout_ms=int(BACKED_OFF_S * 2000))  # backs off
        fetcher = consumer._fetcher
        assert isinstance(fetcher, PatientFetcher)
        assert fetcher._idle.wait == BACKED_OFF_S
        await producer.send_and_wait(topic, b"beat", partition=0)
        message = await consumer.getone()
        had_it = asyncio.get_running_loop().time() - fetcher.answered_at
        assert message.value == b"beat"
        return had_it, fetcher._idle.wait
    finally:
        await producer.stop()
        await consumer.stop()


async def test_a_beat_is_handed_over_at_once_and_the_reader_stays_backed_off(
    settings: Settings,
) -> None:
    mine = settings.with_(
        topic_prefix=f"{settings.topic_prefix}fetch",
        fetch_idle_max_ms=BACKED_OFF_S * 1000,
        fetch_cold_max_ms=BACKED_OFF_S * 1000,
    )
    await ensure_topics(mine)
    topics = topics_for(mine)
    had_it, wait = await _arrival(mine, topics.workers)
    # Not held back until the next fetch is due (a whole back-off later).
    assert had_it < 0.5
    assert wait == BACKED_OFF_S
    # A task's record heats: the next fetches come at the short wait.
    had_it, wait = await _arrival(mine, topics.outputs)
    assert had_it < 0.5
    assert wait == mine.fetch_idle_ms / 1000
