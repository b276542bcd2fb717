"""The scheduler's domain: what a command or fact means for the task schedule.

``decide(state, cause, now) -> list[event]`` is pure: it reads the state and
returns the events to append. ``evolve(state, event)`` folds one event into the
state. Rebuilding the state after a restart is the same fold over the scheduler's
own output topic (plus agents and control), from empty or from a snapshot
(:func:`to_snapshot` / :func:`from_snapshot`), so recovery is not a separate path.

Why ``evolve`` mutates: copying the state per event would cost O(tasks) per event.
``evolve`` is the only place that mutates; ``decide`` and ``schedule`` never do.

Cost: every event is O(log n) in the queued tasks (plus the events it yields), for
any number of idle agents and pools. ``evolve`` keeps indexes for that (see
:class:`PoolState`): per-pool heaps of queued tasks, idle agents ordered by id and
by the best task waiting for them, and the set of pools where a dispatch is
possible now, so :func:`schedule` looks only there.

Memory: finished tasks leave the state; a window of the last ``dedup_window``
finished task ids (and expanded deliberation ids) keeps duplicates out. Idempotent
submission is guaranteed within that window: a ``TaskSubmitted`` repeated after
``dedup_window`` more tasks have finished runs the task again.

Time enters as ``now`` (microseconds since the epoch); nothing here reads a clock.
Rules that wait (answer deadlines, retry back-off) keep their due times in ``timers``;
:func:`next_due` says when the caller must come back even without input, and
:func:`expire` what the timers due at ``now`` imply.

Rules enforced here (each has a test):

* HALT first: while halted nothing is dispatched; tasks in flight finish (drain), or
  with ``cancel_running`` are cancelled at once (:func:`halted`).
* Capacity: a pool never has more tasks in flight than its limit (its own, set at run
  time by ``PoolConfigured``, or the default); lowering it dispatches nothing more until
  the pool is under it, and preempts nothing.
* Priority: among queued tasks of a pool, a higher priority is dispatched
  first; within one priority, arrival order.
* Idempotence: a duplicate command or fact yields no events.
* One task per agent at a time: an agent's context belongs to one task.
* Deadlines: an attempt with no answer by its dispatch's deadline is stalled (the
  attempt counts) and its agent gets no work until it registers again or its late
  answer is witnessed (the answer completes nothing).
* Host leases: a runtime host whose lease (its last ``HostBeat``) runs out is lost
  (:func:`lost_hosts`): each of its running attempts is stalled like one past its
  deadline, and its agents get no work until it beats or registers them again
  (:func:`revived`, :func:`reinstate`). A host that never beat is never judged. A
  host that says it is leaving (``HostLeaving``) gets no new work at once; its lease
  ends when its drain does, and it is then judged the same way, as having left. A host
  whose newest beat says it is over its memory or CPU limit (``over_limit``) gets no
  new work until a beat says it has room again; what it runs goes on. A lost host still
  silent ``fail_after_us`` after its lease ran out is failed (:func:`failed_hosts`):
  its agents are failed, to be reinstated the same way.
* Circuit breakers: an agent that failed ``threshold`` attempts in a row (failed,
  stalled, lost with its host) gets no work for a cool-down (:func:`tripped`), then one
  probe task (:func:`half_opened`): an answer closes the circuit, a failure opens it
  again.
* Autoscaling: a pool with tasks that could start now (queued, within its capacity) and
  no idle agent for them is starved (:func:`starved`): said at most once per
  ``STARVED_EVERY_US`` while it lasts, and only while the pool has a live host, whose
  share of the waiting tasks it may start as new agents. An agent its host retired
  (``AgentRetired``: the pool shrank) gets no work until registered again.
* Retries: a failed or stalled attempt with attempts left waits out its back-off
  (:class:`~conclave.domain.retry.RetryPolicy`) holding no agent and no capacity, then
  is queued again; a permanent failure is dead-lettered at once.
* Dependencies: a task waits, holding nothing, until every task it depends on has
  completed; it ranks by its submission. If one is dead-lettered or cancelled, the
  task and everything waiting on it end ``dependency_failed``, naming the dependency
  and where the failure began. A dependency must be known when the dependent arrives
  (:func:`refusal` says so otherwise), so the graph is acyclic by construction.
* Cancellation: a waiting, queued, retrying or running task ends ``cancelled`` at once
  (a running one frees its agent and capacity; its host stops the agent); cancelling a
  deliberation cancels each of its unfinished tasks.
* Expiry: a task not dispatched by its ``start_by`` (schedule-to-start) or not finished
  by its ``finish_by`` (absolute deadline) ends ``expired``, like a cancellation.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from itertools import takewhile
from typing import TypeVar

from conclave.domain.events import (
    AgentCircuitClosed,
    AgentCircuitHalfOpened,
    AgentCircuitOpened,
    AgentFailed,
    AgentRegistered,
    AgentReinstated,
    AgentRestarted,
    AgentRetired,
    CancelRequested,
    DeliberationRequested,
    Halt,
    Heartbeat,
    HostBeat,
    HostFailed,
    HostLeaving,
    HostLost,
    PoolConfigured,
    PoolStarved,
    Resume,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDependencyFailed,
    TaskDispatched,
    TaskExpired,
    TaskQueued,
    TaskRetryScheduled,
    TaskStalled,
    TaskSubmitted,
    WitnessEntry,
)
from conclave.domain.ordered import Rank
from conclave.domain.retry import retry_of
from conclave.domain.scheduler_state import (
    DEFAULT_CAPACITY,
    DEFAULT_DEDUP_WINDOW,
    NOTHING,
    SNAPSHOT_VERSION,
    AgentSlot,
    HostLease,
    PoolState,
    SchedulerState,
    TaskState,
    TaskStatus,
    Turns,
    from_snapshot,
    to_snapshot,
)
from conclave.domain.validation import MAX_ATTEMPTS
from conclave.domain.witness import is_permanent_failure

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_DEDUP_WINDOW",
    "LEFT",
    "NO_ANSWER",
    "REGISTRATION_GRACE_US",
    "SNAPSHOT_VERSION",
    "STARVED_EVERY_US",
    "AgentSlot",
    "HostLease",
    "PoolState",
    "SchedulerEvent",
    "SchedulerState",
    "TaskState",
    "TaskStatus",
    "decide",
    "deliberation_task_id",
    "due_timers",
    "evolve",
    "expire",
    "failed_hosts",
    "failures_due",
    "fairness_key",
    "from_snapshot",
    "half_opened",
    "halted",
    "hosts_due",
    "lost_hosts",
    "next_due",
    "refusal",
    "reinstate",
    "revived",
    "schedule",
    "starved",
    "status_of",
    "to_snapshot",
    "tripped",
]

SchedulerEvent = (
    TaskQueued
    | TaskDispatched
    | TaskStalled
    | TaskRetryScheduled
    | AgentReinstated
    | HostLost
    | AgentCircuitOpened
    | AgentCircuitHalfOpened
    | AgentCircuitClosed
    | TaskCompleted
    | TaskDeadLettered
    | TaskCancelled
    | TaskExpired
    | TaskDependencyFailed
    | PoolStarved
    | HostFailed
)
Outcome = (
    AgentCircuitClosed
    | AgentReinstated
    | TaskQueued
    | TaskRetryScheduled
    | TaskCompleted
    | TaskDeadLettered
    | TaskCancelled
    | TaskDependencyFailed
)
"""What a command or a witnessed fact may lead to."""
Failure = TaskDeadLettered | TaskCancelled | TaskExpired | TaskDependencyFailed
"""Terminal without an answer: what a task depending on it can never get past."""


def deliberation_task_id(deliberation_id: str, agent_id: str) -> str:
    """The task in which one agent answers one deliberation."""
    return f"{deliberation_id}/{agent_id}"


def status_of(state: SchedulerState, task_id: str) -> TaskStatus | None:
    """A live task's status, a recently finished one's, or ``None`` (unknown or forgotten)."""
    task = state.tasks.get(task_id)
    return task.status if task is not None else state.finished.get(task_id)


def next_due(state: SchedulerState) -> int | None:
    """The earliest time (µs since the epoch) at which a timer, an expiry or the end of a
    circuit's cool-down is due."""
    firsts = [
        f[0][0]
        for f in (state.timers.first(), state.expiries.first(), state.breakers.first())
        if f is not None
    ]
    return min(firsts, default=None)


def due_timers(state: SchedulerState, now: int) -> list[str]:
    """Keys of the timers due at ``now``, earliest first. Pure: folding what they
    cause is what removes them."""
    return [key for _, key in takewhile(lambda e: e[0][0] <= now, state.timers)]


REGISTRATION_GRACE_US = 10_000_000
"""How long a deliberation's task for an agent not registered in its pool waits for
that agent (a host starting up) before it expires, naming the agent."""


def refusal(
    state: SchedulerState, command: TaskSubmitted | CancelRequested | DeliberationRequested
) -> str | None:
    """Why the scheduler refuses a command that is valid in itself (see
    :func:`conclave.domain.validation.invalid_command`) in this state, if it does: a
    dependency it does not know, a cancellation of nothing that is still running, a
    deliberation put to every agent of a pool that has none."""
    if isinstance(command, DeliberationRequested):
        pool = state.pools.get(command.pool)
        if command.agent_ids or command.deliberation_id in state.deliberations:
            return None  # named agents are waited for (a while); a duplicate is ignored
        if pool is None or not pool.members:
            return f"pool {command.pool!r} has no registered agent to put the motion to"
        return None
    if isinstance(command, TaskSubmitted):
        if _known(state, command.task_id):
            return None  # a duplicate: decide() ignores it
        unknown = [d for d in command.depends_on if not _known(state, d)]
        if not unknown:
            return None
        listed = ", ".join(repr(d) for d in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        return f"depends on {len(unknown)} unknown task(s): {listed}; submit dependencies first"
    if command.task_id is not None:
        status = status_of(state, command.task_id)
        if status is None:
            return f"no task {command.task_id!r} is known to the scheduler"
        if not status.terminal or status is TaskStatus.CANCELLED:
            return None  # an idempotent repeat, if cancelled already
        return f"task {command.task_id!r} is already {status.value}"
    deliberation_id = command.deliberation_id or ""
    if deliberation_id in state.by_deliberation:
        return None
    if deliberation_id in state.deliberations:
        return f"deliberation {deliberation_id!r} has no unfinished task"
    return f"no deliberation {deliberation_id!r} is known to the scheduler"


def decide(
    state: SchedulerState,
    cause: TaskSubmitted | DeliberationRequested | CancelRequested | WitnessEntry,
    now: int,
    *,
    tenant: str | None = None,
) -> list[Outcome]:
    """Events that a command or a witnessed fact implies at ``now``; ``[]`` for duplicates.
    ``now`` sets the due time of a retry. A command :func:`refusal` refuses yields
    nothing useful: a dependency unknown here fails its dependent at once. ``tenant``:
    the command's, which qualifies a submission's fairness key."""
    if isinstance(cause, TaskSubmitted):
        if _known(state, cause.task_id):
            return []
        key = fairness_key(tenant, cause.fairness_key) if cause.agent_id is None else None
        waiting = [d for d in cause.depends_on if status_of(state, d) is not TaskStatus.COMPLETED]
        queued: list[Outcome] = [
            TaskQueued(
                task_id=cause.task_id,
                pool=cause.pool,
                priority=cause.priority,
                input=cause.input,
                agent_id=cause.agent_id,
                max_attempts=max(1, cause.max_attempts),
                deliberation_id=None,
                sequence=state.next_sequence,
                turn=_turn(state, cause.pool, key),
                **retry_of(cause).as_fields(),
                redrive_of=cause.redrive_of,
                depends_on=list(cause.depends_on),
                waiting_for=waiting,
                start_by=(
                    now + cause.start_within_ms * 1000
                    if cause.start_within_ms is not None
                    else None
                ),
                finish_by=cause.finish_by,
                fairness_key=key,
                key_limit=cause.key_limit if key is not None else None,
                aging_turns=state.aging.get(cause.pool),
            )
        ]
        for dependency in waiting:
            status = status_of(state, dependency)
            if status is None or status.failed:
                how = "is unknown" if status is None else f"ended {status.value}"
                queued.append(
                    TaskDependencyFailed(
                        task_id=cause.task_id,
                        dependency=dependency,
                        culprit=dependency,
                        reason=f"dependency {dependency!r} {how} before this task arrived",
                    )
                )
                break
        return queued
    if isinstance(cause, CancelRequested):
        if cause.task_id is not None:
            ids = [cause.task_id]
        else:
            ids = sorted(state.by_deliberation.get(cause.deliberation_id or "", ()))
        reason = f"cancelled: {cause.reason}" if cause.reason else "cancelled"
        cancelled: list[Outcome] = [
            _ended(state, state.tasks[i], TaskCancelled, reason) for i in ids if i in state.tasks
        ]
        return _with_dependents(state, cancelled)
    if isinstance(cause, DeliberationRequested):
        if cause.deliberation_id in state.deliberations:
            return []
        pool = state.pools.get(cause.pool)
        agent_ids = cause.agent_ids or sorted(pool.members if pool is not None else ())
        deliberating: list[Outcome] = []
        for agent_id in agent_ids:
            task_id = deliberation_task_id(cause.deliberation_id, agent_id)
            if _known(state, task_id):
                continue
            deliberating.append(
                TaskQueued(
                    task_id=task_id,
                    pool=cause.pool,
                    priority=cause.priority,
                    input=cause.motion,
                    agent_id=agent_id,
                    max_attempts=1,
                    deliberation_id=cause.deliberation_id,
                    sequence=state.next_sequence + len(deliberating),
                    turn=_turn(state, cause.pool, None),
                    aging_turns=state.aging.get(cause.pool),
                    finish_by=cause.finish_by,
                    start_by=None
                    if _registered(state, agent_id, cause.pool)
                    else (now + REGISTRATION_GRACE_US),
                )
            )
        return deliberating
    return _decide_witnessed(state, cause, now)


def fairness_key(tenant: str | None, key: str | None) -> str:
    """Who a task takes turns with: its tenant's key, or the tenant itself."""
    if tenant is None:
        return key or ""
    return tenant if key is None else f"{tenant}/{key}"


def _turn(state: SchedulerState, pool_name: str, key: str | None) -> int:
    """The turn of a task of ``key`` queued now: one past the key's latest, or past the
    pool's fair clock if the key has fallen behind it (or has no key: targeted tasks);
    the key's latest itself while fewer tasks than its weight took that."""
    turns = state.turns.get(pool_name)
    if turns is None:
        return 1
    if key is None:
        return turns.virtual + 1
    last = turns.last.get(key, 0)
    if last > turns.virtual and turns.used.get(key, 0) < _weight(state, pool_name, key):
        return last
    return max(turns.virtual, last) + 1


def _weight(state: SchedulerState, pool_name: str, key: str) -> int:
    weights = state.weights.get(pool_name)
    return 1 if weights is None else weights.get(key, 1)


def halted(state: SchedulerState, halt: Halt) -> list[TaskCancelled | TaskDependencyFailed]:
    """What a halt decides beyond stopping dispatch: with ``cancel_running``, every task
    in flight is cancelled (and what waits on it fails). Decided from the halt, after
    folding it; written on the tasks topic like any cancellation. A halt that drains
    decides nothing: what runs finishes."""
    if not halt.cancel_running:
        return []
    reason = f"cancelled: halted ({halt.reason})"
    running: list[TaskCancelled] = [
        _ended(state, task, TaskCancelled, reason)
        for task in sorted(state.tasks.values(), key=lambda t: t.task_id)
        if task.status is TaskStatus.DISPATCHED
    ]
    return _with_dependents(state, running)


def reinstate(state: SchedulerState, registration: AgentRegistered) -> list[AgentReinstated]:
    """An agent that had stalled and now registers again (its host restarted) is given
    work again. Decided from the registration, written on the tasks topic: folded from
    there, it comes after the stall in any replay (a registration, on another topic,
    could be folded before it)."""
    if registration.agent_id not in state.suspects:
        return []
    return [AgentReinstated(agent_id=registration.agent_id, host_id=registration.host_id)]


def revived(state: SchedulerState, beat: HostBeat) -> list[AgentReinstated]:
    """A host judged lost beats again (it was cut off, not dead): its agents get work
    again. Decided from the beat after folding it; written on the tasks topic, after
    the ``HostLost``."""
    lease = state.hosts.get(beat.host_id)
    if lease is None or not lease.lost_agents or lease.overdue() is None:
        return []  # not lost, or a beat of the lease already judged (late on the way)
    return [
        AgentReinstated(agent_id=agent_id, host_id=beat.host_id)
        for agent_id in sorted(lease.lost_agents)
        if agent_id in state.suspects
    ]


def hosts_due(state: SchedulerState) -> int | None:
    """The earliest lease that runs out unless its host beats again (O(hosts))."""
    return min((d for h in state.hosts.values() if (d := h.overdue()) is not None), default=None)


def failed_hosts(state: SchedulerState, now: int, after_us: int) -> list[HostFailed]:
    """Hosts judged lost (not left) whose lease ran out ``after_us`` or more before
    ``now`` with no beat since: each failed once per lease, with its agents that are
    still lost (one registered again since, the host started anew, is not). What they
    ran moved on when the host was lost. Pure; O(hosts)."""
    out = []
    for host_id, lease in sorted(state.hosts.items()):
        due = _failure_due(lease, after_us)
        if due is None or due > now:
            continue
        # Never empty here (``_failure_due``), so each due failure is judged once: an
        # agent registered again anywhere was reinstated, which took it off the list.
        agents = sorted(lease.lost_agents)
        silent_s = (now - lease.expires_at) / 1_000_000
        reason = (
            f"host {host_id!r} silent {silent_s:.0f} s after its lease ran out, past the "
            f"grace period of {after_us / 1_000_000:g} s: its agents failed"
        )
        out.append(
            HostFailed(
                host_id=host_id,
                pool=lease.pool,
                agent_ids=agents,
                expires_at=lease.expires_at,
                reason=reason,
            )
        )
    return out


def _agents_of(state: SchedulerState, host_id: str) -> list[str]:
    """The agents registered on ``host_id``, by id: named in a judgement of the host, so
    that a replay needs no registry."""
    return sorted(a.agent_id for a in state.agents.values() if a.host_id == host_id)


def failures_due(state: SchedulerState, after_us: int) -> int | None:
    """When the next lost host is failed unless it beats again (O(hosts))."""
    return min(
        (d for h in state.hosts.values() if (d := _failure_due(h, after_us)) is not None),
        default=None,
    )


def _failure_due(lease: HostLease, after_us: int) -> int | None:
    lost = lease.judged is not None and lease.overdue() is None
    if not lost or lease.leaving_until is not None or not lease.lost_agents:
        return None  # not lost, beat again since, left, or every agent came back
    if (lease.left or -1) >= lease.expires_at:
        return None  # that lease ended with a drain: its agents retired, not failed
    if lease.failed is not None and lease.failed >= lease.expires_at:
        return None  # failed already
    return lease.expires_at + after_us


STARVED_EVERY_US = 1_000_000
"""A pool's shortage of agents is said again after this long, while it lasts."""


def starved(state: SchedulerState, now: int) -> list[PoolStarved]:
    """Pools where tasks could start now (queued, within the pool's capacity) but no
    agent is idle for them, each said at most once per :data:`STARVED_EVERY_US`, and
    only while the pool has a live host (one that beats and takes work) with room to
    grow it (its newest beat's ``spare``): a pool of fixed hosts with a backlog hears
    nothing. ``hosts`` counts those hosts. Judge after :func:`schedule`'s dispatches are
    folded: what is left waits for agents. O(pools + hosts)."""
    if state.halted:
        return []
    hosts: dict[str, int] = {}
    for lease in state.hosts.values():
        live = lease.takes_work and lease.expires_at > now and not lease.lost_agents
        if live and lease.spare > 0:
            hosts[lease.pool] = hosts.get(lease.pool, 0) + 1
    out = []
    for name in sorted(hosts):
        pool = state.pools.get(name)
        if pool is None or name in state.ready:
            continue  # nothing queued, or a dispatch is possible: no shortage
        room = state.capacity_of(name) - pool.in_flight
        waiting = min(room, len(pool.untargeted) + len(pool.heads))
        said = pool.starved_at
        if waiting > 0 and (said is None or now - said >= STARVED_EVERY_US):
            out.append(PoolStarved(pool=name, waiting=waiting, hosts=hosts[name], at=now))
    return out


Lost = HostLost | TaskStalled | TaskQueued | TaskRetryScheduled | TaskDeadLettered

LEFT = "left: its agents retire, its drain is over"
"""How a ``HostLost`` reason ends for a host that left (drained), not one that died."""
NO_ANSWER = "no answer by its deadline"
"""How a ``TaskStalled`` reason ends for an agent that did not answer in time (the
other stalls are its host's: lost or left)."""


def lost_hosts(state: SchedulerState, now: int) -> list[Lost | TaskDependencyFailed]:
    """Hosts whose lease ran out by ``now``, each judged once per lease: ``HostLost``,
    then, for each attempt running on one of its agents, ``TaskStalled`` and a retry or
    a dead letter, as for an attempt past its deadline (a host that said it was leaving
    is judged so when its drain ended). Pure; fold in order."""
    out: list[Lost] = []

    def place() -> int:  # as in expire(): each task queued here its own place, in order
        return state.next_sequence + sum(isinstance(e, TaskQueued) for e in out)

    for host_id, lease in sorted(state.hosts.items()):
        overdue = lease.overdue()
        if overdue is None or overdue > now:
            continue
        agents = _agents_of(state, host_id)
        out.append(
            HostLost(
                host_id=host_id,
                pool=lease.pool,
                agent_ids=agents,
                expires_at=lease.expires_at,
                reason=(
                    f"host {host_id!r} sent no beat before its lease ran out"
                    if lease.leaving_until is None
                    else f"host {host_id!r} {LEFT}"
                ),
            )
        )
        running = sorted(
            task_id
            for agent_id, task_id in state.assignments.items()
            if (slot := state.agents.get(agent_id)) is not None and slot.host_id == host_id
        )
        left = lease.leaving_until is not None
        why = f"host {host_id!r} {'left' if left else 'lost'}"
        for task_id in running:
            task = state.tasks.get(task_id)
            if task is not None and task.status is TaskStatus.DISPATCHED:
                out += _stalled(state, task, host_id, why, now, place(), counted=not left)
    return _with_dependents(state, out)


def tripped(
    state: SchedulerState, now: int, *, threshold: int, cooldown_us: int
) -> list[AgentCircuitOpened]:
    """Circuits that open at ``now``: agents that failed ``threshold`` attempts in a row,
    or the probe of a half-open one. ``threshold`` 0: breakers are off. O(agents that
    failed since their last answer)."""
    if threshold <= 0:
        return []
    failures = state.failures
    due = sorted(  # only what trips is sorted: this runs at every step
        a
        for a, n in failures.items()
        if (n >= threshold or a in state.probing) and a not in state.breakers
    )
    return [
        AgentCircuitOpened(
            agent_id=agent_id,
            failures=failures[agent_id],
            until=now + cooldown_us,
            reason="circuit open: "
            + (
                "its probe task failed"
                if agent_id in state.probing
                else f"{failures[agent_id]} attempts failed in a row"
            ),
        )
        for agent_id in due
    ]


def half_opened(state: SchedulerState, now: int) -> list[AgentCircuitHalfOpened]:
    """Open circuits whose cool-down is over by ``now``: one probe task each."""
    due = takewhile(lambda b: b[0][0] <= now, state.breakers)
    return [AgentCircuitHalfOpened(agent_id=agent_id) for _, agent_id in due]


def _registered(state: SchedulerState, agent_id: str, pool: str) -> bool:
    slot = state.agents.get(agent_id)
    return slot is not None and slot.pool == pool


def _known(state: SchedulerState, task_id: str) -> bool:
    return task_id in state.tasks or task_id in state.finished


_Ended = TypeVar("_Ended", TaskCancelled, TaskExpired)


def _ended(state: SchedulerState, task: TaskState, kind: type[_Ended], reason: str) -> _Ended:
    """The task cancelled or expired; if it runs, the host that must stop its agent."""
    running = task.status is TaskStatus.DISPATCHED
    slot = state.agents.get(task.agent_id or "") if running else None
    return kind(
        task_id=task.task_id,
        agent_id=task.agent_id if running else None,
        host_id=slot.host_id if slot is not None else None,
        attempt=task.attempt,
        reason=reason,
    )


_E = TypeVar("_E", bound=Outcome | TaskStalled | TaskExpired | HostLost)
_HOW = {
    TaskDeadLettered: "was dead-lettered",
    TaskCancelled: "was cancelled",
    TaskExpired: "expired",
    TaskDependencyFailed: "failed a dependency",
}


def _with_dependents(state: SchedulerState, events: list[_E]) -> list[_E | TaskDependencyFailed]:
    """``events``, each failure followed by a ``TaskDependencyFailed`` for every task
    waiting on the failed task, directly or through others (each task once)."""
    out: list[_E | TaskDependencyFailed] = []
    ended = {e.task_id for e in events if isinstance(e, Failure)}
    for event in events:
        out.append(event)
        if not isinstance(event, Failure):
            continue
        culprit = event.culprit if isinstance(event, TaskDependencyFailed) else event.task_id
        how = {event.task_id: _HOW[type(event)]}
        stack = [event.task_id]
        while stack:
            failed = stack.pop()
            for dependent in sorted(state.dependents.get(failed, ())):
                if dependent in ended:
                    continue
                ended.add(dependent)
                began = f"; it began at {culprit!r}" if culprit != failed else ""
                out.append(
                    TaskDependencyFailed(
                        task_id=dependent,
                        dependency=failed,
                        culprit=culprit,
                        reason=f"dependency {failed!r} {how[failed]}{began}",
                    )
                )
                how[dependent] = _HOW[TaskDependencyFailed]
                stack.append(dependent)
    return out


def _released(state: SchedulerState, completed: str) -> list[TaskQueued]:
    """The waiting tasks whose last unfinished dependency is ``completed``, queued in
    the place their submission gave them."""
    out = []
    for dependent in sorted(state.dependents.get(completed, ())):
        task = state.tasks[dependent]
        if task.waiting_for == {completed}:
            out.append(_requeued(task, task.sequence, task.turn))
    return out


def _decide_witnessed(state: SchedulerState, entry: WitnessEntry, now: int) -> list[Outcome]:
    task = state.tasks.get(entry.task_id or "")
    if task is None or task.status is not TaskStatus.DISPATCHED or entry.agent_id != task.agent_id:
        return _answered_late(state, entry)
    if entry.attempt is not None and entry.attempt != task.attempt:
        return _answered_late(state, entry)  # a late or redelivered entry of an earlier attempt
    agent_id = entry.agent_id
    assert agent_id is not None  # equal to the agent of a dispatched task
    if entry.subject_type == "agent.output":
        completed = TaskCompleted(
            task_id=task.task_id,
            agent_id=agent_id,
            output_event_id=entry.subject_event_id,
            witness_sequence=entry.sequence,
        )
        closed = [AgentCircuitClosed(agent_id=agent_id)] if agent_id in state.probing else []
        return [completed, *closed, *_released(state, task.task_id)]
    if entry.subject_type == "task.failed":
        detail = entry.detail or "agent failed"
        failed: list[Outcome] = [
            _dead(task, f"permanent failure: {detail}", entry.sequence)
            if is_permanent_failure(detail)
            else _retry_or_give_up(state, task, detail, entry.sequence, now)
        ]
        return _with_dependents(state, failed)
    return []


def _answered_late(state: SchedulerState, entry: WitnessEntry) -> list[Outcome]:
    """An agent that stalled (no answer by its deadline) and answers that very attempt
    after all is alive and done with it: it gets work again. The answer itself changes nothing.
    Not for an agent lost with its host: the host's beat says when that one is back
    (:func:`revived`), and whether its host is the one that answered is not known here.
    A late answer is not always the agent's fault: a reader held back (an open
    transaction of a dead host holds every answer behind it) stalls healthy agents."""
    agent_id = entry.agent_id
    if (
        agent_id is None
        or entry.subject_type not in ("agent.output", "task.failed")
        or state.suspects.get(agent_id) != (entry.task_id, entry.attempt)
        or any(agent_id in lease.lost_agents for lease in state.hosts.values())
    ):
        return []  # an answer from before the stall (a redelivery) says nothing of now
    slot = state.agents.get(agent_id)
    return [AgentReinstated(agent_id=agent_id, host_id=slot.host_id if slot else "")]


def _retry_or_give_up(
    state: SchedulerState,
    task: TaskState,
    reason: str,
    witness_sequence: int | None,
    now: int,
    *,
    sequence: int | None = None,
) -> TaskQueued | TaskRetryScheduled | TaskDeadLettered:
    """After a failed attempt: dead when no attempt remains; else back in the queue, at
    once or (``TaskRetryScheduled``) after the back-off of its retry policy."""
    if task.attempt >= task.max_attempts:
        return _dead(task, reason, witness_sequence)
    assert task.agent_id is not None  # a dispatched task has its agent
    delay = retry_of(task).delay_us(task.task_id, task.attempt)
    if delay > 0:
        return TaskRetryScheduled(
            task_id=task.task_id,
            agent_id=task.agent_id,
            attempt=task.attempt,
            due=now + delay,
            reason=reason,
        )
    return _requeued(
        task,
        state.next_sequence if sequence is None else sequence,
        _turn(state, task.pool, task.fairness_key),
    )


def _requeued(
    task: TaskState, sequence: int, turn: int, *, max_attempts: int | None = None
) -> TaskQueued:
    """The task back in the queue: for its next attempt at the end of its key's turns,
    or (released by its dependencies) in the place its submission gave it;
    ``max_attempts``: a larger budget from now on."""
    return TaskQueued(
        task_id=task.task_id,
        pool=task.pool,
        priority=task.priority,
        input=task.input,
        agent_id=task.agent_id if task.targeted else None,
        max_attempts=task.max_attempts if max_attempts is None else max_attempts,
        deliberation_id=task.deliberation_id,
        sequence=sequence,
        **retry_of(task).as_fields(),
        depends_on=list(task.depends_on),
        start_by=task.start_by,
        finish_by=task.finish_by,
        fairness_key=task.fairness_key,
        key_limit=task.key_limit,
        turn=turn,
        aging_turns=task.aging_turns,
    )


def _dead(task: TaskState, reason: str, witness_sequence: int | None) -> TaskDeadLettered:
    assert task.agent_id is not None  # a dispatched task has its agent
    return TaskDeadLettered(
        task_id=task.task_id,
        agent_id=task.agent_id,
        attempts=task.attempt,
        reason=reason,
        witness_sequence=witness_sequence,
    )


Expired = (
    TaskExpired
    | TaskStalled
    | TaskQueued
    | TaskRetryScheduled
    | TaskDeadLettered
    | TaskDependencyFailed
)


def expire(state: SchedulerState, now: int) -> list[Expired]:
    """What the expiries and timers due at ``now`` imply, earliest first. A task past its
    ``start_by`` (never dispatched) or its ``finish_by`` expires. Then a dispatched
    attempt past its answer deadline is stalled, and its task retried (at once or after
    its back-off) or dead-lettered like a failed attempt. A retrying task whose back-off
    is over is queued again. Every failure fails the tasks waiting on it. Pure: fold the
    events in order (each ``TaskQueued`` numbers its queue place after the one before
    it); folding them removes the timers."""
    out: list[TaskExpired | TaskStalled | TaskQueued | TaskRetryScheduled | TaskDeadLettered]
    out = []

    def place() -> int:  # several tasks queued in one call: each its own place, in order
        return state.next_sequence + sum(isinstance(e, TaskQueued) for e in out)

    expired = [key for _, key in takewhile(lambda e: e[0][0] <= now, state.expiries)]
    for task_id in expired:
        late = state.tasks[task_id]
        if late.attempt == 0 and late.start_by is not None and late.start_by <= now:
            reason = "expired: not started within its schedule-to-start limit"
            if late.targeted and not _registered(state, late.agent_id or "", late.pool):
                reason = f"expired: agent {late.agent_id!r} is not registered in {late.pool!r}"
        else:
            reason = "expired: not finished by its deadline"
        out.append(_ended(state, late, TaskExpired, reason))
    for task_id in due_timers(state, now):
        if task_id in expired:
            continue
        task = state.tasks.get(task_id)
        if task is not None and task.status is TaskStatus.RETRYING:
            out.append(_requeued(task, place(), _turn(state, task.pool, task.fairness_key)))
            continue
        if task is None or task.status is not TaskStatus.DISPATCHED or task.agent_id is None:
            continue  # not a deadline a live attempt waits on (folding removes those)
        slot = state.agents.get(task.agent_id)
        host_id = slot.host_id if slot is not None else ""
        out += _stalled(state, task, host_id, NO_ANSWER, now, place())
    return _with_dependents(state, out)


def _stalled(
    state: SchedulerState,
    task: TaskState,
    host_id: str,
    why: str,
    now: int,
    sequence: int,
    *,
    counted: bool = True,
) -> list[TaskStalled | TaskQueued | TaskRetryScheduled | TaskDeadLettered]:
    """A dispatched attempt given up on: ``TaskStalled``, then a retry or a dead letter,
    as after a failed attempt (``sequence``: its queue place, if queued again).

    Not ``counted`` (its host left, drained: the operator's doing, not the task's): the
    task is queued again at once with one attempt more allowed, so stopping a host never
    dead-letters a task (up to the cap on attempts, where it counts after all)."""
    assert task.agent_id is not None  # a dispatched task has its agent
    spare = not counted and task.max_attempts < MAX_ATTEMPTS
    reason = f"attempt {task.attempt} of {task.max_attempts} stalled: {why}"
    if spare:
        reason += " (not counted: one more attempt allowed)"
    stall = TaskStalled(
        task_id=task.task_id,
        agent_id=task.agent_id,
        host_id=host_id,
        attempt=task.attempt,
        reason=reason,
    )
    if spare:
        turn = _turn(state, task.pool, task.fairness_key)
        return [stall, _requeued(task, sequence, turn, max_attempts=task.max_attempts + 1)]
    return [stall, _retry_or_give_up(state, task, reason, None, now, sequence=sequence)]


def schedule(
    state: SchedulerState, now: int, *, answer_within_us: int | None = None
) -> list[TaskDispatched]:
    """Dispatches that capacity, free agents and priorities allow at ``now``.

    Queued tasks are taken in (priority, arrival) order. A targeted task waits for
    its own agent; an untargeted one takes an idle agent nobody waits for (the
    smallest id), else the one whose best waiting task ranks lowest, so it never
    steals the agent a better task needs. One call reaches a fixpoint. Pure: the
    returned events still have to be folded with :func:`evolve`.
    """
    if state.halted:
        return []
    deadline = now + answer_within_us if answer_within_us is not None else None
    return [d for name in sorted(state.ready) for d in _schedule_pool(state, name, deadline)]


def _schedule_pool(
    state: SchedulerState, name: str, deadline: int | None
) -> Iterator[TaskDispatched]:
    """Merges the pool's untargeted queue with the best claim of each idle agent, by rank.

    When an untargeted task comes up, every claim ranked better has been served
    already, so every remaining claim ranks lower: taking the worst-claimed agent
    is always allowed, and an untargeted task finds an agent while any is idle.
    """
    pool = state.pools[name]
    free = state.capacity_of(name) - pool.in_flight
    idle = len(pool.unclaimed) + len(pool.claimed)
    taken: set[str] = set()
    unclaimed = iter(pool.unclaimed)
    claims = (c for c in pool.claimed if c[1] not in taken)
    worst_claims = (c for c in pool.claimed_worst_first if c[1] not in taken)
    untargeted = _untargeted(pool)
    claim, task = next(claims, None), next(untargeted, None)
    while free > 0 and idle > 0:
        if claim is not None and claim[1] in taken:  # taken by an untargeted task
            claim = next(claims, None)
        if claim is not None and (task is None or claim[0] < task[0]):
            agent_id = claim[1]
            first = pool.targeted[agent_id].first()
            assert first is not None  # a claimed agent has a queued task waiting for it
            task_id = first[1]
            claim = next(claims, None)
        elif task is not None:
            task_id = task[1]
            spare = next(unclaimed, None) or next(worst_claims)
            agent_id = spare[1]
            task = next(untargeted, None)
        else:
            return
        taken.add(agent_id)
        free -= 1
        idle -= 1
        queued = state.tasks[task_id]
        yield TaskDispatched(
            task_id=task_id,
            pool=queued.pool,
            agent_id=agent_id,
            host_id=state.agents[agent_id].host_id,
            attempt=queued.attempt + 1,
            input=queued.input,
            deliberation_id=queued.deliberation_id,
            deadline=deadline,
        )


def _untargeted(pool: PoolState) -> Iterator[tuple[Rank, str]]:
    """The pool's untargeted queued tasks in rank order, each key with a limit giving no
    more than its room: the plain queue merged with the heads of keys that have room.
    Each task yielded is taken (the caller asks for the next only after dispatching
    it), so a key's next task joins the merge only once its head is taken: the cost is
    O(log n) per task taken, whatever the number of keys or of tasks left behind."""
    if not pool.heads:
        yield from pool.untargeted
        return
    plain = iter(pool.untargeted)
    heads = iter(pool.heads)
    opened: list[tuple[Rank, str, str, Iterator[tuple[Rank, str]], int]] = []
    """Keys whose head was taken: (rank, task id) of their next task, the key, the rest
    of its queue, and the room left after that task."""
    task, head = next(plain, None), next(heads, None)
    while True:
        best = min(
            (
                c
                for c in (
                    (task[0], task[1], 0) if task is not None else None,
                    _first_of(pool, head[1], 1) if head is not None else None,
                    (opened[0][0], opened[0][1], 2) if opened else None,
                )
                if c is not None
            ),
            default=None,
        )
        if best is None:
            return
        rank, task_id, source = best
        yield rank, task_id
        if source == 0:
            task = next(plain, None)
            continue
        if source == 1:
            assert head is not None
            key = head[1]
            rest = iter(pool.keyed[key])
            next(rest)  # the head itself
            room = pool.limits[key] - pool.running.get(key, 0) - 1
            head = next(heads, None)
        else:
            _, _, key, rest, room = heapq.heappop(opened)
            room -= 1
        if room > 0 and (following := next(rest, None)) is not None:
            heapq.heappush(opened, (following[0], following[1], key, rest, room))


def _first_of(pool: PoolState, key: str, source: int) -> tuple[Rank, str, int]:
    first = pool.keyed[key].first()
    assert first is not None  # a key in heads has a queued task
    return first[0], first[1], source


def evolve(
    state: SchedulerState,
    event: SchedulerEvent
    | AgentRegistered
    | AgentRestarted
    | AgentFailed
    | AgentRetired
    | HostBeat
    | HostLeaving
    | Heartbeat
    | Halt
    | Resume
    | PoolConfigured,
) -> SchedulerState:
    """Fold one event into the state (in place, see the module docstring).

    Every case tolerates duplicates and any interleaving of the tasks topic with the
    agents and control topics, which is all that recovery guarantees.
    """
    match event:
        case TaskQueued():
            _fold_queued(state, event)
        case TaskDispatched():
            _fold_dispatched(state, event)
        case TaskStalled():
            _fold_stalled(state, event)
        case TaskRetryScheduled():
            _fold_retry_scheduled(state, event)
        case AgentReinstated():
            _fold_reinstated(state, event)
        case HostLost() | HostFailed():
            _fold_host_lost(state, event)
        case AgentCircuitOpened():
            _fold_circuit_opened(state, event)
        case AgentCircuitHalfOpened():
            state.breakers.discard(event.agent_id)
            state.probing.add(event.agent_id)
            state.place(event.agent_id)
        case AgentCircuitClosed():
            state.probing.discard(event.agent_id)
        case HostBeat():
            _fold_host_beat(state, event)
        case HostLeaving():
            _fold_host_leaving(state, event)
        case TaskCompleted():
            _fold_finished(state, event.task_id, TaskStatus.COMPLETED)
        case TaskDeadLettered():
            _fold_finished(state, event.task_id, TaskStatus.DEAD_LETTERED)
        case TaskCancelled():
            _fold_finished(state, event.task_id, TaskStatus.CANCELLED)
        case TaskExpired():
            _fold_finished(state, event.task_id, TaskStatus.EXPIRED)
        case TaskDependencyFailed():
            _fold_finished(state, event.task_id, TaskStatus.DEPENDENCY_FAILED)
        case AgentRegistered():
            _fold_registered(state, event)
        case AgentFailed():
            _fold_agent_failed(state, event)
        case AgentRetired() | PoolStarved():
            _fold_scaling(state, event)
        case Heartbeat() | AgentRestarted():
            pass  # a beat renews nothing here (host beats do); a restarted agent works on
        case Halt():
            state.halted = True
        case Resume():
            state.halted = False
        case PoolConfigured():
            _fold_configured(state, event)
    return state


def _fold_queued(state: SchedulerState, event: TaskQueued) -> None:
    task = state.tasks.get(event.task_id)
    if task is None:
        if event.task_id in state.finished:
            return  # a duplicate, or a stale retry, of a finished task
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
            **retry_of(event).as_fields(),
            depends_on=tuple(event.depends_on),
            waiting_for=frozenset(event.waiting_for) if event.waiting_for else NOTHING,
            start_by=event.start_by,
            finish_by=event.finish_by,
            fairness_key=event.fairness_key,
            key_limit=event.key_limit,
            turn=event.turn,
            aging_turns=event.aging_turns,
        )
        state.tasks[event.task_id] = task
        state.track(task)
        _take_turn(state, task)
        if event.deliberation_id is not None:
            state.deliberations.add(event.deliberation_id, None)
        state.next_sequence = max(state.next_sequence, event.sequence + 1)
        if task.waiting_for:
            task.status = TaskStatus.WAITING
            state.wait(task)
            return
    elif task.status is TaskStatus.WAITING:
        if event.waiting_for:
            return  # a duplicate
        state.unwait(task)  # its last dependency completed: on to the queue
        task.waiting_for = NOTHING
        task.status = TaskStatus.QUEUED
    elif task.status is TaskStatus.QUEUED:
        return  # a duplicate
    else:  # a retry, at once or after its back-off: back in the queue, keeping its attempts
        if task.status is TaskStatus.DISPATCHED:
            _count_failure(state, task)
            state.release(task)
        state.timers.discard(task.task_id)
        task.status = TaskStatus.QUEUED
        task.max_attempts = max(task.max_attempts, event.max_attempts)  # a stall not counted
        task.sequence = event.sequence
        task.turn = event.turn
        _take_turn(state, task)
        if not task.targeted:
            task.agent_id = None
    state.next_sequence = max(state.next_sequence, event.sequence + 1)
    state.enqueue(task)


def _fold_configured(state: SchedulerState, event: PoolConfigured) -> None:
    """The pool's whole configuration from now on; queued tasks keep the aging they were
    accepted with."""
    state.capacities[event.pool] = event.capacity
    if event.aging_turns is None:
        state.aging.pop(event.pool, None)
    else:
        state.aging[event.pool] = event.aging_turns
    if event.weights:
        state.weights[event.pool] = dict(event.weights)
    else:
        state.weights.pop(event.pool, None)
    state.refresh(event.pool)


def _take_turn(state: SchedulerState, task: TaskState) -> None:
    """Remember the turn a task of a key took, while it is ahead of the pool's clock."""
    key = task.fairness_key
    if key is None or task.targeted or not task.turn:
        return
    turns = state.turns.setdefault(task.pool, Turns())
    if task.turn <= turns.virtual:
        return
    last = turns.last.get(key, 0)
    if task.turn > last:
        turns.last[key] = task.turn
        turns.used[key] = 1
    elif task.turn == last:
        turns.used[key] = turns.used.get(key, 0) + 1


def _fold_dispatched(state: SchedulerState, event: TaskDispatched) -> None:
    task = state.tasks.get(event.task_id)
    if task is None or task.status is not TaskStatus.QUEUED:
        return  # a duplicate, or a dispatch of a task this fold never saw
    task.status = TaskStatus.DISPATCHED
    state.assignments[event.agent_id] = task.task_id
    state.start(task)
    task.agent_id = event.agent_id
    task.attempt = event.attempt
    state.reckon(task)  # started: only its finish_by is left
    if event.deadline is not None:
        state.timers.add(task.task_id, (event.deadline,))
    state.place(event.agent_id)


def _fold_stalled(state: SchedulerState, event: TaskStalled) -> None:
    """The agent gave no answer in time: no more work for it until it registers again.
    The task itself moves on with the retry or dead letter that follows."""
    task = state.tasks.get(event.task_id)
    if task is None or task.status is not TaskStatus.DISPATCHED or task.attempt != event.attempt:
        return  # a duplicate, or a stall that was already dealt with
    state.suspects[event.agent_id] = (event.task_id, event.attempt)
    state.timers.discard(event.task_id)
    slot = state.agents.get(event.agent_id)
    if slot is not None:
        state.unplace(slot)


def _count_failure(state: SchedulerState, task: TaskState) -> None:
    """A dispatched attempt ended without an answer: one more failure in a row for its
    agent (what :func:`tripped` judges)."""
    agent_id = task.agent_id or ""
    state.failures[agent_id] = state.failures.get(agent_id, 0) + 1


def _fold_host_beat(state: SchedulerState, event: HostBeat) -> None:
    """The latest lease any beat promised (the same whatever order beats are folded in),
    and whether the host is over its limits, as the beat folded last says: a host's beats
    are in order on one partition, and recovery folds each partition in order (a lease
    cannot tell: a leaving or a loss folded first may have moved it past a beat)."""
    host = state.hosts.get(event.host_id)
    if host is None:
        host = state.hosts[event.host_id] = HostLease(event.pool, event.expires_at)
    else:
        host.pool = event.pool
        host.expires_at = max(host.expires_at, event.expires_at)
    host.spare = event.spare or 0
    if host.over_limit != event.over_limit:
        host.over_limit = event.over_limit
        for agent_id in event.agent_ids:  # out of the idle indexes, or back in
            state.place(agent_id)


def _fold_reinstated(state: SchedulerState, event: AgentReinstated) -> None:
    state.suspects.pop(event.agent_id, None)
    for lease in state.hosts.values():  # wherever it was lost (it may have moved)
        lease.lost_agents.discard(event.agent_id)
    state.place(event.agent_id)


def _fold_host_leaving(state: SchedulerState, event: HostLeaving) -> None:
    """Its agents leave the idle indexes (what they run goes on); its lease ends with its
    drain, whatever an earlier beat promised."""
    host = state.hosts.get(event.host_id)
    if host is None:
        host = state.hosts[event.host_id] = HostLease(event.pool, event.until)
    host.expires_at = event.until
    host.leaving_until = event.until
    for agent_id in event.agent_ids:
        if (slot := state.agents.get(agent_id)) is not None:
            state.unplace(slot)
            state.refresh(slot.pool)


def _fold_host_lost(state: SchedulerState, event: HostLost | HostFailed) -> None:
    """The host's agents leave the idle indexes until they are reinstated; its running
    attempts move on with the stalls that follow. Failed (after its loss, on the same
    topic), nothing changes but that it is not judged failed again."""
    host = state.hosts.get(event.host_id)
    if host is None:  # folded before any beat of the host (recovery interleaves)
        host = state.hosts[event.host_id] = HostLease(event.pool, event.expires_at)
    if isinstance(event, HostFailed):
        host.failed = max(host.failed or 0, event.expires_at)
        return
    if event.reason.endswith(LEFT):
        host.left = max(host.left or 0, event.expires_at)
    if host.judged is not None and host.judged >= event.expires_at:
        return  # a duplicate
    host.judged = event.expires_at
    for agent_id in event.agent_ids:  # as decided: the registry may be folded later
        state.suspects.setdefault(agent_id, None)
        host.lost_agents.add(agent_id)
        slot = state.agents.get(agent_id)
        if slot is not None:
            state.unplace(slot)
            state.refresh(slot.pool)


def _fold_retry_scheduled(state: SchedulerState, event: TaskRetryScheduled) -> None:
    """The attempt is over: its agent and capacity are free while the task waits."""
    task = state.tasks.get(event.task_id)
    if task is None or task.status is not TaskStatus.DISPATCHED or task.attempt != event.attempt:
        return  # a duplicate, or about an attempt already dealt with
    _count_failure(state, task)
    state.release(task)
    task.status = TaskStatus.RETRYING
    if not task.targeted:
        task.agent_id = None
    state.timers.add(task.task_id, (event.due,))


def _fold_finished(state: SchedulerState, task_id: str, status: TaskStatus) -> None:
    task = state.tasks.pop(task_id, None)
    if task is None:
        return  # finished already, or never seen
    if task.status is TaskStatus.DISPATCHED:
        if status is TaskStatus.DEAD_LETTERED:
            _count_failure(state, task)
        elif status is TaskStatus.COMPLETED:  # answered: its agent's run of failures ends
            state.failures.pop(task.agent_id or "", None)
        state.release(task)
    elif task.status is TaskStatus.RETRYING:
        state.timers.discard(task_id)
    elif task.status is TaskStatus.WAITING:
        state.unwait(task)
    else:
        state.unqueue(task)
    state.untrack(task)
    state.finished.add(task_id, status)
    if status is TaskStatus.COMPLETED:  # one dependency fewer for those waiting on it
        for dependent in state.dependents.pop(task_id, ()):
            waiting = state.tasks[dependent]
            waiting.waiting_for = waiting.waiting_for - {task_id}


def _fold_circuit_opened(state: SchedulerState, event: AgentCircuitOpened) -> None:
    state.breakers.add(event.agent_id, (event.until,))
    state.failures.pop(event.agent_id, None)
    state.probing.discard(event.agent_id)
    state.place(event.agent_id)


def _fold_agent_failed(state: SchedulerState, event: AgentFailed) -> None:
    """Its host gave up on it: no work for it until registered again. On the agents
    topic like its registrations, so the two are folded in the order they happened."""
    state.failed[event.agent_id] = event.reason
    state.place(event.agent_id)  # out of the idle indexes


def _fold_scaling(state: SchedulerState, event: AgentRetired | PoolStarved) -> None:
    """A pool said short of agents (not again for a while), or an agent retired as its
    pool shrank (no work for it until registered again)."""
    if isinstance(event, AgentRetired):
        state.retired.add(event.agent_id)
        state.place(event.agent_id)  # out of the idle indexes
    elif (pool := state.pools.get(event.pool)) is not None:
        pool.starved_at = max(pool.starved_at or 0, event.at)


def _fold_registered(state: SchedulerState, event: AgentRegistered) -> None:
    state.failed.pop(event.agent_id, None)  # its host started anew: a fresh start
    state.retired.discard(event.agent_id)  # the pool grew again
    slot = state.agents.get(event.agent_id)
    if slot is None:
        slot = state.agents[event.agent_id] = AgentSlot(event.agent_id, event.pool, event.host_id)
    elif slot.pool != event.pool:  # moved: leaves the old pool's indexes first
        state.unplace(slot)
        state.pool(slot.pool).members.discard(slot.agent_id)
        state.refresh(slot.pool)
        slot.pool = event.pool
    slot.host_id = event.host_id
    state.pool(event.pool).members.add(event.agent_id)
    host = state.hosts.get(event.host_id)
    if host is not None and host.leaving_until is not None:  # started anew: all work again
        host.leaving_until = None
        for other in [a for a in state.agents.values() if a.host_id == event.host_id]:
            state.place(other.agent_id)
    state.place(event.agent_id)
