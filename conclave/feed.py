"""One Kafka consumer per process, shared by every reader in it.

A worker runs several shards and reads the workers' beats; each needs its own partitions
at its own positions, and several read the same partitions (every scheduler shard reads
the control and witness topics). One consumer each would mean one fetch loop each, and
against a broker that does not long-poll an idle fetch loop costs CPU whether or not
anything arrives. A :class:`Feed` runs one loop for all of them: it fetches every
partition somebody reads, from the lowest position anybody needs, and hands each
:class:`Subscription` the records at or after its own position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import Position, new_consumer
from conclave.errors import BrokerUnavailable
from conclave.outage import Backoff, Outage
from conclave.settings import Settings

__all__ = ["Feed", "Subscription", "fetched_to"]

log = logging.getLogger(__name__)

FETCH_MAX_RECORDS = 10_000


class Subscription:
    """One reader's partitions and positions on a :class:`Feed`."""

    def __init__(self, feed: Feed, positions: Position) -> None:
        self._feed = feed
        self.next: Position = dict(positions)
        """Per partition, the offset of the next record this reader needs."""
        self._buffer: dict[TopicPartition, list[Any]] = {}
        self._count = 0
        self._arrived = asyncio.Event()

    def _offer(self, tp: TopicPartition, messages: list[Any]) -> None:
        wanted = self.next.get(tp)
        if wanted is None:
            return
        fresh = [m for m in messages if m.offset >= wanted]
        if fresh:
            self._buffer.setdefault(tp, []).extend(fresh)
            self._count += len(fresh)
            self.next[tp] = fresh[-1].offset + 1
            self._arrived.set()

    async def get(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        """What arrived since the last call (waiting up to ``timeout_ms`` for something),
        in offset order per partition; at most about ``max_records`` records."""
        if not self._count and timeout_ms > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_ms / 1000):
                    await self._arrived.wait()
        taken: dict[TopicPartition, list[Any]] = {}
        budget = max_records
        # An even share for every partition first, then the rest in turn: a burst on one
        # partition must not hold back another's records for several batches (a host's
        # beats waiting behind thousands of commands looked like a silent host).
        share = max(1, budget // max(1, len(self._buffer)))
        for limit in (share, budget):
            for tp in list(self._buffer):
                if budget <= 0:
                    break
                messages = self._buffer[tp]
                n = min(limit, budget)
                part, rest = messages[:n], messages[n:]
                taken.setdefault(tp, []).extend(part)
                budget -= len(part)
                if rest:
                    self._buffer[tp] = rest
                else:
                    del self._buffer[tp]
        self._count -= sum(len(m) for m in taken.values())
        return taken

    def buffered(self, tp: TopicPartition) -> int:
        """Records of ``tp`` fetched for this reader and not yet taken by :meth:`get`."""
        return len(self._buffer.get(tp, ()))

    def close(self) -> None:
        self._feed._unsubscribe(self)


class Feed:
    def __init__(self, settings: Settings, *, name: str = "feed") -> None:
        self.settings = settings
        self.name = name
        self._consumer: AIOKafkaConsumer | None = None
        self._subscriptions: list[Subscription] = []
        self._position: Position = {}
        """Per assigned partition, the offset the consumer reads next."""
        self._fetched_to: Position = {}
        """Per assigned partition, the consumer's position after its last fetch (past
        transaction markers, unlike ``_position``): for the lag metrics."""
        self._pump: asyncio.Task[None] | None = None
        self._assigned = asyncio.Event()

    async def start(self) -> None:
        consumer = new_consumer(
            self.settings, auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable"
            ) from exc
        self._consumer = consumer
        self._pump = asyncio.create_task(self._run(), name=f"{self.name}-pump")

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._consumer is not None:
            # aiokafka's close can wait for ever on a fetch that is being cancelled (seen
            # once in many runs); a process that is stopping must not hang on it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._consumer.stop()
            self._consumer = None

    def behind(self, tp: TopicPartition) -> int | None:
        """Records of ``tp`` on the broker that this feed could fetch and has not yet (as
        of its last fetch; transaction markers it skipped and records of transactions
        still open do not count), if it reads ``tp``."""
        if self._consumer is None or tp not in self._position or tp not in self._fetched_to:
            return None
        end: int | None = self._consumer.highwater(tp)
        stable: int | None = self._consumer.last_stable_offset(tp)
        if end is not None and stable is not None and stable >= 0:
            end = min(end, stable)
        return None if end is None else max(0, end - self._fetched_to[tp])

    def subscribe(self, positions: Mapping[TopicPartition, int]) -> Subscription:
        """Start reading ``positions``' partitions from those offsets."""
        subscription = Subscription(self, dict(positions))
        self._subscriptions.append(subscription)
        self._reassign()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            self._reassign()

    def _reassign(self) -> None:
        assert self._consumer is not None, "start() first"
        lowest: Position = {}
        for subscription in self._subscriptions:
            for tp, offset in subscription.next.items():
                lowest[tp] = min(offset, lowest.get(tp, offset))
        log.debug("%s: reassign %s (was %s)", self.name, lowest, self._position)
        if set(lowest) != set(self._position):
            # A new assignment forgets every position: set them all again.
            self._consumer.assign(list(lowest))
            self._position = {}
        for tp, offset in lowest.items():
            if self._position.get(tp, offset + 1) > offset:
                self._consumer.seek(tp, offset)
                self._position[tp] = offset
        if lowest:
            self._assigned.set()
        else:
            self._assigned.clear()

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        outage = Outage(log, self.name, f"Kafka at {self.settings.kafka_bootstrap}")
        backoff = Backoff()
        while True:
            await self._assigned.wait()
            try:
                batch = await consumer.getmany(timeout_ms=1000, max_records=FETCH_MAX_RECORDS)
            except KafkaError as exc:
                outage.failed(exc)
                await backoff.wait()
                continue
            outage.recovered()
            backoff.reset()
            moved = fetched_to(consumer, batch, self._position, FETCH_MAX_RECORDS)
            self._fetched_to = {  # only what is still assigned
                tp: at
                for tp in self._position
                if (at := moved.get(tp, self._fetched_to.get(tp))) is not None
            }
            for tp, fetched in batch.items():
                position = self._position.get(tp)
                log.debug(
                    "%s: %s[%d] %d record(s) from %s, position %s",
                    self.name,
                    tp.topic,
                    tp.partition,
                    len(fetched),
                    fetched[0].offset if fetched else None,
                    position,
                )
                if position is None:
                    continue  # unassigned while the fetch was under way
                messages = [m for m in fetched if m.offset >= position]
                if not messages:
                    continue
                self._position[tp] = messages[-1].offset + 1
                for subscription in self._subscriptions:
                    subscription._offer(tp, messages)


def fetched_to(
    consumer: AIOKafkaConsumer,
    batch: Mapping[TopicPartition, list[Any]],
    partitions: Iterable[TopicPartition],
    max_records: int,
) -> Position:
    """Where each partition stands after a fetch, transaction markers included: past its
    last record if the fetch gave any, else at its end (a fetch that was not cut short
    and gave nothing for a partition leaves only markers or nothing behind). For the lag
    metrics: ``consumer.position`` would say the same, but may wait for a reset."""
    truncated = sum(len(records) for records in batch.values()) >= max_records
    found: Position = {}
    for tp in partitions:
        records = batch.get(tp)
        if records:
            found[tp] = records[-1].offset + 1
        elif not truncated and (end := consumer.highwater(tp)) is not None:
            found[tp] = end
    return found
