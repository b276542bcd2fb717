"""The projector's folding: coalesced batches give the rows that one event per
transaction gives, bad records become dead letters (tombstones apart from empty
values), and records of aborted Kafka transactions never reach a read model.

Each test has an installation of its own (topic prefix, so topics and read-model
schema), written to directly, so that it knows exactly what history it folds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from conclave.bus import ensure_topics, topics_for
from conclave.domain.events import (
    AgentOutput,
    AgentRegistered,
    DeadLetterRecord,
    Event,
    Halt,
    Heartbeat,
    HostBeat,
    Priority,
    Resume,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskFailed,
    TaskQueued,
    WitnessEntry,
    new_envelope,
)
from conclave.settings import Settings
from conclave.topics import Topics
from projections.database import MIGRATIONS, NewerDatabase, connect, migrate, schema_for
from projections.projector import Projector
from schemas.codec import default_codec
from tests.integration.conftest import eventually
from tests.integration.test_rebuild import snapshot
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration

Produced = tuple[str, str, bytes | None]
"""(topic, key, value) of one record to produce; ``None`` is a tombstone."""


@dataclass
class Installation:
    """A topic prefix of its own: its topics and its read-model schema."""

    settings: Settings
    pool: asyncpg.Pool
    clock: int = 1_800_000_000_000_000
    pools: list[asyncpg.Pool] = field(default_factory=list)

    @property
    def topics(self) -> Topics:
        return topics_for(self.settings)

    @property
    def schema(self) -> str:
        return schema_for(self.settings)

    def encode(self, event: Event, *, at: int | None = None) -> bytes:
        """``event`` as a processor would write it, at ``at`` (default: the next tick)."""
        self.clock += 10
        envelope = new_envelope(
            event.TYPE, tenant="t", producer="test", occurred_at=self.clock if at is None else at
        )
        return default_codec().encode(envelope, event)

    async def produce(self, records: Iterable[Produced]) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all", linger_ms=5
        )
        await producer.start()
        try:
            futures = [
                await producer.send(topic, value=value, key=key.encode())
                for topic, key, value in records
            ]
            for future in futures:
                await future
        finally:
            await producer.stop()

    async def pool_for(self, schema: str) -> asyncpg.Pool:
        """A pool on another schema of the same database (a shadow read model)."""
        pool = await connect(self.settings, schema=schema)
        await migrate(pool)
        self.pools.append(pool)
        return pool

    async def fold(self, pool: asyncpg.Pool | None = None, *, max_batch: int = 5000) -> int:
        """Fold everything there is into ``pool``'s schema (default: the installation's)."""
        projector = Projector(self.settings, pool or self.pool, max_batch=max_batch)
        await projector.start()
        try:
            return await projector.catch_up()
        finally:
            await projector.stop()


@contextlib.asynccontextmanager
async def installation(settings: Settings, partitions: int = 1) -> AsyncIterator[Installation]:
    own = settings.with_(topic_prefix=f"p{secrets.token_hex(4)}", partitions=partitions)
    await ensure_topics(own)
    pool = await connect(own)
    await migrate(pool)
    fresh = Installation(own, pool)
    try:
        yield fresh
    finally:
        for other in (pool, *fresh.pools):
            await other.close()


@pytest.fixture
async def fresh(settings: Settings) -> AsyncIterator[Installation]:
    async with installation(settings, partitions=3) as it:
        yield it


def task_history(it: Installation, tasks: int, *, start: int = 0) -> list[Produced]:
    """What ``tasks`` ordinary tasks leave on the history topics (as the bench's)."""
    t = it.topics
    out: list[Produced] = []
    for i in range(start, start + tasks):
        task_id, agent = f"task-{i:05d}", f"agent-{i % 4}"
        out += [
            (t.tasks, task_id, it.encode(_queued(task_id))),
            (t.tasks, task_id, it.encode(_dispatched(task_id, agent, 1))),
            (t.outputs, task_id, it.encode(_output(task_id, agent, 1, f"answer {i}"))),
            (t.witness, "w", it.encode(_entry(i + 1, f"out-{i}", task_id, agent))),
            (t.tasks, task_id, it.encode(_completed(task_id, agent, i + 1))),
        ]
        if i % 3 == 0:
            out.append((t.heartbeats, agent, it.encode(_beat(agent, task_id))))
    return out


def _host_beats(it: Installation, rng: random.Random) -> list[Produced]:
    """Two hosts' beats, each a heartbeat of every agent it names, at times no other beat
    or heartbeat shares (a tie between topics would make the order matter)."""
    out: list[Produced] = []
    agents = [f"agent-{a}" for a in range(6)]
    for host, odd in (("h1", 1), ("h2", 3)):  # a host's beat is its agents' heartbeat
        for _ in range(rng.randrange(0, 4)):
            at = it.clock + 4 * rng.randrange(-1_250, 1_250) + odd  # no two at one time
            running = {a: f"task-{rng.randrange(60):03d}" for a in agents if rng.random() < 0.3}
            beat = HostBeat(
                host_id=host, pool="p", agent_ids=agents, expires_at=at, running=running
            )
            out.append((it.topics.agents, host, it.encode(beat, at=at)))
    return out


def adversarial_history(it: Installation, seed: int) -> list[Produced]:
    """Histories whose rows depend on order and on first-write-wins: retries, late and
    duplicated events, events of unknown tasks, beats out of time order, registrations
    after beats, witness entries that collide, bad records in between."""
    rng = random.Random(seed)
    t = it.topics
    out: list[Produced] = []
    for i in range(60):
        task_id, agent = f"task-{i:03d}", f"agent-{rng.randrange(6)}"
        script = rng.choice(["plain", "retry", "dead", "late", "orphan", "dup"])
        steps: list[bytes] = []
        if script != "orphan":
            steps.append(it.encode(_queued(task_id)))
        steps.append(it.encode(_dispatched(task_id, agent, 1)))
        if script == "retry":
            steps += [it.encode(_queued(task_id)), it.encode(_dispatched(task_id, agent, 2))]
        if script == "dead":
            steps.append(it.encode(TaskDeadLettered(
                task_id=task_id, agent_id=agent, attempts=1, reason="boom", witness_sequence=i
            )))  # fmt: skip
        else:
            steps.append(it.encode(_completed(task_id, agent, i)))
        if script == "late":  # stale events after the terminal one change nothing
            steps += [
                it.encode(_dispatched(task_id, agent, 3)),
                it.encode(_queued(task_id)),
                it.encode(TaskDeadLettered(
                    task_id=task_id, agent_id=agent, attempts=3, reason="late", witness_sequence=0
                )),
            ]  # fmt: skip
        if script == "orphan":  # nothing to update until the task is queued
            steps.append(it.encode(_queued(task_id)))
        if script == "dup":
            steps = [s for step in steps for s in (step, step)]
        out += [(t.tasks, task_id, step) for step in steps]
        output = it.encode(_output(task_id, agent, 1, f"answer {i}"))
        out += [(t.outputs, task_id, output)] * rng.choice([1, 2])
        if rng.random() < 0.3:
            failed = TaskFailed(
                task_id=task_id,
                agent_id=agent,
                attempt=1,
                error_type="E",
                error_message=f"failed {i}",
                deliberation_id=None,
            )
            out.append((t.outputs, task_id, it.encode(failed)))
    for n in range(1, 41):  # collisions: a sequence twice, a subject twice
        subject = f"subject-{n if n % 7 else n - 1}"
        out.append((t.witness, "w", it.encode(_entry(n, subject, None, None))))
        if n % 5 == 0:
            out.append((t.witness, "w", it.encode(_entry(n, f"other-{n}", None, None))))
    for a in range(6):
        agent = f"agent-{a}"
        for _ in range(rng.randrange(1, 6)):
            at = it.clock + 2 * rng.randrange(-2_500, 2_500)  # even: no tie with a host's
            out.append((t.heartbeats, agent, it.encode(_beat(agent, None), at=at)))
        for host in ("h1", "h2")[: rng.randrange(0, 3)]:
            registered = AgentRegistered(agent_id=agent, pool="p", host_id=host, agent_ref="m:f")
            out.append((t.agents, agent, it.encode(registered)))
    out += _host_beats(it, rng)
    out += [
        (t.control, "system", it.encode(Halt(reason="stop", operator="o"))),
        (t.control, "system", it.encode(Resume(reason="go", operator="o"))),
        (t.tasks, "junk", b"not avro"),
        (t.tasks, "junk", None),
        (t.deadletter, "x", it.encode(_letter(b"\x00bad", 1))),
        (t.deadletter, "x", it.encode(_letter(None, 2))),
        (t.deadletter, "x", it.encode(_letter(None, 2))),
    ]
    # Interleave the topics as a busy system would, keeping each key's records in order.
    by_key: dict[tuple[str, str], list[Produced]] = {}
    for topic, key, value in out:
        by_key.setdefault((topic, key), []).append((topic, key, value))
    mixed: list[Produced] = []
    queues = list(by_key.values())
    while queues:
        queue = rng.choice(queues)
        mixed.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return mixed


async def test_coalesced_batches_give_the_rows_of_one_event_per_transaction(
    fresh: Installation,
) -> None:
    await fresh.produce(adversarial_history(fresh, seed=6))
    one_by_one = await fresh.pool_for(f"{fresh.schema}_single")

    batched_count = await fresh.fold(max_batch=5000)
    single_count = await fresh.fold(one_by_one, max_batch=1)

    assert batched_count == single_count
    batched, single = await snapshot(fresh.pool), await snapshot(one_by_one)
    for table, rows in single.items():
        assert batched[table] == rows, f"{table} differs between batched and one-by-one folding"
    statuses = {r[0]: r[5] for r in batched["tasks"]}
    assert "queued" in statuses.values()  # orphans: queued after their dispatch
    late = await fresh.pool.fetch("SELECT status FROM tasks WHERE error = 'late'")
    assert late == []  # nothing after a terminal event changed a terminal status


async def test_folding_in_many_batches_equals_folding_at_once(fresh: Installation) -> None:
    history = adversarial_history(fresh, seed=7)
    at_once = await fresh.pool_for(f"{fresh.schema}_at_once")
    # The installation's schema folds after every slice, the shadow one once at the end.
    for start in range(0, len(history), 97):
        await fresh.produce(history[start : start + 97])
        await fresh.fold(max_batch=13)
    await fresh.fold(at_once)
    assert await snapshot(fresh.pool) == await snapshot(at_once)


async def test_tombstones_and_empty_values_on_every_history_topic_are_dead_letters(
    fresh: Installation,
) -> None:
    t = fresh.topics
    valid = task_history(fresh, 1)
    bad: list[Produced] = [(topic, "k", value) for topic in t.history for value in (None, b"")]
    await fresh.produce([*bad, *valid])
    await fresh.fold()

    rows = await fresh.pool.fetch(
        "SELECT * FROM dead_letters WHERE processor = 'projector' ORDER BY source_topic"
    )
    letters = {(r["source_topic"], None if r["original"] is None else bytes(r["original"])): r
               for r in rows}  # fmt: skip
    assert len(rows) == 2 * len(t.history)
    for topic in t.history:
        tombstone, empty = letters[(topic, None)], letters[(topic, b"")]
        assert "tombstone" in tombstone["reason"]
        assert "empty value" in empty["reason"]
        assert tombstone["error_type"] == empty["error_type"] == "SchemaError"
    assert await fresh.pool.fetchval("SELECT status FROM tasks") == "completed"
    assert await fresh.pool.fetchval("SELECT count(*) FROM witness_entries") == 1


async def test_a_refused_record_in_a_large_batch_is_the_only_dead_letter(
    fresh: Installation,
) -> None:
    history = task_history(fresh, 300)
    refused = fresh.encode(_output("task-refused", "a", 1, "nul \x00 inside"))
    history.insert(700, (fresh.topics.outputs, "task-refused", refused))
    await fresh.produce(history)
    assert await fresh.fold() == len(history)
    letters = await fresh.pool.fetch("SELECT * FROM dead_letters")
    assert [(bytes(r["original"]), r["error_type"]) for r in letters] == [
        (refused, "CharacterNotInRepertoireError")
    ]
    assert await fresh.pool.fetchval("SELECT count(*) FROM outputs") == 300
    assert await fresh.pool.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'") == 300


async def test_records_of_aborted_transactions_never_reach_the_read_models(
    fresh: Installation,
) -> None:
    t = fresh.topics
    producer = AIOKafkaProducer(
        bootstrap_servers=fresh.settings.kafka_bootstrap,
        transactional_id=f"test-{secrets.token_hex(4)}",
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(t.tasks, fresh.encode(_queued("committed")), key=b"committed")
        await producer.begin_transaction()
        await producer.send(t.tasks, fresh.encode(_queued("aborted")), key=b"aborted")
        await producer.send(t.witness, fresh.encode(_entry(1, "aborted", None, None)), key=b"w")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(t.tasks, fresh.encode(_queued("after")), key=b"after")
    finally:
        await producer.stop()

    await fresh.fold()  # returns although transaction markers end the partitions

    ids = {r["task_id"] for r in await fresh.pool.fetch("SELECT task_id FROM tasks")}
    assert ids == {"committed", "after"}
    assert await fresh.pool.fetchval("SELECT count(*) FROM witness_entries") == 0


# -- events ---------------------------------------------------------------------------------


def _queued(task_id: str) -> TaskQueued:
    return TaskQueued(
        task_id=task_id,
        pool="p",
        priority=Priority.NORMAL,
        input=f"input of {task_id}",
        agent_id=None,
        max_attempts=3,
        deliberation_id=None,
        sequence=0,
    )


def _dispatched(task_id: str, agent: str, attempt: int) -> TaskDispatched:
    return TaskDispatched(
        task_id=task_id,
        pool="p",
        agent_id=agent,
        host_id="h1",
        attempt=attempt,
        input="x",
        deliberation_id=None,
    )


def _completed(task_id: str, agent: str, sequence: int) -> TaskCompleted:
    return TaskCompleted(
        task_id=task_id, agent_id=agent, output_event_id=f"out-{task_id}", witness_sequence=sequence
    )


def _output(task_id: str, agent: str, attempt: int, content: str) -> AgentOutput:
    return AgentOutput(
        task_id=task_id,
        agent_id=agent,
        attempt=attempt,
        content=content,
        latency_us=1000,
        deliberation_id=None,
    )


def _entry(sequence: int, subject: str, task_id: str | None, agent: str | None) -> WitnessEntry:
    return WitnessEntry(
        sequence=sequence,
        previous_hash=bytes(32),
        entry_hash=sequence.to_bytes(32, "big"),
        subject_type="agent.output",
        subject_event_id=subject,
        subject_digest=bytes(32),
        recorded_at=sequence,
        task_id=task_id,
        agent_id=agent,
        detail="",
        attempt=1,
    )


def _beat(agent: str, task_id: str | None) -> Heartbeat:
    return Heartbeat(agent_id=agent, host_id="h0", task_id=task_id, rss_bytes=1 << 20)


def _letter(original: bytes | None, offset: int) -> DeadLetterRecord:
    return DeadLetterRecord(
        reason="bad",
        error_type="SchemaError",
        original=original,
        source_topic="elsewhere",
        source_partition=0,
        source_offset=offset,
        processor="scheduler",
    )


async def test_a_database_migrated_by_a_newer_conclave_is_refused_and_left_alone(
    fresh: Installation,
) -> None:
    await fresh.pool.execute("INSERT INTO schema_migrations (name) VALUES ('999_future.sql')")
    with pytest.raises(NewerDatabase, match=r"newer Conclave \(999_future.sql unknown here\)"):
        await migrate(fresh.pool)
    assert await migrate_names(fresh.pool) == {"999_future.sql", *_shipped()}
    result = await asyncio.to_thread(cli, fresh.settings, "db", "migrate")
    assert result.returncode != 0
    assert "newer Conclave" in result.stderr
    assert "Traceback" not in result.stderr


async def migrate_names(pool: asyncpg.Pool) -> set[str]:
    return {r["name"] for r in await pool.fetch("SELECT name FROM schema_migrations")}


def _shipped() -> set[str]:
    return {p.name for p in MIGRATIONS.glob("*.sql")}


async def test_records_that_trickle_in_share_transactions_while_following(
    fresh: Installation,
) -> None:
    """Live, a small batch makes the next read wait (the linger): records arriving one by
    one are folded a few per transaction instead of one each, and all of them land."""
    history = task_history(fresh, 4)
    projector = Projector(fresh.settings, fresh.pool, linger_s=0.25)
    await projector.start()
    stop = asyncio.Event()
    following = asyncio.create_task(projector.run(stop))
    producer = AIOKafkaProducer(bootstrap_servers=fresh.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        before = _batches()
        for topic, key, value in history:
            await producer.send_and_wait(topic, value=value, key=key.encode())
            await asyncio.sleep(0.03)
        await eventually(lambda: _finished(fresh.pool, 4))
        commits = _batches() - before
    finally:
        await producer.stop()
        stop.set()
        await following
        await projector.stop()
    assert 1 <= commits <= len(history) // 3, f"{len(history)} records in {commits} transactions"


async def _finished(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'") >= n)


def _batches() -> float:
    """Transactions the projectors of this process committed so far."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("conclave_projection_batch_size_count")
    return value or 0.0
