"""Which decoded events are acceptable commands. Pure."""

from __future__ import annotations

from conclave.domain.events import (
    AgentOutput,
    CancelRequested,
    DeliberationRequested,
    Event,
    Halt,
    PoolConfigured,
    Resume,
    TaskFailed,
    TaskSubmitted,
)
from conclave.domain.retry import MAX_DELAY_MS, retry_of

__all__ = [
    "CONTROL_COMMANDS",
    "MAX_ATTEMPTS",
    "MAX_CAPACITY",
    "MAX_DEPENDENCIES",
    "MAX_ID_LENGTH",
    "MAX_INPUT_BYTES",
    "MAX_WEIGHT",
    "MAX_WEIGHTED_KEYS",
    "invalid_command",
    "invalid_output",
    "invalid_tenant",
]

MAX_ID_LENGTH = 200
MAX_INPUT_BYTES = 900_000
"""A task's input or a motion, UTF-8: one Kafka record with its envelope (brokers cap
records near 1 MB by default). Larger payloads belong in storage, passed by reference."""
MAX_CAPACITY = 1_000_000
MAX_ATTEMPTS = 1000
"""Attempts of one task, at most (Celery, Temporal and the like have no cap, but
nothing sane retries a task more often; a read model keeps the count in 32 bits)."""
MAX_DEPENDENCIES = 1000
MAX_WEIGHT = 1000
"""A fairness key's weight, at most: 1,000 of its tasks for one of a key of weight 1."""
MAX_WEIGHTED_KEYS = 1000
"""Keys one pool setting may weigh: each is kept in the scheduler's state."""
"""Dependencies of one task, at most: a wider fan-in belongs in a workflow step."""
CONTROL_COMMANDS = (Halt, Resume, PoolConfigured)
"""The commands of the control topic: whoever reads one there checks it with
:func:`invalid_command` (the scheduler, the witness, the projector), so all of them
refuse the same ones."""


def invalid_command(event: Event) -> str | None:
    """Why ``event`` is not a valid command, or ``None`` when it is."""
    match event:
        case TaskSubmitted():
            if (reason := _bad_id("task_id", event.task_id)) is not None:
                return reason
            if event.agent_id is not None and (reason := _bad_id("agent_id", event.agent_id)):
                return reason
            if (reason := _bad_pool(event.pool)) is not None:
                return reason
            if "\x00" in event.input:
                return "input must not contain NUL characters"
            if (reason := _too_large("input", event.input)) is not None:
                return reason
            if not 1 <= event.max_attempts <= MAX_ATTEMPTS:
                return f"max_attempts must be 1-{MAX_ATTEMPTS:,}"
            if event.redrive_of is not None and (reason := _bad_id("redrive_of", event.redrive_of)):
                return reason
            return (
                retry_of(event).invalid()
                or _bad_dependencies(event)
                or _bad_deadlines(event)
                or _bad_fairness(event)
            )
        case DeliberationRequested():
            if (reason := _bad_id("deliberation_id", event.deliberation_id)) is not None:
                return reason
            if (reason := _bad_pool(event.pool)) is not None:
                return reason
            if "\x00" in event.motion:
                return "motion must not contain NUL characters"
            if (reason := _too_large("motion", event.motion)) is not None:
                return reason
            for agent_id in event.agent_ids:
                if (reason := _bad_id("agent_ids", agent_id)) is not None:
                    return reason
            if len(set(event.agent_ids)) != len(event.agent_ids):
                return "agent_ids must not repeat"
            if event.finish_by is not None and event.finish_by <= 0:
                return "finish_by must be a time (µs since the epoch)"
            return None
        case CancelRequested():
            if (event.task_id is None) == (event.deliberation_id is None):
                return "a cancellation names a task_id or a deliberation_id, not both or neither"
            if event.task_id is not None:
                return _bad_task_ref("task_id", event.task_id)
            assert event.deliberation_id is not None
            return _bad_id("deliberation_id", event.deliberation_id)
        case PoolConfigured():
            reason = (
                _bad_pool(event.pool)
                or _nul("reason", event.reason)
                or _nul("operator", event.operator)
            )
            if reason is not None:
                return reason
            if not 0 <= event.capacity <= MAX_CAPACITY:
                return f"capacity must be 0-{MAX_CAPACITY:,}"
            if event.aging_turns is not None and not 1 <= event.aging_turns <= MAX_CAPACITY:
                return f"aging_turns must be 1-{MAX_CAPACITY:,}"
            return _bad_weights(event.weights)
        case Halt() | Resume():
            return _nul("reason", event.reason) or _nul("operator", event.operator)
        case _:
            return f"{event.TYPE} is not a command"


def invalid_output(event: AgentOutput | TaskFailed) -> str | None:
    """Why an agent's answer or failure is malformed, or ``None``: the witness
    dead-letters it instead of witnessing it. What an entry keeps of it (ids, attempt,
    a failure's type) must be something a read model can hold."""
    if not 0 <= event.attempt <= MAX_ATTEMPTS:
        return f"attempt must be 0-{MAX_ATTEMPTS:,}"
    if (reason := _bad_task_ref("task_id", event.task_id)) is not None:
        return reason
    # An agent id's length is not checked: hosts name their agents as they like.
    if isinstance(event, TaskFailed):
        return _nul("agent_id", event.agent_id) or _nul("error_type", event.error_type)
    return _nul("agent_id", event.agent_id)


def _bad_weights(weights: dict[str, int]) -> str | None:
    if len(weights) > MAX_WEIGHTED_KEYS:
        return f"weights name {len(weights):,} keys, more than {MAX_WEIGHTED_KEYS:,}"
    for key, weight in sorted(weights.items()):
        if not 0 < len(key) <= 2 * MAX_ID_LENGTH + 1 or key.count("/") > 1:
            return f"weights: {key[:MAX_ID_LENGTH]!r} is not a fairness key (tenant or tenant/key)"
        if (reason := _nul("a weighted key", key)) is not None:
            return reason
        if not 1 <= weight <= MAX_WEIGHT:
            return f"the weight of {key!r} must be 1-{MAX_WEIGHT:,}"
    return None


def _nul(field: str, value: str) -> str | None:
    """PostgreSQL's text holds no NUL: a value with one could never be read back."""
    return f"{field} must not contain NUL characters" if "\x00" in value else None


def _bad_pool(pool: str) -> str | None:
    return "pool must not be empty" if not pool else _nul("pool", pool)


def invalid_tenant(tenant: str) -> str | None:
    """Why ``tenant`` cannot name a tenant, or ``None``: an id like any other, since it
    is a fairness key's first part (``tenant/key``) and a column of every read model."""
    return _bad_id("tenant", tenant)


def _bad_id(field: str, value: str) -> str | None:
    """Ids are 1-200 characters without ``/``: ``/`` joins a deliberation's task ids."""
    if not value or len(value) > MAX_ID_LENGTH:
        return f"{field} must be 1-{MAX_ID_LENGTH} characters"
    if "/" in value:
        return f"{field} must not contain '/'"
    return _nul(field, value)


def _bad_task_ref(field: str, value: str) -> str | None:
    """A reference to an existing task: a submitted task's id, or a deliberation's
    task id (``deliberation/agent``)."""
    if not 0 < len(value) <= 2 * MAX_ID_LENGTH + 1 or value.count("/") > 1:
        return f"{field} {value[:MAX_ID_LENGTH]!r} is not a task id"
    return _nul(field, value)


def _bad_dependencies(event: TaskSubmitted) -> str | None:
    if len(event.depends_on) > MAX_DEPENDENCIES:
        return f"depends_on lists {len(event.depends_on)} tasks; at most {MAX_DEPENDENCIES}"
    if len(set(event.depends_on)) != len(event.depends_on):
        return "depends_on must not repeat a task"
    if event.task_id in event.depends_on:
        return f"task {event.task_id!r} cannot depend on itself"
    for dependency in event.depends_on:
        if (reason := _bad_task_ref("depends_on", dependency)) is not None:
            return reason
    return None


def _bad_deadlines(event: TaskSubmitted) -> str | None:
    if event.start_within_ms is not None and not 0 < event.start_within_ms <= MAX_DELAY_MS:
        return f"start_within_ms must be 1-{MAX_DELAY_MS:,} (a year)"
    if event.finish_by is not None and event.finish_by <= 0:
        return "finish_by must be a time (µs since the epoch)"
    return None


def _bad_fairness(event: TaskSubmitted) -> str | None:
    if event.fairness_key is not None and (reason := _bad_id("fairness_key", event.fairness_key)):
        return reason
    if event.key_limit is not None:
        if not 1 <= event.key_limit <= MAX_CAPACITY:
            return f"key_limit must be 1-{MAX_CAPACITY:,}"
        if event.agent_id is not None:
            return "key_limit applies to tasks any agent of the pool may run, not to one agent's"
    return None


def _too_large(field: str, text: str) -> str | None:
    if len(text) * 4 <= MAX_INPUT_BYTES:  # cannot be too large: no need to encode it
        return None
    size = len(text.encode())
    if size <= MAX_INPUT_BYTES:
        return None
    return (
        f"{field} is {size:,} bytes; at most {MAX_INPUT_BYTES:,} (one record): "
        "store larger payloads elsewhere and pass a reference"
    )
