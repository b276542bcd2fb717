"""How a processor takes its input, without a broker: a burst on one partition does not
hold back another's records, and the scheduler judges no host lost while beats are
written and not yet read (both once dead-lettered a whole host's tasks in the chains
workload: its beats sat behind 20,000 commands for longer than its lease)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from conclave.domain.events import AgentRegistered, Event, HostBeat, HostLost
from conclave.feed import Feed, Subscription
from conclave.records import Record
from conclave.settings import Settings
from conclave.topics import Topics
from schemas.codec import default_codec
from streams.core import Emitter
from streams.scheduler import HOST_GRACE_US, SchedulerShard

TOPICS = Topics(prefix="unit")
START = 1_700_000_000_000_000
LEASE_US = 5_000_000
FEED = Feed(Settings(kafka_bootstrap="localhost:9092", database_url="postgresql:///unit"))
"""Never started: a subscription only tells it when it closes."""


def _message(tp: TopicPartition, offset: int) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, b"", None, 0, 0, [])


def test_a_burst_on_one_partition_does_not_hold_back_another() -> None:
    commands, agents = TopicPartition("commands", 0), TopicPartition("agents", 0)
    subscription = Subscription(FEED, {commands: 0, agents: 0})
    subscription._offer(commands, [_message(commands, i) for i in range(12_000)])
    subscription._offer(agents, [_message(agents, i) for i in range(3)])

    first = _take(subscription, 5_000)

    assert [m.offset for m in first[agents]] == [0, 1, 2]
    assert [m.offset for m in first[commands]] == list(range(4_997))
    assert subscription.buffered(commands) == 12_000 - 4_997
    assert subscription.buffered(agents) == 0
    rest = _take(subscription, 100_000)
    assert [m.offset for m in rest[commands]] == list(range(4_997, 12_000))


def _take(subscription: Subscription, max_records: int) -> dict[TopicPartition, list[Any]]:
    return asyncio.run(subscription.get(timeout_ms=0, max_records=max_records))


def _shard() -> SchedulerShard:
    shard = SchedulerShard(TOPICS, 0, 8, Emitter(default_codec(), TOPICS, "scheduler", "default"))
    shard.restore(None)
    return shard


def _record(shard: SchedulerShard, event: Event, offset: int, at: int) -> Record:
    out = shard.emitter.event(TOPICS.agents, 0, "key", event, now=at, causation=None)
    return Record(TOPICS.agents, 0, offset, out.key.encode(), out.value, out.headers)


def _lost(records: list[Any]) -> list[str]:
    decoded = (default_codec().decode(o.value) for o in records if o.topic == TOPICS.tasks)
    return [event.host_id for _, event in decoded if isinstance(event, HostLost)]


def test_no_host_is_judged_lost_while_its_beats_are_unread() -> None:
    shard = _shard()
    beats = TopicPartition(TOPICS.agents, 0)
    registered = AgentRegistered(agent_id="a-1", pool="p", host_id="h", agent_ref="")
    beat = HostBeat(host_id="h", pool="p", agent_ids=["a-1"], expires_at=START + LEASE_US)
    shard.step([_record(shard, registered, 0, START), _record(shard, beat, 1, START)], START, {})
    # Well past the lease and the grace after starting, beats written and not read yet:
    later = START + LEASE_US + HOST_GRACE_US + 1_000_000
    for t in range(START + 1_000_000, later, 1_000_000):
        assert _lost(shard.step([], t, {beats: 2})) == []

    assert _lost(shard.step([], later, {beats: 0})) == ["h"]
