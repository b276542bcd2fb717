"""The client SDK: produce commands to Conclave's topics.

    async with Client(settings) as client:
        task_id = await client.submit("summarise the minutes", priority=Priority.HIGH)
        report = await client.submit("write the report", depends_on=[task_id])
        deliberation_id = await client.deliberate("Shall we adjourn?", agent_ids=[...])
        await client.cancel(report)
        workflow_id = await client.run_workflow(definition, {"topic": "minutes"})

Every call returns once the broker has acknowledged the command. Commands of one pool go
to one partition (:func:`conclave.topics.pool_partition`), the one its scheduler shard
reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace

from conclave import payloads
from conclave.bus import EventProducer, topics_for
from conclave.domain import workflows
from conclave.domain.events import (
    CancelRequested,
    DeliberationRequested,
    Envelope,
    Halt,
    PoolConfigured,
    Priority,
    ProjectionDigest,
    Resume,
    TaskSubmitted,
    WorkflowCancelRequested,
    WorkflowRunRequested,
)
from conclave.domain.retry import DEFAULT_RETRY, RetryPolicy
from conclave.domain.validation import MAX_INPUT_BYTES, invalid_command
from conclave.errors import InvalidCommand
from conclave.settings import Settings
from conclave.topics import pool_partition
from conclave.tracing import headers_for, tracer

__all__ = ["Client", "idempotent_task_id"]


def idempotent_task_id(tenant: str, key: str) -> str:
    """The task id an idempotency key stands for in ``tenant``: ``idem-`` and 40 hex
    digits of SHA-256 over the tenant, a NUL and the key. The same key gives the same id
    (so the scheduler runs it once); another tenant's same key, another id."""
    if not key:
        raise InvalidCommand("idempotency_key must not be empty")
    digest = hashlib.sha256(tenant.encode() + b"\x00" + key.encode()).hexdigest()
    return f"idem-{digest[:40]}"


class Client:
    def __init__(self, settings: Settings, *, producer_name: str = "client") -> None:
        self.settings = settings
        self.topics = topics_for(settings)
        self._producer = EventProducer(settings, producer=producer_name)
        self._partitions: dict[str, int] = {}

    async def _partition(self, topic: str, pool: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            count = self._partitions[topic] = await self._producer.partitions(topic)
        return pool_partition(pool, count)

    async def __aenter__(self) -> Client:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def submit(
        self,
        input: str,
        *,
        task_id: str | None = None,
        pool: str = "default",
        priority: Priority = Priority.NORMAL,
        agent_id: str | None = None,
        max_attempts: int = 1,
        retry: RetryPolicy = DEFAULT_RETRY,
        redrive_of: str | None = None,
        depends_on: Sequence[str] = (),
        start_within_ms: int | None = None,
        finish_by: int | None = None,
        fairness_key: str | None = None,
        key_limit: int | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Submit one task; returns its id. Submitting the same id twice runs it once.

        A failed attempt is retried while ``max_attempts`` allows, after the back-off of
        ``retry`` (1 s, doubling, at most 60 s, +-20 % by default). Anything the scheduler
        would refuse (a bad id, a policy that makes no sense) raises
        :class:`~conclave.errors.InvalidCommand`, a ``ValueError``, before it is sent.
        ``redrive_of`` names the dead-lettered task this one runs again
        (``conclave dlq redrive``).

        ``depends_on``: tasks that must complete first; the task waits (``waiting``)
        until they have, and ends ``dependency_failed`` if one is dead-lettered or
        cancelled. Each must have been submitted before (awaited), in a pool of the same
        scheduler shard (any pool with one partition, the default); an unknown one gets
        the task rejected.

        ``start_within_ms``: not dispatched within this long of being accepted (waiting
        for dependencies included), the task ends ``expired``. ``finish_by`` (µs since the
        epoch, see :func:`conclave.domain.events.now_us`): not finished by then, it ends
        ``expired``, a running attempt stopped.

        ``fairness_key``: tasks of equal priority in a pool take turns between tenants,
        and between the keys of one tenant (a customer id, say); ``key_limit``: at most
        this many tasks of the tenant's key (of the tenant, without a key) in flight in
        the pool at once, however many agents are idle.

        ``idempotency_key``: instead of a ``task_id``, a key of the caller's choosing:
        the task id is derived from it and this client's tenant
        (:func:`idempotent_task_id`), so submitting the same key again is a no-op that
        returns the same id, and the same key in another tenant is another task.

        An ``input`` over one record's limit (900,000 bytes of UTF-8) is stored in chunks
        on the payloads topic and the task carries a reference to it, which the runtime
        host resolves before the agent sees the input (:mod:`conclave.payloads`; at most
        64 MiB)."""
        if idempotency_key is not None:
            if task_id is not None:
                raise InvalidCommand("give a task_id or an idempotency_key, not both")
            task_id = idempotent_task_id(self.settings.tenant, idempotency_key)
        task_id = task_id or str(uuid.uuid4())
        if len(input) * 4 > MAX_INPUT_BYTES and len(data := input.encode()) > MAX_INPUT_BYTES:
            ref = await payloads.store(self._producer, self.topics.payloads, task_id, data)
            input = ref.text()
        event = _submitted(task_id, input, pool, priority, agent_id, max_attempts, retry)
        event = dataclasses.replace(
            event,
            redrive_of=redrive_of,
            depends_on=list(depends_on),
            start_within_ms=start_within_ms,
            finish_by=finish_by,
            fairness_key=fairness_key,
            key_limit=key_limit,
        )
        _check(event)
        topic = self.topics.command(priority)
        with tracer().start_as_current_span("submit", kind=trace.SpanKind.PRODUCER) as span:
            span.set_attribute("conclave.task_id", task_id)
            await self._producer.send(
                topic,
                task_id,
                event,
                partition=await self._partition(topic, pool),
                correlation_id=task_id,
                headers=headers_for(),
            )
        return task_id

    async def submit_many(
        self,
        inputs: Sequence[str],
        *,
        task_ids: Sequence[str] | None = None,
        pool: str = "default",
        priority: Priority = Priority.NORMAL,
        max_attempts: int = 1,
        retry: RetryPolicy = DEFAULT_RETRY,
        depends_on: Sequence[Sequence[str]] | None = None,
        fairness_key: str | None = None,
        key_limit: int | None = None,
    ) -> list[str]:
        """Submit one task per input, awaiting the broker's acknowledgements once per
        thousand rather than once per task; returns the task ids in order.

        ``depends_on[i]``: the dependencies of the ``i``-th task (see :meth:`submit`).
        Tasks of one call go to one topic partition in order, so a task may depend on
        one earlier in the same call. ``fairness_key`` and ``key_limit``: as for
        :meth:`submit`, the same for every task of the call."""
        ids = list(task_ids) if task_ids is not None else [str(uuid.uuid4()) for _ in inputs]
        if len(ids) != len(inputs):
            raise ValueError("task_ids and inputs differ in length")
        if depends_on is not None and len(depends_on) != len(inputs):
            raise ValueError("depends_on and inputs differ in length")
        topic = self.topics.command(priority)
        partition = await self._partition(topic, pool)
        for start in range(0, len(ids), 1000):
            records = []
            for i in range(start, min(start + 1000, len(ids))):
                task_id = ids[i]
                event = _submitted(task_id, inputs[i], pool, priority, None, max_attempts, retry)
                if fairness_key is not None or key_limit is not None:
                    event = dataclasses.replace(
                        event, fairness_key=fairness_key, key_limit=key_limit
                    )
                if depends_on is not None and depends_on[i]:
                    event = dataclasses.replace(event, depends_on=list(depends_on[i]))
                _check(event)
                with tracer().start_as_current_span("submit", kind=trace.SpanKind.PRODUCER):
                    _, record = self._producer.encode(
                        topic, partition, task_id, event, correlation_id=task_id
                    )
                records.append(record)
            await self._producer.send_all(records)
        return ids

    async def deliberate(
        self,
        motion: str,
        *,
        agent_ids: Sequence[str] = (),
        deliberation_id: str | None = None,
        pool: str = "default",
        priority: Priority = Priority.HIGH,
        finish_by: int | None = None,
    ) -> str:
        """Put one motion to many agents; each answers in its own task and context.

        Their answers are revealed together, once every agent is done: ``finish_by``
        (µs since the epoch) bounds the wait, an agent not done by then expires.

        ``agent_ids`` empty means every agent registered in ``pool`` when the scheduler
        takes the motion (none registered: the deliberation is rejected). Named agents
        get a task each, which waits until that agent is idle; an agent not registered
        in the pool is waited for 10 s (a host starting), then its task expires, naming
        it."""
        deliberation_id = deliberation_id or f"delib-{uuid.uuid4().hex[:12]}"
        event = DeliberationRequested(
            deliberation_id=deliberation_id,
            pool=pool,
            priority=priority,
            motion=motion,
            agent_ids=list(agent_ids),
            finish_by=finish_by,
        )
        _check(event)
        topic = self.topics.command(priority)
        with tracer().start_as_current_span("deliberate", kind=trace.SpanKind.PRODUCER):
            await self._producer.send(
                topic,
                deliberation_id,
                event,
                partition=await self._partition(topic, pool),
                correlation_id=deliberation_id,
                headers=headers_for(),
            )
        return deliberation_id

    async def cancel(
        self,
        task_id: str | None = None,
        *,
        deliberation_id: str | None = None,
        pool: str = "default",
        reason: str = "",
    ) -> None:
        """Cancel one task, or every unfinished task of a deliberation, in ``pool``.

        A waiting, queued or retrying task ends ``cancelled`` at once; a running one too,
        and its host stops the agent (a late answer is witnessed but is not the task's
        answer). Tasks depending on it end ``dependency_failed``. Cancelling a finished
        or unknown task is rejected (``conclave task show`` says why); cancelling a
        cancelled one again does nothing. Sent on the critical topic: it overtakes work."""
        event = CancelRequested(task_id=task_id, deliberation_id=deliberation_id, reason=reason)
        _check(event)
        subject = task_id or deliberation_id or ""
        topic = self.topics.command(Priority.CRITICAL)
        await self._producer.send(
            topic,
            subject,
            event,
            partition=await self._partition(topic, pool),
            correlation_id=subject,
            headers=headers_for(),
        )

    async def run_workflow(
        self,
        definition: Mapping[str, Any],
        input: Any = None,
        *,
        workflow_id: str | None = None,
    ) -> str:
        """Run a workflow: ``definition`` is the mapping a workflow file holds (``name``,
        ``steps``: each with ``name``, ``input`` template, ``pool`` or ``agent``,
        ``priority``, ``max_attempts``, ``depends_on``; see
        :mod:`conclave.domain.workflows`), ``input`` any JSON value its templates read.
        Returns the workflow id (``wf-`` and 12 hex digits unless given; the same id runs
        once). Unknown references, cycles and input paths ``input`` lacks raise
        :class:`~conclave.errors.InvalidCommand` before anything is sent; the workflow
        processor checks again and writes ``workflow.rejected`` with the reason."""
        workflow_id = workflow_id or f"wf-{uuid.uuid4().hex[:12]}"
        if workflows.WORKFLOW_ID.fullmatch(workflow_id) is None:
            raise InvalidCommand("workflow_id must be 1-100 of A-Z a-z 0-9 _ -")
        try:
            spec = workflows.parse(dict(definition), input)
            input_json = json.dumps(input)
        except (ValueError, TypeError) as exc:
            raise InvalidCommand(str(exc)) from None
        event = WorkflowRunRequested(
            workflow_id=workflow_id, definition_json=spec.to_json(), input_json=input_json
        )
        await self._producer.send(
            self.topics.workflow_requests,
            workflow_id,
            event,
            partition=0,
            correlation_id=workflow_id,
            headers=headers_for(),
        )
        return workflow_id

    async def cancel_workflow(self, workflow_id: str, *, reason: str = "") -> None:
        """Cancel a running workflow as a whole: its running steps are cancelled (their
        agents stopped), the others never run. A finished or unknown workflow: rejected
        (``workflow.rejected``), nothing else happens."""
        event = WorkflowCancelRequested(workflow_id=workflow_id, reason=reason)
        await self._producer.send(
            self.topics.workflow_requests,
            workflow_id,
            event,
            partition=0,
            correlation_id=workflow_id,
            headers=headers_for(),
        )

    async def configure_pool(
        self,
        pool: str,
        *,
        capacity: int,
        reason: str = "",
        operator: str = "operator",
        aging_turns: int | None = None,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        """Set ``pool``'s capacity (tasks in flight at most) from now on; witnessed. 0 stops
        dispatching to it; lowering it stops nothing that runs. Other pools keep theirs:
        a foreground and a background pool never take each other's places.
        ``aging_turns``: ``None`` (the default) serves by strict priority; ``N`` lets a
        task accepted from now on gain one priority level per ``N`` turns served in the
        pool, so low priority cannot starve. ``weights``: fairness key (a tenant, or
        ``tenant/key``) -> 1-1,000; among keys with work queued at the same priority, one
        of weight ``w`` is served ``w`` tasks for each of a key of weight 1 (keys not
        named weigh 1). Each call sets the pool's whole configuration."""
        event = PoolConfigured(
            pool=pool,
            capacity=capacity,
            reason=reason,
            operator=operator,
            aging_turns=aging_turns,
            weights=dict(weights or {}),
        )
        _check(event)
        await self._producer.send(self.topics.control, "system", event, partition=0)

    async def record_digest(self, event: ProjectionDigest) -> Envelope:
        """Commit a projection digest to the witness log (via the control topic)."""
        return await self._producer.send(self.topics.control, "system", event, partition=0)

    async def halt(
        self, reason: str, *, operator: str = "operator", cancel_running: bool = False
    ) -> None:
        """Stop dispatching everywhere (witnessed). Tasks in flight finish, unless
        ``cancel_running``: then they are cancelled and their agents stopped."""
        halt = Halt(reason=reason, operator=operator, cancel_running=cancel_running)
        await self._producer.send(self.topics.control, "system", halt, partition=0)

    async def resume(self, reason: str, *, operator: str = "operator") -> None:
        await self._producer.send(
            self.topics.control, "system", Resume(reason=reason, operator=operator), partition=0
        )

    async def send_raw(
        self, topic: str, key: str, value: bytes | None, *, partition: int | None = None
    ) -> int:
        """Produce arbitrary bytes, ``None`` for a tombstone (tests and tooling: garbage must
        be dead-lettered); returns the offset."""
        return await self._producer.send_raw(topic, key, value, partition=partition)


def _submitted(
    task_id: str,
    input: str,
    pool: str,
    priority: Priority,
    agent_id: str | None,
    max_attempts: int,
    retry: RetryPolicy,
) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=task_id,
        pool=pool,
        priority=priority,
        input=input,
        agent_id=agent_id,
        max_attempts=max_attempts,
        **retry.as_fields(),
    )


def _check(
    command: TaskSubmitted | DeliberationRequested | CancelRequested | PoolConfigured,
) -> None:
    """Refuse here, with the scheduler's own words, what the scheduler would reject."""
    if (reason := invalid_command(command)) is not None:
        raise InvalidCommand(reason)
