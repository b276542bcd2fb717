"""The scheduler's domain: what a command or fact means for the task schedule.

``decide(state, cause) -> list[event]`` is pure: it reads the state and returns
the events to append. ``evolve(state, event)`` folds one event into the state.
Rebuilding the state after a restart is the same fold over the scheduler's own
output topic, so recovery is not a separate code path.

Why ``evolve`` mutates: the state holds every live task of every pool; copying
it per event would make scheduling O(tasks) per event. ``evolve`` is the only
place that mutates, and ``decide`` never does, so the state is still a fold.

Rules enforced here (each has a test):

* HALT first: while halted nothing is dispatched.
* Capacity: a pool never has more tasks in flight than its limit.
* Priority: among queued tasks of a pool, a higher priority is dispatched
  first; within one priority, arrival order.
* Idempotence: a duplicate command or fact yields no events.
* One task per agent at a time: an agent's context belongs to one task.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field

from conclave.domain.events import (
    AgentRegistered,
    DeliberationRequested,
    Halt,
    Heartbeat,
    Priority,
    Resume,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskQueued,
    TaskSubmitted,
    WitnessEntry,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "AgentSlot",
    "SchedulerEvent",
    "SchedulerState",
    "TaskState",
    "TaskStatus",
    "decide",
    "deliberation_task_id",
    "evolve",
    "schedule",
]

DEFAULT_CAPACITY = 72

SchedulerEvent = TaskQueued | TaskDispatched | TaskCompleted | TaskDeadLettered


class TaskStatus(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    DEAD_LETTERED = "dead_lettered"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.DEAD_LETTERED)


@dataclass(slots=True)
class TaskState:
    task_id: str
    pool: str
    priority: Priority
    input: str
    agent_id: str | None
    """Fixed target agent, or the agent it is dispatched to."""
    targeted: bool
    max_attempts: int
    deliberation_id: str | None
    sequence: int
    status: TaskStatus = TaskStatus.QUEUED
    attempt: int = 0


@dataclass(slots=True)
class AgentSlot:
    agent_id: str
    pool: str
    host_id: str


@dataclass(slots=True)
class SchedulerState:
    capacity: int = DEFAULT_CAPACITY
    halted: bool = False
    tasks: dict[str, TaskState] = field(default_factory=dict)
    agents: dict[str, AgentSlot] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    """Pool -> number of dispatched, unfinished tasks."""
    queues: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    """Pool -> heap of (priority, sequence, task id) of queued tasks."""
    next_sequence: int = 1
    assignments: dict[str, str] = field(default_factory=dict)
    """Agent id -> the dispatched task it works on. Kept apart from the agent registry
    so that folding a dispatch before its agent's registration still marks it busy."""
    deliberations: set[str] = field(default_factory=set)
    """Deliberations already expanded into tasks: a redelivered request adds none."""

    def pools(self) -> set[str]:
        return set(self.queues) | {a.pool for a in self.agents.values()}


def deliberation_task_id(deliberation_id: str, agent_id: str) -> str:
    """The task in which one agent answers one deliberation."""
    return f"{deliberation_id}/{agent_id}"


def decide(
    state: SchedulerState,
    cause: TaskSubmitted | DeliberationRequested | WitnessEntry,
) -> list[TaskQueued | TaskCompleted | TaskDeadLettered]:
    """Events that a command or a witnessed fact implies; ``[]`` for duplicates."""
    if isinstance(cause, TaskSubmitted):
        if cause.task_id in state.tasks:
            return []
        return [
            TaskQueued(
                task_id=cause.task_id,
                pool=cause.pool,
                priority=cause.priority,
                input=cause.input,
                agent_id=cause.agent_id,
                max_attempts=max(1, cause.max_attempts),
                deliberation_id=None,
                sequence=state.next_sequence,
            )
        ]
    if isinstance(cause, DeliberationRequested):
        if cause.deliberation_id in state.deliberations:
            return []
        agent_ids = cause.agent_ids or sorted(
            a.agent_id for a in state.agents.values() if a.pool == cause.pool
        )
        queued: list[TaskQueued | TaskCompleted | TaskDeadLettered] = []
        for agent_id in agent_ids:
            task_id = deliberation_task_id(cause.deliberation_id, agent_id)
            if task_id in state.tasks:
                continue
            queued.append(
                TaskQueued(
                    task_id=task_id,
                    pool=cause.pool,
                    priority=cause.priority,
                    input=cause.motion,
                    agent_id=agent_id,
                    max_attempts=1,
                    deliberation_id=cause.deliberation_id,
                    sequence=state.next_sequence + len(queued),
                )
            )
        return queued
    return _decide_witnessed(state, cause)


def _decide_witnessed(
    state: SchedulerState, entry: WitnessEntry
) -> list[TaskQueued | TaskCompleted | TaskDeadLettered]:
    task = state.tasks.get(entry.task_id or "")
    if task is None or task.status is not TaskStatus.DISPATCHED or entry.agent_id != task.agent_id:
        return []
    if entry.attempt is not None and entry.attempt != task.attempt:
        return []  # a late or redelivered entry of an earlier attempt
    agent_id = entry.agent_id
    assert agent_id is not None  # equal to the agent of a dispatched task
    if entry.subject_type == "agent.output":
        return [
            TaskCompleted(
                task_id=task.task_id,
                agent_id=agent_id,
                output_event_id=entry.subject_event_id,
                witness_sequence=entry.sequence,
            )
        ]
    if entry.subject_type == "task.failed":
        if task.attempt < task.max_attempts:
            return [
                TaskQueued(
                    task_id=task.task_id,
                    pool=task.pool,
                    priority=task.priority,
                    input=task.input,
                    agent_id=task.agent_id if task.targeted else None,
                    max_attempts=task.max_attempts,
                    deliberation_id=task.deliberation_id,
                    sequence=state.next_sequence,
                )
            ]
        return [
            TaskDeadLettered(
                task_id=task.task_id,
                agent_id=agent_id,
                attempts=task.attempt,
                reason=entry.detail or "agent failed",
                witness_sequence=entry.sequence,
            )
        ]
    return []


def schedule(state: SchedulerState) -> list[TaskDispatched]:
    """Dispatches that capacity, free agents and priorities allow right now.

    Queued tasks are taken in (priority, arrival) order. A targeted task waits for
    its own agent; an untargeted one takes an idle agent that no better queued
    task is waiting for, so it never steals the agent a higher-priority task needs.
    Pure: the returned events still have to be folded with :func:`evolve`.
    """
    if state.halted:
        return []
    dispatched: list[TaskDispatched] = []
    for pool in sorted(state.queues):
        free = state.capacity - state.in_flight.get(pool, 0)
        if free <= 0 or not state.queues[pool]:
            continue
        idle = {
            a.agent_id: a
            for a in state.agents.values()
            if a.pool == pool and a.agent_id not in state.assignments
        }
        if not idle:
            continue
        queued = sorted(state.queues[pool])
        # The best queued task waiting for each idle agent, by its (priority, sequence).
        wanted: dict[str, tuple[int, int]] = {}
        for priority, sequence, task_id in queued:
            target = state.tasks[task_id].agent_id if state.tasks[task_id].targeted else None
            if target in idle and target not in wanted:
                wanted[target] = (priority, sequence)
        for priority, sequence, task_id in queued:
            if free <= 0 or not idle:
                break
            task = state.tasks[task_id]
            if task.targeted:
                agent = idle.get(task.agent_id or "")
            else:
                agent = _free_agent(idle, wanted, (priority, sequence))
            if agent is None:
                continue
            del idle[agent.agent_id]
            wanted.pop(agent.agent_id, None)
            free -= 1
            dispatched.append(
                TaskDispatched(
                    task_id=task.task_id,
                    pool=pool,
                    agent_id=agent.agent_id,
                    host_id=agent.host_id,
                    attempt=task.attempt + 1,
                    input=task.input,
                    deliberation_id=task.deliberation_id,
                )
            )
    return dispatched


def _free_agent(
    idle: dict[str, AgentSlot], wanted: dict[str, tuple[int, int]], rank: tuple[int, int]
) -> AgentSlot | None:
    """An idle agent for an untargeted task of ``rank``: one nobody waits for, else one
    wanted only by a task ranked below this one (the lowest-ranked such claim first)."""
    unclaimed = sorted(a for a in idle if a not in wanted)
    if unclaimed:
        return idle[unclaimed[0]]
    outranked = [(claim, a) for a, claim in wanted.items() if a in idle and claim > rank]
    if not outranked:
        return None
    return idle[max(outranked)[1]]


def evolve(
    state: SchedulerState,
    event: SchedulerEvent | AgentRegistered | Heartbeat | Halt | Resume,
) -> SchedulerState:
    """Fold one event into the state (in place, see the module docstring)."""
    match event:
        case TaskQueued():
            task = state.tasks.get(event.task_id)
            if task is None:
                task = TaskState(
                    task_id=event.task_id,
                    pool=event.pool,
                    priority=event.priority,
                    input=event.input,
                    agent_id=event.agent_id,
                    targeted=event.agent_id is not None,
                    max_attempts=event.max_attempts,
                    deliberation_id=event.deliberation_id,
                    sequence=event.sequence,
                )
                state.tasks[event.task_id] = task
                if event.deliberation_id is not None:
                    state.deliberations.add(event.deliberation_id)
            elif task.status is not TaskStatus.DISPATCHED:
                return state  # a duplicate (or a stale retry of a finished task)
            else:  # a retry: back in the queue, keeping its attempts
                _release(state, task)
                task.status = TaskStatus.QUEUED
                task.sequence = event.sequence
                if not task.targeted:
                    task.agent_id = None
            heapq.heappush(
                state.queues.setdefault(event.pool, []),
                (int(event.priority), event.sequence, event.task_id),
            )
            state.next_sequence = max(state.next_sequence, event.sequence + 1)
        case TaskDispatched():
            task = state.tasks.get(event.task_id)
            if task is None or task.status is not TaskStatus.QUEUED:
                return state  # a duplicate, or a dispatch of a task this fold never saw
            queue = state.queues[task.pool]
            queue.remove((int(task.priority), task.sequence, task.task_id))
            heapq.heapify(queue)
            task.status = TaskStatus.DISPATCHED
            task.agent_id = event.agent_id
            task.attempt = event.attempt
            state.in_flight[task.pool] = state.in_flight.get(task.pool, 0) + 1
            state.assignments[event.agent_id] = task.task_id
        case TaskCompleted() | TaskDeadLettered():
            task = state.tasks.get(event.task_id)
            if task is None or task.status.terminal:
                return state
            _release(state, task)
            task.status = (
                TaskStatus.COMPLETED
                if isinstance(event, TaskCompleted)
                else TaskStatus.DEAD_LETTERED
            )
        case AgentRegistered():
            slot = state.agents.get(event.agent_id)
            if slot is None:
                state.agents[event.agent_id] = AgentSlot(event.agent_id, event.pool, event.host_id)
            else:
                slot.pool, slot.host_id = event.pool, event.host_id
        case Heartbeat():
            pass  # liveness is judged by the lifecycle processor, not the scheduler
        case Halt():
            state.halted = True
        case Resume():
            state.halted = False
    return state


def _release(state: SchedulerState, task: TaskState) -> None:
    """Free the capacity and the agent a dispatched task held."""
    if task.status is not TaskStatus.DISPATCHED:
        return
    state.in_flight[task.pool] -= 1
    if state.assignments.get(task.agent_id or "") == task.task_id:
        del state.assignments[task.agent_id or ""]
