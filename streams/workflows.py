"""The workflow processor: runs DAGs of steps as tasks, a thin shell around
:mod:`conclave.domain.workflows`.

One shard, ``workflows-0``. Inputs: the workflow requests topic (run, cancel), and every
partition of the tasks topic (how each step's task ended) and of the outputs topic (the
answers: a step's output is the one the scheduler's ``task.completed`` names, so a forged
output is never used). Its changelog is the workflows topic. When every dependency of a
step has completed, it renders the step's input and writes ``workflow.step_submitted``
**and** the step's ``task.submitted`` (on its priority's command topic) in the
transaction that also commits its input positions: a crash never submits a step twice nor
loses one, and a restart resumes from the last completed step. A step whose input reads
no output goes earlier, once its dependencies are submitted, with them as its task's
``depends_on`` (when their pools share its scheduler shard): the scheduler then queues it
in the decision that completes the last one, one hop sooner.

The tasks and outputs topics are state-only inputs too: what was read from them but not
decided yet (an output whose ``task.completed`` was not read yet) is folded again at
recovery. Records there are keyed by task id, so those of tasks that are not open
workflow steps are skipped without decoding; those topics' garbage is the scheduler's
and the witness's to dead-letter, not this shard's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from conclave import metrics
from conclave.bus import Outgoing, Position
from conclave.domain import workflows as wf
from conclave.domain.events import (
    WORKFLOW_DECISIONS,
    WORKFLOW_REQUESTS,
    AgentOutput,
    CancelRequested,
    CommandRejected,
    Envelope,
    Event,
    Priority,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDependencyFailed,
    TaskExpired,
    TaskSubmitted,
    WorkflowEnded,
    WorkflowStepSubmitted,
)
from conclave.errors import SchemaError
from conclave.records import Record
from conclave.topics import Topics, pool_partition
from streams.core import Emitter, Source

__all__ = ["WorkflowShard"]


class WorkflowShard:
    processor = "workflows"

    def __init__(self, topics: Topics, partitions: int, emitter: Emitter) -> None:
        self.topics = topics
        self.index = 0
        self.partitions = partitions
        self.emitter = emitter
        self.state = wf.WorkflowsState()

    @property
    def name(self) -> str:
        return "workflows-0"

    def inputs(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.workflow_requests, 0), *self.state_inputs()]

    def changelog(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.workflows, 0)]

    def state_inputs(self) -> list[TopicPartition]:
        return [
            TopicPartition(topic, i)
            for topic in (self.topics.tasks, self.topics.outputs)
            for i in range(self.partitions)
        ]

    def resume_at(self) -> Position | None:
        return None

    def restore(self, state: Mapping[str, Any] | None) -> None:
        self.state = wf.WorkflowsState() if state is None else wf.from_snapshot(state)

    def snapshot(self) -> Mapping[str, Any]:
        return wf.to_snapshot(self.state)

    def fold(self, record: Record, source: Source) -> list[Outgoing]:
        if source == "input":
            self._observe(record)
            return []
        try:
            _, event = self.emitter.codec.decode(record.value)
        except SchemaError as exc:
            return [
                self.emitter.dead_letter(record, reason=str(exc), error_type="SchemaError", now=0)
            ]
        if not isinstance(event, WORKFLOW_DECISIONS):
            reason = f"{event.TYPE} does not belong on {record.topic}"
            return [
                self.emitter.dead_letter(record, reason=reason, error_type="InvalidEvent", now=0)
            ]
        wf.evolve(self.state, event)
        return []

    def _observe(self, record: Record) -> None:
        """A record of the tasks or outputs topic: a fact about an open step, or nothing."""
        key = record.key.decode(errors="replace") if record.key is not None else ""
        if not wf.is_open(self.state, key):
            return
        try:
            envelope, event = self.emitter.codec.decode(record.value)
        except SchemaError:
            return
        match event:
            case AgentOutput() if record.topic == self.topics.outputs:
                wf.observe_output(self.state, event.task_id, envelope.event_id, event.content)
            case TaskCompleted() if record.topic == self.topics.tasks:
                wf.observe_end(self.state, event.task_id, "completed", event.output_event_id, "")
            case CommandRejected() if record.topic == self.topics.tasks:
                if event.command_type == TaskSubmitted.TYPE:
                    wf.observe_end(self.state, event.subject_id, "rejected", None, event.reason)
            case TaskDeadLettered() | TaskDependencyFailed() | TaskCancelled() | TaskExpired():
                if record.topic == self.topics.tasks:
                    outcome = event.TYPE.removeprefix("task.")
                    wf.observe_end(self.state, event.task_id, outcome, None, event.reason)
            case _:
                pass

    def step(
        self, records: Sequence[Record], now: int, unread: Mapping[TopicPartition, int]
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        requests = self.topics.workflow_requests
        for record in records:
            if record.topic != requests:
                self._observe(record)
                continue
            decoded = self.emitter.decode(record, now, out)
            if decoded is None:
                continue
            envelope, event = decoded
            if not isinstance(event, WORKFLOW_REQUESTS):
                reason = f"{event.TYPE} does not belong on {record.topic}"
                out.append(
                    self.emitter.dead_letter(
                        record, reason=reason, error_type="InvalidEvent", now=now
                    )
                )
                continue
            for decision in wf.decide(self.state, event, envelope.event_id, envelope.tenant):
                out += self._emit(decision, envelope, now, self.state.running)
                wf.evolve(self.state, decision)
        # settle() folds what it decides: keep the workflows it may end, for their
        # tenants and the pools of the steps it cancels.
        before = {w: self.state.running[w] for w in self.state.dirty if w in self.state.running}
        for decision in wf.settle(self.state, same_shard=self._same_shard):
            out += self._emit(decision, None, now, before)
        return out

    def _emit(
        self,
        decision: wf.Decision,
        cause: Envelope | None,
        now: int,
        running_before: Mapping[str, wf.Workflow],
    ) -> list[Outgoing]:
        """The decision on the changelog, and the commands it implies."""
        running = running_before.get(decision.workflow_id)
        tenant = running.tenant if running is not None else None
        out = [
            self.emitter.event(
                self.topics.workflows,
                0,
                decision.workflow_id,
                decision,
                now=now,
                causation=cause,
                tenant=tenant,
                correlation_id=decision.workflow_id,
            )
        ]
        if isinstance(decision, WorkflowStepSubmitted):
            command: Event = TaskSubmitted(
                task_id=decision.task_id,
                pool=decision.pool,
                priority=decision.priority,
                input=decision.input,
                agent_id=decision.agent_id,
                max_attempts=decision.max_attempts,
                depends_on=list(decision.depends_on),
            )
            out.append(
                self._command(
                    decision.priority, decision.pool, decision.task_id, command, tenant, now
                )
            )
        elif isinstance(decision, WorkflowEnded) and running is not None:
            for name in decision.cancelled_steps:
                step = running.steps[name]
                if any(running.steps[d].status != "completed" for d in step.spec.depends_on):
                    continue  # it waits on a step cancelled here: the scheduler fails it too
                task_id = wf.task_id_of(decision.workflow_id, name)
                cancel = CancelRequested(task_id=task_id, reason=f"workflow {decision.reason}")
                out.append(
                    self._command(Priority.CRITICAL, step.spec.pool, task_id, cancel, tenant, now)
                )
        return out

    def _command(
        self,
        priority: Priority,
        pool: str,
        task_id: str,
        command: Event,
        tenant: str | None,
        now: int,
    ) -> Outgoing:
        return self.emitter.event(
            self.topics.command(priority),
            pool_partition(pool, self.partitions),
            task_id,
            command,
            now=now,
            causation=None,
            tenant=tenant,
            correlation_id=task_id,
        )

    def _same_shard(self, a: str, b: str) -> bool:
        return pool_partition(a, self.partitions) == pool_partition(b, self.partitions)

    def next_due(self) -> int | None:
        return 0 if self.state.dirty else None  # observations folded at recovery

    def fences(self) -> list[tuple[str, TopicPartition]]:
        return []

    def gauges(self) -> Iterator[metrics.Sample]:
        yield "conclave_workflows_running", (self.name,), len(self.state.running)
