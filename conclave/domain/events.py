"""Conclave's events: immutable facts, one dataclass per Avro schema.

Every event travels inside an :class:`Envelope` (who, when, why). Field names
match the Avro schemas in ``schemas/`` one to one, so the codec converts by
name and nothing else.

Times are integers, microseconds since the Unix epoch (UTC): cheap to encode
and exact to compare, which replay needs.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

from conclave.domain.retry import DEFAULT_RETRY

__all__ = [
    "AGENTS_TOPIC_EVENTS",
    "COORDINATION_DECISIONS",
    "COORDINATION_REQUESTS",
    "TASKS_TOPIC_EVENTS",
    "TASK_ENDINGS",
    "WORKFLOW_DECISIONS",
    "WORKFLOW_REQUESTS",
    "AgentCircuitClosed",
    "AgentCircuitHalfOpened",
    "AgentCircuitOpened",
    "AgentFailed",
    "AgentMessage",
    "AgentOutput",
    "AgentRegistered",
    "AgentReinstated",
    "AgentRestarted",
    "AgentRetired",
    "CancelRequested",
    "CommandRejected",
    "DeadLetterRecord",
    "DeliberationRequested",
    "Envelope",
    "Event",
    "Halt",
    "Heartbeat",
    "HostBeat",
    "HostFailed",
    "HostLeaving",
    "HostLost",
    "LockDenied",
    "LockExpired",
    "LockGranted",
    "LockReleaseRequested",
    "LockReleased",
    "LockRenewRequested",
    "LockRenewed",
    "LockRequested",
    "LockWaiting",
    "PoolConfigured",
    "PoolStarved",
    "Priority",
    "ProjectionDigest",
    "Resume",
    "StateCheckpointRequested",
    "StateCheckpointed",
    "StateRestoreRequested",
    "StateRestored",
    "StateUpdateRejected",
    "StateUpdateRequested",
    "StateUpdated",
    "TaskCancelled",
    "TaskCompleted",
    "TaskDeadLettered",
    "TaskDependencyFailed",
    "TaskDispatched",
    "TaskExpired",
    "TaskFailed",
    "TaskQueued",
    "TaskRetryScheduled",
    "TaskStalled",
    "TaskSubmitted",
    "WitnessCheckpoint",
    "WitnessEntry",
    "WorkerBeat",
    "WorkflowCancelRequested",
    "WorkflowEnded",
    "WorkflowRejected",
    "WorkflowRunRequested",
    "WorkflowStarted",
    "WorkflowStepCompleted",
    "WorkflowStepSubmitted",
    "new_envelope",
    "now_us",
]


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch."""
    return time.time_ns() // 1000


class Priority(enum.IntEnum):
    """Command priority; lower value is served first. Each has its own topic."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(p.label for p in cls)
            raise ValueError(f"unknown priority {text!r} (expected one of {names})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """Metadata shared by every event."""

    event_id: str
    event_type: str
    occurred_at: int
    """Microseconds since the epoch at which the producer created the event."""
    tenant: str
    correlation_id: str
    """Ties together everything that happened for one request (a task, a deliberation)."""
    causation_id: str | None
    """The event id of the event that caused this one; ``None`` for user commands."""
    producer: str
    """Which process wrote the event, e.g. ``client``, ``scheduler``, ``runtime:host-1``."""


def new_envelope(
    event_type: str,
    *,
    tenant: str,
    producer: str,
    correlation_id: str | None = None,
    causation: Envelope | None = None,
    occurred_at: int | None = None,
) -> Envelope:
    """A fresh envelope; correlation is inherited from the cause when not given."""
    event_id = str(uuid.uuid4())
    if correlation_id is None:
        correlation_id = causation.correlation_id if causation is not None else event_id
    return Envelope(
        event_id=event_id,
        event_type=event_type,
        occurred_at=now_us() if occurred_at is None else occurred_at,
        tenant=tenant,
        correlation_id=correlation_id,
        causation_id=causation.event_id if causation is not None else None,
        producer=producer,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSubmitted:
    """A user asks for one task to be run by an agent of a pool."""

    TYPE: ClassVar[str] = "task.submitted"
    task_id: str
    pool: str
    priority: Priority
    input: str
    """The task's input, opaque to Conclave (usually JSON or plain text)."""
    agent_id: str | None = None
    """Run on this agent only; ``None`` lets the scheduler choose an idle agent of the pool."""
    max_attempts: int = 1
    """How many times the task may be dispatched before it is dead-lettered (schema v2)."""
    retry_backoff_ms: int = DEFAULT_RETRY.backoff_ms
    """Retry policy (schema v3), see :class:`conclave.domain.retry.RetryPolicy`."""
    retry_multiplier: float = DEFAULT_RETRY.multiplier
    retry_backoff_max_ms: int = DEFAULT_RETRY.max_backoff_ms
    retry_jitter: float = DEFAULT_RETRY.jitter
    redrive_of: str | None = None
    """The dead-lettered task this one runs again, with a fresh attempt budget."""
    depends_on: list[str] = field(default_factory=list)
    """Tasks that must complete before this one is queued (schema v4). Each must be
    known to the scheduler when this command arrives (so no cycle can form); if one is
    dead-lettered or cancelled, this task ends as ``dependency_failed``."""
    start_within_ms: int | None = None
    """Schedule-to-start: not dispatched within this long of being accepted (waiting for
    dependencies included), the task ends ``expired``."""
    finish_by: int | None = None
    """Absolute deadline, µs since the epoch: not finished by then, the task ends
    ``expired`` (a running attempt is stopped)."""
    fairness_key: str | None = None
    """Tasks of equal priority in a pool are served round-robin between fairness keys
    (schema v5): the scheduler qualifies this one with the command's tenant, so tenants
    take turns even when none names a key."""
    key_limit: int | None = None
    """At most this many untargeted tasks of the same tenant and fairness key in flight in
    the pool at once; the latest task queued with a limit sets the key's."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequested:
    """A user asks to cancel one task (queued, waiting, retrying or running), or every
    unfinished task of a deliberation: exactly one of the two ids is given."""

    TYPE: ClassVar[str] = "task.cancel_requested"
    task_id: str | None = None
    deliberation_id: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliberationRequested:
    """The same motion put to many agents at once; each answers in its own context."""

    TYPE: ClassVar[str] = "deliberation.requested"
    deliberation_id: str
    pool: str
    priority: Priority
    motion: str
    agent_ids: list[str]
    """The agents that must answer; empty means every agent registered in the pool."""
    finish_by: int | None = None
    """The deliberation's deadline (schema v2), µs since the epoch: an agent not done by
    then expires, and the answers given are revealed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQueued:
    """The scheduler accepted a task: it waits for the dependencies in ``waiting_for``,
    then for capacity and an agent. When the last of them completes, the scheduler
    writes the task's ``TaskQueued`` again with ``waiting_for`` empty."""

    TYPE: ClassVar[str] = "task.queued"
    task_id: str
    pool: str
    priority: Priority
    input: str
    agent_id: str | None
    max_attempts: int
    deliberation_id: str | None
    sequence: int
    """The scheduler's arrival order; ties of turn within one priority go to the lower
    sequence."""
    retry_backoff_ms: int = DEFAULT_RETRY.backoff_ms
    """The task's retry policy (schema v2), as submitted."""
    retry_multiplier: float = DEFAULT_RETRY.multiplier
    retry_backoff_max_ms: int = DEFAULT_RETRY.max_backoff_ms
    retry_jitter: float = DEFAULT_RETRY.jitter
    redrive_of: str | None = None
    """The dead-lettered task this one runs again, with a fresh attempt budget."""
    depends_on: list[str] = field(default_factory=list)
    """The task's dependencies, as submitted (schema v3)."""
    waiting_for: list[str] = field(default_factory=list)
    """Those of them not completed yet: while any is, the task is ``waiting``."""
    start_by: int | None = None
    """Not dispatched by then (µs since the epoch), the task expires."""
    finish_by: int | None = None
    """Not finished by then (µs since the epoch), the task expires."""
    fairness_key: str | None = None
    """``tenant`` or ``tenant/key`` (schema v4): who the task takes turns with; ``None``
    for targeted tasks and tasks queued before fairness existed."""
    key_limit: int | None = None
    """At most this many untargeted tasks of ``fairness_key`` in flight in the pool."""
    turn: int = 0
    """Fair queuing's place (schema v4): within one priority, tasks are served by turn,
    then by ``sequence``. A key's tasks take consecutive turns, starting no earlier than
    the turn last served in the pool, so keys take turns; 0 before fairness existed."""
    aging_turns: int | None = None
    """The pool's aging when the task was accepted (stamped, so that recovery ranks it the
    same whatever order it folds topics in): ``None`` ranks by priority then turn; ``N``
    by ``turn + N x priority level``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRetryScheduled:
    """An attempt failed (transiently) or stalled, and attempts remain: the task waits
    until ``due``, holding no agent and no capacity, then the scheduler queues it again
    (``TaskQueued``). A due time in the log, not recomputed on replay."""

    TYPE: ClassVar[str] = "task.retry_scheduled"
    task_id: str
    agent_id: str
    """The agent of the attempt that failed."""
    attempt: int
    """The attempt that failed."""
    due: int
    """When the task is queued again, µs since the epoch."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDispatched:
    """The scheduler handed a task to one agent on one runtime host."""

    TYPE: ClassVar[str] = "task.dispatched"
    task_id: str
    pool: str
    agent_id: str
    host_id: str
    attempt: int
    input: str
    deliberation_id: str | None
    deadline: int | None = None
    """When the scheduler stops waiting for this attempt's answer (µs since the epoch):
    past it, the attempt is stalled and the task retried or dead-lettered. ``None``: no
    deadline (dispatches written before schema v2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStalled:
    """The scheduler stopped waiting for an attempt: no answer by its deadline (the host
    died, hung or lost its way to the broker). A task queued or dead-lettered follows;
    the agent gets no more work until it registers again. A late answer of this attempt
    is still witnessed, but never completes the task."""

    TYPE: ClassVar[str] = "task.stalled"
    task_id: str
    agent_id: str
    host_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRejected:
    """The scheduler refused a well-formed command: an invalid field, or a priority that
    is not its topic's. Nothing else happened; ``conclave task show ID`` says why.
    Written on the tasks topic, so the submitter finds it where the task would be."""

    TYPE: ClassVar[str] = "command.rejected"
    command_type: str
    """``task.submitted`` or ``deliberation.requested``."""
    subject_id: str
    """The task or deliberation id, as given (possibly the invalid field itself)."""
    command_event_id: str
    """The rejected command's event id: a redelivered command is rejected once."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentReinstated:
    """An agent that had stalled registered again, answered after all, or whose lost host
    beat again: the scheduler gives it work again. Written by the scheduler on the tasks
    topic, after its ``TaskStalled``, so that a replay sees the two in the order they
    happened."""

    TYPE: ClassVar[str] = "agent.reinstated"
    agent_id: str
    host_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentRegistered:
    """A runtime host announces an agent it runs."""

    TYPE: ClassVar[str] = "agent.registered"
    agent_id: str
    pool: str
    host_id: str
    agent_ref: str
    """The callable that implements the agent, ``module:function``."""
    capabilities: list[str] = field(default_factory=list)
    """Schema v2: what the agent can do (free-form names such as ``summarise``): how
    ``conclave agents --capability`` finds it."""
    version: str | None = None
    """Schema v2: the version of the agent's code, as its host says."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentCircuitOpened:
    """An agent failed too many attempts in a row: no work for it until ``until``, then
    one probe task (``AgentCircuitHalfOpened``). Written by the scheduler on the tasks
    topic in the decision that folded the failure."""

    TYPE: ClassVar[str] = "agent.circuit_opened"
    agent_id: str
    failures: int
    """Consecutive failed attempts (failed, stalled or lost with its host)."""
    until: int
    """End of the cool-down, µs since the epoch (the scheduler's clock)."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentCircuitHalfOpened:
    """An open circuit's cool-down is over: the agent may take one task. An answer closes
    the circuit (``AgentCircuitClosed``), another failure opens it again."""

    TYPE: ClassVar[str] = "agent.circuit_half_opened"
    agent_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentCircuitClosed:
    """The probe task of a half-open circuit was answered: the agent works as before."""

    TYPE: ClassVar[str] = "agent.circuit_closed"
    agent_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostBeat:
    """A runtime host is alive and its work loop turns: sent by the host (not per agent)
    while it reads its dispatches, on its pool's partition of the agents topic. The
    scheduler counts the host's agents as alive until ``expires_at``; a host whose lease
    runs out loses its dispatches (``HostLost``)."""

    TYPE: ClassVar[str] = "host.beat"
    host_id: str
    pool: str
    agent_ids: list[str]
    expires_at: int
    """Until when (µs since the epoch, the host's clock) the host promises to have beaten
    again: the time of the beat plus its lease."""
    rss_bytes: int | None = None
    """Schema v2: the host process's resident memory when it beat."""
    cpu_percent: float | None = None
    """Schema v2: the host process's CPU use since its previous beat (% of one core)."""
    over_limit: str | None = None
    """Schema v2: why the host takes no new work now (over its memory or CPU limit;
    ``None``: it has room). The newest beat of a host says: its agents get no dispatch
    while it is over, and what they run goes on."""
    running: dict[str, str] = field(default_factory=dict)
    """Schema v3: agent -> the task it runs, for those of its agents that run one (the
    others are idle). A host beats once for all its agents: it writes no per-agent
    ``Heartbeat`` since, so 72 agents cost one record a second, not 73."""
    spare: int | None = None
    """Schema v4: how many more agents the host could start now when its pool is short
    (its maximum less those it runs; 0 while over its limits or the machine's spawn
    limit). The scheduler says a pool is starved only while one of its hosts has room to
    grow. ``None``: a host that does not say (an older one), taken as 0."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentRestarted:
    """An agent crashed (an attempt ended in an error it did not raise on purpose, or
    ran past the task timeout) and its host started it afresh: its memory is empty
    again, and it takes work at once. Written by the host on its pool's partition of
    the agents topic, in the transaction that reports the crashed attempt."""

    TYPE: ClassVar[str] = "agent.restarted"
    agent_id: str
    pool: str
    host_id: str
    restarts: int
    """Restarts of this agent within ``window_s``, this one included."""
    window_s: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentFailed:
    """An agent crashed once more than its restart budget allows within the window: its
    host no longer runs it, and the scheduler gives it no work until its host registers
    it again (a host started anew). Written by the host like ``AgentRestarted``."""

    TYPE: ClassVar[str] = "agent.failed"
    agent_id: str
    pool: str
    host_id: str
    restarts: int
    """Restarts within ``window_s`` before this crash (the budget spent)."""
    window_s: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentRetired:
    """A runtime host stopped one of its agents because the pool shrank: the agent was
    idle past the host's idle timeout while the host ran more than its minimum. It gets
    no work until registered again (the pool grows, or a dispatch that crossed the
    retirement brings it back). Written by the host on its pool's partition of the
    agents topic, like its registrations, so the two fold in order."""

    TYPE: ClassVar[str] = "agent.retired"
    agent_id: str
    pool: str
    host_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLeaving:
    """A runtime host is stopping (SIGTERM, Ctrl-C): its agents take no new work from
    now on, and what they run finishes by ``until``, when its lease ends (its beats
    until then promise no later). Sent by the host on its pool's partition of the
    agents topic, before its drain. The scheduler then judges it as it would a silent
    host, but as having left: its agents retire, and an attempt still unanswered is
    stalled and retried elsewhere. A host started again with the same id registers its
    agents, and is back."""

    TYPE: ClassVar[str] = "host.leaving"
    host_id: str
    pool: str
    agent_ids: list[str]
    until: int
    """When its drain ends at the latest (µs since the epoch, the host's clock)."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLost:
    """The scheduler judged a runtime host dead: its lease ran out with no newer beat.
    Its agents get no work until it beats or registers again (``AgentReinstated``); each
    of its running attempts is stalled in the same decision (``TaskStalled``, then a
    retry or a dead letter)."""

    TYPE: ClassVar[str] = "host.lost"
    host_id: str
    pool: str
    agent_ids: list[str]
    """Its agents when it was judged lost: each gets no work until reinstated."""
    expires_at: int
    """The lease that ran out (the ``expires_at`` of the host's last beat)."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostFailed:
    """A runtime host judged lost stayed silent for the grace period after its lease ran
    out (``CONCLAVE_HOST_FAIL_AFTER_S``): it is not coming back by itself, and its agents
    are failed. What they ran was retried elsewhere when the host was lost; like a lost
    host's, its agents work again when it beats or registers them again."""

    TYPE: ClassVar[str] = "host.failed"
    host_id: str
    pool: str
    agent_ids: list[str]
    """Its agents when it was judged failed."""
    expires_at: int
    """The lease that ran out (as in the ``HostLost`` before)."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStarved:
    """The scheduler has tasks of a pool that could start now (queued, within the pool's
    capacity) and no idle agent to run them: a host that may grow the pool starts agents
    (autoscaling). Written on the pool's partition of the tasks topic with the pool in
    the broadcast header, so that the pool's hosts read it; at most once a second per
    pool while the shortage lasts, and only while the pool has a live host."""

    TYPE: ClassVar[str] = "pool.starved"
    pool: str
    waiting: int
    """Tasks that could start now if there were idle agents for them."""
    hosts: int
    """Live hosts of the pool (beating, not leaving): each starts its share."""
    at: int
    """When it was judged (µs since the epoch)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """An agent is alive; ``task_id`` names what it is working on, if anything."""

    TYPE: ClassVar[str] = "agent.heartbeat"
    agent_id: str
    host_id: str
    task_id: str | None
    rss_bytes: int
    """Resident memory of the agent's host process at the time of the beat."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentOutput:
    """What an agent answered. Visible to readers only once witnessed."""

    TYPE: ClassVar[str] = "agent.output"
    task_id: str
    agent_id: str
    attempt: int
    content: str
    latency_us: int
    """Time the agent callable took, measured by the runtime."""
    deliberation_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailed:
    """An agent raised (or timed out) while running a task: attribution for the failure."""

    TYPE: ClassVar[str] = "task.failed"
    task_id: str
    agent_id: str
    attempt: int
    error_type: str
    error_message: str
    deliberation_id: str | None
    permanent: bool = False
    """Retrying cannot help (the agent raised ``PermanentFailure``, or its answer was
    refused): the task is dead-lettered at once, whatever attempts remain (schema v2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCompleted:
    """Terminal: the task's output has been witnessed."""

    TYPE: ClassVar[str] = "task.completed"
    task_id: str
    agent_id: str
    output_event_id: str
    witness_sequence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDeadLettered:
    """Terminal: the task failed on its last attempt."""

    TYPE: ClassVar[str] = "task.dead_lettered"
    task_id: str
    agent_id: str
    attempts: int
    reason: str
    witness_sequence: int | None
    """The witness entry of the last attempt's failure; ``None`` when the last attempt
    stalled (nothing was witnessed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCancelled:
    """Terminal: a user cancelled the task. If it was running, the host named here stops
    its agent; a late answer of that attempt is witnessed and changes nothing."""

    TYPE: ClassVar[str] = "task.cancelled"
    task_id: str
    agent_id: str | None
    """The agent running it, if it was dispatched."""
    host_id: str | None
    attempt: int
    """Attempts begun before the cancellation."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskExpired:
    """Terminal: the task was not dispatched by its ``start_by`` or not finished by its
    ``finish_by``. If it was running, the host named here stops its agent."""

    TYPE: ClassVar[str] = "task.expired"
    task_id: str
    agent_id: str | None
    """The agent running it, if it was dispatched."""
    host_id: str | None
    attempt: int
    """Attempts begun before it expired."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDependencyFailed:
    """Terminal: a task this one depends on was dead-lettered or cancelled (or failed a
    dependency itself), so this one never runs."""

    TYPE: ClassVar[str] = "task.dependency_failed"
    task_id: str
    dependency: str
    """The dependency that failed."""
    culprit: str
    """Where the failure began: the dead-lettered or cancelled task."""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WitnessEntry:
    """One link of the append-only, hash-chained witness log (see docs/witness.md)."""

    TYPE: ClassVar[str] = "witness.entry"
    sequence: int
    """1, 2, 3, ... with no gaps."""
    previous_hash: bytes
    """``entry_hash`` of entry ``sequence - 1``; 32 zero bytes for entry 1."""
    entry_hash: bytes
    subject_type: str
    """The witnessed event's type, e.g. ``agent.output``, ``system.halt``."""
    subject_event_id: str
    subject_digest: bytes
    """SHA-256 of the witnessed event's exact record bytes on its topic."""
    recorded_at: int
    task_id: str | None
    agent_id: str | None
    detail: str
    """Short attribution: the error type of a failure, the reason of a halt."""
    attempt: int | None = None
    """Which attempt of the task the witnessed output or failure belongs to."""
    source_topic: str | None = None
    """Where the witnessed record was read (schema v3). With ``source_partition`` and
    ``source_offset`` the witness recovers its input positions from its own log."""
    source_partition: int | None = None
    source_offset: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WitnessCheckpoint:
    """The witness log's Merkle tree head at ``tree_size``, signed: what a third party
    keeps to check proofs against (see docs/witness.md, "Signed checkpoints")."""

    TYPE: ClassVar[str] = "witness.checkpoint"
    origin: str
    """The log's name: the signing key's name (the C2SP convention)."""
    tree_size: int
    """Entries 1 .. ``tree_size`` are under ``root_hash``."""
    root_hash: bytes
    note: str
    """The C2SP signed note: the ``tlog-checkpoint`` text and its Ed25519 signature
    lines, exactly as signed (what checkpoint tooling reads)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterRecord:
    """Bytes a processor could not use, kept with the reason and where they came from."""

    TYPE: ClassVar[str] = "dead_letter.recorded"
    reason: str
    error_type: str
    original: bytes | None
    """The record value exactly as consumed; ``None`` for a null value (a tombstone),
    which is not the same as empty bytes (schema v2)."""
    source_topic: str
    source_partition: int
    source_offset: int
    processor: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Halt:
    """Stop dispatching everywhere, now. Witnessed."""

    TYPE: ClassVar[str] = "system.halt"
    reason: str
    operator: str
    cancel_running: bool = False
    """``False``: tasks in flight finish (drain). ``True`` (schema v2): they are cancelled
    and their agents stopped; nothing is left running."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """Lift a halt. Witnessed."""

    TYPE: ClassVar[str] = "system.resume"
    reason: str
    operator: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfigured:
    """Set one pool's capacity (tasks in flight at most) from now on: an operator's
    decision, on the control topic, witnessed like a halt. 0 stops dispatching to the
    pool; tasks already running go on. Pools never configured have the scheduler's
    default (``CONCLAVE_POOL_CAPACITY``)."""

    TYPE: ClassVar[str] = "pool.configured"
    pool: str
    capacity: int
    reason: str
    operator: str
    aging_turns: int | None = None
    """Schema v2. ``None``: strict priority. ``N``: a queued task gains one priority level
    for every ``N`` turns served in the pool, so low priority cannot starve. Each
    ``PoolConfigured`` sets the pool's whole configuration."""
    weights: dict[str, int] = field(default_factory=dict)
    """Schema v3. Fairness key (a tenant, or ``tenant/key``) -> its weight: among keys
    with work queued at the same priority, a key of weight ``w`` is served ``w`` tasks for
    every one of a key of weight 1 (weighted fair queuing in whole turns). Keys not named
    weigh 1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectionDigest:
    """The digest of every read model of ``schema`` and the positions its rows cover, as
    ``conclave replay`` computed them after a rebuild: on the control topic, witnessed, so
    that a later rebuild can be proven equal to what was live. Changes no state but its
    own read model (``projection_digests``)."""

    TYPE: ClassVar[str] = "projection.digest"
    schema: str
    tables: list[str]
    """``table:rows:sha256`` per read model, sorted by table."""
    positions: list[str]
    """``topic:partition:next_offset`` per history partition, sorted."""
    digest: str
    """SHA-256 (hex) over the table lines: the whole schema in one value."""
    reason: str
    """``replay`` (rebuilt and swapped in) or ``check`` (rebuilt and compared only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerBeat:
    """A stream-processor worker is alive and owns ``shards``: how workers share shards
    and take over a dead one's without waiting for the broker to evict anybody."""

    TYPE: ClassVar[str] = "worker.beat"
    worker_id: str
    shards: list[str]
    """The shards it runs now, e.g. ``scheduler-0``, ``witness-0``."""
    leaving: bool
    """True on a graceful stop: the others take its shards over at once."""
    lease_ms: int
    """How long after this beat the worker counts as alive."""


# -- Coordination: resource locks and versioned state (streams/coordination.py) --------
# Requests come from clients on the coordination requests topic; decisions are the
# coordination processor's changelog, keyed by lock name or state key. Every decision
# names the ``request_id`` it answers (``None``: decided by time alone), which is how a
# client awaits its answer.


@dataclass(frozen=True, slots=True, kw_only=True)
class LockRequested:
    """Take lock ``name`` for ``holder`` for ``ttl_ms``; if another holds it, wait up to
    ``wait_ms`` in line (0: fail at once with who holds it until when)."""

    TYPE: ClassVar[str] = "lock.requested"
    name: str
    holder: str
    ttl_ms: int
    wait_ms: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockRenewRequested:
    """Extend the lease granted with ``fencing_token`` to ``ttl_ms`` from now."""

    TYPE: ClassVar[str] = "lock.renew_requested"
    name: str
    holder: str
    fencing_token: int
    ttl_ms: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockReleaseRequested:
    """Give up the lease granted with ``fencing_token``."""

    TYPE: ClassVar[str] = "lock.release_requested"
    name: str
    holder: str
    fencing_token: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockGranted:
    """``holder`` holds lock ``name`` until ``expires_at`` (µs since the epoch, the
    processor's clock) unless renewed. ``fencing_token`` is larger than every token this
    lock was granted with before: a resource that remembers the largest token it saw
    refuses a holder whose lease has passed to another."""

    TYPE: ClassVar[str] = "lock.granted"
    name: str
    holder: str
    fencing_token: int
    expires_at: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockWaiting:
    """The lock is held: ``holder`` waits in line (first come, first served) until
    ``wait_until``, then is denied."""

    TYPE: ClassVar[str] = "lock.waiting"
    name: str
    holder: str
    ttl_ms: int
    wait_until: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockDenied:
    """A request about lock ``name`` was refused: ``action`` is ``acquire``, ``renew`` or
    ``release``; ``reason`` says why (``locked by X until T``, a stale token, ...)."""

    TYPE: ClassVar[str] = "lock.denied"
    name: str
    holder: str
    action: str
    reason: str
    request_id: str
    held_by: str | None
    """Who holds the lock at the decision, if anyone."""
    held_until: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LockRenewed:
    TYPE: ClassVar[str] = "lock.renewed"
    name: str
    holder: str
    fencing_token: int
    expires_at: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockReleased:
    TYPE: ClassVar[str] = "lock.released"
    name: str
    holder: str
    fencing_token: int
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockExpired:
    """The lease granted with ``fencing_token`` ran out unrenewed: decided by the
    processor when its clock passed ``expires_at``, not by a clean-up job."""

    TYPE: ClassVar[str] = "lock.expired"
    name: str
    holder: str
    fencing_token: int
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StateUpdateRequested:
    """Set ``key`` to ``value_json`` if its version is still ``expected_version`` (0: the
    key has no version yet); a stale update is rejected, never merged."""

    TYPE: ClassVar[str] = "state.update_requested"
    key: str
    expected_version: int
    value_json: str
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateCheckpointRequested:
    """Label ``key``'s current version ``label`` (if it is still ``expected_version``,
    when given), to restore it later."""

    TYPE: ClassVar[str] = "state.checkpoint_requested"
    key: str
    label: str
    expected_version: int | None
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateRestoreRequested:
    """Make the value of checkpoint ``label`` ``key``'s next version (if its version is
    still ``expected_version``, when given); history is kept."""

    TYPE: ClassVar[str] = "state.restore_requested"
    key: str
    label: str
    expected_version: int | None
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateUpdated:
    """``key`` is at ``version`` (one more than before: versions have no gaps)."""

    TYPE: ClassVar[str] = "state.updated"
    key: str
    version: int
    value_json: str
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateUpdateRejected:
    """A request about ``key`` was refused; ``action`` is ``update``, ``checkpoint`` or
    ``restore``. ``current_version`` is the version it would have had to name."""

    TYPE: ClassVar[str] = "state.update_rejected"
    key: str
    action: str
    expected_version: int | None
    current_version: int
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateCheckpointed:
    TYPE: ClassVar[str] = "state.checkpointed"
    key: str
    version: int
    label: str
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateRestored:
    """``key``'s ``new_version`` has the value of ``from_version`` (checkpoint
    ``label``), written again so that the log alone says what the state is."""

    TYPE: ClassVar[str] = "state.restored"
    key: str
    from_version: int
    new_version: int
    label: str
    value_json: str
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowRunRequested:
    """A user asks for a workflow (a DAG of named steps) to be run on ``input_json``."""

    TYPE: ClassVar[str] = "workflow.run_requested"
    workflow_id: str
    definition_json: str
    """The definition as JSON (name, steps: pool or agent, priority, max_attempts, input
    template, depends_on), see :mod:`conclave.domain.workflows`."""
    input_json: str
    """The workflow's input, JSON: what ``{{ input... }}`` references read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowCancelRequested:
    """Cancel a running workflow as a whole: its running steps are cancelled, the rest
    never run."""

    TYPE: ClassVar[str] = "workflow.cancel_requested"
    workflow_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStarted:
    """The workflow processor accepted a workflow (valid DAG, every reference known)."""

    TYPE: ClassVar[str] = "workflow.started"
    workflow_id: str
    name: str
    definition_json: str
    """The normalised definition: every step with its pool, priority, dependencies."""
    input_json: str
    tenant: str
    """The tenant its steps are submitted as (the run request's)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowRejected:
    """A run or cancel request was refused; nothing else happened."""

    TYPE: ClassVar[str] = "workflow.rejected"
    workflow_id: str
    action: str
    """``run`` or ``cancel``."""
    request_event_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStepSubmitted:
    """``step`` was submitted as task ``task_id`` with its rendered input (the
    ``task.submitted`` is in the same transaction): once every dependency completed, or,
    for a step whose input reads no output, once they were submitted (``depends_on``)."""

    TYPE: ClassVar[str] = "workflow.step_submitted"
    workflow_id: str
    step: str
    task_id: str
    pool: str
    agent_id: str | None
    priority: Priority
    max_attempts: int
    input: str
    """The rendered input."""
    depends_on: list[str] = field(default_factory=list)
    """Step tasks the scheduler still has to see complete before it queues this one: a
    step whose input reads no output is submitted as soon as its dependencies are, so
    that the scheduler releases it in the decision that completes the last one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStepCompleted:
    """``step``'s task completed; ``output`` is its accepted answer (the output the
    scheduler's ``task.completed`` names), which later steps' templates read."""

    TYPE: ClassVar[str] = "workflow.step_completed"
    workflow_id: str
    step: str
    task_id: str
    output_event_id: str
    output: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowEnded:
    """Terminal: ``outcome`` is ``completed``, ``failed`` (``failed_step`` names the step)
    or ``cancelled``. Steps never submitted are ``skipped``; tasks still running were
    cancelled (``cancelled_tasks``, each with a ``task.cancel_requested`` alongside)."""

    TYPE: ClassVar[str] = "workflow.ended"
    workflow_id: str
    outcome: str
    failed_step: str | None
    reason: str
    skipped_steps: list[str] = field(default_factory=list)
    cancelled_steps: list[str] = field(default_factory=list)


# -- agent-to-agent messages ------------------------------------------------------------
# One record type for every kind of message (conclave.domain.messaging says which kinds
# there are and what each field means for each); on the messages topic, in the partition
# of the recipient's pool (or of the asker's inbox, for an answer).


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentMessage:
    """A message from an agent (or a client) to an agent, a pool, or every agent of a
    pool. ``host_id`` names the inbox it is delivered to (the same value is in the record's
    host header, so no other host decodes it); a broadcast has none and is read by every
    host of ``pool``. ``expires_at`` (µs since the epoch): not delivered after it, but
    dead-lettered with the reason ``expired``."""

    TYPE: ClassVar[str] = "agent.message"
    message_id: str
    kind: str
    """command, query, response, event, notification, error, data or heartbeat."""
    correlation_id: str | None
    """For a response or an error: the ``message_id`` it answers."""
    sender: str
    """The sending agent's id, or a client's name."""
    reply_to: str
    """The sender's inbox (its host id, or a client's inbox id): where answers go."""
    reply_partition: int
    """The partition of the messages topic that inbox reads."""
    recipient: str
    """As addressed: an agent id, ``pool:NAME`` (any one agent of the pool) or
    ``broadcast:NAME`` (every agent of the pool)."""
    agent_id: str | None
    """The agent it was resolved to (``None`` for a broadcast, or an answer to a client)."""
    host_id: str | None
    """The inbox it is for (``None`` for a broadcast)."""
    pool: str | None
    expires_at: int | None
    priority: Priority
    """Higher priority is delivered first within what one fetch of an inbox gives."""
    expects_reply: bool
    """An ``ask``: the sender awaits a response (or error) with this id as correlation."""
    payload: str


Event = (
    TaskSubmitted
    | CancelRequested
    | DeliberationRequested
    | TaskQueued
    | TaskDispatched
    | TaskStalled
    | TaskRetryScheduled
    | CommandRejected
    | AgentReinstated
    | AgentRegistered
    | Heartbeat
    | AgentCircuitOpened
    | AgentCircuitHalfOpened
    | AgentCircuitClosed
    | AgentRestarted
    | AgentFailed
    | AgentRetired
    | PoolStarved
    | HostFailed
    | HostBeat
    | HostLeaving
    | HostLost
    | AgentOutput
    | TaskFailed
    | TaskCompleted
    | TaskDeadLettered
    | TaskCancelled
    | TaskExpired
    | TaskDependencyFailed
    | WitnessEntry
    | WitnessCheckpoint
    | DeadLetterRecord
    | Halt
    | Resume
    | PoolConfigured
    | ProjectionDigest
    | WorkerBeat
    | LockRequested
    | LockRenewRequested
    | LockReleaseRequested
    | LockGranted
    | LockWaiting
    | LockDenied
    | LockRenewed
    | LockReleased
    | LockExpired
    | StateUpdateRequested
    | StateCheckpointRequested
    | StateRestoreRequested
    | StateUpdated
    | StateUpdateRejected
    | StateCheckpointed
    | StateRestored
    | WorkflowRunRequested
    | WorkflowCancelRequested
    | WorkflowStarted
    | WorkflowRejected
    | WorkflowStepSubmitted
    | WorkflowStepCompleted
    | WorkflowEnded
    | AgentMessage
)

TASK_ENDINGS = (TaskCompleted, TaskDeadLettered, TaskCancelled, TaskExpired, TaskDependencyFailed)
"""Events that end a task (terminal); the part of ``TYPE`` after ``task.`` is its outcome."""

AGENTS_TOPIC_EVENTS = (
    AgentRegistered,
    AgentRestarted,
    AgentFailed,
    AgentRetired,
    HostBeat,
    HostLeaving,
)
"""What runtime hosts write on the agents topic, in their order on a pool's partition."""

TASKS_TOPIC_EVENTS = (
    TaskQueued,
    TaskDispatched,
    TaskStalled,
    TaskRetryScheduled,
    AgentReinstated,
    HostLost,
    HostFailed,
    PoolStarved,
    AgentCircuitOpened,
    AgentCircuitHalfOpened,
    AgentCircuitClosed,
    TaskCompleted,
    TaskDeadLettered,
    TaskCancelled,
    TaskExpired,
    TaskDependencyFailed,
    CommandRejected,
)
"""What the scheduler writes on the tasks topic (its changelog), in no particular order."""

COORDINATION_REQUESTS = (
    LockRequested,
    LockRenewRequested,
    LockReleaseRequested,
    StateUpdateRequested,
    StateCheckpointRequested,
    StateRestoreRequested,
)
"""What clients write on the coordination requests topic."""

COORDINATION_DECISIONS = (
    LockGranted,
    LockWaiting,
    LockDenied,
    LockRenewed,
    LockReleased,
    LockExpired,
    StateUpdated,
    StateUpdateRejected,
    StateCheckpointed,
    StateRestored,
)
"""What the coordination processor writes (its changelog)."""

WORKFLOW_REQUESTS = (WorkflowRunRequested, WorkflowCancelRequested)
"""What clients write on the workflow requests topic."""

WORKFLOW_DECISIONS = (
    WorkflowStarted,
    WorkflowRejected,
    WorkflowStepSubmitted,
    WorkflowStepCompleted,
    WorkflowEnded,
)
"""What the workflow processor writes (its changelog)."""
