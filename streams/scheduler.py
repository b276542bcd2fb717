"""The scheduler processor: a thin shell around :mod:`conclave.domain.scheduling`.

Consumes commands (four priorities), control (halt/resume), agent facts and
witness entries; appends queued/dispatched/completed/dead-lettered events to
the tasks topic. Its state is a fold of its own output (plus agents and
control), rebuilt by :meth:`SchedulerProcessor.recover` before consuming.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from conclave.bus import EventProducer, read_history
from conclave.domain import scheduling
from conclave.domain.events import (
    AgentRegistered,
    DeliberationRequested,
    Envelope,
    Event,
    Halt,
    Heartbeat,
    Resume,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskQueued,
    TaskSubmitted,
    WitnessEntry,
)
from conclave.domain.scheduling import SchedulerEvent
from conclave.domain.validation import invalid_command
from conclave.errors import SchemaError
from conclave.records import DeadLetters, Record, decode_or_dead_letter
from conclave.topics import HOST_HEADER, Topics
from conclave.tracing import Headers, context_from, headers_for, tracer

__all__ = ["SchedulerProcessor"]


_FOLDED = (
    TaskQueued,
    TaskDispatched,
    TaskCompleted,
    TaskDeadLettered,
    AgentRegistered,
    Halt,
    Resume,
)


class SchedulerProcessor:
    name = "scheduler"

    def __init__(self, producer: EventProducer, topics: Topics, capacity: int) -> None:
        self.producer = producer
        self.topics = topics
        self.state = scheduling.SchedulerState(capacity=capacity)
        self.dead_letters = DeadLetters(producer, topics, self.name)
        self.task_traces: dict[str, Headers] = {}
        """Trace headers of each live task, from the command that created it."""
        # What each non-command input topic may carry (commands are checked by
        # invalid_command). Anything else is dead-lettered, not ignored.
        self.accepts: dict[str, tuple[type[Any], ...]] = {
            topics.control: (Halt, Resume),
            topics.agents: (AgentRegistered, Heartbeat),
            topics.witness: (WitnessEntry,),
        }

    @property
    def inputs(self) -> list[str]:
        return [*self.topics.commands, self.topics.control, self.topics.agents, self.topics.witness]

    async def recover(self) -> int:
        """Fold the scheduler's own history into its state; returns events folded."""
        codec = self.producer.codec
        folded = 0
        source = [self.topics.tasks, self.topics.agents, self.topics.control]
        async for message in read_history(self.producer.settings, source):
            try:
                _, event = codec.decode(message.value)
            except SchemaError:
                continue  # dead-lettered when it was first consumed
            if isinstance(event, _FOLDED):
                scheduling.evolve(self.state, event)
                folded += 1
        return folded

    async def handle(self, record: Record) -> None:
        decoded = await decode_or_dead_letter(self.producer.codec, record, self.dead_letters)
        if decoded is None:
            return
        envelope, event = decoded
        if (rejection := self._rejection(record.topic, event)) is not None:
            reason, error_type = rejection
            await self.dead_letters.put(record, reason=reason, error_type=error_type)
            return
        with tracer().start_as_current_span(
            f"schedule {event.TYPE}",
            context=context_from(record.headers),
            kind=trace.SpanKind.CONSUMER,
        ):
            await self._apply(envelope, event)

    def _rejection(self, topic: str, event: Event) -> tuple[str, str] | None:
        """Why ``event`` may not be consumed from ``topic`` (reason, error type), if so."""
        if topic in self.topics.commands:
            reason = invalid_command(event)
            if reason is None and isinstance(event, Halt | Resume):
                reason = f"{event.TYPE} belongs on {self.topics.control}, where it is witnessed"
            return None if reason is None else (reason, "InvalidCommand")
        if not isinstance(event, self.accepts.get(topic, ())):
            return f"{event.TYPE} does not belong on {topic}", "InvalidEvent"
        return None

    async def _apply(self, cause: Envelope, event: Event) -> None:
        decided: list[TaskQueued | TaskCompleted | TaskDeadLettered] = []
        match event:
            case TaskSubmitted() | DeliberationRequested() | WitnessEntry():
                decided = scheduling.decide(self.state, event)
            case AgentRegistered() | Halt() | Resume():
                scheduling.evolve(self.state, event)
            case _:
                return  # a heartbeat: liveness is not the scheduler's concern
        for outcome in decided:
            scheduling.evolve(self.state, outcome)
        dispatched = scheduling.schedule(self.state)
        for dispatch in dispatched:
            scheduling.evolve(self.state, dispatch)
        here = headers_for()
        emitted: list[SchedulerEvent] = [*decided, *dispatched]
        for event_out in emitted:
            # A task's events carry the task's own trace, whatever event let it move on
            # (a dispatch may be caused by another task finishing or an agent registering).
            headers = self.task_traces.setdefault(event_out.task_id, here)
            if isinstance(event_out, TaskDispatched):
                headers = [*headers, (HOST_HEADER, event_out.host_id.encode())]
            elif isinstance(event_out, TaskCompleted | TaskDeadLettered):
                self.task_traces.pop(event_out.task_id, None)
            await self.producer.send(
                self.topics.tasks, event_out.task_id, event_out, causation=cause, headers=headers
            )
