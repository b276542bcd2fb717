"""Workers' beats on ``<prefix>.workers``: who is alive and which shards each one runs.

Each worker beats every ``beat_s`` seconds and reads everybody's beats; the placement
of shards is then a pure function of that view (:mod:`conclave.domain.ownership`).
Nothing waits for the broker's consumer-group coordinator, which on the embedded broker
never expires a member killed with -9.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import EventProducer, new_consumer, topics_for
from conclave.domain import ownership
from conclave.domain.events import DeadLetterRecord, WorkerBeat
from conclave.errors import BrokerUnavailable, SchemaError
from conclave.feed import Feed, Subscription
from conclave.records import Record
from conclave.settings import Settings

__all__ = ["Membership"]

log = logging.getLogger(__name__)

_LOOKBACK = 2_000
"""Beats read back on start: enough to see every worker that beat within a lease."""


class Membership:
    def __init__(self, settings: Settings, worker_id: str, feed: Feed, *, lease_ms: int) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.topic = TopicPartition(topics_for(settings).workers, 0)
        self.members: dict[str, ownership.Member] = {}
        self._producer = EventProducer(settings, producer=f"worker:{worker_id}")
        self._feed = feed
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Connect and read the recent beats, so the first placement sees the others."""
        await self._producer.start()
        consumer = new_consumer(self.settings)
        try:
            await consumer.start()
            consumer.assign([self.topic])
            first = (await consumer.beginning_offsets([self.topic]))[self.topic]
            end = (await consumer.end_offsets([self.topic]))[self.topic]
        except KafkaError as exc:
            await self._producer.stop()
            raise BrokerUnavailable(f"cannot read {self.topic.topic}: {exc}") from exc
        finally:
            await consumer.stop()
        self._subscription = self._feed.subscribe({self.topic: max(first, end - _LOOKBACK)})
        while await self.poll(timeout_ms=300):
            pass

    async def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        await self._producer.stop()

    async def beat(self, shards: Iterable[str], *, leaving: bool = False) -> None:
        await self._producer.send(
            self.topic.topic,
            self.worker_id,
            WorkerBeat(
                worker_id=self.worker_id,
                shards=sorted(shards),
                leaving=leaving,
                lease_ms=self.lease_ms,
            ),
            partition=0,
            # Within half a lease, or the others may count this worker out unannounced.
            deadline_s=self.lease_ms / 2000,
        )

    async def poll(self, timeout_ms: int = 0) -> int:
        """Fold the beats that arrived; returns how many records were read."""
        assert self._subscription is not None, "start() first"
        batch = await self._subscription.get(timeout_ms=timeout_ms, max_records=10_000)
        count = 0
        for message in batch.get(self.topic, []):
            count += 1
            record = Record.of(message)
            try:
                envelope, beat = self._producer.codec.decode(record.value)
            except SchemaError as exc:
                await self._dead_letter(record, str(exc))
                continue
            if isinstance(beat, WorkerBeat):
                self.members = ownership.observe(self.members, beat, envelope.occurred_at)
            else:
                await self._dead_letter(record, f"{beat.TYPE} does not belong on {record.topic}")
        return count

    async def _dead_letter(self, record: Record, reason: str) -> None:
        """Every worker reads the beats; all of them report a bad record under one
        processor name, so the read model keeps it once."""
        log.warning("membership dead-lettered %s@%d: %s", record.topic, record.offset, reason)
        await self._producer.send(
            topics_for(self.settings).deadletter,
            f"{record.topic}/{record.partition}/{record.offset}",
            DeadLetterRecord(
                reason=reason,
                error_type="SchemaError",
                original=record.value,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                processor="membership",
            ),
            partition=0,
        )
