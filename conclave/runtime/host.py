"""A runtime host: runs agents for the tasks the scheduler dispatches to it.

The host reads the tasks topic by manual partition assignment (no consumer
group), so a host killed with -9 blocks no one; it acts only on dispatches
addressed to its own host id. It registers its agents, beats their hearts,
runs each task in the agent's own context and reports an output or a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace

from conclave.bus import EventProducer, new_consumer, topics_for
from conclave.domain.events import (
    AgentOutput,
    AgentRegistered,
    Envelope,
    Heartbeat,
    TaskDispatched,
    TaskFailed,
)
from conclave.errors import BrokerUnavailable
from conclave.records import DeadLetters, Record, decode_or_dead_letter
from conclave.runtime.agents import AgentContext, AgentFn
from conclave.settings import Settings
from conclave.topics import HOST_HEADER
from conclave.tracing import context_from, headers_for, tracer

__all__ = ["MAX_OUTPUT_BYTES", "HostConfig", "OutputRejected", "RuntimeHost"]

MAX_OUTPUT_BYTES = 900_000
"""An answer must fit one Kafka record with its envelope (brokers cap records near 1 MB)."""


class OutputRejected(ValueError):
    """An agent's answer that cannot be recorded: not text, or too large."""


def _checked(content: object) -> str:
    """The agent's answer, or :class:`OutputRejected` reported as that agent's failure
    (rather than a send that fails later with nobody told)."""
    if not isinstance(content, str):
        raise OutputRejected(f"agent returned {type(content).__name__}, not str")
    if "\x00" in content:
        raise OutputRejected("answer contains a NUL character, which no read model can store")
    if len(content.encode()) > MAX_OUTPUT_BYTES:
        raise OutputRejected(f"answer of {len(content.encode())} bytes exceeds {MAX_OUTPUT_BYTES}")
    return content


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    pool: str = "default"
    agent_ids: Sequence[str] = ()
    agent_ref: str = "simulated"
    host_id: str = field(default_factory=lambda: f"host-{uuid.uuid4().hex[:8]}")
    task_timeout_s: float = 300.0


class RuntimeHost:
    def __init__(self, settings: Settings, config: HostConfig, agent: AgentFn) -> None:
        self.settings = settings
        self.config = config
        self.agent = agent
        self.topics = topics_for(settings)
        self.producer = EventProducer(settings, producer=f"runtime:{config.host_id}")
        self.dead_letters = DeadLetters(self.producer, self.topics, f"runtime:{config.host_id}")
        self.memories: dict[str, dict[str, object]] = {a: {} for a in config.agent_ids}
        self.current: dict[str, str | None] = dict.fromkeys(config.agent_ids)
        self.started: set[tuple[str, int]] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._process = psutil.Process()
        self._host_header = config.host_id.encode()

    async def start(self) -> None:
        await self.producer.start()
        consumer = new_consumer(self.settings, auto_offset_reset="latest")
        try:
            await consumer.start()
            await consumer.topics()
        except KafkaError as exc:
            await consumer.stop()
            await self.producer.stop()
            raise BrokerUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable"
            ) from exc
        partitions = [
            TopicPartition(self.topics.tasks, p)
            for p in sorted(consumer.partitions_for_topic(self.topics.tasks) or ())
        ]
        consumer.assign(partitions)
        # Fix the start position before registering: no dispatch to us can come earlier.
        for tp, end in (await consumer.end_offsets(partitions)).items():
            consumer.seek(tp, end)
        self._consumer = consumer
        await self._register()
        self._loops = [
            asyncio.create_task(self._consume(), name="runtime-consume"),
            asyncio.create_task(self._heartbeat(), name="runtime-heartbeat"),
        ]

    async def stop(self, *, drain_s: float = 5.0) -> None:
        """Stop taking work, let running tasks finish (up to ``drain_s``), then close."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        if self._running:
            _, pending = await asyncio.wait(self._running, timeout=drain_s)
            for task in pending:
                task.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        await self.producer.stop()

    async def _register(self) -> None:
        futures = []
        for agent_id in self.config.agent_ids:
            _, fut = await self.producer.send(
                self.topics.agents,
                agent_id,
                AgentRegistered(
                    agent_id=agent_id,
                    pool=self.config.pool,
                    host_id=self.config.host_id,
                    agent_ref=self.config.agent_ref,
                ),
            )
            futures.append(fut)
        await asyncio.gather(*futures)

    async def _consume(self) -> None:
        assert self._consumer is not None
        codec = self.producer.codec
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for message in records:
                    if (HOST_HEADER, self._host_header) not in (message.headers or ()):
                        continue  # someone else's dispatch, or not a dispatch at all
                    record = Record.of(message)
                    decoded = await decode_or_dead_letter(codec, record, self.dead_letters)
                    if decoded is None:
                        continue
                    envelope, event = decoded
                    if isinstance(event, TaskDispatched) and self._mine(event):
                        self._spawn(envelope, event, record)

    def _mine(self, event: TaskDispatched) -> bool:
        return (
            event.host_id == self.config.host_id
            and event.agent_id in self.memories
            and (event.task_id, event.attempt) not in self.started  # duplicate delivery
        )

    def _spawn(self, cause: Envelope, event: TaskDispatched, record: Record) -> None:
        self.started.add((event.task_id, event.attempt))
        task = asyncio.create_task(self._run(cause, event, record))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, cause: Envelope, event: TaskDispatched, record: Record) -> None:
        ctx = AgentContext(
            agent_id=event.agent_id,
            task_id=event.task_id,
            attempt=event.attempt,
            input=event.input,
            deliberation_id=event.deliberation_id,
            memory=self.memories[event.agent_id],
        )
        self.current[event.agent_id] = event.task_id
        with tracer().start_as_current_span(
            "agent.run", context=context_from(record.headers), kind=trace.SpanKind.CONSUMER
        ) as span:
            span.set_attribute("conclave.task_id", event.task_id)
            span.set_attribute("conclave.agent_id", event.agent_id)
            started = time.perf_counter()
            try:
                content = _checked(
                    await asyncio.wait_for(self.agent(ctx), self.config.task_timeout_s)
                )
            except Exception as exc:  # any agent error is reported, with attribution
                outcome: AgentOutput | TaskFailed = TaskFailed(
                    task_id=event.task_id,
                    agent_id=event.agent_id,
                    attempt=event.attempt,
                    error_type=type(exc).__name__,
                    error_message=str(exc)[:2000],
                    deliberation_id=event.deliberation_id,
                )
            else:
                outcome = AgentOutput(
                    task_id=event.task_id,
                    agent_id=event.agent_id,
                    attempt=event.attempt,
                    content=content,
                    latency_us=int((time.perf_counter() - started) * 1_000_000),
                    deliberation_id=event.deliberation_id,
                )
            finally:
                self.current[event.agent_id] = None
            await self.producer.send(
                self.topics.outputs, event.task_id, outcome, causation=cause, headers=headers_for()
            )

    async def _heartbeat(self) -> None:
        while True:
            rss = self._process.memory_info().rss
            for agent_id, task_id in self.current.items():
                await self.producer.send(
                    self.topics.heartbeats,
                    agent_id,
                    Heartbeat(
                        agent_id=agent_id,
                        host_id=self.config.host_id,
                        task_id=task_id,
                        rss_bytes=rss,
                    ),
                )
            await asyncio.sleep(self.settings.heartbeat_interval_s)
