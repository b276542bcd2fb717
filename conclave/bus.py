"""The Kafka adapter: producing encoded events, transactions, creating topics, reading history.

aiokafka's errors are translated here into :class:`BrokerUnavailable` (retriable) and
:class:`Fenced` (a newer instance owns this transactional id), so that nothing above this
module knows which client library talks to the broker.

Every write is awaited: :meth:`EventProducer.send` returns once the broker acknowledged
the record, and a :class:`Transaction` either commits everything it was given together
with the input positions, or nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAlreadyExistsError,
    UnknownProducerId,
)
from aiokafka.structs import OffsetAndMetadata

from conclave import fetching
from conclave.connections import kafka_options
from conclave.domain.events import Envelope, Event, new_envelope
from conclave.errors import BrokerUnavailable, Fenced
from conclave.settings import Settings
from conclave.topics import Topics
from conclave.tracing import Headers, configure, headers_for
from schemas.codec import Codec, default_codec

__all__ = [
    "EventProducer",
    "Outgoing",
    "Position",
    "TransactionalProducer",
    "committed_offsets",
    "committed_positions",
    "ensure_topics",
    "fence",
    "new_consumer",
    "read_history",
    "topics_for",
]

Position = dict[TopicPartition, int]
"""Next offset to read, per partition."""

# Tuned for latency: the defaults batch for hundreds of milliseconds per hop.
PRODUCER_OPTIONS: dict[str, Any] = {"linger_ms": 0, "acks": "all", "request_timeout_ms": 10_000}
TRANSACTION_DEADLINE_S = 60.0
"""A transaction not committed by then is given up (and the writer recovers): aiokafka
would otherwise wait for a broker that went away until it comes back. As long as a
broker keeps a transaction open by default (``transaction.timeout.ms``): giving one up
earlier races with the broker working through its queued requests when it wakes, and
the embedded broker can then leave a transaction open for ever (suspected in a CI run
with the broker frozen for 30 s under a 20 s deadline)."""
CONSUMER_OPTIONS: dict[str, Any] = {
    "fetch_max_wait_ms": 100,
    "fetch_min_bytes": 1,
    # Processors write in transactions: a reader sees a batch of decisions all at once
    # or not at all, and never the writes of a zombie that was fenced mid-transaction.
    "isolation_level": "read_committed",
}


def new_consumer(settings: Settings, **options: Any) -> AIOKafkaConsumer:
    """A consumer tuned for latency that reads only committed records.

    Without ``group_id`` it is group-less (manual assignment); with one it still never
    joins the group (use :meth:`AIOKafkaConsumer.assign`), it only reads that group's
    committed offsets.
    """
    fetching.install(
        settings.fetch_idle_ms / 1000,
        settings.fetch_idle_max_ms / 1000,
        hot_s=settings.fetch_hot_ms / 1000,
        cold_s=settings.fetch_cold_ms / 1000,
        cold_max_s=settings.fetch_cold_max_ms / 1000,
        quiet=topics_for(settings).liveness,
    )
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        **(CONSUMER_OPTIONS | kafka_options(settings) | options),
    )


def topics_for(settings: Settings) -> Topics:
    return Topics(prefix=settings.topic_prefix, partitions=settings.partitions)


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every missing topic with its partitions and retention; returns those created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=10_000,
        **kafka_options(settings),
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
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot create topics: {exc}") from exc
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One encoded record to write: where, with which key, value and headers."""

    topic: str
    partition: int | None
    """``None``: by key (Kafka's default partitioner); transactions need a partition."""
    key: str
    value: bytes | None
    """``None`` is a tombstone (only tools and tests write one)."""
    headers: Headers


class EventProducer:
    """Encodes events with the codec and sends them with trace context in the headers.

    Idempotent (the broker drops a retried duplicate) and awaited: ``send`` returns once
    the broker has acknowledged the record, or raises :class:`BrokerUnavailable`.
    """

    def __init__(self, settings: Settings, *, producer: str, codec: Codec | None = None) -> None:
        self.settings = settings
        self.name = producer
        self.codec = codec or default_codec()
        configure(settings)  # once per process; traces need a provider
        self._producer = self._new()

    def _new(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=f"conclave-{self.name}-{uuid.uuid4().hex[:6]}",
            enable_idempotence=True,
            **(PRODUCER_OPTIONS | {"linger_ms": self.settings.producer_linger_ms}),
            **kafka_options(self.settings),
        )

    async def _renew(self, error: KafkaError) -> None:
        """After an error that leaves the idempotent producer's sequence state unusable (the
        broker forgot it: it restarted and lost what it had acknowledged), start afresh."""
        if isinstance(error, (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)):
            await self._producer.stop()
            self._producer = self._new()
            with contextlib.suppress(KafkaError):
                await self._producer.start()

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise BrokerUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable"
            ) from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def envelope(
        self,
        event: Event,
        *,
        causation: Envelope | None = None,
        correlation_id: str | None = None,
        occurred_at: int | None = None,
    ) -> Envelope:
        return new_envelope(
            event.TYPE,
            tenant=self.settings.tenant,
            producer=self.name,
            causation=causation,
            correlation_id=correlation_id,
            occurred_at=occurred_at,
        )

    def encode(
        self,
        topic: str,
        partition: int | None,
        key: str,
        event: Event,
        *,
        causation: Envelope | None = None,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        occurred_at: int | None = None,
    ) -> tuple[Envelope, Outgoing]:
        """The record for ``event``: encoded now, written by :meth:`send_all` or a
        :class:`Transaction`."""
        envelope = self.envelope(
            event, causation=causation, correlation_id=correlation_id, occurred_at=occurred_at
        )
        value = self.codec.encode(envelope, event)
        return envelope, Outgoing(
            topic, partition, key, value, headers if headers is not None else headers_for()
        )

    async def send(
        self,
        topic: str,
        key: str,
        event: Event,
        *,
        partition: int | None = None,
        causation: Envelope | None = None,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        deadline_s: float | None = None,
    ) -> Envelope:
        """Send one event and wait for the broker's acknowledgement (at most
        ``deadline_s``: aiokafka itself waits for a broker that went away for as long as
        it takes to come back)."""
        envelope = self.envelope(event, causation=causation, correlation_id=correlation_id)
        value = self.codec.encode(envelope, event)
        await self.send_raw(topic, key, value, headers, partition=partition, deadline_s=deadline_s)
        return envelope

    async def send_raw(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        headers: Headers | None = None,
        *,
        partition: int | None = None,
        deadline_s: float | None = None,
    ) -> int:
        """Send bytes as they are (``None`` is a tombstone) and wait; returns the offset."""
        record = Outgoing(
            topic, partition, key, value, headers if headers is not None else headers_for()
        )
        (offset,) = await self.send_all([record], deadline_s=deadline_s)
        return offset

    async def send_all(
        self, records: Iterable[Outgoing], *, deadline_s: float | None = None
    ) -> list[int]:
        """Send many records, then wait once for every acknowledgement (at most
        ``deadline_s``); returns their offsets."""

        async def sent() -> list[int]:
            futures = [
                await self._producer.send(
                    r.topic,
                    value=r.value,
                    key=r.key.encode(),
                    partition=r.partition,
                    headers=r.headers,
                )
                for r in records
            ]
            return [metadata.offset for metadata in await asyncio.gather(*futures)]

        try:
            async with asyncio.timeout(deadline_s):
                return await sent()
        except TimeoutError:
            raise BrokerUnavailable(f"no acknowledgement within {deadline_s:.0f} s") from None
        except KafkaError as exc:
            await self._renew(exc)
            raise BrokerUnavailable(f"cannot send: {exc}") from exc

    async def partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has, from the broker's metadata."""
        try:
            found = await self._producer.partitions_for(topic)
        except KafkaError as exc:
            raise BrokerUnavailable(f"no metadata for {topic}: {exc}") from exc
        return len(found)


class TransactionalProducer:
    """The processing contract's writer: one owner of ``name`` at a time.

    :meth:`commit` writes a batch of records and the input positions they were decided
    from in one transaction: readers (``read_committed``) see all of it or none of it.

    **Incarnations.** Each start uses a transactional id of its own, ``<name>.<n>``, and
    records ``n`` in the metadata of the positions it commits (under the consumer group
    ``name``). A new instance reads the last ``n``, starts a producer with ``<name>.<n>``
    once (which fences that instance, so a zombie's next write fails with
    :class:`Fenced`, and aborts whatever transaction it left open), then claims
    ``<name>.<n+1>``. Why not simply reuse one transactional id: after an abort, the
    embedded broker keeps listing the aborted transaction in every later fetch response
    (Kafka lists it only for fetches that overlap it), so a reader that starts after the
    abort would drop every later record of that producer id as aborted. An id that has
    had an abort is therefore never written with again; any failure here means
    :meth:`start` anew, which moves to the next incarnation.
    """

    def __init__(self, settings: Settings, name: str, anchor: TopicPartition) -> None:
        self.settings = settings
        self.name = name
        """Also the consumer group under which positions are committed."""
        self.anchor = anchor
        """An input partition whose committed position carries the incarnation."""
        self.incarnation = 0
        self.note = ""
        """What the previous instance kept in the commit metadata besides its incarnation."""
        self._producer: AIOKafkaProducer | None = None

    @property
    def transactional_id(self) -> str:
        return f"{self.name}.{self.incarnation}"

    def _new_producer(self, transactional_id: str) -> AIOKafkaProducer:
        return _transactional(self.settings, transactional_id)

    async def start(self, *, initial: int | None = None) -> None:
        """Fence the previous instance and claim the next incarnation. With nothing
        committed yet, the claim commits ``initial`` (default: the anchor's beginning)."""
        await self.stop()
        last = await fence(self.settings, self.name, self.anchor)
        previous, self.note = _incarnation(last.metadata if last is not None else "")
        self.incarnation = previous + 1
        self._producer = self._new_producer(self.transactional_id)
        try:
            await self._producer.start()
        except (ProducerFenced, InvalidProducerEpoch) as exc:
            await self.stop()
            raise Fenced(f"{self.transactional_id}: {exc}") from exc
        except KafkaError as exc:
            await self.stop()
            raise BrokerUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable"
            ) from exc
        if last is not None:
            position = last.offset
        elif initial is not None:
            position = initial
        else:
            position = await _beginning(self.settings, self.anchor)
        # The claim: from now on a successor fences this incarnation, not the previous one.
        await self.commit([], {self.anchor: position}, note=self.note)

    async def superseded(self) -> bool:
        """After :class:`Fenced`: whether a newer instance claimed ``name`` (a successor:
        this one is a zombie and must stop) rather than someone only fencing this
        incarnation (the scheduler does, to a runtime host it judged lost), after which
        :meth:`start` claims the next one and carries on."""
        last = (await committed_offsets(self.settings, self.name, [self.anchor])).get(self.anchor)
        return last is not None and _incarnation(last.metadata)[0] > self.incarnation

    async def stop(self) -> None:
        if self._producer is not None:
            # A producer whose broker went away can take long to close: do not wait on it.
            with contextlib.suppress(TimeoutError, KafkaError):
                async with asyncio.timeout(5):
                    await self._producer.stop()
            self._producer = None

    async def commit(
        self,
        records: Sequence[Outgoing],
        positions: Mapping[TopicPartition, int],
        *,
        note: str = "",
        expect: Mapping[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int]:
        """Write ``records`` and commit ``positions`` (with ``note`` in their metadata,
        :attr:`note` for the next instance), atomically.

        ``expect`` gives, for partitions only this producer writes, the offset its next
        record cannot be below: a lower one means the broker lost committed records
        (the embedded broker does, when killed), and the transaction is aborted.

        Returns the next offset after the last record written to each partition. Raises
        :class:`Fenced` when a newer instance took over, :class:`BrokerUnavailable` for
        anything else; the transaction is then aborted (or was never committed) and the
        caller must recover its state from what *was* committed.
        """
        try:
            async with asyncio.timeout(TRANSACTION_DEADLINE_S):
                return await self._transaction(records, positions, note, expect)
        except TimeoutError:
            raise BrokerUnavailable(
                f"transaction of {self.transactional_id}: no answer within "
                f"{TRANSACTION_DEADLINE_S:.0f} s"
            ) from None

    async def _transaction(
        self,
        records: Sequence[Outgoing],
        positions: Mapping[TopicPartition, int],
        note: str,
        expect: Mapping[TopicPartition, int] | None,
    ) -> dict[TopicPartition, int]:
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable(f"{self.name}: start() first")
        metadata = f"{self.incarnation};{note}"
        try:
            await producer.begin_transaction()
            try:
                firsts, ends = await self._write(records)
                for tp, first in firsts.items():
                    floor = (expect or {}).get(tp)
                    if floor is not None and first < floor:
                        raise BrokerUnavailable(
                            f"{tp.topic}[{tp.partition}] lost committed records: the next "
                            f"offset is {first}, below {floor}"
                        )
                if positions:
                    await producer.send_offsets_to_transaction(
                        {tp: OffsetAndMetadata(o, metadata) for tp, o in positions.items()},
                        self.name,
                    )
            except BaseException:
                await _quietly(producer.abort_transaction())
                raise
            await producer.commit_transaction()
        except (ProducerFenced, InvalidProducerEpoch) as exc:
            raise Fenced(f"{self.transactional_id} was taken over: {exc}") from exc
        except KafkaError as exc:
            raise BrokerUnavailable(f"transaction of {self.transactional_id}: {exc}") from exc
        return ends

    async def _write(
        self, records: Sequence[Outgoing]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """One batch per partition (one produce request instead of one per record);
        awaits every acknowledgement. Returns each partition's first offset written and
        next offset."""
        producer = self._producer
        assert producer is not None
        sent: list[tuple[TopicPartition, int, asyncio.Future[Any]]] = []
        builders: dict[TopicPartition, Any] = {}

        async def flush(tp: TopicPartition) -> None:
            builder = builders.pop(tp)
            future = await producer.send_batch(builder, tp.topic, partition=tp.partition)
            sent.append((tp, builder.record_count(), future))

        for record in records:
            assert record.partition is not None, "a transaction writes to chosen partitions"
            tp = TopicPartition(record.topic, record.partition)
            key = record.key.encode()
            for _ in range(2):
                builder = builders.get(tp)
                if builder is None:
                    builder = builders[tp] = producer.create_batch()
                if builder.append(
                    key=key, value=record.value, timestamp=None, headers=record.headers
                ):
                    break
                if builder.record_count() == 0:
                    raise BrokerUnavailable(f"a record for {tp.topic} does not fit in a batch")
                await flush(tp)  # full: send it, the record goes into the next one
        for tp in list(builders):
            await flush(tp)
        firsts: dict[TopicPartition, int] = {}
        ends: dict[TopicPartition, int] = {}
        for tp, count, future in sent:
            metadata = await future  # the batch's base offset
            firsts[tp] = min(firsts.get(tp, metadata.offset), metadata.offset)
            ends[tp] = max(ends.get(tp, 0), metadata.offset + count)
        return firsts, ends


def _transactional(settings: Settings, transactional_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"conclave-{transactional_id}",
        transactional_id=transactional_id,
        enable_idempotence=True,
        linger_ms=0,
        acks="all",
        request_timeout_ms=10_000,
        max_batch_size=1 << 20,
        **kafka_options(settings),
    )


async def fence(settings: Settings, name: str, anchor: TopicPartition) -> OffsetAndMetadata | None:
    """Fence the current incarnation of the :class:`TransactionalProducer` ``name``: the
    transaction it left open is aborted (readers stop waiting on it) and its next write
    fails with :class:`Fenced`. What a successor does on start, and what the scheduler
    does to a runtime host it judged lost: a dead writer's open transaction would
    otherwise hold back every ``read_committed`` reader of the partitions it wrote (the
    embedded broker never times a transaction out). Returns what ``name`` last
    committed at ``anchor``; nothing to fence when it never committed."""
    last: OffsetAndMetadata | None = (await committed_offsets(settings, name, [anchor])).get(anchor)
    if last is None:
        return None
    transactional_id = f"{name}.{_incarnation(last.metadata)[0]}"
    producer = _transactional(settings, transactional_id)
    try:
        await producer.start()  # InitProducerId: bumps the epoch, aborts its open txn
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot fence {transactional_id}: {exc}") from exc
    finally:
        await producer.stop()
    return last


def _incarnation(metadata: str) -> tuple[int, str]:
    """``(n, note)`` from commit metadata ``"n;note"`` (``(0, "")`` when absent)."""
    number, _, note = metadata.partition(";")
    return (int(number), note) if number.isdigit() else (0, "")


async def _beginning(settings: Settings, tp: TopicPartition) -> int:
    consumer = new_consumer(settings)
    try:
        await consumer.start()
        found: int = (await consumer.beginning_offsets([tp]))[tp]
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot read offsets of {tp.topic}: {exc}") from exc
    finally:
        await consumer.stop()
    return found


async def _quietly(awaitable: Any) -> None:
    """Await a clean-up step whose own failure must not hide the original error."""
    with contextlib.suppress(Exception):  # the first error is the one to report
        await awaitable


async def committed_offsets(
    settings: Settings, group_id: str, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, OffsetAndMetadata]:
    """What ``group_id`` committed for ``partitions``, with each commit's metadata
    (absent: never committed)."""
    consumer = new_consumer(settings, group_id=group_id)
    try:
        await consumer.start()
        # AIOKafkaConsumer.committed() drops the metadata; its coordinator's call keeps it.
        found = await consumer._coordinator.fetch_committed_offsets(list(partitions))
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot read positions of {group_id}: {exc}") from exc
    finally:
        await consumer.stop()
    return {tp: meta for tp, meta in found.items() if meta is not None and meta.offset >= 0}


async def committed_positions(
    settings: Settings, group_id: str, partitions: Sequence[TopicPartition]
) -> Position:
    """The offsets ``group_id`` committed for ``partitions`` (absent: never committed)."""
    found = await committed_offsets(settings, group_id, partitions)
    return {tp: meta.offset for tp, meta in found.items()}


async def read_history(
    settings: Settings,
    topics: Sequence[str] | Sequence[TopicPartition],
    *,
    start: Mapping[TopicPartition, int] | None = None,
    end: Mapping[TopicPartition, int] | None = None,
) -> AsyncIterator[Any]:
    """Every committed record of ``topics`` (names, or single partitions) from the start
    (or ``start``) up to the current end (or ``end``), partition by partition in batches.

    Uses manual assignment and no consumer group, so a reader never disturbs (or waits
    on) anybody else's group.
    """
    consumer = new_consumer(
        settings, auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise BrokerUnavailable(f"Kafka at {settings.kafka_bootstrap} is not reachable") from exc
    try:
        partitions = await _partitions(consumer, topics)
        if not partitions:
            return
        consumer.assign(partitions)
        ends = dict(await consumer.end_offsets(partitions))
        if end is not None:
            ends.update({tp: min(ends[tp], end[tp]) for tp in partitions if tp in end})
        starts = dict(await consumer.beginning_offsets(partitions))
        for tp in partitions:
            offset = max((start or {}).get(tp, starts[tp]), starts[tp])
            consumer.seek(tp, offset)
        remaining = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot read history: {exc}") from exc
    finally:
        await consumer.stop()


async def _partitions(
    consumer: AIOKafkaConsumer, topics: Sequence[str] | Sequence[TopicPartition]
) -> list[TopicPartition]:
    await consumer.topics()  # loads metadata for every topic
    partitions: list[TopicPartition] = []
    for topic in topics:
        if isinstance(topic, TopicPartition):
            partitions.append(topic)
            continue
        for p in sorted(consumer.partitions_for_topic(topic) or ()):
            partitions.append(TopicPartition(topic, p))
    return partitions
