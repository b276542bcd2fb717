"""The Kafka adapter: producing encoded events, creating topics, reading history.

aiokafka's errors are translated here into :class:`BrokerUnavailable`, so that
nothing above this module knows which client library talks to the broker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from conclave import fetching
from conclave.domain.events import Envelope, Event, new_envelope
from conclave.errors import BrokerUnavailable
from conclave.settings import Settings
from conclave.topics import Topics
from conclave.tracing import Headers, configure, headers_for
from schemas.codec import Codec, default_codec

__all__ = ["EventProducer", "ensure_topics", "new_consumer", "read_history", "topics_for"]

# Tuned for latency: the defaults batch for hundreds of milliseconds per hop.
PRODUCER_OPTIONS: dict[str, Any] = {"linger_ms": 0, "acks": "all", "request_timeout_ms": 10_000}
CONSUMER_OPTIONS: dict[str, Any] = {"fetch_max_wait_ms": 100, "fetch_min_bytes": 1}


def new_consumer(settings: Settings, **options: Any) -> AIOKafkaConsumer:
    """A group-less consumer (manual assignment) tuned for latency."""
    fetching.install(settings.fetch_idle_ms / 1000)
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        **(CONSUMER_OPTIONS | options),
    )


def topics_for(settings: Settings) -> Topics:
    return Topics(prefix=settings.topic_prefix, partitions=settings.partitions)


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every missing topic with its partitions and retention; returns those created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000
    )
    try:
        await admin.start()
    except KafkaError as exc:
        raise BrokerUnavailable(f"Kafka at {settings.kafka_bootstrap} is not reachable") from exc
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in topics_for(settings).specs() if s.name not in existing]
        created: list[str] = []
        for spec in missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            settings.replication_factor,
                            topic_configs=dict(spec.config),
                        )
                    ]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process won the race: fine, the spec is the same
        return created
    finally:
        await admin.close()


class EventProducer:
    """Encodes events with the codec and sends them with trace context in the headers."""

    def __init__(self, settings: Settings, *, producer: str, codec: Codec | None = None) -> None:
        self.settings = settings
        self.name = producer
        self.codec = codec or default_codec()
        configure(settings.trace_sample_ratio)  # once per process; traces need a provider
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=f"conclave-{producer}-{uuid.uuid4().hex[:6]}",
            **(PRODUCER_OPTIONS | {"linger_ms": settings.producer_linger_ms}),
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaConnectionError as exc:
            await self._producer.stop()
            raise BrokerUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable"
            ) from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def flush(self) -> None:
        """Wait until everything sent so far is acknowledged."""
        await self._producer.flush()

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def envelope(
        self, event: Event, *, causation: Envelope | None = None, correlation_id: str | None = None
    ) -> Envelope:
        return new_envelope(
            event.TYPE,
            tenant=self.settings.tenant,
            producer=self.name,
            causation=causation,
            correlation_id=correlation_id,
        )

    async def send(
        self,
        topic: str,
        key: str,
        event: Event,
        *,
        causation: Envelope | None = None,
        correlation_id: str | None = None,
        headers: Headers | None = None,
    ) -> tuple[Envelope, asyncio.Future[Any]]:
        """Queue one event; await the returned future for the broker's acknowledgement."""
        envelope = self.envelope(event, causation=causation, correlation_id=correlation_id)
        value = self.codec.encode(envelope, event)
        future = await self.send_raw(topic, key, value, headers)
        return envelope, future

    async def send_raw(
        self, topic: str, key: str, value: bytes, headers: Headers | None = None
    ) -> asyncio.Future[Any]:
        try:
            future: asyncio.Future[Any] = await self._producer.send(
                topic,
                value=value,
                key=key.encode(),
                headers=headers if headers is not None else headers_for(),
            )
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot send to {topic}: {exc}") from exc
        return future


async def read_history(
    settings: Settings, topics: Sequence[str], *, start: dict[TopicPartition, int] | None = None
) -> AsyncIterator[Any]:
    """Every record of ``topics`` from the start (or given offsets) up to the current end.

    Uses manual assignment and no consumer group, so a reader never disturbs
    (or waits on) anybody else's group.
    """
    consumer = new_consumer(settings, auto_offset_reset="earliest")
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise BrokerUnavailable(f"Kafka at {settings.kafka_bootstrap} is not reachable") from exc
    try:
        await consumer.topics()  # loads metadata for every topic
        partitions = []
        for topic in topics:
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                partitions.append(TopicPartition(topic, p))
        if not partitions:
            return
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            offset = (start or {}).get(tp)
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        remaining = {tp for tp in partitions if ends[tp] > (start or {}).get(tp, 0)}
        # seek_to_beginning is lazy; a partition whose start is past zero still ends at `ends`
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
