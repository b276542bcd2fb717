"""The HTTP API's bodies and answers: pydantic models, so that the OpenAPI document says
exactly what each endpoint takes and gives.

Every string a client sends passes :func:`storable` (PostgreSQL text and Avro strings
hold neither NUL nor lone surrogates: refused here with a message rather than failing in
a driver), and every integer fits a PostgreSQL ``bigint`` / Avro ``long``. Whatever else
a command must satisfy is checked by the client SDK in the scheduler's own words
(:func:`conclave.domain.validation.invalid_command`), the same checks as the CLI's.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from conclave.domain.retry import MAX_DELAY_MS
from conclave.domain.validation import MAX_ATTEMPTS, MAX_DEPENDENCIES, MAX_ID_LENGTH

__all__ = [
    "MAX_LONG",
    "Accepted",
    "AgentOut",
    "AgentStateName",
    "CancelBody",
    "DeliberateBody",
    "DeliberationAccepted",
    "DeliberationOut",
    "Error",
    "HaltBody",
    "HostOut",
    "PoolOut",
    "PriorityName",
    "RedriveBody",
    "ResumeBody",
    "StatusOut",
    "SubmitBody",
    "TaskAccepted",
    "TaskOut",
    "TaskPage",
    "TaskSummaryOut",
    "storable",
]

MAX_LONG = 2**63 - 1
MAX_TEXT = 1_000_000
"""Characters of an input or a motion; the SDK refuses more than 900,000 bytes with the
size (one Kafka record), and the body limit (1 MiB) comes first anyway."""


def storable(text: str) -> str:
    """``text`` if PostgreSQL and Avro can store it: no NUL, valid UTF-8."""
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(storable)]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(storable)]
TaskRef = Annotated[
    str, Field(min_length=1, max_length=2 * MAX_ID_LENGTH + 1), AfterValidator(storable)
]
"""A task id; a deliberation's tasks are ``<deliberation id>/<agent id>``."""
Reason = Annotated[str, Field(max_length=10_000), AfterValidator(storable)]
Micros = Annotated[int, Field(ge=1, le=MAX_LONG, description="µs since the epoch")]


class PriorityName(enum.StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


AgentStateName = Literal[
    "idle",
    "busy",
    "silent",
    "unresponsive",
    "lost",
    "retired",
    "failed",
    "circuit_open",
    "probing",
]


WorkflowStatusName = Literal["running", "completed", "failed", "cancelled", "rejected"]


class _Body(BaseModel):
    """A request body: unknown fields are refused (a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Error(BaseModel):
    detail: str
    """What was wrong, in one line."""


class RetryBody(_Body):
    backoff_ms: int = Field(1000, ge=0, le=MAX_DELAY_MS, description="Wait before the first retry")
    multiplier: float = Field(2.0, description="Each further retry waits this much longer")
    max_backoff_ms: int = Field(60_000, ge=0, le=MAX_DELAY_MS)
    jitter: float = Field(0.2, description="Spread of each wait, 0 to 1")


class SubmitBody(_Body):
    input: Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(storable)]
    task_id: Id | None = Field(None, description="Idempotency: the same id runs once")
    pool: Id = "default"
    priority: PriorityName = PriorityName.NORMAL
    agent_id: Id | None = Field(None, description="Run on this agent only")
    max_attempts: int = Field(1, ge=1, le=MAX_ATTEMPTS)
    retry: RetryBody = Field(default_factory=RetryBody)
    depends_on: list[TaskRef] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Tasks of this tenant that must complete first; each must be readable"
        " (GET /v1/tasks/{id}) when this one is submitted",
    )
    start_within_ms: int | None = Field(None, ge=1, le=MAX_DELAY_MS)
    finish_by: Micros | None = None
    fairness_key: Id | None = Field(
        None, description="Equal-priority tasks of a pool take turns between keys (and tenants)"
    )
    key_limit: int | None = Field(
        None, ge=1, le=1_000_000, description="At most this many of the key's tasks in flight"
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None,
        description="Instead of task_id: the same key submitted again is a no-op that returns"
        " the same task id (per tenant)",
    )


class DeliberateBody(_Body):
    motion: Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(storable)]
    agent_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    deliberation_id: Id | None = None
    pool: Id = "default"
    priority: PriorityName = PriorityName.HIGH
    finish_by: Micros | None = None


class CancelBody(_Body):
    reason: Reason = ""


class RedriveBody(_Body):
    max_attempts: int | None = Field(
        None, ge=1, le=MAX_ATTEMPTS, description="Attempts of the new run (default: as before)"
    )


class HaltBody(_Body):
    reason: Reason
    cancel_running: bool = False


class ResumeBody(_Body):
    reason: Reason


class WorkflowBody(_Body):
    definition: dict[str, Any] = Field(
        description="What a workflow file holds: name, steps (each with name, input "
        "template, pool or agent, priority, max_attempts, depends_on)"
    )
    input: Any = Field(None, description="Any JSON value the steps' templates read")
    workflow_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,100}$", description="The same id runs once"
    )


class Accepted(BaseModel):
    detail: str


class TaskAccepted(BaseModel):
    task_id: str
    """Follow it with GET /v1/tasks/{task_id} (404 until the read models have it)."""


class DeliberationAccepted(BaseModel):
    deliberation_id: str


class WorkflowAccepted(BaseModel):
    workflow_id: str
    """Follow it with GET /v1/workflows/{workflow_id} (404 until the read models have it,
    and for good if it was rejected before anything was sent)."""


class TaskSummaryOut(_Out):
    task_id: str
    tenant: str
    status: str
    pool: str
    priority: str
    agent_id: str | None
    attempt: int
    max_attempts: int
    error: str | None
    queued_at: int
    finished_at: int | None
    next_attempt_at: int | None
    redrive_of: str | None


class TaskPage(BaseModel):
    tasks: list[TaskSummaryOut]
    next_cursor: str | None
    """Pass it as ``cursor`` for the next page; ``null`` on the last page."""


class OutputOut(_Out):
    event_id: str
    agent_id: str
    content: str
    latency_us: int
    witness_sequence: int


class FailureOut(_Out):
    attempt: int
    agent_id: str
    error_type: str
    message: str
    permanent: bool
    failed_at: int


class RetryOut(_Out):
    backoff_ms: int
    multiplier: float
    max_backoff_ms: int
    jitter: float


class TaskOut(_Out):
    task_id: str
    tenant: str
    status: str
    pool: str
    priority: str
    input: str
    agent_id: str | None
    attempt: int
    max_attempts: int
    deliberation_id: str | None
    error: str | None
    queued_at: int
    dispatched_at: int | None
    finished_at: int | None
    next_attempt_at: int | None
    redrive_of: str | None
    output: OutputOut | None
    """The accepted answer, once witnessed (and, in a deliberation, once all are in)."""
    failures: list[FailureOut]
    unsolicited_outputs: int
    start_by: int | None
    finish_by: int | None
    dependencies: dict[str, str]
    sealed: bool
    retry: RetryOut


class DeliberationOut(_Out):
    deliberation_id: str
    revealed: bool
    statuses: dict[str, str]
    answers: dict[str, OutputOut]
    failures: dict[str, str]


class PoolOut(_Out):
    pool: str
    agents: int
    capacity: int
    """Tasks in flight at most: as set with ``conclave capacity``, else the default."""
    default_capacity: bool
    in_flight: int
    aging_turns: int | None
    """A queued task gains a priority level per this many turns served; null: strict."""
    weights: dict[str, int]
    """This tenant's fairness keys (the tenant, tenant/key) the pool's setting weighs;
    others weigh 1. Other tenants' keys are not shown."""
    queued: dict[str, int]
    waiting: int
    retrying: int
    completed: int
    dead_lettered: int
    cancelled: int
    expired: int
    dependency_failed: int


class AgentOut(_Out):
    agent_id: str
    pool: str | None
    host_id: str
    state: str
    current_task_id: str | None
    """Only if that task is this tenant's."""
    last_heartbeat_at: int | None
    suspended_reason: str | None
    rss_bytes: int | None
    capabilities: list[str]
    """What it can do, as its registration says (``?capability=`` finds agents by it)."""
    version: str | None
    restarts: int | None = None
    """Restarts after crashes within the restart window, as its latest restart said."""


class AgentChangeOut(_Out):
    occurred_at: int
    state: str
    reason: str
    """Why; for another tenant's task only that it was one."""
    task_id: str | None
    event_id: str
    source: str
    """``topic:partition@offset`` of the event that caused it."""


class HostOut(_Out):
    host_id: str
    pool: str | None
    state: str
    agent_ids: list[str]
    last_beat_at: int | None
    lease_expires_at: int | None
    lost_at: int | None
    lost_reason: str | None
    leaving_until: int | None
    rss_bytes: int | None
    cpu_percent: float | None
    over_limit: str | None
    """Why its agents take no new work, while it is over its memory or CPU limit."""
    failed_reason: str | None = None
    """Why the scheduler judged it failed (lost, then silent past the grace period)."""


class WorkflowStepOut(_Out):
    step: str
    task_id: str
    status: str
    pool: str
    agent_id: str | None
    priority: str
    depends_on: list[str]
    attempts: int
    max_attempts: int
    task_status: str | None
    input: str | None
    output: str | None
    submitted_at: int | None
    ended_at: int | None


class WorkflowOut(_Out):
    workflow_id: str
    tenant: str
    name: str
    status: str
    input_json: str
    failed_step: str | None
    reason: str | None
    started_at: int
    ended_at: int | None
    steps: list[WorkflowStepOut]
    """Empty in a listing."""


class StatusOut(_Out):
    halt_reason: str | None
    witness_head: int
    witness_head_at: int | None
    witness_head_hash: str | None
    """The head entry's SHA-256 (hex), covering every entry before it."""
    checkpoint_origin: str | None
    checkpoint_size: int | None
    checkpoint_at: int | None
    dead_lettered_last_hour: int
    """This tenant's tasks dead-lettered in the last hour."""
