"""Wiring: the faust app that runs the stream processors, and nothing else.

The app stays thin: each processor is an object with ``inputs`` and
``handle(record)``; faust only delivers records to it, one at a time, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import faust

from conclave import fetching
from conclave.bus import EventProducer, ensure_topics, topics_for
from conclave.errors import BrokerUnavailable
from conclave.records import Record
from conclave.settings import Settings
from streams.scheduler import SchedulerProcessor
from streams.witness import WitnessProcessor

__all__ = ["Processor", "ProcessorsHandle", "build_app", "start_processors"]


class Processor(Protocol):
    name: str

    @property
    def inputs(self) -> list[str]: ...

    async def recover(self) -> int: ...

    async def handle(self, record: Record) -> None: ...


def build_app(settings: Settings, processors: Sequence[Processor]) -> faust.App:
    fetching.install(settings.fetch_idle_ms / 1000)  # faust's consumer is aiokafka's
    app = faust.App(
        f"{settings.topic_prefix}-processors",
        broker=f"kafka://{settings.kafka_bootstrap}",
        web_enabled=False,
        store="memory://",
        topic_replication_factor=settings.replication_factor,
        topic_partitions=settings.partitions,
        producer_linger=0.0,
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
    )
    for processor in processors:
        channel = app.topic(
            *processor.inputs, key_serializer="raw", value_serializer="raw", value_type=bytes
        )
        app.agent(channel, name=processor.name)(_shell(processor))
    return app


def _shell(processor: Processor) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def run(stream: Any) -> None:
        async for event in stream.events():
            await processor.handle(Record.of(event.message))

    run.__name__ = processor.name
    return run


class ProcessorsHandle:
    """A running set of processors in this process; ``stop()`` ends them gracefully."""

    def __init__(
        self,
        app: faust.App,
        producer: EventProducer,
        scheduler: SchedulerProcessor,
        witness: WitnessProcessor,
    ) -> None:
        self.app = app
        self.producer = producer
        self.scheduler = scheduler
        self.witness = witness

    async def stop(self) -> None:
        await self.app.stop()
        await self.producer.stop()


async def start_processors(settings: Settings) -> ProcessorsHandle:
    """Create topics, recover every processor from history, then start consuming."""
    await ensure_topics(settings)
    topics = topics_for(settings)
    producer = EventProducer(settings, producer="processors")
    await producer.start()
    scheduler = SchedulerProcessor(producer, topics, settings.pool_capacity)
    witness = WitnessProcessor(producer, topics)
    await asyncio.gather(scheduler.recover(), witness.recover())
    app = build_app(settings, [scheduler, witness])
    await app.start()
    await _assigned(app, expected={*scheduler.inputs, *witness.inputs})
    return ProcessorsHandle(app, producer, scheduler, witness)


async def _assigned(app: faust.App, expected: set[str], timeout_s: float = 60.0) -> None:
    """Wait until the consumer group has handed us every input topic.

    ``App.start()`` returns before the group join completes; reporting "running"
    before then would make the first events wait for a rebalance.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        assigned = {tp.topic for tp in app.consumer.assignment()}
        if expected <= assigned:
            return
        await asyncio.sleep(0.05)
    raise BrokerUnavailable(f"no partition assignment for {sorted(expected)} in {timeout_s:.0f} s")
