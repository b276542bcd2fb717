"""The history topics as the projector reads them.

Manual assignment of every partition, no consumer group (positions live in
PostgreSQL, next to the rows they produced), and ``read_committed``: records of
an aborted or still open Kafka transaction never reach a read model. aiokafka's
errors are translated to :class:`~conclave.errors.BrokerUnavailable` here.

aiokafka does not raise when the broker goes away while it fetches: it retries
inside and ``getmany`` returns nothing. :meth:`HistorySource.probe` asks the
broker for end offsets instead, with a deadline, to tell an outage from a quiet
topic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import new_consumer
from conclave.errors import BrokerUnavailable
from conclave.settings import Settings
from projections.rows import Consumed

__all__ = ["HistorySource"]

PROBE_TIMEOUT_S = 3.0
"""How long the broker may take to answer a probe before it counts as unavailable."""


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:
        raise BrokerUnavailable(f"Kafka {what}: no answer within {PROBE_TIMEOUT_S:.0f} s") from exc
    except KafkaError as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise BrokerUnavailable(f"Kafka {what}: {detail}") from exc


class HistorySource:
    """Every partition of ``topics``, positioned where the read models end."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.settings = settings
        self.topics = topics
        self.partitions: list[TopicPartition] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = new_consumer(
            self.settings,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 2**20,
        )
        try:
            with _unavailable(f"at {self.settings.kafka_bootstrap} is not reachable"):
                await consumer.start()
                await consumer.topics()
        except BrokerUnavailable:
            await consumer.stop()
            raise
        self.partitions = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        self._consumer = consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "start() first"
        return self._consumer

    async def seek(self, positions: Mapping[tuple[str, int], int]) -> dict[TopicPartition, int]:
        """Read on from ``positions``; partitions without one from their beginning.
        Returns where every partition now stands."""
        self.consumer.assign(self.partitions)
        missing = [tp for tp in self.partitions if tp not in positions]
        with _unavailable("beginning offsets"):
            beginnings = await self.consumer.beginning_offsets(missing) if missing else {}
        where = {tp: positions.get(tp, beginnings.get(tp, 0)) for tp in self.partitions}
        for tp, offset in where.items():
            self.consumer.seek(tp, offset)
        return where

    def park(self) -> None:
        """Read nothing until the next :meth:`seek` (a standby fetches nothing ahead)."""
        if self._consumer is not None:
            self._consumer.unsubscribe()

    async def fetch(self, *, max_records: int, timeout_ms: int) -> list[Consumed]:
        """The next records (possibly none), in offset order per partition."""
        with _unavailable("fetch"):
            batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [m for messages in batch.values() for m in messages]

    async def positions(self) -> dict[TopicPartition, int]:
        """The next offset of every partition, past any transaction markers and aborted
        records already skipped (so a partition can move without yielding records)."""
        consumer = self.consumer

        async def every() -> dict[TopicPartition, int]:
            # Immediate unless a partition awaits an offset reset from the broker.
            return {tp: await consumer.position(tp) for tp in self.partitions}

        with _unavailable("positions"):
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                return await every()

    async def end_offsets(self) -> dict[TopicPartition, int]:
        """The end (last stable offset under ``read_committed``) of every partition."""
        with _unavailable("end offsets"):
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                ends: dict[TopicPartition, int] = await self.consumer.end_offsets(self.partitions)
        return ends

    async def probe(self) -> None:
        """Raise :class:`BrokerUnavailable` unless the broker answers promptly."""
        await self.end_offsets()
