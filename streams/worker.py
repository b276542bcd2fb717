"""A worker: runs the stream-processor shards that are its own, and takes over the shards
of workers that stopped beating.

Every shard (``scheduler-0`` .. ``scheduler-<n-1>``, ``witness-0``, ``coordination-0`` ..
``coordination-<n-1>``, ``workflows-0``) runs in exactly one
worker at a time. Which one is decided by :func:`conclave.domain.ownership.plan` from the
workers' beats, re-evaluated a few times a second: start one worker or ten, kill any of
them with -9, and the shards end up running again within a lease (5 s by default) plus
their recovery time, on the embedded broker as on Apache Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import EventProducer, ensure_topics, topics_for
from conclave.domain import ownership
from conclave.domain.events import now_us
from conclave.errors import BrokerUnavailable, ConfigError, Fenced
from conclave.feed import Feed
from conclave.outage import Outage
from conclave.settings import Settings
from conclave.transparency.keyfiles import read_signer
from schemas.codec import default_codec
from streams.coordination import CoordinationShard
from streams.core import Clock, Emitter, Shard, ShardRunner
from streams.membership import Membership
from streams.scheduler import SchedulerShard
from streams.witness import WitnessShard
from streams.workflows import WorkflowShard

__all__ = ["Worker", "build_shard", "shard_inputs", "shard_names"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_MS = 5_000


def shard_names(partitions: int) -> list[str]:
    return [
        *(f"scheduler-{i}" for i in range(partitions)),
        "witness-0",
        *(f"coordination-{i}" for i in range(partitions)),
        "workflows-0",
    ]


@dataclass(slots=True)
class _Running:
    runner: ShardRunner
    stop: asyncio.Event
    task: asyncio.Task[None]


@dataclass(slots=True)
class Worker:
    settings: Settings
    worker_id: str
    lease_ms: int = DEFAULT_LEASE_MS
    beat_s: float = 1.0
    tick_s: float = 0.2
    clock: Clock = now_us
    snapshot_every_events: int = 50_000
    partitions: int = 0
    """Read from the topics' metadata on start."""
    running: dict[str, _Running] = field(default_factory=dict)
    failure: BaseException | None = None
    """What ended the worker, if something did (a broken witness chain, a bug)."""
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    _feed: Feed | None = None
    _membership: Membership | None = None
    _supervisor: asyncio.Task[None] | None = None
    _settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def shards(self) -> list[str]:
        return shard_names(self.partitions)

    async def start(self) -> None:
        """Create missing topics, read the others' beats and start supervising."""
        await ensure_topics(self.settings)
        self.partitions = await _partitions(self.settings)
        self._feed = Feed(self.settings, name=self.worker_id)
        await self._feed.start()
        self._membership = Membership(
            self.settings, self.worker_id, self._feed, lease_ms=self.lease_ms
        )
        await self._membership.start()
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"{self.worker_id}-supervisor"
        )
        self._supervisor.add_done_callback(self._supervisor_ended)

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: supervisor stopped: %s", self.worker_id, task.exception())
            self.failure = task.exception()
            self.failed.set()

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every shard this worker should run has recovered and is consuming."""
        async with asyncio.timeout(timeout_s):
            await self._settled.wait()

    async def stop(self) -> None:
        """Give every shard up cleanly and say so, so the others take over at once."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await asyncio.gather(*(self._stop(name) for name in list(self.running)))
        if self._membership is not None:
            with contextlib.suppress(BrokerUnavailable):
                async with asyncio.timeout(5.0):
                    await self._membership.beat([], leaving=True)
            await self._membership.stop()
            self._membership = None
        if self._feed is not None:
            await self._feed.stop()
            self._feed = None

    async def _supervise(self) -> None:
        assert self._membership is not None
        membership = self._membership
        outage = Outage(log, self.worker_id, f"Kafka at {self.settings.kafka_bootstrap}")
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        while True:
            changed = self._reap()
            try:
                await membership.poll()
                plan = ownership.plan(
                    self.shards, membership.members, self.worker_id, self.running, self.clock()
                )
                for name in sorted(plan.stop):
                    log.info("%s: giving %s up to another worker", self.worker_id, name)
                    await self._stop(name)
                for name in sorted(plan.start):
                    self._start(name)
                changed = changed or bool(plan.start or plan.stop)
                if changed or loop.time() >= next_beat:
                    await membership.beat(self.running)
                    next_beat = loop.time() + self.beat_s
                outage.recovered()
            except BrokerUnavailable as exc:
                outage.failed(exc)
            if self.running and all(r.runner.ready.is_set() for r in self.running.values()):
                self._settled.set()
            elif not self.running and self._membership.members:
                self._settled.set()  # everything belongs to others: nothing to wait for
            await asyncio.sleep(self.tick_s)

    def _start(self, name: str) -> None:
        runner = ShardRunner(
            self.settings,
            self._shard(name),
            feed=self._feed,
            clock=self.clock,
            snapshot_every_events=self.snapshot_every_events,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop), name=f"{self.worker_id}-{name}")
        self.running[name] = _Running(runner, stop, task)

    async def _stop(self, name: str) -> None:
        running = self.running.pop(name, None)
        if running is None:
            return
        running.stop.set()
        with contextlib.suppress(Fenced, BrokerUnavailable, asyncio.CancelledError):
            await running.task

    def _reap(self) -> bool:
        """Forget runners that ended; a fenced one lost its shard, anything else is fatal."""
        changed = False
        for name, running in list(self.running.items()):
            if not running.task.done():
                continue
            del self.running[name]
            changed = True
            error = running.task.exception()
            if isinstance(error, Fenced):
                log.warning("%s: %s was taken over by another instance", self.worker_id, name)
            elif error is not None:
                log.error("%s: %s stopped: %s", self.worker_id, name, error)
                self.failure = error
                self.failed.set()
        return changed

    def _shard(self, name: str) -> Shard:
        return build_shard(self.settings, name, self.partitions)


def build_shard(settings: Settings, name: str, partitions: int) -> Shard:
    """Shard ``name`` (``scheduler-2``, ``witness-0``) as ``settings`` configure it."""
    kind, _, index = name.rpartition("-")
    topics = topics_for(settings)
    emitter = Emitter(default_codec(), topics, kind, settings.tenant)
    if kind == "scheduler":
        return SchedulerShard(
            topics,
            int(index),
            settings.pool_capacity,
            emitter,
            answer_within_s=settings.task_timeout_s + settings.answer_grace_s,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown_s=settings.breaker_cooldown_s,
            host_fail_after_s=settings.host_fail_after_s,
        )
    if kind == "witness":
        return WitnessShard(
            topics,
            partitions,
            emitter,
            signer=read_signer(settings.witness_key) if settings.witness_key else None,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_interval_s=settings.checkpoint_interval_s,
        )
    if kind == "coordination":
        return CoordinationShard(topics, int(index), emitter)
    if kind == "workflows":
        return WorkflowShard(topics, partitions, emitter)
    raise ConfigError(f"unknown shard {name!r}")


def shard_inputs(settings: Settings, partitions: int) -> dict[str, list[TopicPartition]]:
    """Every shard's input partitions, by shard name: what its lag is measured on."""
    return {
        name: build_shard(settings, name, partitions).inputs() for name in shard_names(partitions)
    }


async def _partitions(settings: Settings) -> int:
    """The partition count every pool-partitioned topic shares (refuses a mix)."""
    topics = topics_for(settings)
    pooled = [
        *topics.commands,
        topics.agents,
        topics.tasks,
        topics.outputs,
        topics.coordination_requests,
        topics.coordination,
    ]
    producer = EventProducer(settings, producer="worker")
    await producer.start()
    try:
        counts = {topic: await producer.partitions(topic) for topic in pooled}
    except KafkaError as exc:
        raise BrokerUnavailable(f"no metadata for the topics: {exc}") from exc
    finally:
        await producer.stop()
    if len(set(counts.values())) != 1:
        found = ", ".join(f"{t}={n}" for t, n in counts.items())
        raise ConfigError(f"pool-partitioned topics disagree on partitions ({found})")
    return counts[topics.tasks]
