"""The projector: folds the history topics into the PostgreSQL read models.

Each batch of records is applied in one transaction together with the next
offsets to read, so the read models and the position never disagree: after a
crash the projector resumes exactly where its last transaction ended. The
consumer uses manual assignment and positions from PostgreSQL, not a group.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import new_consumer, topics_for
from conclave.domain.events import (
    AgentOutput,
    AgentRegistered,
    DeadLetterRecord,
    Envelope,
    Halt,
    Heartbeat,
    Resume,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskFailed,
    TaskQueued,
    WitnessEntry,
)
from conclave.errors import BrokerUnavailable, SchemaError
from conclave.records import Record
from conclave.settings import Settings
from schemas.codec import Codec, default_codec

__all__ = ["Projector"]

Progress = Callable[[int, int], None]


class Projector:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, codec: Codec | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.codec = codec or default_codec()
        self.topics = topics_for(settings)
        self.expected: dict[str, tuple[type[Any], ...]] = {
            self.topics.agents: (AgentRegistered,),
            self.topics.heartbeats: (Heartbeat,),
            self.topics.tasks: (TaskQueued, TaskDispatched, TaskCompleted, TaskDeadLettered),
            self.topics.outputs: (AgentOutput, TaskFailed),
            self.topics.witness: (WitnessEntry,),
            self.topics.deadletter: (DeadLetterRecord,),
            self.topics.control: (Halt, Resume),
        }
        """What each history topic carries; every type here has a statement below."""
        self.consumer: AIOKafkaConsumer | None = None
        self.partitions: list[TopicPartition] = []
        self._conn: asyncpg.Connection | None = None
        self.batches = asyncio.Event()
        """Set after every committed batch; readers clear it and wait for the next."""

    async def start(self) -> None:
        consumer = new_consumer(
            self.settings, auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 2**20
        )
        try:
            await consumer.start()
            await consumer.topics()
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable"
            ) from exc
        self.partitions = [
            TopicPartition(topic, p)
            for topic in self.topics.history
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(self.partitions)
        stored = await self._stored_offsets()
        for tp in self.partitions:
            if tp in stored:
                consumer.seek(tp, stored[tp])
            else:
                await consumer.seek_to_beginning(tp)
        self.consumer = consumer

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        if self._conn is not None:
            await self.pool.release(self._conn)
            self._conn = None

    async def _connection(self) -> asyncpg.Connection:
        """One connection held for the projector's life: a pool acquire per batch costs a
        session reset round trip each time, on the hot path."""
        if self._conn is None:
            self._conn = await self.pool.acquire()
        return self._conn

    async def _stored_offsets(self) -> dict[TopicPartition, int]:
        rows = await self.pool.fetch("SELECT topic, partition, next_offset FROM projection_offsets")
        return {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def step(self, timeout_ms: int = 200) -> int:
        """Fetch and apply one batch in one transaction; returns the records applied."""
        assert self.consumer is not None, "start() first"
        batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=1000)
        records = [Record.of(m) for msgs in batch.values() for m in msgs]
        if not records:
            return 0
        rows = [(record, row) for record in records if (row := self._row(record)) is not None]
        conn = await self._connection()
        try:
            async with conn.transaction():
                # Consecutive rows for the same statement go in one round trip; the order
                # of statements (and so of one task's updates) is the order of the records.
                for sql, group in itertools.groupby(rows, key=lambda row: row[1][0]):
                    await conn.executemany(sql, [args for _, (_, args) in group])
                await _save_offsets(conn, batch)
        except asyncpg.DataError:
            # A record PostgreSQL refuses (a NUL in text, say) must not wedge every later
            # batch: apply this one record by record and dead-letter the refused ones.
            async with conn.transaction():
                for record, (sql, args) in rows:
                    try:
                        async with conn.transaction():  # a savepoint per record
                            await conn.execute(sql, *args)
                    except asyncpg.DataError as exc:
                        await conn.execute(
                            _UNPROJECTABLE,
                            record.topic,
                            record.partition,
                            record.offset,
                            f"read model refused it: {exc}",
                            type(exc).__name__,
                            record.value,
                        )
                await _save_offsets(conn, batch)
        self.batches.set()
        return len(records)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step()

    async def lag(self) -> int:
        """Records on the history topics not yet folded."""
        assert self.consumer is not None
        ends = await self.consumer.end_offsets(self.partitions)
        total = 0
        for tp in self.partitions:
            total += max(0, ends[tp] - await self.consumer.position(tp))
        return total

    async def catch_up(self, progress: Progress | None = None) -> int:
        """Apply everything up to the current end of the history topics."""
        assert self.consumer is not None
        ends = await self.consumer.end_offsets(self.partitions)
        total = sum(ends.values())
        applied = 0
        while True:
            behind = [tp for tp in self.partitions if await self.consumer.position(tp) < ends[tp]]
            if not behind:
                return applied
            applied += await self.step()
            if progress is not None:
                done = sum([await self.consumer.position(tp) for tp in self.partitions])
                progress(min(done, total), total)

    def _row(self, record: Record) -> tuple[str, tuple[Any, ...]] | None:
        """The statement and arguments that fold one record, or ``None`` to skip it."""
        try:
            envelope, event = self.codec.decode(record.value)
        except SchemaError as exc:
            if record.topic == self.topics.deadletter:
                return None  # never dead-letter a dead letter; it is already kept in Kafka
            return _UNPROJECTABLE, (
                record.topic,
                record.partition,
                record.offset,
                str(exc),
                "SchemaError",
                record.value,
            )
        if not isinstance(event, self.expected.get(record.topic, ())):
            # Folding it would put it in the wrong table (a HALT on the tasks topic would
            # read as a system event); skipping it would lose it silently.
            return _UNPROJECTABLE, (
                record.topic,
                record.partition,
                record.offset,
                f"{event.TYPE} is not projected from {record.topic}",
                "InvalidEvent",
                record.value,
            )
        sql, arguments = _STATEMENTS[type(event)]
        return sql, arguments(envelope, event)


_UNPROJECTABLE = """
    INSERT INTO dead_letters (source_topic, source_partition, source_offset, processor,
        reason, error_type, original, recorded_at)
    VALUES ($1, $2, $3, 'projector', $4, $5, $6, 0) ON CONFLICT DO NOTHING"""


async def _save_offsets(
    conn: asyncpg.Connection, batch: Mapping[TopicPartition, list[Any]]
) -> None:
    """The next offset of every partition in ``batch``, in the batch's transaction."""
    await conn.executemany(
        """INSERT INTO projection_offsets (topic, partition, next_offset)
           VALUES ($1, $2, $3) ON CONFLICT (topic, partition)
           DO UPDATE SET next_offset = EXCLUDED.next_offset""",
        [(tp.topic, tp.partition, msgs[-1].offset + 1) for tp, msgs in batch.items() if msgs],
    )


Arguments = Callable[[Envelope, Any], tuple[Any, ...]]

_SYSTEM = """INSERT INTO system_events (event_id, kind, reason, operator, occurred_at)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"""

_STATEMENTS: Mapping[type[Any], tuple[str, Arguments]] = {
    TaskQueued: (
        """INSERT INTO tasks (task_id, tenant, correlation_id, pool, priority, status, input,
               agent_id, attempt, max_attempts, deliberation_id, queued_at)
           VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, 0, $8, $9, $10)
           ON CONFLICT (task_id) DO UPDATE SET status = 'queued', queued_at = EXCLUDED.queued_at""",
        lambda env, e: (
            e.task_id,
            env.tenant,
            env.correlation_id,
            e.pool,
            e.priority.label,
            e.input,
            e.agent_id,
            e.max_attempts,
            e.deliberation_id,
            env.occurred_at,
        ),
    ),
    TaskDispatched: (
        """UPDATE tasks SET status = 'dispatched', agent_id = $2, attempt = $3, dispatched_at = $4
           WHERE task_id = $1 AND status NOT IN ('completed', 'dead_lettered')""",
        lambda env, e: (e.task_id, e.agent_id, e.attempt, env.occurred_at),
    ),
    TaskCompleted: (
        """UPDATE tasks SET status = 'completed', output_event_id = $2, witness_sequence = $3,
               finished_at = $4 WHERE task_id = $1""",
        lambda env, e: (e.task_id, e.output_event_id, e.witness_sequence, env.occurred_at),
    ),
    TaskDeadLettered: (
        """UPDATE tasks SET status = 'dead_lettered', error = $2, witness_sequence = $3,
               finished_at = $4 WHERE task_id = $1""",
        lambda env, e: (e.task_id, e.reason, e.witness_sequence, env.occurred_at),
    ),
    AgentOutput: (
        """INSERT INTO outputs (event_id, task_id, agent_id, attempt, content, latency_us,
               deliberation_id, produced_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT DO NOTHING""",
        lambda env, e: (
            env.event_id,
            e.task_id,
            e.agent_id,
            e.attempt,
            e.content,
            e.latency_us,
            e.deliberation_id,
            env.occurred_at,
        ),
    ),
    TaskFailed: (
        """INSERT INTO task_failures (event_id, task_id, agent_id, attempt, error_type,
               error_message, failed_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT DO NOTHING""",
        lambda env, e: (
            env.event_id,
            e.task_id,
            e.agent_id,
            e.attempt,
            e.error_type,
            e.error_message,
            env.occurred_at,
        ),
    ),
    WitnessEntry: (
        """INSERT INTO witness_entries (sequence, previous_hash, entry_hash, subject_type,
               subject_event_id, subject_digest, recorded_at, task_id, agent_id, detail, attempt)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING""",
        lambda env, e: (
            e.sequence,
            e.previous_hash,
            e.entry_hash,
            e.subject_type,
            e.subject_event_id,
            e.subject_digest,
            e.recorded_at,
            e.task_id,
            e.agent_id,
            e.detail,
            e.attempt,
        ),
    ),
    AgentRegistered: (
        """INSERT INTO agents (agent_id, pool, host_id, agent_ref, registered_at)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (agent_id) DO UPDATE SET pool = EXCLUDED.pool, host_id = EXCLUDED.host_id,
               agent_ref = EXCLUDED.agent_ref, registered_at = EXCLUDED.registered_at""",
        lambda env, e: (e.agent_id, e.pool, e.host_id, e.agent_ref, env.occurred_at),
    ),
    Heartbeat: (
        """INSERT INTO agents (agent_id, host_id, last_heartbeat_at, current_task_id, rss_bytes)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (agent_id) DO UPDATE SET last_heartbeat_at = EXCLUDED.last_heartbeat_at,
               current_task_id = EXCLUDED.current_task_id, rss_bytes = EXCLUDED.rss_bytes
           WHERE coalesce(agents.last_heartbeat_at, 0) <= EXCLUDED.last_heartbeat_at""",
        lambda env, e: (e.agent_id, e.host_id, env.occurred_at, e.task_id, e.rss_bytes),
    ),
    Halt: (
        _SYSTEM,
        lambda env, e: (env.event_id, e.TYPE, e.reason, e.operator, env.occurred_at),
    ),
    Resume: (_SYSTEM, lambda env, e: (env.event_id, e.TYPE, e.reason, e.operator, env.occurred_at)),
    DeadLetterRecord: (
        """INSERT INTO dead_letters (source_topic, source_partition, source_offset, processor,
               reason, error_type, original, recorded_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING""",
        lambda env, e: (
            e.source_topic,
            e.source_partition,
            e.source_offset,
            e.processor,
            e.reason,
            e.error_type,
            e.original,
            env.occurred_at,
        ),
    ),
}
