"""Agents talking to agents: ask, tell and broadcast through the messages topic.

    async with Messenger(settings, name="ops") as m:          # a client: its own inbox
        answer = await m.ask("agent-7", "status?", timeout=2)  # str, or an error raised
        await m.tell("pool:reviewers", "new commit abc123")    # one agent of the pool
        await m.broadcast("reviewers", "stop at 18:00")        # every agent of the pool

Inside an agent the same calls are on its context (``await ctx.ask(...)``); the runtime
host owns one messenger, whose inbox is the host id.

How a message travels: the sender resolves the recipient against the agent directory (a
tail of the agents topic: every registration says agent -> pool, host) and writes one
:class:`AgentMessage` to the messages topic, in the partition of the recipient's pool,
with the host header naming the recipient's host (or, for a broadcast, the broadcast
header naming the pool). Each host reads only its pool's partition and decodes only the
records whose header names it or its pool. Answers go to the asker's inbox (the partition
and host header it named in ``reply_to``), where the waiting ``ask`` picks them up by
correlation id. Every write waits for the broker's acknowledgement.

Rules at delivery (:mod:`conclave.domain.messaging`): an expired message is never
delivered but dead-lettered with the reason ``expired``; a message to nobody gets an error
answer (and ``ask``/``tell`` raise :class:`UnknownRecipient`).

Errors (all :class:`~conclave.errors.ConclaveError`): :class:`AskTimeout` (no answer in
time), :class:`UnknownRecipient`, :class:`RemoteError` (the recipient answered with an
error: its handler raised, or it takes no messages), and
:class:`~conclave.errors.InvalidCommand` for a message that cannot be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from conclave import metrics
from conclave.bus import EventProducer, Outgoing, new_consumer, topics_for
from conclave.domain import messaging as dm
from conclave.domain.events import AgentMessage, AgentRegistered, DeadLetterRecord, Priority, now_us
from conclave.errors import BrokerUnavailable, ConclaveError, InvalidCommand, SchemaError
from conclave.records import Record
from conclave.settings import Settings
from conclave.topics import BROADCAST_HEADER, HOST_HEADER, pool_partition
from conclave.tracing import headers_for

__all__ = [
    "AskTimeout",
    "Delivery",
    "Messenger",
    "RemoteError",
    "UnknownRecipient",
]

log = logging.getLogger(__name__)

DIRECTORY_CATCH_UP_S = 2.0
"""How long a send to a name the directory does not know waits for the directory to
read the agents topic up to its end (an agent that registered a moment ago)."""
SYSTEM_SENDER = "conclave"
"""The sender of the error answer to a message that has no recipient."""


class UnknownRecipient(ConclaveError):
    """No registered agent (or pool) by that name."""


class AskTimeout(ConclaveError, TimeoutError):
    """No answer within the ask's timeout (the recipient is slow, stopped, or does not
    answer this kind of message)."""

    retriable = True


class RemoteError(ConclaveError):
    """The recipient answered with an error; ``error_type`` is what its handler raised."""

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


Delivery = Callable[[AgentMessage, Record], Awaitable[None]]
"""What a host does with a message for one of its agents (or its pool's broadcast)."""


@dataclass(frozen=True, slots=True)
class _Inbox:
    inbox: str
    partition: int
    pool: str | None


def error_payload(error_type: str, message: str) -> str:
    """An error answer's payload: ``ErrorType: message``."""
    return f"{error_type}: {message}"[:2000]


def _raised(payload: str) -> ConclaveError:
    error_type, _, message = payload.partition(": ")
    if error_type == UnknownRecipient.__name__:
        return UnknownRecipient(message)
    return RemoteError(payload, error_type=error_type or "Error")


class Messenger:
    """One process's messaging: a producer, the agent directory, and one inbox.

    ``inbox`` defaults to a fresh client inbox; a runtime host passes its host id, its
    pool (whose broadcasts it reads), ``deliver`` (what to do with a message for its
    agents) and ``group`` (where its inbox position is committed, so that a host
    restarted with the same id reads what was sent while it was down)."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "client",
        inbox: str | None = None,
        pool: str | None = None,
        deliver: Delivery | None = None,
        group: str | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics_for(settings)
        self.name = name
        self.inbox_id = inbox or f"inbox-{uuid.uuid4().hex[:12]}"
        self.pool = pool
        self._deliver = deliver
        self._group = group
        self.producer = EventProducer(settings, producer=f"messages:{name}")
        self._partitions = 0
        self._inbox = _Inbox(self.inbox_id, 0, pool)
        self._inbox_consumer: AIOKafkaConsumer | None = None
        self._directory_consumer: AIOKafkaConsumer | None = None
        self._directory: dict[str, tuple[str, str]] = {}
        self._directory_read = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[AgentMessage]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._started = False
        self._directory_started = False
        self._starting = asyncio.Lock()
        self.decoded = 0
        """Records of the messages topic this messenger decoded (only its own)."""

    async def __aenter__(self) -> Messenger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def partition(self) -> int:
        """The partition of the messages topic this inbox reads."""
        return self._inbox.partition

    async def start(self) -> None:
        """Connect and stand at the inbox's position: every message sent to it after this
        returns is seen."""
        async with self._starting:
            if not self._started:
                await self._start()

    async def _start(self) -> None:
        await self.producer.start()
        try:
            self._partitions = await self.producer.partitions(self.topics.messages)
            home = self.pool if self.pool is not None else self.inbox_id
            self._inbox = _Inbox(self.inbox_id, pool_partition(home, self._partitions), self.pool)
            tp = TopicPartition(self.topics.messages, self._inbox.partition)
            options = {"group_id": self._group} if self._group else {}
            consumer = new_consumer(self.settings, auto_offset_reset="latest", **options)
            self._inbox_consumer = consumer
            await consumer.start()
            consumer.assign([tp])
            committed = await consumer.committed(tp) if self._group else None
            if committed is None or committed < 0:
                await consumer.seek_to_end(tp)
                start = await consumer.position(tp)  # now, before anyone knows this inbox
                if self._group:  # a restart reads what came while it was down
                    await consumer.commit({tp: start})
            else:
                consumer.seek(tp, committed)
        except KafkaError as exc:
            await self.stop()
            raise BrokerUnavailable(f"cannot read {self.topics.messages}: {exc}") from exc
        except BaseException:
            await self.stop()
            raise
        self._loops.append(asyncio.create_task(self._read(tp), name="messages-inbox"))
        self._started = True

    async def stop(self) -> None:
        self._started = self._directory_started = False
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        for consumer in (self._inbox_consumer, self._directory_consumer):
            if consumer is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await consumer.stop()
        self._inbox_consumer = self._directory_consumer = None
        await self.producer.stop()
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    # -- sending ----------------------------------------------------------------------

    async def ask(
        self,
        recipient: str,
        payload: str,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 - the ask's own deadline, also its TTL
        sender: str | None = None,
        kind: str = dm.MessageKind.QUERY,
        priority: Priority = Priority.NORMAL,
    ) -> str:
        """Send ``payload`` to ``recipient`` and return its answer. The message expires
        with the timeout: an ask nobody can answer in time is never delivered late.
        :class:`AskTimeout`, :class:`UnknownRecipient` or :class:`RemoteError` otherwise."""
        if timeout <= 0:
            raise InvalidCommand("timeout must be positive")
        message = await self._message(recipient, payload, sender, kind, priority, timeout, True)
        future: asyncio.Future[AgentMessage] = asyncio.get_running_loop().create_future()
        self._waiting[message.message_id] = future
        try:
            await self._send(message)
            try:
                async with asyncio.timeout(timeout):
                    reply = await future
            except TimeoutError:
                raise AskTimeout(f"no answer from {recipient!r} within {timeout:g} s") from None
        finally:
            self._waiting.pop(message.message_id, None)
        if reply.kind == dm.MessageKind.ERROR:
            raise _raised(reply.payload)
        return reply.payload

    async def tell(
        self,
        recipient: str,
        payload: str,
        *,
        ttl: float | None = None,
        sender: str | None = None,
        kind: str = dm.MessageKind.NOTIFICATION,
        priority: Priority = Priority.NORMAL,
    ) -> str:
        """Send without waiting for an answer (only for the broker's acknowledgement);
        returns the message id. A broadcast is ``tell("broadcast:POOL", ...)``, or
        :meth:`broadcast`. :class:`UnknownRecipient` if nobody has that name (the message
        and its error answer are recorded all the same)."""
        message = await self._message(recipient, payload, sender, kind, priority, ttl, False)
        await self._send(message)
        return message.message_id

    async def broadcast(
        self,
        pool: str,
        payload: str,
        *,
        ttl: float | None = None,
        sender: str | None = None,
        kind: str = dm.MessageKind.NOTIFICATION,
        priority: Priority = Priority.NORMAL,
    ) -> str:
        """Send ``payload`` to every agent of ``pool`` (but the sender), once each."""
        return await self.tell(
            f"{dm.BROADCAST_PREFIX}{pool}",
            payload,
            ttl=ttl,
            sender=sender,
            kind=kind,
            priority=priority,
        )

    async def answer(self, asked: AgentMessage, payload: str, *, error: bool, sender: str) -> None:
        """Answer an ask: a response, or an error, to the asker's inbox."""
        await self.start()
        kind = dm.MessageKind.ERROR if error else dm.MessageKind.RESPONSE
        reply = self._answer(asked, kind, payload, sender)
        await self.producer.send_all([self._record(reply, asked.reply_partition)])

    def _answer(
        self, asked: AgentMessage, kind: dm.MessageKind, payload: str, sender: str
    ) -> AgentMessage:
        return dm.answer(
            asked,
            kind=kind,
            payload=payload,
            message_id=uuid.uuid4().hex,
            sender=sender,
            reply_to=self.inbox_id,
            reply_partition=self.partition,
        )

    async def _message(
        self,
        recipient: str,
        payload: str,
        sender: str | None,
        kind: str,
        priority: Priority,
        ttl: float | None,
        expects_reply: bool,
    ) -> AgentMessage:
        await self.start()
        if ttl is not None and ttl <= 0:
            raise InvalidCommand("ttl must be positive")
        try:
            address = dm.parse_address(recipient)
        except ValueError as exc:
            raise InvalidCommand(str(exc)) from None
        message_id = uuid.uuid4().hex
        route = await self._route(address, message_id)
        message = AgentMessage(
            message_id=message_id,
            kind=str(kind),
            correlation_id=None,
            sender=sender or self.name,
            reply_to=self.inbox_id,
            reply_partition=self.partition,
            recipient=recipient,
            agent_id=route.agent_id if route else None,
            host_id=route.host_id if route else None,
            pool=route.pool if route else None,
            expires_at=None if ttl is None else now_us() + round(ttl * 1_000_000),
            priority=Priority(priority),
            expects_reply=expects_reply,
            payload=payload,
        )
        if (reason := dm.invalid_message(message)) is not None:
            raise InvalidCommand(reason)
        return message

    async def _send(self, message: AgentMessage) -> None:
        if message.pool is not None:
            partition = pool_partition(message.pool, self._partitions)
            await self.producer.send_all([self._record(message, partition)])
            return
        # Nobody by that name: the message is recorded (where only the sender's inbox
        # partition holds it, no header: nobody decodes it) with its error answer.
        reason = f"no agent or pool named {message.recipient!r}"
        error = self._answer(
            message,
            dm.MessageKind.ERROR,
            error_payload(UnknownRecipient.__name__, reason),
            SYSTEM_SENDER,
        )
        await self.producer.send_all(
            [self._record(message, self.partition), self._record(error, self.partition)]
        )
        if not message.expects_reply:
            raise UnknownRecipient(reason)

    def _record(self, message: AgentMessage, partition: int) -> Outgoing:
        headers = headers_for()
        if message.host_id is not None:
            headers.append((HOST_HEADER, message.host_id.encode()))
        elif message.pool is not None and not dm.MessageKind(message.kind).answers:
            headers.append((BROADCAST_HEADER, message.pool.encode()))
        return self.producer.encode(
            self.topics.messages,
            partition,
            message.recipient,
            message,
            correlation_id=message.correlation_id or message.message_id,
            headers=headers,
        )[1]

    # -- the directory -------------------------------------------------------------------

    async def _route(self, address: dm.Address, message_id: str) -> dm.Route | None:
        await self._read_directory()
        route = dm.resolve(address, self._directory, message_id)
        if route is None:
            # Perhaps registered a moment ago: read the agents topic up to its end now.
            with contextlib.suppress(TimeoutError, KafkaError):
                async with asyncio.timeout(DIRECTORY_CATCH_UP_S):
                    await self._caught_up()
            route = dm.resolve(address, self._directory, message_id)
        return route

    async def _read_directory(self) -> None:
        async with self._starting:
            if not self._directory_started:
                consumer = new_consumer(self.settings, auto_offset_reset="earliest")
                self._directory_consumer = consumer
                try:
                    await consumer.start()
                    partitions = await self.producer.partitions(self.topics.agents)
                    tps = [TopicPartition(self.topics.agents, p) for p in range(partitions)]
                    consumer.assign(tps)
                    await consumer.seek_to_beginning(*tps)
                except KafkaError as exc:
                    raise BrokerUnavailable(f"cannot read {self.topics.agents}: {exc}") from exc
                self._loops.append(asyncio.create_task(self._tail(), name="messages-directory"))
                self._directory_started = True
                await self._caught_up()  # once; later, only a miss looks again (_route)

    async def _caught_up(self) -> None:
        consumer = self._directory_consumer
        assert consumer is not None
        tps = list(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        while True:
            self._directory_read.clear()  # before looking: a batch read meanwhile wakes us
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return
            await self._directory_read.wait()

    async def _tail(self) -> None:
        consumer = self._directory_consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            except KafkaError:
                await asyncio.sleep(0.5)
                continue
            for messages in batch.values():
                for message in messages:
                    self._registered(message.value)
            self._directory_read.set()

    def _registered(self, value: bytes | None) -> None:
        try:
            _, event = self.producer.codec.decode(value)
        except SchemaError:
            return  # the projector dead-letters bad records; not ours to judge
        if isinstance(event, AgentRegistered):
            self._directory[event.agent_id] = (event.pool, event.host_id)

    # -- the inbox ------------------------------------------------------------------------

    def _mine(self, headers: object) -> bool:
        """Whether a record's headers name this inbox or its pool (without decoding it)."""
        for key, value in headers or ():  # type: ignore[attr-defined]
            if key == HOST_HEADER and value == self.inbox_id.encode():
                return True
            if key == BROADCAST_HEADER and self.pool is not None and value == self.pool.encode():
                return True
        return False

    async def _read(self, tp: TopicPartition) -> None:
        consumer = self._inbox_consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(tp, timeout_ms=1000)
            except KafkaError:
                await asyncio.sleep(0.5)  # an outage: asks wait (AskTimeout)
                continue
            records = [Record.of(m) for m in batch.get(tp, []) if self._mine(m.headers)]
            decoded: list[tuple[AgentMessage, Record]] = []
            for record in records:
                self.decoded += 1
                try:
                    _, event = self.producer.codec.decode(record.value)
                except SchemaError as exc:
                    await self.dead_letter(record, str(exc), "InvalidEvent")
                    continue
                if not isinstance(event, AgentMessage):
                    await self.dead_letter(
                        record, f"{event.TYPE} carries a message header", "InvalidEvent"
                    )
                    continue
                decoded.append((event, record))
            now = now_us()
            # Higher priority first within what one fetch gave; record order otherwise.
            for event, record in sorted(decoded, key=lambda d: d[0].priority):
                await self._received(event, record, now)
            if batch.get(tp) and self._group:
                with contextlib.suppress(KafkaError):
                    await consumer.commit({tp: await consumer.position(tp)})

    async def _received(self, message: AgentMessage, record: Record, now: int) -> None:
        if dm.expired(message, now):
            late_ms = (now - (message.expires_at or now)) / 1000
            log.info(
                "%s: message %s to %s expired %.0f ms before delivery",
                self.name,
                message.message_id,
                message.recipient,
                late_ms,
            )
            if self._deliver is not None and self.pool is not None:
                metrics.agent_messages.labels(self.pool, "expired").inc()
            await self.dead_letter(record, "expired", "MessageExpired")
            return
        if message.kind in dm.ANSWERS:
            future = self._waiting.get(message.correlation_id or "")
            if future is not None and not future.done():
                future.set_result(message)
            return  # an answer nobody waits for any more (its ask timed out): recorded
        if self._deliver is None:
            if message.expects_reply:
                reason = f"{self.inbox_id} is a client inbox: it takes no messages"
                await self.answer(
                    message, error_payload("NotAccepted", reason), error=True, sender=self.name
                )
            return
        await self._deliver(message, record)

    async def dead_letter(self, record: Record, reason: str, error_type: str) -> None:
        """Keep a message that cannot be delivered, with the reason, in the dead letters."""
        await self.producer.send(
            self.topics.deadletter,
            f"{record.topic}/{record.partition}/{record.offset}",
            DeadLetterRecord(
                reason=reason,
                error_type=error_type,
                original=record.value,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                processor=self.name,
            ),
            partition=0,
        )
