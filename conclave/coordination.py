"""Resource locks and versioned state, from Python.

    async with Coordinator(settings) as co:
        async with await co.acquire_lock("repo:main", "agent-7", ttl=30, wait=5) as lease:
            guard_writes_with(lease.token)     # a fencing token, larger at every grant
            await lease.renew()
        version = await co.update_state("wf-42", expected_version=3, value={"step": 4})

A request goes to the coordination requests topic (partition of its lock name or key,
the one its processor shard owns); the call returns when the processor's decision is on
the coordination topic, which the coordinator tails from the moment it started. Nothing
is decided here: the grant, the token, the version all come from the log.

Errors (all :class:`~conclave.errors.ConclaveError`): :class:`LockUnavailable` (locked by
X until T, or waited in vain), :class:`LeaseLost` (a renewal or release refused: the
token is stale, the lease ran out), :class:`StaleVersion` (the state moved on; it names
the current version), :class:`StateRejected` (any other refusal), :class:`NoDecision`
(no answer in time: is a worker running?).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import EventProducer, new_consumer, topics_for
from conclave.domain import coordination as co
from conclave.domain.events import (
    COORDINATION_DECISIONS,
    LockDenied,
    LockGranted,
    LockReleased,
    LockReleaseRequested,
    LockRenewed,
    LockRenewRequested,
    LockRequested,
    LockWaiting,
    StateCheckpointed,
    StateCheckpointRequested,
    StateRestored,
    StateRestoreRequested,
    StateUpdated,
    StateUpdateRejected,
    StateUpdateRequested,
)
from conclave.errors import BrokerUnavailable, ConclaveError, InvalidCommand, NotFound
from conclave.settings import Settings
from conclave.topics import pool_partition
from projections import coordination as queries
from projections.coordination import StateVersion
from schemas.codec import default_codec

__all__ = [
    "Coordinator",
    "Lease",
    "LeaseLost",
    "LockUnavailable",
    "NoDecision",
    "StaleVersion",
    "StateRejected",
    "StateVersion",
]

DECISION_GRACE_S = 30.0
"""How long past a request's own wait a decision may take before :class:`NoDecision`."""
READ_YOUR_WRITES_S = 5.0
"""How long :meth:`Coordinator.read_state` waits for the read model to show a version this
coordinator saw decided."""


class LockUnavailable(ConclaveError):
    """The lock is held by another (``locked by X until T``), or the wait ran out."""

    def __init__(self, reason: str, *, held_by: str | None, held_until: int | None) -> None:
        super().__init__(reason)
        self.held_by = held_by
        self.held_until = held_until


class LeaseLost(ConclaveError):
    """A renewal or release was refused: the lease ran out or passed to another."""


class StateRejected(ConclaveError):
    """A state request was refused; ``current_version`` is the key's version then."""

    def __init__(self, reason: str, *, current_version: int) -> None:
        super().__init__(reason)
        self.current_version = current_version


class StaleVersion(StateRejected):
    """The update named a version that is no longer the key's: read again and retry."""


class NoDecision(ConclaveError):
    """No decision arrived in time (no worker runs the coordination shards?)."""

    retriable = True
    permanent = False


@dataclass(slots=True)
class Lease:
    """A granted lock: hold it until ``expires_at`` (µs since the epoch), renew it before.
    Use ``token`` to fence writes: a resource that remembers the largest token it saw
    (:class:`conclave.domain.coordination.Fence`) refuses a holder that lost the lock."""

    name: str
    holder: str
    token: int
    expires_at: int
    ttl: float
    _coordinator: Coordinator = field(repr=False)

    async def renew(self, ttl: float | None = None) -> None:
        """Extend the lease to ``ttl`` (default: the one it was granted with) from now;
        :class:`LeaseLost` if it is no longer this holder's."""
        await self._coordinator._renew(self, self.ttl if ttl is None else ttl)

    async def release(self) -> None:
        """Give the lock up (the next in line gets it); :class:`LeaseLost` if it was no
        longer this holder's anyway."""
        await self._coordinator._release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(LeaseLost):
            await self.release()


class Coordinator:
    """Locks and versioned state for one process: one producer, one reader of decisions.

    ``db`` (the read models) is needed only to read state (:meth:`read_state`,
    :meth:`state_history`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        producer_name: str = "coordination",
        db: asyncpg.Pool | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics_for(settings)
        self.db = db
        self._producer_name = producer_name
        self._producer: EventProducer | None = None
        """Made on start: an aiokafka producer never started warns when collected."""
        self._codec = default_codec()
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task[None] | None = None
        self._partitions = 0
        self._waiting: dict[str, asyncio.Future[co.Decision]] = {}
        self._versions: dict[str, int] = {}
        """The newest version of each key this coordinator saw decided."""
        self._started = False
        self._producing = False
        self._starting = asyncio.Lock()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, and stand at the end of the decisions: every decision from now on is
        seen (so a request sent after this returns is answered here)."""
        async with self._starting:  # agents of one host may all ask at once
            if not self._started:
                await self._start()

    async def _start(self) -> None:
        producer = self._producer = EventProducer(self.settings, producer=self._producer_name)
        await producer.start()
        self._producing = True
        try:
            self._partitions = await producer.partitions(self.topics.coordination)
            consumer = new_consumer(self.settings, auto_offset_reset="latest")
            await consumer.start()
            self._consumer = consumer
            tps = [TopicPartition(self.topics.coordination, p) for p in range(self._partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)  # resolved now, before any request is sent
        except KafkaError as exc:
            await self.stop()
            raise BrokerUnavailable(f"cannot read {self.topics.coordination}: {exc}") from exc
        self._tail = asyncio.create_task(self._read(), name="coordination-decisions")
        self._started = True

    async def stop(self) -> None:
        self._started = False
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
            self._tail = None
        if self._consumer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._consumer.stop()
            self._consumer = None
        if self._producer is not None and self._producing:
            self._producing = False
            await self._producer.stop()
        self._producer = None
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    # -- locks ------------------------------------------------------------------------

    async def acquire_lock(self, name: str, holder: str, ttl: float, *, wait: float = 0.0) -> Lease:
        """Take lock ``name`` for ``ttl`` seconds. Held by another: wait in line up to
        ``wait`` seconds (0: fail at once); :class:`LockUnavailable` says who holds it
        until when."""
        request = LockRequested(
            name=name,
            holder=holder,
            ttl_ms=_ms(ttl),
            wait_ms=_ms(wait),
            request_id=_request_id(),
        )
        decision = await self._ask(request, name, within=wait)
        if isinstance(decision, LockGranted):
            return Lease(name, holder, decision.fencing_token, decision.expires_at, ttl, self)
        assert isinstance(decision, LockDenied), decision
        raise LockUnavailable(
            decision.reason, held_by=decision.held_by, held_until=decision.held_until
        )

    async def _renew(self, lease: Lease, ttl: float) -> None:
        request = LockRenewRequested(
            name=lease.name,
            holder=lease.holder,
            fencing_token=lease.token,
            ttl_ms=_ms(ttl),
            request_id=_request_id(),
        )
        decision = await self._ask(request, lease.name)
        if not isinstance(decision, LockRenewed):
            assert isinstance(decision, LockDenied), decision
            raise LeaseLost(decision.reason)
        lease.expires_at, lease.ttl = decision.expires_at, ttl

    async def _release(self, lease: Lease) -> None:
        request = LockReleaseRequested(
            name=lease.name,
            holder=lease.holder,
            fencing_token=lease.token,
            request_id=_request_id(),
        )
        decision = await self._ask(request, lease.name)
        if not isinstance(decision, LockReleased):
            assert isinstance(decision, LockDenied), decision
            raise LeaseLost(decision.reason)

    async def release_lock(self, name: str, holder: str, token: int) -> None:
        """Release a lease known only by its token (``conclave lock release``)."""
        await self._release(Lease(name, holder, token, 0, 0.0, self))

    # -- versioned state ---------------------------------------------------------------

    async def update_state(self, key: str, expected_version: int, value: Any) -> int:
        """Set ``key`` to ``value`` (JSON-serialisable) if its version is still
        ``expected_version`` (0: not written yet); returns the new version.
        :class:`StaleVersion` (with ``current_version``) if it moved on: never merged."""
        request = StateUpdateRequested(
            key=key,
            expected_version=expected_version,
            value_json=json.dumps(value),
            request_id=_request_id(),
        )
        decision = await self._ask(request, key)
        if isinstance(decision, StateUpdated):
            return decision.version
        raise _rejected(decision)

    async def checkpoint_state(
        self, key: str, label: str, *, expected_version: int | None = None
    ) -> int:
        """Label ``key``'s current version ``label``; returns that version."""
        request = StateCheckpointRequested(
            key=key, label=label, expected_version=expected_version, request_id=_request_id()
        )
        decision = await self._ask(request, key)
        if isinstance(decision, StateCheckpointed):
            return decision.version
        raise _rejected(decision)

    async def restore_state(
        self, key: str, label: str, *, expected_version: int | None = None
    ) -> int:
        """Write checkpoint ``label``'s value as ``key``'s next version; returns it."""
        request = StateRestoreRequested(
            key=key, label=label, expected_version=expected_version, request_id=_request_id()
        )
        decision = await self._ask(request, key)
        if isinstance(decision, StateRestored):
            return decision.new_version
        raise _rejected(decision)

    async def read_state(self, key: str, version: int | None = None) -> StateVersion:
        """``key`` at ``version`` (default: the newest), from the read models; a version
        this coordinator saw decided is waited for (up to 5 s) while the projector catches
        up. :class:`~conclave.errors.NotFound` if there is no such version."""
        db = self._db()
        wanted = version if version is not None else self._versions.get(key, 0)
        deadline = asyncio.get_running_loop().time() + READ_YOUR_WRITES_S
        while True:
            found = await queries.state_version(db, key, version)
            if found is not None and found.version >= wanted:
                return found
            if asyncio.get_running_loop().time() >= deadline:
                if found is not None:
                    return found
                at = f" at version {version}" if version is not None else ""
                raise NotFound(f"no state {key!r}{at}")
            await asyncio.sleep(0.02)

    async def state_history(self, key: str) -> list[StateVersion]:
        return await queries.state_history(self._db(), key)

    def _db(self) -> asyncpg.Pool:
        if self.db is None:
            raise InvalidCommand("reading state needs the read models: Coordinator(db=...)")
        return self.db

    # -- asking and awaiting -------------------------------------------------------------

    async def _ask(self, request: co.Request, subject: str, *, within: float = 0.0) -> co.Decision:
        if not self._started:
            await self.start()
        if (reason := co.invalid_request(request)) is not None:
            raise InvalidCommand(reason)
        future: asyncio.Future[co.Decision] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = future
        assert self._producer is not None
        try:
            await self._producer.send(
                self.topics.coordination_requests,
                subject,
                request,
                partition=pool_partition(subject, self._partitions),
                correlation_id=request.request_id,
            )
            try:
                async with asyncio.timeout(within + DECISION_GRACE_S):
                    return await future
            except TimeoutError:
                raise NoDecision(
                    f"no decision on {request.TYPE} {subject!r} within "
                    f"{within + DECISION_GRACE_S:.0f} s: is `conclave worker` running?"
                ) from None
        finally:
            self._waiting.pop(request.request_id, None)

    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=1000)
            except KafkaError:
                await asyncio.sleep(0.5)  # an outage: the requests wait (NoDecision)
                continue
            for messages in batch.values():
                for message in messages:
                    self._decided(message.value)

    def _decided(self, value: bytes | None) -> None:
        try:
            _, event = self._codec.decode(value)
        except ConclaveError:
            return  # not ours to judge: the processor dead-letters bad records
        if isinstance(event, StateUpdated | StateRestored):
            version = event.version if isinstance(event, StateUpdated) else event.new_version
            self._versions[event.key] = max(self._versions.get(event.key, 0), version)
        if isinstance(event, LockWaiting) or not isinstance(event, COORDINATION_DECISIONS):
            return  # in line: the answer comes later
        request_id = getattr(event, "request_id", None)
        future = self._waiting.get(request_id) if isinstance(request_id, str) else None
        if future is not None and not future.done():
            future.set_result(event)


def _rejected(decision: co.Decision) -> StateRejected:
    assert isinstance(decision, StateUpdateRejected), decision
    kind = StaleVersion if decision.reason.startswith("stale") else StateRejected
    return kind(decision.reason, current_version=decision.current_version)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _request_id() -> str:
    return uuid.uuid4().hex
