"""What each projected event does to the read-model rows, and a batch's changes coalesced.

Pure: no I/O. Two kinds of tables:

- **keyed state** (``tasks``, ``agents``, ``hosts``): a row per entity that events
  change in place; one event may change several rows (``host.lost``: the host's and
  each of its agents'). :func:`fold_task`, :func:`fold_agent` and :func:`fold_host` are
  the rules, one event at a time;
  a batch folds each entity's events in record order onto the row as stored, and
  writes the final row once. Folding a batch at once or one event per transaction
  gives the same row, because it is the same rules applied in the same order.
- **append-only** (``outputs``, ``task_failures``, ``witness_entries``,
  ``system_events``, ``dead_letters``): one row per event, first write wins
  (``ON CONFLICT DO NOTHING``), inserted in record order.

The order that matters is the order of one entity's events, which Kafka keeps
because they share a key (task id, agent id). Rows that two topics touch
(``agents``: registrations, heartbeats, the scheduler's suspensions; ``hosts``: beats
and losses) keep their columns apart or only let them grow, so the row does not depend
on how the topics interleave.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

from conclave.domain.events import (
    AGENTS_TOPIC_EVENTS,
    COORDINATION_DECISIONS,
    TASKS_TOPIC_EVENTS,
    WORKFLOW_DECISIONS,
    AgentCircuitClosed,
    AgentCircuitHalfOpened,
    AgentCircuitOpened,
    AgentFailed,
    AgentMessage,
    AgentOutput,
    AgentRegistered,
    AgentReinstated,
    AgentRestarted,
    AgentRetired,
    CommandRejected,
    DeadLetterRecord,
    Envelope,
    Event,
    Halt,
    Heartbeat,
    HostBeat,
    HostFailed,
    HostLeaving,
    HostLost,
    LockDenied,
    LockExpired,
    LockGranted,
    LockReleased,
    LockRenewed,
    LockWaiting,
    PoolConfigured,
    ProjectionDigest,
    Resume,
    StateCheckpointed,
    StateRestored,
    StateUpdated,
    StateUpdateRejected,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDependencyFailed,
    TaskDispatched,
    TaskExpired,
    TaskFailed,
    TaskQueued,
    TaskRetryScheduled,
    TaskStalled,
    WitnessCheckpoint,
    WitnessEntry,
    WorkflowEnded,
    WorkflowRejected,
    WorkflowStarted,
    WorkflowStepCompleted,
    WorkflowStepSubmitted,
)
from conclave.domain.lifecycle import LIFECYCLE_EVENTS, transitions
from conclave.domain.retry import retry_of
from conclave.domain.scheduler_state import TaskStatus
from conclave.topics import Topics

__all__ = [
    "AGENTS",
    "APPENDS",
    "HOSTS",
    "KEYED_TABLES",
    "TASKS",
    "WORKFLOWS",
    "WORKFLOW_STEPS",
    "AgentRow",
    "Changes",
    "Consumed",
    "HostRow",
    "LockRow",
    "Table",
    "TaskRow",
    "WorkflowRow",
    "WorkflowStepRow",
    "fold_agent",
    "fold_host",
    "fold_lock",
    "fold_task",
    "fold_workflow",
    "fold_workflow_step",
    "projected_from",
]


class Consumed(Protocol):
    """What the projector needs of a consumed record: where it was read, and its bytes.

    An aiokafka ``ConsumerRecord`` as fetched (copying thousands of them into
    :class:`conclave.records.Record` per batch costs more than the fold), or a ``Record``.
    """

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None:
        """``None`` for a null value (a tombstone), which is not the same as ``b""``."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]:
        """Kafka headers: the trace the record belongs to, among others."""


TaskEvent = (
    TaskQueued
    | TaskDispatched
    | TaskStalled
    | TaskRetryScheduled
    | TaskCompleted
    | TaskDeadLettered
    | TaskCancelled
    | TaskExpired
    | TaskDependencyFailed
)

TERMINAL = frozenset(s.value for s in TaskStatus if s.terminal)
"""Task statuses that no later event changes: the first terminal event wins (the
scheduler's own terminal statuses, as the read model spells them)."""


@dataclass(frozen=True, slots=True, eq=False)
class Table:
    """A read-model table as the projector writes it: columns with their SQL types.

    Compared and hashed by identity (each table is one module constant): it keys the
    dicts of every batch, and hashing the column tuples each time would cost more."""

    name: str
    columns: tuple[tuple[str, str], ...]
    key: str | None = None
    """The primary key of a keyed-state table; ``None`` for an append-only one."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)


@dataclass(slots=True)
class TaskRow:
    """One row of ``tasks``; field names are the column names."""

    task_id: str
    tenant: str
    correlation_id: str
    pool: str
    priority: str
    status: str
    input: str
    agent_id: str | None
    attempt: int
    max_attempts: int
    deliberation_id: str | None
    output_event_id: str | None
    witness_sequence: int | None
    error: str | None
    queued_at: int
    dispatched_at: int | None
    finished_at: int | None
    next_attempt_at: int | None
    """While ``retrying``: when the task is queued again, µs since the epoch."""
    redrive_of: str | None
    """The dead-lettered task this one runs again."""
    depends_on: list[str]
    """Tasks it waits for (while ``waiting``), as submitted."""
    start_by: int | None
    """Not dispatched by then (µs since the epoch), it expires."""
    finish_by: int | None
    """Not finished by then, it expires."""
    retry_backoff_ms: int
    """The task's retry policy, as submitted (a redrive runs with it again)."""
    retry_multiplier: float
    retry_backoff_max_ms: int
    retry_jitter: float


@dataclass(slots=True)
class AgentRow:
    """One row of ``agents``: registration columns and heartbeat columns."""

    agent_id: str
    pool: str | None
    host_id: str
    agent_ref: str | None
    registered_at: int | None
    last_heartbeat_at: int | None
    current_task_id: str | None
    rss_bytes: int | None
    suspended_at: int | None = None
    """When the scheduler stopped giving it work (its attempt stalled, or its host was
    lost); ``None`` once it was reinstated."""
    suspended_reason: str | None = None
    circuit: str | None = None
    """``open`` (no work until ``circuit_until``), ``half_open`` (one probe task) or
    ``None`` (closed)."""
    circuit_until: int | None = None
    circuit_reason: str | None = None
    capabilities: list[str] | None = None
    """What it can do, as its latest registration says."""
    version: str | None = None
    restarts: int | None = None
    """Restarts within the window, as its latest restart (``agent.restarted``) says."""
    restarted_at: int | None = None
    failed_reason: str | None = None
    """Why its host gave up on it (``agent.failed``); ``None`` once registered again."""
    retired_reason: str | None = None
    """Why its host retired it (``agent.retired``: the pool shrank); ``None`` once
    registered again."""


@dataclass(slots=True)
class HostRow:
    """One row of ``hosts``: a runtime host's latest beat, and whether it was lost since."""

    host_id: str
    pool: str | None
    agent_ids: list[str]
    last_beat_at: int | None
    lease_expires_at: int | None
    """The latest lease any of its beats promised (µs since the epoch, the host's clock)."""
    lost_lease: int | None
    """The lease the scheduler judged run out (``host.lost``): the host counts as lost
    while no beat promised a later one."""
    lost_at: int | None
    lost_reason: str | None
    leaving_until: int | None = None
    """When the drain of a host that said it is stopping ends (``host.leaving``): its
    lease ends then, and it counts as leaving (and, judged, as left) while no later beat
    promised more."""
    rss_bytes: int | None = None
    """The host process's resident memory, as its newest beat measured it."""
    cpu_percent: float | None = None
    """Its CPU use (% of one core) between its two newest beats."""
    failed_lease: int | None = None
    """The lease after which the scheduler judged it failed (``host.failed``): it counts
    as failed while lost with that lease."""
    failed_reason: str | None = None
    over_limit: str | None = None
    """Why its newest beat said it takes no new work (over its memory or CPU limit)."""


@dataclass(slots=True)
class LockRow:
    """One row of ``locks``: the lock's latest decision."""

    name: str
    holder: str | None
    """The holder now (``state`` held), else the last one."""
    fencing_token: int
    expires_at: int | None
    state: str
    """``held``, ``released`` or ``expired``."""
    waiters: list[str]
    """Holders in line, first first."""
    waiting_requests: list[str]
    updated_at: int


@dataclass(slots=True)
class WorkflowRow:
    """One row of ``workflows``."""

    workflow_id: str
    tenant: str
    name: str
    status: str
    """``running``, ``completed``, ``failed``, ``cancelled`` or ``rejected``."""
    input_json: str
    definition_json: str
    steps: int
    failed_step: str | None
    reason: str | None
    started_at: int
    ended_at: int | None


@dataclass(slots=True)
class WorkflowStepRow:
    """One row of ``workflow_steps`` (key: the step's task id)."""

    task_id: str
    workflow_id: str
    step: str
    position: int
    pool: str
    agent_id: str | None
    priority: str
    max_attempts: int
    depends_on: list[str]
    status: str
    """``pending``, ``submitted``, ``completed``, ``failed``, ``skipped``, ``cancelled``."""
    input: str | None
    output: str | None
    output_event_id: str | None
    submitted_at: int | None
    ended_at: int | None


def _table(name: str, row: type[Any], types: Mapping[str, str], key: str) -> Table:
    return Table(name, tuple((f.name, types[f.name]) for f in dataclasses.fields(row)), key)


TASKS = _table(
    "tasks",
    TaskRow,
    {
        "task_id": "text",
        "tenant": "text",
        "correlation_id": "text",
        "pool": "text",
        "priority": "text",
        "status": "text",
        "input": "text",
        "agent_id": "text",
        "attempt": "integer",
        "max_attempts": "integer",
        "deliberation_id": "text",
        "output_event_id": "text",
        "witness_sequence": "bigint",
        "error": "text",
        "queued_at": "bigint",
        "dispatched_at": "bigint",
        "finished_at": "bigint",
        "next_attempt_at": "bigint",
        "redrive_of": "text",
        "depends_on": "text[]",
        "start_by": "bigint",
        "finish_by": "bigint",
        "retry_backoff_ms": "bigint",
        "retry_multiplier": "double precision",
        "retry_backoff_max_ms": "bigint",
        "retry_jitter": "double precision",
    },
    "task_id",
)
AGENTS = _table(
    "agents",
    AgentRow,
    {
        "agent_id": "text",
        "pool": "text",
        "host_id": "text",
        "agent_ref": "text",
        "registered_at": "bigint",
        "last_heartbeat_at": "bigint",
        "current_task_id": "text",
        "rss_bytes": "bigint",
        "suspended_at": "bigint",
        "suspended_reason": "text",
        "circuit": "text",
        "circuit_until": "bigint",
        "circuit_reason": "text",
        "capabilities": "text[]",
        "version": "text",
        "restarts": "integer",
        "restarted_at": "bigint",
        "failed_reason": "text",
        "retired_reason": "text",
    },
    "agent_id",
)
HOSTS = _table(
    "hosts",
    HostRow,
    {
        "host_id": "text",
        "pool": "text",
        "agent_ids": "text[]",
        "last_beat_at": "bigint",
        "lease_expires_at": "bigint",
        "lost_lease": "bigint",
        "lost_at": "bigint",
        "lost_reason": "text",
        "leaving_until": "bigint",
        "rss_bytes": "bigint",
        "cpu_percent": "double precision",
        "over_limit": "text",
        "failed_lease": "bigint",
        "failed_reason": "text",
    },
    "host_id",
)
LOCKS = _table(
    "locks",
    LockRow,
    {
        "name": "text",
        "holder": "text",
        "fencing_token": "bigint",
        "expires_at": "bigint",
        "state": "text",
        "waiters": "text[]",
        "waiting_requests": "text[]",
        "updated_at": "bigint",
    },
    "name",
)
WORKFLOWS = _table(
    "workflows",
    WorkflowRow,
    {
        "workflow_id": "text",
        "tenant": "text",
        "name": "text",
        "status": "text",
        "input_json": "text",
        "definition_json": "text",
        "steps": "integer",
        "failed_step": "text",
        "reason": "text",
        "started_at": "bigint",
        "ended_at": "bigint",
    },
    "workflow_id",
)
WORKFLOW_STEPS = _table(
    "workflow_steps",
    WorkflowStepRow,
    {
        "task_id": "text",
        "workflow_id": "text",
        "step": "text",
        "position": "integer",
        "pool": "text",
        "agent_id": "text",
        "priority": "text",
        "max_attempts": "integer",
        "depends_on": "text[]",
        "status": "text",
        "input": "text",
        "output": "text",
        "output_event_id": "text",
        "submitted_at": "bigint",
        "ended_at": "bigint",
    },
    "task_id",
)
KEYED_TABLES = (TASKS, AGENTS, HOSTS, LOCKS, WORKFLOWS, WORKFLOW_STEPS)

OUTPUTS = Table(
    "outputs",
    (
        ("event_id", "text"),
        ("task_id", "text"),
        ("agent_id", "text"),
        ("attempt", "integer"),
        ("content", "text"),
        ("latency_us", "bigint"),
        ("deliberation_id", "text"),
        ("produced_at", "bigint"),
    ),
)
TASK_FAILURES = Table(
    "task_failures",
    (
        ("event_id", "text"),
        ("task_id", "text"),
        ("agent_id", "text"),
        ("attempt", "integer"),
        ("error_type", "text"),
        ("error_message", "text"),
        ("failed_at", "bigint"),
        ("permanent", "boolean"),
    ),
)
WITNESS_ENTRIES = Table(
    "witness_entries",
    (
        ("sequence", "bigint"),
        ("previous_hash", "bytea"),
        ("entry_hash", "bytea"),
        ("subject_type", "text"),
        ("subject_event_id", "text"),
        ("subject_digest", "bytea"),
        ("recorded_at", "bigint"),
        ("task_id", "text"),
        ("agent_id", "text"),
        ("detail", "text"),
        ("attempt", "integer"),
    ),
)
CHECKPOINTS = Table(
    "checkpoints",
    (
        ("origin", "text"),
        ("tree_size", "bigint"),
        ("root_hash", "bytea"),
        ("note", "text"),
        ("signed_at", "bigint"),
    ),
)
SYSTEM_EVENTS = Table(
    "system_events",
    (
        ("event_id", "text"),
        ("kind", "text"),
        ("reason", "text"),
        ("operator", "text"),
        ("occurred_at", "bigint"),
    ),
)
POOL_SETTINGS = Table(
    "pool_settings",
    (
        ("event_id", "text"),
        ("pool", "text"),
        ("capacity", "integer"),
        ("reason", "text"),
        ("operator", "text"),
        ("configured_at", "bigint"),
        ("aging_turns", "integer"),
        ("weights", "text[]"),
    ),
)
"""Every capacity an operator set (``conclave capacity``): the newest per pool holds."""
DEAD_LETTERS = Table(
    "dead_letters",
    (
        ("source_topic", "text"),
        ("source_partition", "integer"),
        ("source_offset", "bigint"),
        ("processor", "text"),
        ("reason", "text"),
        ("error_type", "text"),
        ("original", "bytea"),
        ("recorded_at", "bigint"),
    ),
)
REJECTIONS = Table(
    "rejections",
    (
        ("command_event_id", "text"),
        ("subject_id", "text"),
        ("command_type", "text"),
        ("reason", "text"),
        ("tenant", "text"),
        ("rejected_at", "bigint"),
    ),
)
LOCK_EVENTS = Table(
    "lock_events",
    (
        ("event_id", "text"),
        ("name", "text"),
        ("kind", "text"),
        ("holder", "text"),
        ("fencing_token", "bigint"),
        ("expires_at", "bigint"),
        ("reason", "text"),
        ("request_id", "text"),
        ("occurred_at", "bigint"),
    ),
)
MESSAGES = Table(
    "messages",
    (
        ("message_id", "text"),
        ("kind", "text"),
        ("correlation_id", "text"),
        ("sender", "text"),
        ("recipient", "text"),
        ("agent_id", "text"),
        ("host_id", "text"),
        ("pool", "text"),
        ("priority", "text"),
        ("expects_reply", "boolean"),
        ("expires_at", "bigint"),
        ("payload", "text"),
        ("sent_at", "bigint"),
    ),
)
STATE_VERSIONS = Table(
    "state_versions",
    (
        ("key", "text"),
        ("version", "bigint"),
        ("value_json", "text"),
        ("request_id", "text"),
        ("restored_from", "bigint"),
        ("label", "text"),
        ("updated_at", "bigint"),
    ),
)
STATE_CHECKPOINTS = Table(
    "state_checkpoints",
    (("key", "text"), ("label", "text"), ("version", "bigint"), ("checkpointed_at", "bigint")),
)
STATE_REJECTIONS = Table(
    "state_rejections",
    (
        ("event_id", "text"),
        ("key", "text"),
        ("action", "text"),
        ("expected_version", "bigint"),
        ("current_version", "bigint"),
        ("reason", "text"),
        ("request_id", "text"),
        ("rejected_at", "bigint"),
    ),
)
PROJECTION_DIGESTS = Table(
    "projection_digests",
    (
        ("event_id", "text"),
        ("schema_name", "text"),
        ("tables", "text[]"),
        ("positions", "text[]"),
        ("digest", "text"),
        ("reason", "text"),
        ("computed_at", "bigint"),
    ),
)
"""Every read-model digest a replay committed to the witness log (``projection.digest``)."""
AGENT_EVENTS = Table(
    "agent_events",
    (
        ("agent_id", "text"),
        ("state", "text"),
        ("reason", "text"),
        ("task_id", "text"),
        ("occurred_at", "bigint"),
        ("event_id", "text"),
        ("source_topic", "text"),
        ("source_partition", "integer"),
        ("source_offset", "bigint"),
        ("step", "smallint"),
    ),
)
"""Every change of an agent's state (:func:`conclave.domain.lifecycle.transitions`);
``step`` orders the changes one event makes to one agent."""
APPENDS = (
    LOCK_EVENTS,
    MESSAGES,
    STATE_VERSIONS,
    STATE_CHECKPOINTS,
    STATE_REJECTIONS,
    OUTPUTS,
    TASK_FAILURES,
    WITNESS_ENTRIES,
    CHECKPOINTS,
    SYSTEM_EVENTS,
    POOL_SETTINGS,
    DEAD_LETTERS,
    REJECTIONS,
    PROJECTION_DIGESTS,
    AGENT_EVENTS,
)


_ENDED = {
    TaskCancelled: TaskStatus.CANCELLED.value,
    TaskExpired: TaskStatus.EXPIRED.value,
    TaskDependencyFailed: TaskStatus.DEPENDENCY_FAILED.value,
}


def fold_task(
    row: TaskRow | None, envelope: Envelope, event: TaskEvent, _task_id: str
) -> TaskRow | None:
    """The ``tasks`` row after one task event (``row`` is changed in place).

    A terminal status is final: a late or duplicated queued, dispatched or terminal
    event never takes a completed task back. Events of a task not yet queued change
    nothing (there is no row to change).
    """
    if isinstance(event, TaskQueued):
        if row is None:
            return TaskRow(
                task_id=event.task_id,
                tenant=envelope.tenant,
                correlation_id=envelope.correlation_id,
                pool=event.pool,
                priority=event.priority.label,
                status="waiting" if event.waiting_for else "queued",
                input=event.input,
                agent_id=event.agent_id,
                attempt=0,
                max_attempts=event.max_attempts,
                deliberation_id=event.deliberation_id,
                output_event_id=None,
                witness_sequence=None,
                error=None,
                queued_at=envelope.occurred_at,
                dispatched_at=None,
                finished_at=None,
                next_attempt_at=None,
                redrive_of=event.redrive_of,
                depends_on=list(event.depends_on),
                start_by=event.start_by,
                finish_by=event.finish_by,
                **retry_of(event).as_fields(),
            )
        if row.status not in TERMINAL:  # a retry, or its dependencies done: in the queue
            row.status = "waiting" if event.waiting_for else "queued"
            row.max_attempts = max(row.max_attempts, event.max_attempts)  # a stall not counted
            row.queued_at = envelope.occurred_at
            row.next_attempt_at = None
        return row
    if row is None or row.status in TERMINAL:
        return row
    if isinstance(event, TaskDispatched):
        row.status = "dispatched"
        row.agent_id = event.agent_id
        row.attempt = event.attempt
        row.dispatched_at = envelope.occurred_at
    elif isinstance(event, TaskStalled):
        row.error = event.reason  # a retry or a dead letter follows
    elif isinstance(event, TaskRetryScheduled):
        row.status = "retrying"
        row.error = event.reason
        row.next_attempt_at = event.due
    elif isinstance(event, TaskCompleted):
        row.status = "completed"
        row.output_event_id = event.output_event_id
        row.witness_sequence = event.witness_sequence
        row.finished_at = envelope.occurred_at
    elif isinstance(event, TaskCancelled | TaskExpired | TaskDependencyFailed):
        row.status = _ENDED[type(event)]
        row.error = event.reason
        row.finished_at = envelope.occurred_at
    else:
        row.status = "dead_lettered"
        row.error = event.reason
        row.witness_sequence = event.witness_sequence
        row.finished_at = envelope.occurred_at
    return row


AgentEvent = (
    AgentRegistered
    | HostBeat
    | AgentRestarted
    | AgentFailed
    | AgentRetired
    | AgentReinstated
    | Heartbeat
    | TaskStalled
    | HostLost
    | HostFailed
    | AgentCircuitOpened
    | AgentCircuitHalfOpened
    | AgentCircuitClosed
)


_CIRCUIT = (AgentCircuitOpened, AgentCircuitHalfOpened, AgentCircuitClosed)


def fold_agent(
    row: AgentRow | None, envelope: Envelope, event: AgentEvent, agent_id: str
) -> AgentRow:
    """The ``agents`` row after a registration or a heartbeat (``row`` changed in place).

    A registration sets the registration columns (the latest registration wins); a
    heartbeat sets the heartbeat columns unless the row already has a later beat. A
    heartbeat's host (the latest one's) only fills a row that has no registration yet. A
    host's beat is a heartbeat of each agent it names, saying which of them runs what
    (the same rule: the latest beat wins, whichever topic or host it came from). The
    scheduler's own
    view (a stall, a lost host, a reinstatement: all on the tasks topic, so in order)
    sets and clears the suspension.
    """
    if row is None:
        row = AgentRow(
            agent_id=agent_id,
            pool=None,
            host_id="" if isinstance(event, _CIRCUIT) else event.host_id,  # until registered
            agent_ref=None,
            registered_at=None,
            last_heartbeat_at=None,
            current_task_id=None,
            rss_bytes=None,
        )
    if isinstance(event, AgentRegistered):
        row.pool = event.pool
        row.host_id = event.host_id
        row.agent_ref = event.agent_ref
        row.registered_at = envelope.occurred_at
        row.capabilities, row.version = sorted(set(event.capabilities)), event.version
        row.failed_reason = row.retired_reason = None  # its host started anew, or grew
    elif isinstance(event, AgentRestarted):
        if (row.restarted_at or 0) <= envelope.occurred_at:
            row.restarts, row.restarted_at = event.restarts, envelope.occurred_at
    elif isinstance(event, AgentFailed):
        row.failed_reason = event.reason
    elif isinstance(event, AgentRetired):
        row.retired_reason = event.reason
    elif isinstance(event, AgentReinstated):
        row.suspended_at = row.suspended_reason = None
    elif isinstance(event, TaskStalled | HostLost | HostFailed):
        row.suspended_at = envelope.occurred_at
        row.suspended_reason = event.reason
    elif isinstance(event, AgentCircuitOpened):
        row.circuit, row.circuit_until, row.circuit_reason = "open", event.until, event.reason
    elif isinstance(event, AgentCircuitHalfOpened):
        row.circuit, row.circuit_until = "half_open", None
    elif isinstance(event, AgentCircuitClosed):
        row.circuit = row.circuit_until = row.circuit_reason = None
    elif (row.last_heartbeat_at or 0) <= envelope.occurred_at:  # a heartbeat, or a host's beat
        row.last_heartbeat_at = envelope.occurred_at
        if isinstance(event, HostBeat):
            row.current_task_id = event.running.get(agent_id)
        else:
            row.current_task_id = event.task_id
        row.rss_bytes = event.rss_bytes
        if row.registered_at is None:  # until it registers: where the latest beat came from
            row.host_id = event.host_id
    return row


def fold_host(
    row: HostRow | None,
    envelope: Envelope,
    event: HostBeat | HostLeaving | HostLost | HostFailed,
    _host_id: str,
) -> HostRow:
    """The ``hosts`` row after a beat, a host's leaving or a loss. Leases only grow but
    when the host leaves (beats and leaving are in order: one topic), so they and losses
    (tasks topic) give the same row in whatever order the topics are folded."""
    if row is None:
        row = HostRow(event.host_id, event.pool, [], None, None, None, None, None)
    if isinstance(event, HostLeaving):
        row.lease_expires_at = row.leaving_until = event.until
    elif isinstance(event, HostBeat):
        if (row.last_beat_at or 0) <= envelope.occurred_at:
            row.pool, row.agent_ids = event.pool, list(event.agent_ids)
            row.last_beat_at = envelope.occurred_at
            row.rss_bytes, row.cpu_percent = event.rss_bytes, event.cpu_percent
            row.over_limit = event.over_limit
        row.lease_expires_at = max(row.lease_expires_at or 0, event.expires_at)
    elif isinstance(event, HostFailed):
        if (row.failed_lease or 0) < event.expires_at:
            row.failed_lease, row.failed_reason = event.expires_at, event.reason
    elif (row.lost_lease or 0) < event.expires_at:
        row.lost_lease, row.lost_at, row.lost_reason = (
            event.expires_at,
            envelope.occurred_at,
            event.reason,
        )
    return row


LockEvent = LockGranted | LockWaiting | LockDenied | LockRenewed | LockReleased | LockExpired


def fold_lock(
    row: LockRow | None, envelope: Envelope, event: LockEvent, name: str
) -> LockRow | None:
    """The ``locks`` row after one lock decision (decisions of one lock are in order:
    one partition, one key). A denial alone makes no row (a request for nothing)."""
    if row is None and isinstance(event, LockDenied):
        return None
    if row is None:
        row = LockRow(name, None, 0, None, "released", [], [], envelope.occurred_at)
    row.updated_at = envelope.occurred_at
    request_id = getattr(event, "request_id", None)
    if request_id in row.waiting_requests:
        i = row.waiting_requests.index(request_id)
        del row.waiting_requests[i], row.waiters[i]
    if isinstance(event, LockGranted):
        row.holder, row.fencing_token, row.expires_at = (
            event.holder,
            event.fencing_token,
            event.expires_at,
        )
        row.state = "held"
    elif isinstance(event, LockWaiting):
        row.waiters.append(event.holder)
        row.waiting_requests.append(event.request_id)
    elif isinstance(event, LockRenewed) and event.fencing_token == row.fencing_token:
        row.expires_at = event.expires_at
    elif isinstance(event, LockReleased | LockExpired) and event.fencing_token == row.fencing_token:
        row.state = "released" if isinstance(event, LockReleased) else "expired"
    return row


def _lock_event(env: Envelope, e: LockEvent) -> tuple[Any, ...]:
    return (
        env.event_id,
        e.name,
        e.TYPE.removeprefix("lock."),
        e.holder,
        getattr(e, "fencing_token", None),
        getattr(e, "expires_at", None) or getattr(e, "wait_until", None),
        getattr(e, "reason", None),
        getattr(e, "request_id", None),
        env.occurred_at,
    )


WorkflowEvent = (
    WorkflowStarted
    | WorkflowRejected
    | WorkflowStepSubmitted
    | WorkflowStepCompleted
    | WorkflowEnded
)


def fold_workflow(
    row: WorkflowRow | None, envelope: Envelope, event: WorkflowEvent, _workflow_id: str
) -> WorkflowRow | None:
    """The ``workflows`` row after one workflow decision."""
    match event:
        case WorkflowStarted():
            if row is None or row.status == "rejected":
                steps = len(json.loads(event.definition_json)["steps"])
                row = WorkflowRow(
                    event.workflow_id,
                    event.tenant,
                    event.name,
                    "running",
                    event.input_json,
                    event.definition_json,
                    steps,
                    None,
                    None,
                    envelope.occurred_at,
                    None,
                )
        case WorkflowRejected():
            if row is None and event.action == "run":
                row = WorkflowRow(
                    event.workflow_id,
                    envelope.tenant,
                    "",
                    "rejected",
                    "",
                    "",
                    0,
                    None,
                    event.reason,
                    envelope.occurred_at,
                    envelope.occurred_at,
                )
        case WorkflowEnded():
            if row is not None and row.status == "running":
                row.status = event.outcome
                row.failed_step = event.failed_step
                row.reason = event.reason
                row.ended_at = envelope.occurred_at
        case _:
            pass
    return row


def fold_workflow_step(
    row: WorkflowStepRow | None, envelope: Envelope, event: WorkflowEvent, task_id: str
) -> WorkflowStepRow | None:
    """The ``workflow_steps`` row after one workflow decision."""
    match event:
        case WorkflowStarted():
            if row is None:
                steps = json.loads(event.definition_json)["steps"]
                step = task_id.partition(".")[2]
                for position, s in enumerate(steps):
                    if s["name"] == step:
                        row = WorkflowStepRow(
                            task_id,
                            event.workflow_id,
                            step,
                            position,
                            s["pool"],
                            s["agent"],
                            s["priority"],
                            s["max_attempts"],
                            list(s["depends_on"]),
                            "pending",
                            None,
                            None,
                            None,
                            None,
                            None,
                        )
        case WorkflowStepSubmitted():
            if row is not None and row.status == "pending":
                row.status = "submitted"
                row.input = event.input
                row.submitted_at = envelope.occurred_at
        case WorkflowStepCompleted():
            if row is not None and row.status == "submitted":
                row.status = "completed"
                row.output = event.output
                row.output_event_id = event.output_event_id
                row.ended_at = envelope.occurred_at
        case WorkflowEnded():
            if row is not None and row.status in ("pending", "submitted"):
                if row.step == event.failed_step:
                    row.status = "failed"
                elif row.status == "pending":
                    row.status = "skipped"
                else:
                    row.status = "cancelled"
                row.ended_at = envelope.occurred_at
        case _:
            pass
    return row


def _all_steps(event: WorkflowStarted) -> list[str]:
    steps = json.loads(event.definition_json)["steps"]
    return [f"{event.workflow_id}.{s['name']}" for s in steps]


def _ended_steps(event: WorkflowEnded) -> list[str]:
    names = [*event.skipped_steps, *event.cancelled_steps]
    if event.failed_step is not None:
        names.append(event.failed_step)
    return [f"{event.workflow_id}.{name}" for name in names]


Fold = Callable[[Any, Envelope, Any, str], Any]
"""(stored row or None, envelope, event, the row's key) -> the row after the event."""
Append = Callable[[Envelope, Any], tuple[Any, ...]]


def _one(name: str) -> Callable[[Any], list[str]]:
    get = attrgetter(name)
    return lambda event: [get(event)]


_TASK = (TASKS, _one("task_id"), fold_task)
_AGENT = (AGENTS, _one("agent_id"), fold_agent)
_HOST = (HOSTS, _one("host_id"), fold_host)
_LOCK = (LOCKS, _one("name"), fold_lock)
_WORKFLOW = (WORKFLOWS, _one("workflow_id"), fold_workflow)
_STEP = (WORKFLOW_STEPS, _one("task_id"), fold_workflow_step)

KEYED: Mapping[type[Any], tuple[tuple[Table, Callable[[Any], list[str]], Fold], ...]] = {
    TaskQueued: (_TASK,),
    TaskDispatched: (_TASK,),
    TaskCompleted: (_TASK,),
    TaskDeadLettered: (_TASK,),
    TaskStalled: (_TASK, _AGENT),
    TaskRetryScheduled: (_TASK,),
    TaskCancelled: (_TASK,),
    TaskExpired: (_TASK,),
    TaskDependencyFailed: (_TASK,),
    AgentRegistered: (_AGENT,),
    AgentReinstated: (_AGENT,),
    AgentCircuitOpened: (_AGENT,),
    AgentCircuitHalfOpened: (_AGENT,),
    AgentCircuitClosed: (_AGENT,),
    AgentRestarted: (_AGENT,),
    AgentFailed: (_AGENT,),
    AgentRetired: (_AGENT,),
    Heartbeat: (_AGENT,),
    HostBeat: (_HOST, (AGENTS, attrgetter("agent_ids"), fold_agent)),
    HostLeaving: (_HOST,),
    HostLost: (_HOST, (AGENTS, attrgetter("agent_ids"), fold_agent)),
    HostFailed: (_HOST, (AGENTS, attrgetter("agent_ids"), fold_agent)),
    LockGranted: (_LOCK,),
    LockWaiting: (_LOCK,),
    LockDenied: (_LOCK,),
    LockRenewed: (_LOCK,),
    LockReleased: (_LOCK,),
    LockExpired: (_LOCK,),
    WorkflowStarted: (_WORKFLOW, (WORKFLOW_STEPS, _all_steps, fold_workflow_step)),
    WorkflowRejected: (_WORKFLOW,),
    WorkflowStepSubmitted: (_STEP,),
    WorkflowStepCompleted: (_STEP,),
    WorkflowEnded: (_WORKFLOW, (WORKFLOW_STEPS, _ended_steps, fold_workflow_step)),
}
"""Events that change keyed-state rows: per table, the rows' keys and the rule."""
_FOLDS: Mapping[tuple[type[Any], Table], Fold] = {
    (kind, table): fold for kind, targets in KEYED.items() for table, _, fold in targets
}


def _system(env: Envelope, e: Halt | Resume) -> tuple[Any, ...]:
    return (env.event_id, e.TYPE, e.reason, e.operator, env.occurred_at)


APPENDED: Mapping[type[Any], tuple[Table, Append]] = {
    **dict.fromkeys((LockGranted, LockWaiting, LockDenied), (LOCK_EVENTS, _lock_event)),
    **dict.fromkeys((LockRenewed, LockReleased, LockExpired), (LOCK_EVENTS, _lock_event)),
    AgentMessage: (
        MESSAGES,
        lambda env, e: (
            e.message_id,
            e.kind,
            e.correlation_id,
            e.sender,
            e.recipient,
            e.agent_id,
            e.host_id,
            e.pool,
            e.priority.label,
            e.expects_reply,
            e.expires_at,
            e.payload,
            env.occurred_at,
        ),
    ),
    StateUpdated: (
        STATE_VERSIONS,
        lambda env, e: (e.key, e.version, e.value_json, e.request_id, None, None, env.occurred_at),
    ),
    StateRestored: (
        STATE_VERSIONS,
        lambda env, e: (
            e.key,
            e.new_version,
            e.value_json,
            e.request_id,
            e.from_version,
            e.label,
            env.occurred_at,
        ),
    ),
    StateCheckpointed: (
        STATE_CHECKPOINTS,
        lambda env, e: (e.key, e.label, e.version, env.occurred_at),
    ),
    StateUpdateRejected: (
        STATE_REJECTIONS,
        lambda env, e: (
            env.event_id,
            e.key,
            e.action,
            e.expected_version,
            e.current_version,
            e.reason,
            e.request_id,
            env.occurred_at,
        ),
    ),
    AgentOutput: (
        OUTPUTS,
        lambda env, e: (
            env.event_id,
            e.task_id,
            e.agent_id,
            e.attempt,
            e.content,
            e.latency_us,
            e.deliberation_id,
            env.occurred_at,
        ),
    ),
    TaskFailed: (
        TASK_FAILURES,
        lambda env, e: (
            env.event_id,
            e.task_id,
            e.agent_id,
            e.attempt,
            e.error_type,
            e.error_message,
            env.occurred_at,
            e.permanent,
        ),
    ),
    TaskStalled: (  # a stalled attempt is a failed one too, in the attempt history
        TASK_FAILURES,
        lambda env, e: (
            env.event_id,
            e.task_id,
            e.agent_id,
            e.attempt,
            "Stalled",
            e.reason,
            env.occurred_at,
            False,
        ),
    ),
    WitnessEntry: (
        WITNESS_ENTRIES,
        lambda env, e: (
            e.sequence,
            e.previous_hash,
            e.entry_hash,
            e.subject_type,
            e.subject_event_id,
            e.subject_digest,
            e.recorded_at,
            e.task_id,
            e.agent_id,
            e.detail,
            e.attempt,
        ),
    ),
    CommandRejected: (
        REJECTIONS,
        lambda env, e: (
            e.command_event_id,
            e.subject_id,
            e.command_type,
            e.reason,
            env.tenant,
            env.occurred_at,
        ),
    ),
    WitnessCheckpoint: (
        CHECKPOINTS,
        lambda env, e: (e.origin, e.tree_size, e.root_hash, e.note, env.occurred_at),
    ),
    Halt: (SYSTEM_EVENTS, _system),
    Resume: (SYSTEM_EVENTS, _system),
    ProjectionDigest: (
        PROJECTION_DIGESTS,
        lambda env, e: (
            env.event_id,
            e.schema,
            e.tables,
            e.positions,
            e.digest,
            e.reason,
            env.occurred_at,
        ),
    ),
    PoolConfigured: (
        POOL_SETTINGS,
        lambda env, e: (
            env.event_id,
            e.pool,
            e.capacity,
            e.reason,
            e.operator,
            env.occurred_at,
            e.aging_turns,
            [f"{key}={weight}" for key, weight in sorted(e.weights.items())] or None,
        ),
    ),
    DeadLetterRecord: (
        DEAD_LETTERS,
        lambda env, e: (
            e.source_topic,
            e.source_partition,
            e.source_offset,
            e.processor,
            e.reason,
            e.error_type,
            e.original,
            env.occurred_at,
        ),
    ),
}
"""Events that add one row to an append-only table, and that row (a task's stall also
changes its ``tasks`` row)."""

PROJECTED = frozenset(KEYED) | frozenset(APPENDED)


def projected_from(topics: Topics) -> dict[str, tuple[type[Any], ...]]:
    """The events each history topic carries; anything else on it is not projected (folding
    a HALT found on the tasks topic would put it in the wrong table)."""
    return {
        topics.agents: AGENTS_TOPIC_EVENTS,
        topics.heartbeats: (Heartbeat,),
        topics.tasks: TASKS_TOPIC_EVENTS,
        topics.outputs: (AgentOutput, TaskFailed),
        topics.witness: (WitnessEntry,),
        topics.checkpoints: (WitnessCheckpoint,),
        topics.deadletter: (DeadLetterRecord,),
        topics.control: (Halt, Resume, PoolConfigured, ProjectionDigest),
        topics.coordination: COORDINATION_DECISIONS,
        topics.workflows: WORKFLOW_DECISIONS,
        topics.messages: (AgentMessage,),
    }


_ROW_TYPES: Mapping[Table, type[Any]] = {
    TASKS: TaskRow,
    AGENTS: AgentRow,
    HOSTS: HostRow,
    LOCKS: LockRow,
    WORKFLOWS: WorkflowRow,
    WORKFLOW_STEPS: WorkflowStepRow,
}


@dataclass(slots=True)
class Changes:
    """What a run of records does to the read models, grouped for few round trips.

    Keyed events stay in record order per entity, to be folded onto the stored row;
    append rows stay in record order per table.
    """

    keyed: dict[Table, dict[str, list[tuple[Envelope, Event]]]] = field(default_factory=dict)
    appends: dict[Table, list[tuple[Any, ...]]] = field(default_factory=dict)
    ended: list[Consumed] = field(default_factory=list)
    """Records that end a task: their trace's last hop is their projection."""

    def add(self, envelope: Envelope, event: Event, record: Consumed) -> None:
        """One decoded event of a type in :data:`PROJECTED`, read from ``record``."""
        for table, keys, _ in KEYED.get(type(event), ()):
            by_key = self.keyed.setdefault(table, {})
            for key in keys(event):
                by_key.setdefault(key, []).append((envelope, event))
        appended = APPENDED.get(type(event))
        if appended is not None:
            table, row = appended
            self.appends.setdefault(table, []).append(row(envelope, event))
        if type(event) in LIFECYCLE_EVENTS:
            self.appends.setdefault(AGENT_EVENTS, []).extend(
                (
                    t.agent_id,
                    t.state,
                    t.reason,
                    t.task_id,
                    envelope.occurred_at,
                    envelope.event_id,
                    record.topic,
                    record.partition,
                    record.offset,
                    step,
                )
                for step, t in enumerate(transitions(event))
            )

    def reject(self, record: Consumed, reason: str, error_type: str) -> None:
        """A record the projector cannot fold: kept in ``dead_letters`` with its bytes
        (``NULL`` for a tombstone, so that it stays apart from an empty value)."""
        self.appends.setdefault(DEAD_LETTERS, []).append(
            (
                record.topic,
                record.partition,
                record.offset,
                "projector",
                reason,
                error_type,
                record.value,
                0,
            )
        )

    def folded(self, table: Table, stored: Mapping[str, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The final rows of ``table`` that differ from ``stored`` (key -> stored row).

        Each entity's events are folded in record order onto its stored row.
        """
        row_type = _ROW_TYPES[table]
        values = attrgetter(*table.names)
        out: list[tuple[Any, ...]] = []
        for key, events in self.keyed.get(table, {}).items():
            before = stored.get(key)
            row = row_type(*before) if before is not None else None
            for envelope, event in events:
                row = _FOLDS[type(event), table](row, envelope, event, key)
            if row is not None and (after := values(row)) != before:
                out.append(after)
        return out
