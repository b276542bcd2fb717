"""A runtime host: runs agents for the tasks the scheduler dispatches to it.

The host reads its pool's partition of the tasks topic by manual assignment (no consumer
group, so a host killed with -9 blocks no one) and acts only on dispatches addressed to
its host id. It registers its agents, beats their hearts, runs each task in the agent's
own context and reports an output or a failure.

Outputs follow the processing contract: they are written in Kafka transactions together
with the host's position on the tasks topic, under a transactional id derived from the
host id. A host restarted with the same id fences the old instance and resumes from the
committed position: dispatches it had answered are skipped (the committed offset metadata
lists them), the ones it had not are run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace

from conclave import logs, metrics, payloads
from conclave.bus import (
    EventProducer,
    Outgoing,
    TransactionalProducer,
    committed_positions,
    new_consumer,
    topics_for,
)
from conclave.coordination import Coordinator
from conclave.domain.events import (
    AgentFailed,
    AgentMessage,
    AgentOutput,
    AgentRegistered,
    AgentRestarted,
    AgentRetired,
    DeadLetterRecord,
    Envelope,
    HostBeat,
    HostLeaving,
    PoolStarved,
    TaskCancelled,
    TaskDispatched,
    TaskExpired,
    TaskFailed,
    now_us,
)
from conclave.domain.messaging import expired
from conclave.domain.restarts import RestartBudget, Restarted
from conclave.domain.scaling import Scaling
from conclave.errors import BrokerUnavailable, Fenced, SchemaError
from conclave.feed import fetched_to
from conclave.messaging import Messenger, UnknownRecipient, error_payload
from conclave.outage import Backoff, Outage
from conclave.records import Record
from conclave.runtime.agents import (
    AgentContext,
    AgentFn,
    MessageHandler,
    PermanentFailure,
    TransientFailure,
)
from conclave.runtime.limits import HostLimits, SpawnRefused, over_limit, spawn_refusal
from conclave.settings import Settings
from conclave.topics import BROADCAST_HEADER, HOST_HEADER, pool_partition
from conclave.tracing import hop

__all__ = ["MAX_OUTPUT_BYTES", "HostConfig", "OutputRejected", "RuntimeHost"]

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 900_000
"""An answer must fit one Kafka record with its envelope (brokers cap records near 1 MB)."""
_MAX_DONE_LISTED = 400
"""Answered dispatches above the committed position listed in the offset metadata."""

_ANSWERS_WITNESSED_US = 2_000_000
"""How long after its last commit a stopped host's lease lasts: its last answers reach
the scheduler through the witness (milliseconds when healthy) before the attempts still
open are stalled, or they would count as late and the work be done again."""
_STARVED_STALE_US = 5_000_000
"""A ``pool.starved`` older than this is not acted on (read again after a recovery)."""


class OutputRejected(PermanentFailure):
    """An agent's answer that cannot be recorded: not text, or too large. Permanent: the
    same agent would answer the same way again."""


class AgentUnavailable(TransientFailure):
    """A dispatch to an agent its host gave up on (``agent.failed``), sent before the
    scheduler heard so: another agent may take the task."""


def crashed(exc: BaseException) -> bool:
    """Whether an attempt's error is the agent crashing (restarted, within its budget),
    rather than its answer about the task: a failure it raised on purpose
    (:class:`PermanentFailure`, :class:`TransientFailure`) is an answer; any other error,
    and running past the task timeout (hung), is a crash."""
    return not isinstance(exc, PermanentFailure | TransientFailure)


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
    task_timeout_s: float | None = None
    """How long an agent may work on one attempt; ``None``: the settings' (300 s)."""
    capabilities: Sequence[str] = ()
    """What its agents can do: registered with each, found with ``--capability``."""
    version: str | None = None
    """The version of its agents' code, registered with each."""
    limits: HostLimits = field(default_factory=HostLimits)
    """Memory and CPU over which its agents take no new work; memory use of the machine
    over which it does not start."""
    restarts: int | None = None
    """Restarts of a crashed agent allowed within ``restart_window_s`` before the next
    crash fails it; ``None``: the settings' (``CONCLAVE_AGENT_RESTARTS``, 5)."""
    restart_window_s: float | None = None
    """``None``: the settings' (``CONCLAVE_AGENT_RESTART_WINDOW_S``, 60 s)."""
    spare_agent_ids: Sequence[str] = ()
    """Agents it may start besides ``agent_ids`` when the scheduler says the pool is short
    of agents (autoscaling: between ``len(agent_ids)`` and ``len(agent_ids) +
    len(spare_agent_ids)``); each retires again once idle for ``idle_retire_s``. Empty: a
    fixed size."""
    idle_retire_s: float = 60.0
    """How long an agent beyond ``agent_ids``' number may be idle before it retires."""


@dataclass(slots=True)
class _Progress:
    """Which dispatches (by tasks-topic offset) are running and which are answered but
    not yet committed, so the committed position never passes an unanswered one."""

    consumed: int = 0
    """The offset after the last record read."""
    running: set[int] = field(default_factory=set)
    answered: set[int] = field(default_factory=set)
    """Answered and committed, above the committed position (skipped after a restart)."""

    def commit_point(self, done: set[int]) -> tuple[int, str, set[int]]:
        """The position to commit once ``done`` is answered, the note listing the answered
        offsets above it (the oldest forgotten first if there are many), and that set."""
        low = min(self.running - done, default=self.consumed)
        answered = {o for o in self.answered | done if o >= low}
        listed = sorted(answered)[-_MAX_DONE_LISTED:]
        return low, ",".join(map(str, listed)), answered

    @staticmethod
    def answered_from(metadata: str) -> set[int]:
        return {int(o) for o in metadata.split(",") if o.strip().isdigit()}


@dataclass(slots=True)
class RunningAgent:
    """One agent a host runs, and what it holds."""

    memory: dict[str, object] = field(default_factory=dict)
    """Its memory across tasks (``AgentContext.memory``): emptied when it restarts."""
    task_id: str | None = None
    """The task it works on now."""
    idle_since: int | None = None
    """When it last became idle (µs since the epoch); ``None`` while busy. Who has been
    idle the idle timeout may retire as the pool shrinks."""
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One message at a time, in the order they arrived."""


class RuntimeHost:
    def __init__(
        self,
        settings: Settings,
        config: HostConfig,
        agent: AgentFn,
        on_message: MessageHandler | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.agent = agent
        self.on_message: MessageHandler | None = on_message or getattr(agent, "on_message", None)
        """How its agents answer messages (``None``: they take none; an ask gets an error)."""
        self.topics = topics_for(settings)
        self.name = f"runtime:{config.host_id}"
        self.producer = EventProducer(settings, producer=self.name)
        self.coordination = Coordinator(settings, producer_name=self.name)
        """The agents' locks and versioned state: connected when an agent first uses it."""
        self.messenger = Messenger(
            settings,
            name=self.name,
            inbox=config.host_id,
            pool=config.pool,
            deliver=self._message,
            group=f"{self.group_id}.messages",
        )
        """Its agents' messages: the inbox is the host id, read from the position
        committed by the last instance of this host."""
        self.scaling = Scaling(
            (*config.agent_ids, *config.spare_agent_ids),
            minimum=len(config.agent_ids),
            idle_us=int(config.idle_retire_s * 1_000_000),
        )
        self.agents: dict[str, RunningAgent] = {
            agent_id: RunningAgent(idle_since=now_us()) for agent_id in config.agent_ids
        }
        """The agents it runs now, in the order they started (it grows and shrinks)."""
        self._handling: set[asyncio.Task[None]] = set()
        self._partition = 0
        self._tp = TopicPartition(self.topics.tasks, 0)
        self._progress = _Progress()
        self._pending: list[tuple[int, Outgoing]] = []
        """(dispatch offset, outcome record) waiting for the next transaction."""
        self._flushed = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._attempts: dict[str, tuple[int, asyncio.Task[None]]] = {}
        """Task id -> the attempt this host runs for it, and the coroutine running it."""
        self._cancelled: dict[str, str] = {}
        """Task id -> why the scheduler cancelled it, while its coroutine is stopping."""
        self._consumer: AIOKafkaConsumer | None = None
        self._writer: TransactionalProducer | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._suspect = False
        """A transaction failed or the broker was away: recover before writing again."""
        self._fenced = False
        """The last commit was fenced: unless a successor took over, claim again."""
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()
        """Set when the host cannot go on (another instance with its id took over)."""
        self._process = psutil.Process()
        self._turned_at = time.monotonic()
        """When the consume loop last came round: the host beats only while it does."""
        self._fetched_to: int | None = None
        """The consumer's position after its last fetch, past transaction markers."""
        self._stuck = False
        self._leaving_until: int | None = None
        """Set once the host said it is leaving: its beats promise no later."""
        self._over_limit: str | None = None  # what the last beat said of its limits
        self._host_header = config.host_id.encode()
        self._pool_header = (BROADCAST_HEADER, config.pool.encode())
        # Its agents' restarts after crashes, and those it gave up on (they run nothing).
        self._restarts = RestartBudget(
            settings.agent_restarts if config.restarts is None else config.restarts,
            int((config.restart_window_s or settings.agent_restart_window_s) * 1_000_000),
        )

    @property
    def _task_timeout_s(self) -> float:
        return self.config.task_timeout_s or self.settings.task_timeout_s

    @property
    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}.runtime.{self.config.host_id}"

    async def start(self) -> None:
        memory = psutil.virtual_memory().percent
        refusal = spawn_refusal(self.config.limits, memory, len(self.config.agent_ids))
        if refusal is not None:
            await self.stop()  # closes the clients made for it, none of them started
            raise SpawnRefused(f"runtime {self.config.host_id}: {refusal}")
        self._process.cpu_percent(None)  # the first call only starts the measure
        await self.producer.start()
        try:
            partitions = await self.producer.partitions(self.topics.tasks)
            self._partition = pool_partition(self.config.pool, partitions)
            self._tp = TopicPartition(self.topics.tasks, self._partition)
            await self._open_consumer()
            await self.messenger.start()  # before registering: no message can be missed
            await self._register()
        except BaseException:
            await self.stop()
            raise
        self._loops = [
            asyncio.create_task(self._consume(), name="runtime-consume"),
            asyncio.create_task(self._flush(), name="runtime-flush"),
            asyncio.create_task(self._heartbeat(), name="runtime-heartbeat"),
        ]
        for loop in self._loops:
            loop.add_done_callback(self._loop_ended)
        metrics.watch(self._gauges)

    def _gauges(self) -> Iterator[metrics.Sample]:
        pool = self.config.pool
        busy = sum(agent.task_id is not None for agent in self.agents.values())
        yield "conclave_agents_running", (pool,), busy
        consumer = self._consumer
        end = consumer.highwater(self._tp) if consumer is not None else None
        if end is not None and self._fetched_to is not None:
            labels = ("runtime", self._tp.topic, str(self._tp.partition))
            yield "conclave_consumer_lag_records", labels, max(0, end - self._fetched_to)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop that ends on its own is fatal (a fenced zombie, a bug): say so, loudly."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s: %s stopped: %s", self.name, task.get_name(), task.exception())
        self.failure = task.exception()
        self.failed.set()

    async def _open_consumer(self) -> None:
        consumer = new_consumer(self.settings)
        try:
            await consumer.start()
            consumer.assign([self._tp])
            end = (await consumer.end_offsets([self._tp]))[self._tp]
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerUnavailable(f"cannot read {self._tp.topic}: {exc}") from exc
        self._consumer = consumer
        self._writer = TransactionalProducer(self.settings, self.group_id, self._tp)
        await self._recover(initial=end)

    async def _recover(self, *, initial: int | None = None) -> None:
        """Start from what the broker has committed: fence the last instance of this host
        (or this one's failed producer), claim the next, and read dispatches again from the
        committed position. At start (a new host: from ``initial``, the end, as nothing can
        be addressed to it before it registers), and after any failed transaction or broker
        outage -- the embedded broker may have lost what it had acknowledged, and then the
        dispatches whose answers it lost are run again."""
        assert self._consumer is not None
        assert self._writer is not None
        await self._writer.start(initial=initial)
        committed = await committed_positions(self.settings, self.group_id, [self._tp])
        position = committed.get(self._tp, initial if initial is not None else 0)
        answered = _Progress.answered_from(self._writer.note)
        if initial is None and position < self._progress.consumed:
            log.info("%s: reading dispatches again from offset %d", self.name, position)
        self._consumer.seek(self._tp, position)
        self._progress.consumed = position
        self._progress.answered = answered
        kept = [(o, out) for o, out in self._pending if o >= position and o not in answered]
        # The others were committed after all (the broker answered too late): done.
        self._progress.running -= {o for o, _ in self._pending} - {o for o, _ in kept}
        self._pending = kept

    def resync(self) -> None:
        """Before writing again, check what the broker kept and read the dispatches again
        from the committed position (after an outage; the running tasks carry on)."""
        self._suspect = True
        self._wakeup.set()

    async def stop(self, *, drain_s: float = 5.0) -> None:
        """Stop taking work, let running tasks finish (up to ``drain_s``), commit what they
        answered, then close. The scheduler is told at the start (it dispatches nothing
        more here) and at the end (what is still unanswered goes elsewhere soon)."""
        metrics.unwatch(self._gauges)
        leaving = bool(self._loops) and self.failure is None
        if leaving:
            await self._leave(now_us() + int((2 * drain_s + 1) * 1_000_000), "stopping")
        consume = [t for t in self._loops if t.get_name() == "runtime-consume"]
        for loop in consume:
            loop.cancel()
        if self._running:
            _, pending = await asyncio.wait(self._running, timeout=drain_s)
            for task in pending:
                task.cancel()
        if self._pending and self._writer is not None:
            self._wakeup.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await self._drained()
        for loop in self._loops:
            loop.cancel()
        # A loop that failed on its own was logged and kept in ``failure`` already.
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if leaving:  # what it answered last has a moment to be witnessed before that
            await self._leave(now_us() + _ANSWERS_WITNESSED_US, "stopped")
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        for handling in self._handling:
            handling.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
        await self.messenger.stop()
        await self.coordination.stop()
        await self.producer.stop()

    async def _drained(self) -> None:
        while self._pending:
            self._flushed.clear()
            await self._flushed.wait()

    async def _register(self, agent_ids: Sequence[str] | None = None) -> None:
        """Register its agents (at start), or ``agent_ids`` (started as the pool grew)."""
        await self.producer.send_all(
            self.producer.encode(
                self.topics.agents,
                self._partition,
                agent_id,
                AgentRegistered(
                    agent_id=agent_id,
                    pool=self.config.pool,
                    host_id=self.config.host_id,
                    agent_ref=self.config.agent_ref,
                    capabilities=list(self.config.capabilities),
                    version=self.config.version,
                ),
            )[1]
            for agent_id in (self.config.agent_ids if agent_ids is None else agent_ids)
        )

    async def _consume(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        outage = Outage(log, self.name, f"Kafka at {self.settings.kafka_bootstrap}")
        backoff = Backoff()
        while True:
            # A batch always starts at the consumer's position when it is returned, even
            # if a recovery moved that position while the fetch was under way (aiokafka
            # drops what it fetched for the old one): it is the next thing to read, never
            # something to throw away -- that would lose the dispatches in it.
            self._turned_at = time.monotonic()
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=1000)
                moved = fetched_to(consumer, batch, [self._tp], max_records=sys.maxsize)
                self._fetched_to = moved.get(self._tp, self._fetched_to)
                outage.recovered()
                backoff.reset()
            except KafkaError as exc:
                outage.failed(exc)
                await backoff.wait()
                continue
            for message in batch.get(self._tp, []):
                self._progress.consumed = message.offset + 1
                if (HOST_HEADER, self._host_header) not in (message.headers or ()):
                    if self._pool_header in (message.headers or ()) and self.scaling.elastic:
                        await self._starved(Record.of(message))
                    continue  # someone else's dispatch, or not a dispatch at all
                if message.offset in self._progress.answered | self._progress.running:
                    continue  # answered before a recovery, or still running since
                await self._dispatched(Record.of(message))

    async def _dispatched(self, record: Record) -> None:
        try:
            envelope, event = self.producer.codec.decode(record.value)
        except SchemaError as exc:
            await self._dead_letter(record, str(exc))
            return
        if isinstance(event, TaskCancelled | TaskExpired):
            self._cancel(event)
            return
        if not isinstance(event, TaskDispatched):
            await self._dead_letter(record, f"{event.TYPE} carries a dispatch header")
            return
        mine = event.host_id == self.config.host_id
        if mine and event.agent_id not in self.agents and event.agent_id in self.scaling.ids:
            # The dispatch crossed the agent's retirement: it is back, for this task (which
            # it runs even if its registration was lost: idle again later, it retires).
            await self._start([event.agent_id], "a dispatch for it came after it retired")
        if event.host_id != self.config.host_id or event.agent_id not in self.agents:
            await self._dead_letter(record, f"dispatch to unknown agent {event.agent_id!r}")
            return
        log.debug(
            "%s: dispatch %s@%d (%s)", self.name, event.task_id, record.offset, event.agent_id
        )
        self._progress.running.add(record.offset)
        task = asyncio.create_task(self._run(envelope, event, record))
        self._running.add(task)
        self._attempts[event.task_id] = (event.attempt, task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: self._forget(event.task_id, task))

    async def _starved(self, record: Record) -> None:
        """The scheduler says the pool is short of agents: start this host's share."""
        try:
            _, event = self.producer.codec.decode(record.value)
        except SchemaError as exc:
            await self._dead_letter(record, str(exc))
            return
        if not isinstance(event, PoolStarved):
            await self._dead_letter(record, f"{event.TYPE} carries a pool broadcast header")
            return
        if event.pool != self.config.pool:
            await self._dead_letter(record, f"pool.starved of {event.pool!r} under this pool's")
            return
        if now_us() - event.at > _STARVED_STALE_US:
            return  # read again after a recovery: the pool has had its say since
        wanted = self.scaling.grow(self.agents.keys(), event)
        if not wanted:
            return
        memory = psutil.virtual_memory().percent
        refusal = self._over_limit or spawn_refusal(self.config.limits, memory, len(wanted))
        if refusal is not None:
            log.warning("%s: does not grow the pool: %s", self.name, refusal)
            return
        if not await self._start(wanted, f"the pool is short: {event.waiting} task(s) wait"):
            for agent_id in wanted:  # unregistered, they would get no work: the next word
                del self.agents[agent_id]  # that the pool is short starts them again

    async def _start(self, agent_ids: Sequence[str], why: str) -> bool:
        """Start ``agent_ids`` (of its spare ids, or retired ones) afresh and register them;
        whether the broker took the registrations."""
        for agent_id in agent_ids:
            self.agents[agent_id] = RunningAgent(idle_since=now_us())
        try:
            await self._register(agent_ids)
        except BrokerUnavailable as exc:
            log.warning("%s: could not register %s: %s", self.name, ", ".join(agent_ids), exc)
            return False
        log.info(
            "%s: started %s (%d agents now): %s",
            self.name, ", ".join(agent_ids), len(self.agents), why,
        )  # fmt: skip
        metrics.agents_scaled.labels(self.config.pool, "started").inc(len(agent_ids))
        return True

    def _retire_idle(self) -> list[Outgoing]:
        """Retire the agents idle past the idle timeout, beyond its minimum: the records
        that say so, to be written before its next beat (which no longer names them)."""
        now = now_us()
        idle = {
            agent_id: agent.idle_since
            for agent_id, agent in self.agents.items()
            if agent.idle_since is not None and not agent.turn.locked()  # no message either
        }
        out = []
        for agent_id in self.scaling.shrink(list(self.agents), idle, now):
            idle_s = (now - idle[agent_id]) / 1_000_000
            del self.agents[agent_id]
            reason = f"idle for {idle_s:.0f} s: the pool shrank"
            log.info("%s: retired %s (%d agents now): %s", self.name, agent_id,
                     len(self.agents), reason)  # fmt: skip
            metrics.agents_scaled.labels(self.config.pool, "retired").inc()
            retired = AgentRetired(
                agent_id=agent_id, pool=self.config.pool, host_id=self.config.host_id, reason=reason
            )
            out.append(
                self.producer.encode(self.topics.agents, self._partition, agent_id, retired)[1]
            )
        return out

    def _forget(self, task_id: str, task: asyncio.Task[None]) -> None:
        if self._attempts.get(task_id, (0, None))[1] is task:
            del self._attempts[task_id]
        self._cancelled.pop(task_id, None)

    def _cancel(self, event: TaskCancelled | TaskExpired) -> None:
        """Stop the agent working on a cancelled or expired task: its coroutine is
        cancelled, and the attempt reported as a permanent ``Cancelled`` failure
        (witnessed, and ignored by the scheduler, for which the task is over already)."""
        running = self._attempts.get(event.task_id)
        if running is None or running[0] != event.attempt or running[1].done():
            return  # finished meanwhile, or an attempt this host does not run
        log.info("%s: cancelling task %s attempt %d", self.name, event.task_id, event.attempt)
        self._cancelled[event.task_id] = event.reason
        running[1].cancel()

    async def _message(self, message: AgentMessage, record: Record) -> None:
        """A message for one of this host's agents, or for every one of its pool's (a
        broadcast: all but the sender). Handled one at a time per agent, in order."""
        if message.agent_id is None:
            targets = [a for a in self.agents if a != message.sender]
        elif message.agent_id in self.agents:
            targets = [message.agent_id]
        else:  # registered here once, gone now (a host restarted with other agents)
            metrics.agent_messages.labels(self.config.pool, "refused").inc()
            reason = f"no agent {message.agent_id!r} on host {self.config.host_id}"
            if message.expects_reply:
                payload = error_payload(UnknownRecipient.__name__, reason)
                await self.messenger.answer(message, payload, error=True, sender=self.name)
            else:
                await self._dead_letter(record, reason)
            return
        for agent_id in targets:
            handling = asyncio.create_task(self._handle(agent_id, message, record))
            self._handling.add(handling)
            handling.add_done_callback(self._handling.discard)

    async def _handle(self, agent_id: str, message: AgentMessage, record: Record) -> None:
        async with self.agents[agent_id].turn:
            if expired(message, now_us()):  # it waited behind the agent's earlier messages
                log.info(
                    "%s: message %s to %s expired in line", self.name, message.message_id, agent_id
                )
                metrics.agent_messages.labels(self.config.pool, "expired").inc()
                await self.messenger.dead_letter(record, "expired", "MessageExpired")
                return
            answer, outcome = await self._answer_of(agent_id, message)
            metrics.agent_messages.labels(self.config.pool, outcome).inc()
            if message.expects_reply and answer is not None:
                try:
                    await self.messenger.answer(
                        message, answer, error=outcome != "handled", sender=agent_id
                    )
                except BrokerUnavailable as exc:
                    log.warning("%s: answer to %s lost: %s", self.name, message.message_id, exc)

    async def _answer_of(self, agent_id: str, message: AgentMessage) -> tuple[str | None, str]:
        """The agent's answer to ``message`` (an error payload if it failed), and the
        outcome: ``handled``, ``failed`` or ``refused`` (it takes no messages)."""
        if self.on_message is None:
            return error_payload("NotAccepted", f"agent {agent_id} takes no messages"), "refused"
        ctx = AgentContext(
            agent_id=agent_id,
            task_id="",
            attempt=0,
            input=message.payload,
            deliberation_id=None,
            memory=self.agents[agent_id].memory,
            coordination=self.coordination,
            messenger=self.messenger,
            message=message,
        )
        left_s = self._task_timeout_s
        if message.expires_at is not None:
            left_s = min(left_s, max(0.0, (message.expires_at - now_us()) / 1e6))
        try:
            with logs.about(None, agent_id):
                async with asyncio.timeout(left_s):
                    answer = await self.on_message(ctx, message)
            return (None if answer is None else _checked(answer)), "handled"
        except asyncio.CancelledError:
            raise  # the host is stopping
        except Exception as exc:  # any handler error is the asker's answer
            text = str(exc)
            if isinstance(exc, TimeoutError) and not text:
                text = "no answer before the message expired"
            log.warning(
                "%s: %s failed on message %s: %s: %s",
                self.name,
                agent_id,
                message.message_id,
                type(exc).__name__,
                text[:200],
            )
            return error_payload(type(exc).__name__, text), "failed"

    async def _dead_letter(self, record: Record, reason: str) -> None:
        log.warning("%s dead-lettered %s@%d: %s", self.name, record.topic, record.offset, reason)
        await self.producer.send(
            self.topics.deadletter,
            f"{record.topic}/{record.partition}/{record.offset}",
            DeadLetterRecord(
                reason=reason,
                error_type="InvalidEvent",
                original=record.value,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                processor=self.name,
            ),
            partition=0,
        )

    async def _answer(self, ctx: AgentContext) -> str:
        """The agent's answer; an input passed by reference is resolved first."""
        if (ref := payloads.parse(ctx.input)) is not None:
            ctx.input = (await payloads.load(self.settings, ref)).decode()
        return await self.agent(ctx)

    async def _run(self, cause: Envelope, event: TaskDispatched, record: Record) -> None:
        ctx = AgentContext(
            agent_id=event.agent_id,
            task_id=event.task_id,
            attempt=event.attempt,
            input=event.input,
            deliberation_id=event.deliberation_id,
            memory=self.agents[event.agent_id].memory,
            coordination=self.coordination,
            messenger=self.messenger,
        )
        running = self.agents[event.agent_id]
        running.task_id, running.idle_since = event.task_id, None
        # Log lines of the run (the host's and the agent's own) name the task and agent.
        with (
            logs.about(event.task_id, event.agent_id),
            hop("agent.run", record.headers, attach=True) as onward,
        ):
            span = trace.get_current_span()  # not recording when the trace is unsampled
            span.set_attribute("conclave.task_id", event.task_id)
            span.set_attribute("conclave.agent_id", event.agent_id)
            started = time.perf_counter()
            outcome: AgentOutput | TaskFailed
            crash: str | None = None  # why, if the agent crashed
            try:
                if (why := self._restarts.failed.get(event.agent_id)) is not None:
                    raise AgentUnavailable(f"agent {event.agent_id!r} failed: {why}")
                async with asyncio.timeout(self._task_timeout_s):
                    answer = await self._answer(ctx)
                content = _checked(answer)
            except asyncio.CancelledError:
                if event.task_id not in self._cancelled:
                    raise  # the host is stopping
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                outcome = TaskFailed(
                    task_id=event.task_id,
                    agent_id=event.agent_id,
                    attempt=event.attempt,
                    error_type="Cancelled",
                    error_message=self._cancelled[event.task_id][:2000],
                    deliberation_id=event.deliberation_id,
                    permanent=True,
                )
            except Exception as exc:  # any agent error is reported, with attribution
                message = str(exc)
                if isinstance(exc, TimeoutError) and not message:
                    message = f"no answer within the task timeout of {self._task_timeout_s:g} s"
                outcome = TaskFailed(
                    task_id=event.task_id,
                    agent_id=event.agent_id,
                    attempt=event.attempt,
                    error_type=type(exc).__name__,
                    error_message=message[:2000],
                    deliberation_id=event.deliberation_id,
                    permanent=isinstance(exc, PermanentFailure),
                )
                log.warning(
                    "%s: task %s attempt %d failed on %s: %s: %s",
                    self.name,
                    event.task_id,
                    event.attempt,
                    event.agent_id,
                    type(exc).__name__,
                    message[:200],
                )
                if crashed(exc):
                    where = f"task {event.task_id}, attempt {event.attempt}"
                    crash = f"{type(exc).__name__}: {message[:500]} ({where})"
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
                running.task_id, running.idle_since = None, now_us()
            _count(self.config.pool, outcome, time.perf_counter() - started)
            _, out = self.producer.encode(
                self.topics.outputs,
                self._partition,
                event.task_id,
                outcome,
                causation=cause,
                headers=onward,
            )
        self._pending.append((record.offset, out))
        if crash is not None:  # said after the crashed attempt, in its transaction
            self._pending.append((record.offset, self._restart(event.agent_id, crash)))
        self._wakeup.set()

    def _restart(self, agent_id: str, why: str) -> Outgoing:
        """Agent ``agent_id`` crashed: start it afresh (its memory emptied) while its
        restart budget allows, else give up on it. The record that says which."""
        pool, window_s = self.config.pool, self._restarts.window_us / 1_000_000
        verdict = self._restarts.crashed(agent_id, now_us(), why)
        kind: type[AgentRestarted | AgentFailed]
        if isinstance(verdict, Restarted):
            self.agents[agent_id].memory = {}
            log.warning(
                "%s: agent %s restarted (%d of %d within %g s) after %s",
                self.name, agent_id, verdict.restarts, self._restarts.limit, window_s, why[:200],
            )  # fmt: skip
            kind, outcome, reason = AgentRestarted, "restarted", f"crashed: {why}"
        else:
            log.error("%s: agent %s failed: %s", self.name, agent_id, verdict.reason[:300])
            kind, outcome, reason = AgentFailed, "failed", verdict.reason
        metrics.agent_restarts.labels(pool, outcome).inc()
        said = kind(
            agent_id=agent_id,
            pool=pool,
            host_id=self.config.host_id,
            restarts=verdict.restarts,
            window_s=window_s,
            reason=reason,
        )
        return self.producer.encode(self.topics.agents, self._partition, agent_id, said)[1]

    async def _flush(self) -> None:
        """Group commit: whatever outcomes are ready go out in one transaction with the
        position; the next ones gather meanwhile."""
        assert self._writer is not None
        outage = Outage(log, self.name, f"Kafka at {self.settings.kafka_bootstrap}")
        backoff = Backoff()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._suspect:
                try:
                    if self._fenced and await self._writer.superseded():
                        raise Fenced(f"{self.name}: another instance of this host took over")
                    await self._recover()
                    self._fenced = False
                except BrokerUnavailable as exc:
                    outage.failed(exc)
                    await backoff.wait()
                    self._wakeup.set()
                    continue
                self._suspect = False
            while self._pending and not self._suspect:
                batch = list(self._pending)
                done = {offset for offset, _ in batch}
                position, note, answered = self._progress.commit_point(done)
                try:
                    await self._writer.commit(
                        [out for _, out in batch], {self._tp: position}, note=note
                    )
                except BrokerUnavailable as exc:
                    outage.failed(exc)
                    await backoff.wait()
                    self._suspect = True  # what did the broker keep? recover from it
                    self._wakeup.set()
                    break
                except Fenced:
                    # Judged lost (cut off, paused) and fenced by the scheduler, whose
                    # retries made this transaction's answers late anyway; or a successor.
                    log.warning("%s: fenced; claiming this host's writer again", self.name)
                    self._fenced = self._suspect = True
                    self._wakeup.set()
                    break
                outage.recovered()
                backoff.reset()
                log.debug(
                    "%s: committed %d outcome(s), position %s", self.name, len(batch), position
                )
                del self._pending[: len(batch)]
                self._progress.running -= done
                self._progress.answered = answered
                self._flushed.set()

    async def _leave(self, until: int, reason: str) -> None:
        """Say the host is leaving, its lease ending at ``until``; if the broker cannot
        be reached, the lease runs out by itself."""
        self._leaving_until = until
        leaving = HostLeaving(
            host_id=self.config.host_id,
            pool=self.config.pool,
            agent_ids=list(self.agents),
            until=until,
            reason=reason,
        )
        try:
            await self.producer.send_all(
                [
                    self.producer.encode(
                        self.topics.agents, self._partition, leaving.host_id, leaving
                    )[1]
                ],
                deadline_s=2.0,
            )
        except BrokerUnavailable as exc:
            log.warning("%s: could not say it is leaving: %s", self.name, exc)

    def _host_beat(self, rss: int) -> Outgoing:
        lease_us = int(self.settings.host_lease_s * 1_000_000)
        cpu = self._process.cpu_percent(None)
        was_over = self._over_limit is not None
        self._over_limit = over_limit(self.config.limits, rss, cpu, was_over=was_over)
        if self._over_limit is not None and not was_over:
            log.warning("%s: takes no new work: %s", self.name, self._over_limit)
        elif was_over and self._over_limit is None:
            log.info("%s: has room again", self.name)
        return self.producer.encode(
            self.topics.agents,
            self._partition,
            self.config.host_id,
            HostBeat(
                host_id=self.config.host_id,
                pool=self.config.pool,
                agent_ids=list(self.agents),
                expires_at=min(now_us() + lease_us, self._leaving_until or sys.maxsize),
                rss_bytes=rss,
                cpu_percent=round(cpu, 1),
                over_limit=self._over_limit,
                running={a: x.task_id for a, x in self.agents.items() if x.task_id is not None},
                spare=self._spare(),
            ),
        )[1]

    def _spare(self) -> int:
        """How many more agents it could start now, if its pool were short."""
        room = len(self.scaling.ids) - len(self.agents)
        if room <= 0 or self._over_limit is not None or self._leaving_until is not None:
            return 0
        memory = psutil.virtual_memory().percent
        return 0 if spawn_refusal(self.config.limits, memory, 1) is not None else room

    async def _heartbeat(self) -> None:
        outage = Outage(log, f"{self.name} heartbeats", f"Kafka at {self.settings.kafka_bootstrap}")
        while True:
            # One beat for all its agents, naming what each runs: no per-agent heartbeat.
            beats = []
            stuck = time.monotonic() - self._turned_at
            if stuck < self.settings.host_lease_s:
                if self.scaling.elastic and self._leaving_until is None:
                    beats += self._retire_idle()  # written before the beat that omits them
                beats.append(self._host_beat(self._process.memory_info().rss))
                self._stuck = False
            elif not self._stuck:  # the scheduler is to take its work away: say so once
                log.warning("%s: work loop stuck for %.1f s, host beats stop", self.name, stuck)
                self._stuck = True
            try:
                await self.producer.send_all(
                    beats, deadline_s=max(2.0, 2 * self.settings.heartbeat_interval_s)
                )
            except BrokerUnavailable as exc:
                outage.failed(exc)
            else:
                if outage.ongoing:
                    # The broker is back after an outage: it may have lost what it had
                    # acknowledged just before. Check, even with nothing to write.
                    self.resync()
                outage.recovered()
            await asyncio.sleep(self.settings.heartbeat_interval_s)


def _count(pool: str, outcome: AgentOutput | TaskFailed, elapsed: float) -> None:
    if isinstance(outcome, AgentOutput):
        kind = "answered"
    else:
        kind = "cancelled" if outcome.error_type == "Cancelled" else "failed"
    metrics.agent_runs.labels(pool, kind).inc()
    metrics.agent_run_duration.labels(pool).observe(elapsed)
