"""An agent's lifecycle, read off the events that change it. Pure.

Every change of an agent's state is already an event with its reason, written by its
host or by the scheduler; :func:`transitions` says which agent each one moves to which
state, and why. Folding them in order gives an agent's history (the ``agent_events``
read model, ``conclave agents show ID``)::

    registered -> idle <-> busy            dispatched; answered, failed or cancelled
    busy -> unresponsive                   no answer by the attempt's deadline
    unresponsive -> idle                   it answered that attempt after all
    any -> circuit_open -> probing -> idle too many failures in a row; cool-down; probe answered
    any -> lost                            its host's lease ran out (no beat)
    lost -> failed                         its host stayed silent past the grace period
    any -> retired                         its host stopped, drained (SIGTERM)
    idle -> restarting -> idle             it crashed; its host started it afresh (at
                                           once, in its process: one event, two
                                           transitions)
    idle -> retired                        idle too long as the pool shrank (a busy
                                           agent got a dispatch that crossed that: its
                                           host brings it back, and it stays busy)
    any -> failed                          it crashed past its restart budget
    lost | retired | failed -> registered  its host started again, or grew the pool

Heartbeats change no state and are not history: a beat only renews its host's lease.
``registered`` says where an agent runs, not what it does: an agent registered again
while it ran a task (its host restarted, and resumes its dispatches) is busy until that
attempt ends. The end of a run moves only the agent running that very attempt: a late
or repeated report about an earlier attempt of a task it runs again ends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from conclave.domain.events import (
    AgentCircuitClosed,
    AgentCircuitHalfOpened,
    AgentCircuitOpened,
    AgentFailed,
    AgentRegistered,
    AgentReinstated,
    AgentRestarted,
    AgentRetired,
    Event,
    HostFailed,
    HostLost,
    TaskCancelled,
    TaskCompleted,
    TaskDispatched,
    TaskExpired,
    TaskFailed,
    TaskStalled,
)
from conclave.domain.scheduling import LEFT, NO_ANSWER
from conclave.domain.witness import failure_detail

__all__ = ["LIFECYCLE_EVENTS", "STATES", "AgentNow", "Transition", "fold", "transitions"]

STATES = (
    "registered",
    "idle",
    "busy",
    "unresponsive",
    "circuit_open",
    "probing",
    "lost",
    "retired",
    "failed",
    "restarting",
)


LIFECYCLE_EVENTS = frozenset(
    {
        AgentRegistered,
        AgentRestarted,
        AgentFailed,
        AgentRetired,
        TaskDispatched,
        TaskCompleted,
        TaskFailed,
        TaskCancelled,
        TaskExpired,
        TaskStalled,
        AgentReinstated,
        AgentCircuitOpened,
        AgentCircuitHalfOpened,
        AgentCircuitClosed,
        HostLost,
        HostFailed,
    }
)
"""The events :func:`transitions` reads (others move no agent)."""


@dataclass(frozen=True, slots=True)
class Transition:
    agent_id: str
    state: str
    """One of :data:`STATES`."""
    reason: str
    task_id: str | None = None
    """The task it concerns, if any."""
    ends_run: bool = False
    """The end of a run of ``task_id`` (answered, failed, cancelled, expired): it moves
    only an agent running that task. A failure report about another task (late, or sent
    by hand) says nothing of what the agent does now."""
    attempt: int | None = None
    """The attempt it starts or ends, where the event says (an answer does not: it ends
    the task, so no later attempt of it runs). A late report about an earlier attempt of
    the task the agent runs again ends nothing."""
    if_idle: bool = False
    """It moves only an agent that runs nothing: a host retires idle agents, so one busy
    when the retirement is folded got a dispatch that crossed it, and its host brings it
    back for that task."""


@dataclass(frozen=True, slots=True)
class AgentNow:
    """An agent's state after its history so far, and the task it runs (while busy)."""

    state: str
    task_id: str | None = None
    attempt: int | None = None


def fold(now: AgentNow | None, change: Transition) -> AgentNow:
    """The state after ``change``: the rule that reads an agent's history."""
    if (change.state == "registered" or change.if_idle) and now is not None and now.state == "busy":
        return now  # where it runs, not what it does: its host resumes the attempt
    if change.ends_run and (
        now is None
        or now.task_id != change.task_id
        or (None not in (now.attempt, change.attempt) and now.attempt != change.attempt)
    ):
        return now if now is not None else AgentNow("registered")
    if change.state == "busy":
        return AgentNow("busy", change.task_id, change.attempt)
    return AgentNow(change.state)


def transitions(event: Event) -> list[Transition]:
    """The agents ``event`` moves, each to its new state with the reason (none for an
    event that changes no agent's state)."""
    match event:
        case AgentRegistered():
            version = f", version {event.version}" if event.version else ""
            where = f"on host {event.host_id!r} in pool {event.pool!r}{version}"
            return [Transition(event.agent_id, "registered", where)]
        case TaskDispatched():
            said = f"runs {event.task_id} (attempt {event.attempt})"
            return [Transition(event.agent_id, "busy", said, event.task_id, attempt=event.attempt)]
        case TaskCompleted():
            said = f"answered {event.task_id}"
            return [Transition(event.agent_id, "idle", said, event.task_id, ends_run=True)]
        case TaskFailed():
            error = failure_detail(event.error_type, permanent=event.permanent)
            said = f"attempt {event.attempt} of {event.task_id} failed: {error}"
            said += f": {event.error_message}" if event.error_message else ""
            ended = Transition(event.agent_id, "idle", said, event.task_id, True, event.attempt)
            return [ended]
        case TaskCancelled(agent_id=str(agent_id)) | TaskExpired(agent_id=str(agent_id)):
            said = f"{event.task_id} {event.TYPE.removeprefix('task.')}: its run stopped"
            return [Transition(agent_id, "idle", said, event.task_id, True, event.attempt)]
        case TaskStalled() if event.reason.endswith(NO_ANSWER):
            # A stall because its host is gone follows the host's loss, which says it.
            return [Transition(event.agent_id, "unresponsive", event.reason, event.task_id)]
        case AgentReinstated():
            said = "answered its stalled attempt after all: work again"
            return [Transition(event.agent_id, "idle", said)]
        case AgentRestarted():
            said = f"restart {event.restarts} within {event.window_s:g} s: {event.reason}"
            return [
                Transition(event.agent_id, "restarting", said),
                Transition(event.agent_id, "idle", "started afresh: its memory is empty"),
            ]
        case AgentFailed():
            return [Transition(event.agent_id, "failed", event.reason)]
        case AgentRetired():
            return [Transition(event.agent_id, "retired", event.reason, if_idle=True)]
        case AgentCircuitOpened():
            return [Transition(event.agent_id, "circuit_open", event.reason)]
        case AgentCircuitHalfOpened():
            return [Transition(event.agent_id, "probing", "cool-down over: one probe task")]
        case AgentCircuitClosed():
            return [Transition(event.agent_id, "idle", "the probe answered: circuit closed")]
        case HostLost():
            state = "retired" if event.reason.endswith(LEFT) else "lost"
            return [Transition(agent, state, event.reason) for agent in event.agent_ids]
        case HostFailed():
            return [Transition(agent, "failed", event.reason) for agent in event.agent_ids]
        case _:
            return []
