"""The projector: folds the history topics into the PostgreSQL read models.

The contract:

- **Positions with the rows.** Each batch of records is applied in one
  transaction together with the next offsets to read, so the read models and
  the position never disagree. After *any* failure the projector rolls back,
  reads the stored positions again and seeks there: nothing is lost or folded
  twice, whatever failed and whenever.
- **Outages are waited out.** PostgreSQL or Kafka gone: retry with back-off
  (0.1 s doubling to 5 s), one WARNING when the outage starts and one INFO line
  with its length when it ends, no traceback, no human needed.
- **One active projector per schema.** The active one holds the schema's lock
  (:mod:`projections.lock`) on the connection it writes on; any other stands by
  (one line), polls, and takes over within about a second of the lock being
  free -- the active one stopped or died, or its session ended in an outage.
- **Batches, coalesced.** Hundreds to thousands of records per transaction, a
  statement per table (:mod:`projections.store`), each task's or agent's events
  folded into its final row first (:mod:`projections.rows`).
- **Swaps are noticed.** Every batch's transaction takes the schema's swap lock shared
  and checks that the schema is still the one the projector positioned itself in: a
  rebuild swapping a rebuilt schema in (:mod:`projections.rebuild`) waits for the batch
  in flight, and the next batch rolls back and resumes from the positions stored in the
  new schema. Nothing is written into a schema being swapped away, nothing skipped.
- **Bounded folds.** A fold can stop at an offset per partition, or at the first record
  of each partition at or after a time (``conclave replay --as-of``): records past the
  bound are neither folded nor counted in the positions.
- **Bad input is kept, not fatal.** Undecodable bytes, tombstones (null values),
  empty values, events on the wrong topic and records PostgreSQL refuses become
  ``dead_letters`` rows with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import asyncpg
from aiokafka import TopicPartition

from conclave import metrics, tracing
from conclave.bus import topics_for
from conclave.domain.events import TASK_ENDINGS
from conclave.domain.validation import CONTROL_COMMANDS, invalid_command
from conclave.errors import BrokerUnavailable, DatabaseUnavailable, SchemaError
from conclave.outage import Backoff, Outage
from conclave.settings import Settings
from projections import store
from projections.database import (
    REFUSED,
    ProjectorActive,
    drop_read_models,
    migrate,
    swap_lock_key,
    unavailable,
)
from projections.lock import SchemaLock
from projections.rows import Changes, Consumed, projected_from
from projections.source import HistorySource
from schemas.codec import Codec, default_codec

__all__ = ["Projector"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

DEFAULT_MAX_BATCH = 5000
"""Records per transaction at most: large enough that round trips cost little per
record, small enough that one transaction stays well under a second."""
STANDBY_POLL_S = 1.0
"""How often a standby tries the lock: the longest a schema goes without a projector."""
PROBE_IDLE_S = 2.0
"""After this long without records, ask the broker whether it is there at all."""
FETCH_TIMEOUT_MS = 200
LINGER_S = 0.010
"""After a small batch, the next read waits until this long after it: records that
trickle in (a few per hop of a task) then share a transaction instead of taking one
each, for at most this much more time until they are visible."""
LINGER_BELOW = 100
"""A batch of fewer records than this is small."""
DECODE_SLICE = 500
"""Records decoded between two chances for the commit in flight to go on."""


class SchemaSwapped(Exception):
    """The schema was swapped for a rebuilt one under this projector: reposition."""


@dataclass(frozen=True, slots=True)
class _Batch:
    records: list[Consumed]
    moved: dict[TopicPartition, int]
    """The partitions whose position the batch moves, and where to."""
    changes: Changes
    read_at_ns: int
    """When the batch was fetched: where its records' ``project`` spans start."""


class Projector:
    """Folds the history topics into the read models of ``pool``'s schema.

    ``pool``'s sessions decide the schema (its ``search_path``); the projector holds
    one of its connections while it is the schema's active projector.
    """

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        codec: Codec | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = LINGER_S,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.codec = codec or default_codec()
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._linger_until = 0.0
        self._following = False
        self.topics = topics_for(settings)
        self.expected = projected_from(self.topics)
        """What each history topic carries; anything else on it is dead-lettered."""
        self.batches = asyncio.Event()
        """Set after every committed batch; readers clear it and wait for the next."""
        self._source = HistorySource(settings, self.topics.history)
        self._lock = SchemaLock(pool)
        self._positions: dict[TopicPartition, int] | None = None
        """What the read models hold (committed), once active and positioned; ``None``
        means: read the stored positions and seek before folding again."""
        self._read_to: dict[TopicPartition, int] = {}
        """Where the batches read so far end (the read-ahead is past the commits)."""
        self._ahead: asyncio.Task[_Batch] | None = None
        self.schema: str | None = None
        """The schema folded into (the pool's), known after :meth:`start`."""
        self._backoff = Backoff()
        self._postgres = Outage(log, "projector", "PostgreSQL")
        self._kafka = Outage(log, "projector", f"Kafka at {settings.kafka_bootstrap}")
        self._standing_by = False
        self._heard_from_broker = 0.0
        self._schema_oid: int | None = None
        """The schema positioned in (its OID: a swap keeps the name, not the OID)."""
        self._swap_key = 0
        self._limits: dict[TopicPartition, int] = {}
        """Offsets not to fold from (per partition): a bounded fold's end."""
        self._cutoff_ms: int | None = None
        """Record time (ms) not to fold from: each partition ends at its first record
        at or after it (that record's offset becomes the partition's limit)."""

    def bound(
        self, limits: dict[TopicPartition, int] | None = None, cutoff_ms: int | None = None
    ) -> None:
        """Fold nothing at or past ``limits`` (offsets per partition) nor from the first
        record of each partition whose timestamp is at or after ``cutoff_ms``."""
        self._limits = dict(limits or {})
        self._cutoff_ms = cutoff_ms

    @property
    def partitions(self) -> list[TopicPartition]:
        """Every history partition read (known after :meth:`start`)."""
        return list(self._source.partitions)

    @property
    def limits(self) -> dict[TopicPartition, int]:
        """The bounds in force: given, or found at the cutoff time so far."""
        return dict(self._limits)

    @property
    def active(self) -> bool:
        """Whether this projector holds its schema's lock (others stand by)."""
        return self._lock.held

    async def start(self) -> None:
        """Connect to Kafka and learn the schema (raises :class:`BrokerUnavailable`,
        :class:`DatabaseUnavailable`); folding starts in :meth:`run`, :meth:`catch_up`
        or :meth:`rebuild`."""
        self.schema = await self._lock.resolve()
        self._swap_key = swap_lock_key(self.schema)
        name = f"projector for schema {self.schema}"
        self._postgres = Outage(log, name, "PostgreSQL")
        self._kafka = Outage(log, name, f"Kafka at {self.settings.kafka_bootstrap}")
        await self._source.start()
        metrics.watch(self._gauges)

    def _gauges(self) -> Iterator[metrics.Sample]:
        """How far the read models are behind each history partition (as of the last
        fetch); nothing while standing by, when the active projector says it."""
        if self._positions is None:
            return
        consumer = self._source.consumer
        for tp, position in self._positions.items():
            end = consumer.highwater(tp)
            if end is not None:
                labels = (tp.topic, str(tp.partition))
                yield "conclave_projection_lag_records", labels, max(0, end - position)

    async def stop(self) -> None:
        """Disconnect, and give the schema's lock up: a standby takes over at once."""
        metrics.unwatch(self._gauges)
        self._postgres.forget()  # a projector stopped in an outage waits for nothing now
        self._kafka.forget()
        await self._source.stop()
        await self._lock.release()

    async def run(self, stop: asyncio.Event) -> None:
        """Fold until ``stop`` is set, through outages, standing by while another
        projector of the schema is active."""
        await self._fold(stop=stop)

    async def catch_up(self, progress: Progress | None = None) -> int:
        """Return once the read models hold everything up to the current end of the
        history topics (folded here, or by the active projector while this one stands
        by); returns the records folded here."""
        return await self._fold(until=await self._source.end_offsets(), progress=progress)

    async def rebuild(self, progress: Progress | None = None) -> int:
        """Drop the read models and fold them again from offset 0; returns the records
        folded.

        Holds the schema's lock from the drop to the end of the replay, so that no
        projector folds into the half-built tables: running projectors stand by and
        carry on from the rebuilt positions once this one stops. Raises
        :class:`ProjectorActive` if a projector is active now.
        """
        if not await self._lock.try_acquire():
            raise ProjectorActive(
                f"a projector is active for schema {self.schema}; stop it before rebuilding"
            )
        conn = self._lock.connection
        with unavailable():
            await drop_read_models(conn)
            await migrate(conn)
        self._unposition()
        return await self.catch_up(progress)

    async def lag(self) -> int:
        """Records on the history topics not yet in the read models."""
        ends = await self._source.end_offsets()
        with unavailable():
            stored = await store.stored_positions(self.pool)
        return sum(max(0, end - stored.get(tp, 0)) for tp, end in ends.items())

    # -- the loop -----------------------------------------------------------------------

    async def _fold(
        self,
        *,
        stop: asyncio.Event | None = None,
        until: dict[TopicPartition, int] | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Fold batches until ``stop`` is set or the read models reach ``until``."""
        self._following = until is None  # live: small batches linger (not a catch-up)
        folded = 0
        try:
            while stop is None or not stop.is_set():
                try:
                    if not await self._ready():
                        if until is not None and await self._covered(until):
                            return folded
                        await _pause(stop, STANDBY_POLL_S)
                        continue
                    if until is not None and self._reached(until):
                        return folded
                    folded += await self._step()
                    if progress is not None and until is not None:
                        total = sum(until.values())
                        progress(min(total, sum(self._committed().values())), total)
                except DatabaseUnavailable as exc:
                    lost = self._lock.held and self._lock.lost
                    self._postgres.failed("connection lost" if lost else exc)
                    await self._deactivate(broken=True)
                    await _pause(stop, self._backoff.delay())
                except BrokerUnavailable as exc:
                    self._kafka.failed(exc)
                    self._unposition()
                    await _pause(stop, self._backoff.delay())
                except SchemaSwapped:
                    log.info(
                        "schema %s was swapped for a rebuilt one; resuming from its positions",
                        self.schema,
                    )
                    self._unposition()
            return folded
        finally:
            # A batch read ahead is not in the read models: whoever folds next starts
            # from the stored positions again.
            self._unposition()

    async def _ready(self) -> bool:
        """Hold the lock and stand at the stored positions; ``False`` while standing by."""
        if self._positions is not None:
            return True
        if not self._lock.held:
            got = await self._lock.try_acquire()
            self._postgres.recovered()
            if not got:
                if not self._standing_by:
                    self._standing_by = True
                    log.warning(
                        "another projector is active for schema %s; standing by", self.schema
                    )
                self._source.park()
                return False
            if self._standing_by:
                self._standing_by = False
                log.info("projector for schema %s is active now", self.schema)
        conn = self._lock.connection
        with unavailable():
            await store.prepare(conn)
            async with conn.transaction():
                # Under the swap lock: the positions and the OID are of one schema.
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", self._swap_key)
                self._schema_oid = await conn.fetchval(_SCHEMA_OID)
                stored = await store.stored_positions(conn)
        self._positions = await self._source.seek(stored)
        self._read_to = dict(self._positions)
        return True

    def _unposition(self) -> None:
        """Forget where the consumer stands (it may be ahead of the read models)."""
        self._positions = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()
            ahead.add_done_callback(_discard)

    async def _deactivate(self, *, broken: bool) -> None:
        self._unposition()
        self._source.park()
        await self._lock.release(broken=broken)

    def _committed(self) -> dict[TopicPartition, int]:
        assert self._positions is not None
        return self._positions

    async def _covered(self, until: dict[TopicPartition, int]) -> bool:
        """Whether the read models (folded by whoever is active) reach ``until``."""
        with unavailable():
            stored = await store.stored_positions(self.pool)
        return all(stored.get(tp, 0) >= end for tp, end in until.items())

    def _reached(self, until: dict[TopicPartition, int]) -> bool:
        committed = self._committed()
        limits = self._limits
        return all(
            committed.get(tp, 0) >= min(end, limits.get(tp, end)) for tp, end in until.items()
        )

    async def _step(self) -> int:
        """Fold one batch in one transaction; returns the records folded.

        The next batch is fetched and decoded while this one commits (a read-ahead
        task): decoding is the projector's own CPU work, committing mostly waits for
        PostgreSQL, so the two overlap.
        """
        if self._lock.lost:  # the server went away while we were idle
            raise DatabaseUnavailable("PostgreSQL: connection lost")
        conn = self._lock.connection
        ahead, self._ahead = self._ahead, None
        batch = await (ahead if ahead is not None else self._read())
        self._ahead = asyncio.create_task(self._read())
        if batch.moved:
            await self._commit(conn, batch)
        return len(batch.records)

    async def _read(self) -> _Batch:
        """The next records, decoded, and how far they move each partition."""
        if (rest := self._linger_until - time.monotonic()) > 0:
            await asyncio.sleep(rest)
        records = await self._source.fetch(max_records=self.max_batch, timeout_ms=FETCH_TIMEOUT_MS)
        read_at_ns = time.time_ns()
        now = time.monotonic()
        small = 0 < len(records) < LINGER_BELOW
        self._linger_until = now + self.linger_s if small and self._following else 0.0
        if records or now - self._heard_from_broker > PROBE_IDLE_S:
            if not records:
                await self._source.probe()  # quiet topics, or no broker?
            self._heard_from_broker = now
            self._kafka.recovered()
        positions = await self._source.positions()
        if self._limits or self._cutoff_ms is not None:
            records = self._within_bounds(records, positions)
        moved = {tp: at for tp, at in positions.items() if at != self._read_to.get(tp)}
        self._read_to.update(moved)
        changes = Changes()
        for start in range(0, len(records), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)  # let the commit of the previous batch go on
            self._decode(records[start : start + DECODE_SLICE], changes)
        return _Batch(records, moved, changes, read_at_ns)

    def _within_bounds(
        self, records: list[Consumed], positions: dict[TopicPartition, int]
    ) -> list[Consumed]:
        """``records`` short of the bounds; ``positions`` clamped to them (in place)."""
        limits, cutoff = self._limits, self._cutoff_ms
        kept: list[Consumed] = []
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            limit = limits.get(tp)
            if limit is not None and record.offset >= limit:
                continue
            stamp = getattr(record, "timestamp", None)
            if cutoff is not None and stamp is not None and stamp >= cutoff:
                limits[tp] = record.offset  # this partition ends here
                continue
            kept.append(record)
        for tp, limit in limits.items():
            if tp in positions and positions[tp] > limit:
                positions[tp] = limit
        return kept

    async def _commit(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        with unavailable():
            try:
                async with conn.transaction():
                    await self._same_schema(conn)
                    await store.apply(conn, batch.changes)
                    await store.save_positions(conn, batch.moved)
            except REFUSED:
                # A record PostgreSQL refuses (a NUL in text, a number beyond its column)
                # must not wedge every later batch: fold the rest and dead-letter only
                # the refused ones.
                async with conn.transaction():
                    await self._same_schema(conn)
                    await self._bisect(conn, batch.records)
                    await store.save_positions(conn, batch.moved)
        self._committed().update(batch.moved)
        _count(batch.records)
        for record in batch.changes.ended:  # a task's last hop: its end visible to readers
            tracing.done("project", record.headers, batch.read_at_ns, record.topic)
        self._backoff.reset()
        self._postgres.recovered()
        self.batches.set()

    async def _same_schema(self, conn: asyncpg.Connection) -> None:
        """Take the swap lock shared for this transaction; :class:`SchemaSwapped` if the
        schema is not the one positioned in any more (a rebuild swapped it)."""
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", self._swap_key)
        # A statement of its own: its snapshot is taken after the lock was granted, so it
        # sees a swap that committed while this batch waited.
        if await conn.fetchval(_SCHEMA_OID) != self._schema_oid:
            raise SchemaSwapped(self.schema)

    def _decode(self, records: list[Consumed], changes: Changes) -> Changes:
        """Add what ``records`` do to the read models to ``changes``, bad ones dead-lettered."""
        expected = self.expected
        for record in records:
            try:
                envelope, event = self.codec.decode(record.value)
            except SchemaError as exc:
                changes.reject(record, str(exc), "SchemaError")
                continue
            if isinstance(event, CONTROL_COMMANDS) and (reason := invalid_command(event)):
                changes.reject(record, reason, "InvalidCommand")  # refused everywhere else
            elif isinstance(event, expected.get(record.topic, ())):
                changes.add(envelope, event, record)
                # A task's end is its trace's last hop: one ``project`` span per traced
                # task, not one per record (~75 µs a span).
                if isinstance(event, TASK_ENDINGS):
                    changes.ended.append(record)
            else:
                # Folding it would put it in the wrong table (a HALT on the tasks topic
                # would read as a system event); skipping it would lose it silently.
                reason = f"{event.TYPE} is not projected from {record.topic}"
                changes.reject(record, reason, "InvalidEvent")
        return changes

    async def _bisect(self, conn: asyncpg.Connection, records: list[Consumed]) -> None:
        """Apply ``records`` in savepoints, halving on refusal, so that only the records
        PostgreSQL refuses are dead-lettered (in about 2 log2(n) attempts, not n)."""
        try:
            async with conn.transaction():
                await store.apply(conn, self._decode(records, Changes()))
        except REFUSED as exc:
            if len(records) > 1:
                half = len(records) // 2
                await self._bisect(conn, records[:half])
                await self._bisect(conn, records[half:])
                return
            refused = Changes()
            refused.reject(records[0], f"read model refused it: {exc}", type(exc).__name__)
            await store.apply(conn, refused)


_SCHEMA_OID = "SELECT oid FROM pg_namespace WHERE nspname = current_schema()"


def _discard(task: asyncio.Task[_Batch]) -> None:
    """Retrieve a dropped read-ahead's outcome: it is stale, whatever it was."""
    if not task.cancelled():
        task.exception()


async def _pause(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleep, but wake at once when ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def _count(records: list[Consumed]) -> None:
    metrics.projection_batch.observe(len(records))
    for topic, n in Counter(r.topic for r in records).items():
        metrics.projected.labels(topic).inc(n)
