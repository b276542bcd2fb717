"""The system at a glance, for ``conclave status``: what an operator asks first.

Gathered from the three places that know, each for what it knows best:

* **Kafka**: how far each processor is behind (its committed positions against the
  ends of its inputs) — true wherever the processors run;
* **the read models**: pools and queues, agents and hosts by state, the halt, the
  witness head, dead letters of the last hour;
* **this machine's run files**: the Conclave processes running here and where they
  serve metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import committed_positions, new_consumer, topics_for
from conclave.errors import BrokerUnavailable
from conclave.processes import alive
from conclave.settings import Settings
from projections import queries, store

__all__ = ["Lag", "Status", "gather"]

HOUR_US = 3_600_000_000


@dataclass(frozen=True, slots=True)
class Lag:
    processor: str
    """A shard (``scheduler-0``, ``witness-0``) or ``projector``."""
    records: int
    """Records on its inputs it has not processed (committed) yet."""
    partitions: int
    """Input partitions behind."""


@dataclass(frozen=True, slots=True)
class Process:
    kind: str
    name: str
    pid: int
    metrics_port: int | None


@dataclass(slots=True)
class Status:
    at: int
    """When gathered, µs since the epoch."""
    halted: bool
    halt_reason: str | None
    processes: list[Process]
    lag: list[Lag]
    pools: list[queries.PoolView]
    agents: dict[str, int]
    """Agent state -> how many."""
    hosts: dict[str, int]
    """Host state -> how many."""
    witness_head: int
    witness_head_at: int | None
    checkpoint_size: int | None
    """Entries the last signed checkpoint covers; ``None``: none published yet."""
    checkpoint_at: int | None
    checkpoint_origin: str | None
    dead_letters_last_hour: int
    bad_records_last_hour: int
    """Records dead-lettered as malformed (not tasks) in the last hour."""
    problems: list[str] = field(default_factory=list)
    """What could not be read (a broker down): the rest is still shown."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def gather(settings: Settings, db: asyncpg.Pool) -> Status:
    """Everything ``conclave status`` shows; a part that cannot be read is named in
    ``problems`` instead of failing the whole."""
    now = int(time.time() * 1e6)
    problems: list[str] = []
    try:
        lag = await processor_lag(settings, db)
    except BrokerUnavailable as exc:
        lag = []
        problems.append(f"lag unknown: {exc}")
    agents = await queries.list_agents(db, now, silent_after_us=settings.silent_after_us)
    hosts = await queries.list_hosts(db, now)
    system = await queries.system(db, since_us=now - HOUR_US)
    return Status(
        at=now,
        halted=system.halt_reason is not None,
        halt_reason=system.halt_reason,
        processes=[Process(p.kind, p.name, p.pid, p.metrics_port) for p in alive(settings.home)],
        lag=lag,
        pools=await queries.list_pools(db),
        agents=dict(Counter(a.state for a in agents)),
        hosts=dict(Counter(h.state for h in hosts)),
        witness_head=system.witness_head,
        witness_head_at=system.witness_head_at,
        checkpoint_size=system.checkpoint_size,
        checkpoint_at=system.checkpoint_at,
        checkpoint_origin=system.checkpoint_origin,
        dead_letters_last_hour=system.dead_lettered_since,
        bad_records_last_hour=system.bad_records_since,
        problems=problems,
    )


async def processor_lag(settings: Settings, db: asyncpg.Pool) -> list[Lag]:
    """How far each shard and the projector are behind, from what they committed."""
    from streams.worker import shard_inputs

    consumer = new_consumer(settings)
    try:
        await consumer.start()
        partitions = len(consumer.partitions_for_topic(topics_for(settings).tasks) or ()) or 1
        shards = shard_inputs(settings, partitions)
        committed = {
            name: await committed_positions(settings, f"{settings.topic_prefix}.{name}", inputs)
            for name, inputs in shards.items()
        }
        stored = await store.stored_positions(db)
        history = [
            TopicPartition(topic, p)
            for topic in topics_for(settings).history
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        wanted = {tp for inputs in shards.values() for tp in inputs} | set(history)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(list(wanted))
        lags = [
            await _behind(consumer, name, {tp: committed[name].get(tp, 0) for tp in inputs}, ends)
            for name, inputs in shards.items()
        ]
        projected = {tp: stored.get((tp.topic, tp.partition), 0) for tp in history}
        lags.append(await _behind(consumer, "projector", projected, ends))
    except KafkaError as exc:
        raise BrokerUnavailable(f"Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        await consumer.stop()
    return lags


async def _behind(
    consumer: Any, name: str, positions: dict[TopicPartition, int], ends: dict[TopicPartition, int]
) -> Lag:
    """Records between ``positions`` and the ends. A transactional write ends with a
    commit marker that takes an offset and is no record: where only markers are left,
    a short fetch finds nothing and the partition counts as caught up."""
    behind = {tp: ends[tp] - at for tp, at in positions.items() if ends.get(tp, 0) > at}
    if behind:
        consumer.assign(list(behind))
        for tp in behind:
            consumer.seek(tp, positions[tp])
        fetched = await consumer.getmany(timeout_ms=500)
        for tp in list(behind):
            if fetched.get(tp):
                continue
            async with asyncio.timeout(5):
                position = await consumer.position(tp)
            if position >= ends[tp]:
                del behind[tp]  # nothing but markers
    return Lag(name, sum(behind.values()), len(behind))
