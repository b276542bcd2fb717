"""The processing contract, once for every stream processor (see docs/processing.md).

A processor is split into **shards**, each owning a fixed set of input partitions, a
changelog (the partitions of its own output that its state is folded from) and one
transactional id. :class:`ShardRunner` runs one shard:

1. **Recover**: start a transactional producer with the shard's id, which fences any
   older instance (a zombie's next write fails) and aborts what it left open; load the
   newest snapshot; fold the changelog written after it; fold the state-only inputs
   between the snapshot's positions and the committed ones; seek the inputs to the
   committed positions.
2. **Loop**: take what one fetch gives, let the shard decide for the whole batch with
   ``now`` read once, and write every output *and* the next input positions in one Kafka
   transaction (a snapshot of the state before the batch rides along when one is due).
   State is only ever ahead of the broker inside a batch: if the transaction fails, the
   in-memory state is thrown away and rebuilt from what was committed.

Broker trouble is retried with back-off and logged once per outage; :class:`Fenced`
(another instance took over) ends the runner so that its owner can give the shard up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from conclave import metrics
from conclave.bus import (
    Outgoing,
    Position,
    TransactionalProducer,
    committed_positions,
    fence,
    new_consumer,
    read_history,
)
from conclave.domain.events import DeadLetterRecord, Envelope, Event, new_envelope, now_us
from conclave.errors import BrokerUnavailable, SchemaError
from conclave.feed import Feed, Subscription
from conclave.outage import Backoff, Outage
from conclave.records import Record
from conclave.settings import Settings
from conclave.topics import Topics
from schemas.codec import Codec
from streams import snapshots

__all__ = ["Clock", "Emitter", "Shard", "ShardRunner", "Source"]

log = logging.getLogger(__name__)

KAFKA = "kafka"
"""``messaging.system`` of every record a processor consumes or writes."""

Clock = Callable[[], int]
"""Microseconds since the epoch; read once per batch and handed to the domain."""

Source = Literal["changelog", "input"]


class Shard(Protocol):
    """One independently owned piece of a processor (e.g. the scheduler of partition 2)."""

    processor: str
    """``scheduler``, ``witness``, ...: names its snapshot topic and transactional ids."""
    index: int
    emitter: Emitter

    @property
    def name(self) -> str: ...

    def inputs(self) -> list[TopicPartition]:
        """Every partition the shard consumes."""
        ...

    def changelog(self) -> list[TopicPartition]:
        """Partitions of the shard's own output that its state is a fold of."""
        ...

    def resume_at(self) -> Position | None:
        """Input positions the state itself records (they win over committed offsets:
        a shard whose outputs name their sources survives a broker that lost the tail
        of its output but kept the offsets), or ``None`` to use the committed ones."""
        ...

    def state_inputs(self) -> list[TopicPartition]:
        """Inputs whose records change state without any output (folded at recovery)."""
        ...

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Start from a snapshot's state, or empty."""
        ...

    def snapshot(self) -> Mapping[str, Any]:
        """The state as JSON-compatible data."""
        ...

    def fold(self, record: Record, source: Source) -> list[Outgoing]:
        """Recovery: fold one committed record; returns dead letters for unusable ones."""
        ...

    def step(
        self, records: Sequence[Record], now: int, unread: Mapping[TopicPartition, int]
    ) -> list[Outgoing]:
        """Decide for one batch (possibly empty, when a timer is due); returns every record
        to write, dead letters included. ``unread``: per input, records already written
        that this batch does not hold (a judgement by ``now`` that the silence of an input
        decides must wait while that input has some)."""
        ...

    def next_due(self) -> int | None:
        """When the shard must be stepped even without input (µs since epoch), if ever."""
        ...

    def gauges(self) -> Iterable[metrics.Sample]:
        """What the shard's state says for the metrics endpoint, read at scrape time."""
        ...

    def fences(self) -> list[tuple[str, TopicPartition]]:
        """Transactional writers (name, anchor) to fence now that the last batch is
        committed (a runtime host judged lost), taken once."""
        ...


@dataclass(slots=True)
class Emitter:
    """Encodes a shard's outputs and dead letters; the envelope time is the batch's ``now``."""

    codec: Codec
    topics: Topics
    processor: str
    tenant: str
    producer: str = "processors"

    def event(
        self,
        topic: str,
        partition: int,
        key: str,
        event: Event,
        *,
        now: int,
        causation: Envelope | None,
        headers: Sequence[tuple[str, bytes]] = (),
        tenant: str | None = None,
        correlation_id: str | None = None,
    ) -> Outgoing:
        """``event`` in an envelope of its own: the tenant and correlation id are given,
        else the cause's, else (for events nobody caused) this installation's."""
        if tenant is None:
            tenant = causation.tenant if causation is not None else self.tenant
        envelope = new_envelope(
            event.TYPE,
            tenant=tenant,
            producer=self.producer,
            causation=causation,
            correlation_id=correlation_id,
            occurred_at=now,
        )
        return Outgoing(topic, partition, key, self.codec.encode(envelope, event), list(headers))

    def dead_letter(self, record: Record, *, reason: str, error_type: str, now: int) -> Outgoing:
        log.warning(
            "%s dead-lettered %s/%d@%d: %s",
            self.processor,
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        return self.event(
            self.topics.deadletter,
            0,
            f"{record.topic}/{record.partition}/{record.offset}",
            DeadLetterRecord(
                reason=reason,
                error_type=error_type,
                original=record.value,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                processor=self.processor,
            ),
            now=now,
            causation=None,
            headers=record.headers,
        )

    def decode(
        self, record: Record, now: int, dead: list[Outgoing]
    ) -> tuple[Envelope, Event] | None:
        """The record's event, or ``None`` after adding its dead letter to ``dead``."""
        try:
            return self.codec.decode(record.value)
        except SchemaError as exc:
            dead.append(
                self.dead_letter(record, reason=str(exc), error_type="SchemaError", now=now)
            )
            return None


@dataclass(slots=True)
class ShardRunner:
    """Runs one shard under the processing contract until stopped or fenced."""

    settings: Settings
    shard: Shard
    feed: Feed | None = None
    """The process's shared consumer; ``None``: the runner reads through a feed of its own."""
    clock: Clock = now_us
    snapshot_every_events: int = 50_000
    """Take a snapshot after this many changelog records..."""
    snapshot_every_s: float = 60.0
    """...or this long after the last one, if anything changed since."""
    max_records: int = 5_000
    idle_timeout_ms: int = 1_000
    """The longest wait for records when no timer is due: a wake-up with nothing to do
    costs CPU, and nothing but records and due timers changes a shard."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the shard has recovered and is consuming."""
    recovered_events: int = 0
    recovery_s: float = 0.0
    _producer: TransactionalProducer | None = None
    _own_feed: Feed | None = None
    _subscription: Subscription | None = None
    _positions: Position = field(default_factory=dict)
    _changelog_end: Position = field(default_factory=dict)
    _pending: list[Outgoing] = field(default_factory=list)
    _since_snapshot: int = 0
    _last_snapshot: float = 0.0

    @property
    def group_id(self) -> str:
        """Where the shard's input positions are committed (no member ever joins it), and
        the stem of its transactional ids."""
        return f"{self.settings.topic_prefix}.{self.shard.name}"

    async def run(self, stop: asyncio.Event) -> None:
        """Recover and process until ``stop`` is set. Raises :class:`Fenced` when another
        instance took the shard over; rides out broker outages by itself."""
        outage = Outage(log, self.shard.name, f"Kafka at {self.settings.kafka_bootstrap}")
        backoff = Backoff()
        try:
            while not stop.is_set():
                try:
                    await self._recover()
                    outage.recovered()
                    backoff.reset()
                    await self._loop(stop, outage)
                except BrokerUnavailable as exc:
                    outage.failed(exc)
                    self.ready.clear()
                    await _sleep_unless(stop, backoff.delay())
                finally:
                    await self._close()
        finally:
            outage.forget()

    async def _recover(self) -> None:
        started = time.monotonic()
        shard = self.shard
        self._producer = TransactionalProducer(self.settings, self.group_id, shard.inputs()[0])
        await self._producer.start()  # fences the last instance; aborts its open transaction
        committed = await committed_positions(self.settings, self.group_id, shard.inputs())
        snapshot_tp = TopicPartition(self._snapshot_topic(), shard.index)
        snapshot, bad = await snapshots.latest(self.settings, snapshot_tp)
        now = self.clock()
        self._pending = [
            shard.emitter.dead_letter(
                r, reason="not a snapshot chunk", error_type="SnapshotError", now=now
            )
            for r in bad
        ]
        if snapshot is not None:
            try:
                with snapshots.bulk_load():
                    shard.restore(snapshot.state)
            except (ValueError, KeyError, TypeError) as exc:
                # A snapshot of another version (or a damaged one) is only a cache miss.
                log.warning("%s: snapshot unusable (%s); folding from offset 0", shard.name, exc)
                snapshot = None
        if snapshot is None:
            shard.restore(None)
        folded = 0
        changelog = shard.changelog()
        self._changelog_end = {}
        for tp in changelog:
            start = snapshot.changelog.get(tp, 0) if snapshot is not None else 0
            self._changelog_end[tp] = start
            async for message in read_history(self.settings, [tp], start={tp: start}):
                self._pending += shard.fold(Record.of(message), "changelog")
                self._changelog_end[tp] = message.offset + 1
                folded += 1
        for tp in shard.state_inputs():
            start = snapshot.inputs.get(tp, 0) if snapshot is not None else 0
            end = committed.get(tp, 0)
            if end > start:
                async for message in read_history(
                    self.settings, [tp], start={tp: start}, end={tp: end}
                ):
                    self._pending += shard.fold(Record.of(message), "input")
                    folded += 1
        resume = shard.resume_at()
        self._subscription = await self._subscribe(committed if resume is None else resume)
        self._since_snapshot = folded
        self._last_snapshot = time.monotonic() if snapshot is not None else 0.0
        self.recovered_events = folded
        self.recovery_s = time.monotonic() - started
        metrics.watch(self._gauges)
        log.info(
            "%s recovered in %.2f s (snapshot %s, %d records folded)",
            shard.name,
            self.recovery_s,
            "found" if snapshot is not None else "none",
            folded,
        )
        self.ready.set()

    async def _subscribe(self, committed: Position) -> Subscription:
        """Read the inputs from the committed positions (or their beginning)."""
        inputs = self.shard.inputs()
        beginnings = await _beginnings(self.settings, inputs)
        self._positions = {tp: max(committed.get(tp, 0), beginnings[tp]) for tp in inputs}
        feed = self.feed
        if feed is None:
            feed = self._own_feed = Feed(self.settings, name=self.shard.name)
            await feed.start()
        return feed.subscribe(self._positions)

    def _snapshot_topic(self) -> str:
        return f"{self.settings.topic_prefix}.snapshots.{self.shard.processor}"

    async def _loop(self, stop: asyncio.Event, outage: Outage) -> None:
        assert self._subscription is not None
        assert self._producer is not None
        subscription, shard = self._subscription, self.shard
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                timeout_ms = self._timeout_ms()
                fetch = asyncio.ensure_future(
                    subscription.get(timeout_ms=timeout_ms, max_records=self.max_records)
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    return
                batch: Mapping[TopicPartition, list[Any]] = fetch.result()
                now = self.clock()
                due = shard.next_due()
                if not batch and not self._pending and (due is None or due > now):
                    continue
                started = time.perf_counter()
                records = [Record.of(m) for messages in batch.values() for m in messages]
                snapshot = self._snapshot_if_due(now)
                out = self._pending + shard.step(records, now, self._unread())
                positions = {tp: messages[-1].offset + 1 for tp, messages in batch.items()}
                ends = await self._producer.commit(
                    out + snapshot, positions, expect=self._changelog_end
                )
                outage.recovered()
                await self._fence()
                self._pending = []
                self._positions.update(positions)
                for tp in shard.changelog():
                    if tp in ends:
                        self._changelog_end[tp] = ends[tp]
                # What a recovery from the last snapshot would have to fold again.
                self._since_snapshot += len(records) + len(out)
                self._count(batch, out, time.perf_counter() - started)
        finally:
            stopping.cancel()

    async def _fence(self) -> None:
        """Fence the writers the committed batch judged dead. A failure is logged, not
        fatal: the writer's successor fences it too, and Kafka proper also aborts an
        abandoned transaction after its timeout."""
        for name, anchor in self.shard.fences():
            try:
                await fence(self.settings, name, anchor)
            except BrokerUnavailable as exc:
                log.warning("%s: could not fence %s: %s", self.shard.name, name, exc)
            else:
                log.info("%s: fenced %s", self.shard.name, name)

    def _count(
        self, batch: Mapping[TopicPartition, list[Any]], out: list[Outgoing], elapsed: float
    ) -> None:
        """The batch's messaging metrics: a few label lookups per batch, not per record."""
        group = self.shard.name
        metrics.process_duration.labels(KAFKA, group).observe(elapsed)
        for tp, messages in batch.items():
            metrics.consumed.labels(KAFKA, group, tp.topic, str(tp.partition)).inc(len(messages))
        for topic, n in Counter(o.topic for o in out).items():
            metrics.sent.labels(KAFKA, group, topic).inc(n)

    def _gauges(self) -> Iterator[metrics.Sample]:
        """The shard's own gauges, and how far it is behind each input: records the feed
        has not fetched yet plus those fetched and not processed."""
        yield from self.shard.gauges()
        subscription = self._subscription
        feed = self.feed or self._own_feed
        if subscription is None or feed is None:
            return
        for tp, position in self._positions.items():
            unfetched = feed.behind(tp)
            if unfetched is not None:
                waiting = max(0, subscription.next.get(tp, position) - position)
                labels = (self.shard.name, tp.topic, str(tp.partition))
                yield "conclave_consumer_lag_records", labels, unfetched + waiting

    def _unread(self) -> dict[TopicPartition, int]:
        """Per input, records fetched and not handed over yet plus those the feed has not
        fetched (as of its last fetch; none where it does not know)."""
        subscription, feed = self._subscription, self.feed or self._own_feed
        if subscription is None or feed is None:
            return {}
        return {tp: subscription.buffered(tp) + (feed.behind(tp) or 0) for tp in self._positions}

    def _timeout_ms(self) -> int:
        due = self.shard.next_due()
        if due is None:
            return self.idle_timeout_ms
        return max(0, min(self.idle_timeout_ms, (due - self.clock()) // 1000))

    def _snapshot_if_due(self, now: int) -> list[Outgoing]:
        """Chunks of a snapshot of the state *before* this batch, when one is due.

        Before, because its positions are then already known: the committed input
        positions and the end of the changelog after the previous transaction.
        """
        if self._since_snapshot == 0:
            return []
        elapsed = time.monotonic() - self._last_snapshot
        if self._since_snapshot < self.snapshot_every_events and elapsed < self.snapshot_every_s:
            return []
        snapshot = snapshots.Snapshot(
            shard=self.shard.name,
            taken_at=now,
            inputs=dict(self._positions),
            changelog=dict(self._changelog_end),
            state=self.shard.snapshot(),
        )
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        topic = self._snapshot_topic()
        return [
            Outgoing(topic, self.shard.index, self.shard.name, chunk, [])
            for chunk in snapshots.encode(snapshot)
        ]

    async def _close(self) -> None:
        metrics.unwatch(self._gauges)
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        if self._own_feed is not None:
            await self._own_feed.stop()
            self._own_feed = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def _beginnings(settings: Settings, partitions: list[TopicPartition]) -> Position:
    """The first offset still on the broker of each partition (retention may have
    removed the start): a position below it would be reset, not honoured."""
    consumer = new_consumer(settings)
    try:
        await consumer.start()
        found: Position = await consumer.beginning_offsets(partitions)
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot read offsets: {exc}") from exc
    finally:
        await consumer.stop()
    return found


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
