"""The coordination processor: resource locks and versioned state, a thin shell around
:mod:`conclave.domain.coordination`.

One shard per partition: shard ``i`` consumes partition ``i`` of the coordination
requests topic (clients put a request for lock name or state key ``k`` on partition
``pool_partition(k)``, so one shard owns each lock and each key) and appends its
decisions to partition ``i`` of the coordination topic, its changelog. Its state (every
lock's last fencing token, holder, lease and line of waiters; every key's version,
value and checkpoints) is a fold of that changelog, so tokens keep increasing and
versions keep counting across restarts. It steps at the earliest lease end or wait end,
so an expired lock is released by the processor itself, with an event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from conclave import metrics
from conclave.bus import Outgoing, Position
from conclave.domain import coordination as co
from conclave.domain.events import COORDINATION_DECISIONS, COORDINATION_REQUESTS, Envelope
from conclave.errors import SchemaError
from conclave.records import Record
from conclave.topics import Topics
from streams.core import Emitter, Source

__all__ = ["CoordinationShard"]


class CoordinationShard:
    processor = "coordination"

    def __init__(self, topics: Topics, index: int, emitter: Emitter) -> None:
        self.topics = topics
        self.index = index
        self.emitter = emitter
        self.state = co.CoordinationState()

    @property
    def name(self) -> str:
        return f"coordination-{self.index}"

    def inputs(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.coordination_requests, self.index)]

    def changelog(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.coordination, self.index)]

    def state_inputs(self) -> list[TopicPartition]:
        return []

    def resume_at(self) -> Position | None:
        return None  # the positions committed with the decisions

    def restore(self, state: Mapping[str, Any] | None) -> None:
        self.state = co.CoordinationState() if state is None else co.from_snapshot(state)

    def snapshot(self) -> Mapping[str, Any]:
        return co.to_snapshot(self.state)

    def fold(self, record: Record, source: Source) -> list[Outgoing]:
        try:
            _, event = self.emitter.codec.decode(record.value)
        except SchemaError as exc:
            return [
                self.emitter.dead_letter(record, reason=str(exc), error_type="SchemaError", now=0)
            ]
        if not isinstance(event, COORDINATION_DECISIONS):
            reason = f"{event.TYPE} does not belong on {record.topic}"
            return [
                self.emitter.dead_letter(record, reason=reason, error_type="InvalidEvent", now=0)
            ]
        co.evolve(self.state, event)
        return []

    def step(
        self, records: Sequence[Record], now: int, unread: Mapping[TopicPartition, int]
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        for decision in co.due(self.state, now):
            co.evolve(self.state, decision)
            out.append(self._emit(decision, None, now))
        for record in records:
            decoded = self.emitter.decode(record, now, out)
            if decoded is None:
                continue
            envelope, event = decoded
            if not isinstance(event, COORDINATION_REQUESTS):
                reason = f"{event.TYPE} does not belong on {record.topic}"
                out.append(
                    self.emitter.dead_letter(
                        record, reason=reason, error_type="InvalidEvent", now=now
                    )
                )
                continue
            for decision in co.decide(self.state, event, now):
                co.evolve(self.state, decision)
                out.append(self._emit(decision, envelope, now))
        return out

    def _emit(self, decision: co.Decision, cause: Envelope | None, now: int) -> Outgoing:
        return self.emitter.event(
            self.topics.coordination,
            self.index,
            co.subject(decision)[: co.MAX_NAME],
            decision,
            now=now,
            causation=cause,
        )

    def next_due(self) -> int | None:
        return co.next_due(self.state)

    def fences(self) -> list[tuple[str, TopicPartition]]:
        return []

    def gauges(self) -> Iterator[metrics.Sample]:
        held = Counter(lock.holder is not None for lock in self.state.locks.values())
        waiting = sum(len(lock.waiters) for lock in self.state.locks.values())
        yield "conclave_locks_held", (self.name,), held[True]
        yield "conclave_lock_waiters", (self.name,), waiting
        yield "conclave_state_keys", (self.name,), len(self.state.states)
