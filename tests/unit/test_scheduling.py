"""The scheduler's domain: capacity, HALT, priority, idempotence, no silent drops, recovery.

``Harness`` is the scheduler processor's loop without Kafka (streams/scheduler.py):
decide, fold what was decided, schedule, fold the dispatches. A hypothesis state
machine drives it with random submissions (some depending on earlier tasks),
cancellations, deliberations, registrations (and moves between pools), witnessed
outputs and failures, halts, resumes, redeliveries and
snapshots, time passing beyond answer deadlines (stalled attempts, late answers,
re-registrations), and checks the invariants after every step. Every schedule() is compared
with :func:`reference_schedule`, the full scan the indexed scheduler replaced, and
every step is repeated on a replica restored from the last snapshot.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections import Counter, defaultdict
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from conclave.domain.events import (
    AGENTS_TOPIC_EVENTS,
    AgentCircuitClosed,
    AgentCircuitHalfOpened,
    AgentCircuitOpened,
    AgentFailed,
    AgentRegistered,
    AgentReinstated,
    AgentRetired,
    CancelRequested,
    DeliberationRequested,
    Event,
    Halt,
    HostBeat,
    HostFailed,
    HostLeaving,
    HostLost,
    PoolConfigured,
    Priority,
    Resume,
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
    TaskSubmitted,
    WitnessEntry,
)
from conclave.domain.lifecycle import AgentNow, fold, transitions
from conclave.domain.ordered import RankedSet, Recent
from conclave.domain.retry import RetryPolicy, retry_of
from conclave.domain.scheduling import (
    DEFAULT_CAPACITY,
    DEFAULT_DEDUP_WINDOW,
    REGISTRATION_GRACE_US,
    SNAPSHOT_VERSION,
    STARVED_EVERY_US,
    SchedulerEvent,
    SchedulerState,
    TaskState,
    TaskStatus,
    decide,
    deliberation_task_id,
    due_timers,
    evolve,
    expire,
    failed_hosts,
    failures_due,
    fairness_key,
    from_snapshot,
    half_opened,
    halted,
    hosts_due,
    lost_hosts,
    next_due,
    refusal,
    reinstate,
    revived,
    schedule,
    starved,
    status_of,
    to_snapshot,
    tripped,
)
from conclave.domain.validation import invalid_command
from conclave.domain.witness import ChainHead, digest, next_entry

AGENTS_BY_POOL = {"p0": ("a0", "a1", "a2"), "p1": ("a3", "a4")}
POOL_OF = {agent: pool for pool, agents in AGENTS_BY_POOL.items() for agent in agents}
POOLS = st.sampled_from(sorted(AGENTS_BY_POOL))
PRIORITIES = st.sampled_from(Priority)

Emitted = SchedulerEvent
TERMINAL = tuple(s for s in TaskStatus if s.terminal)
TERMINAL_EVENTS = (
    TaskCompleted,
    TaskDeadLettered,
    TaskCancelled,
    TaskExpired,
    TaskDependencyFailed,
)
Folded = Emitted | AgentRegistered | Halt | Resume | PoolConfigured
T = TypeVar("T")
ANSWER_US = 20_000
"""The harness's answer deadline: 20 commands' worth of its clock (1 ms each)."""
BREAK_US = 30_000
"""The harness's circuit cool-down."""
FAIL_US = 25_000
"""A lost host silent this long after its lease ran out is failed."""

RETRY_POLICIES = st.builds(
    RetryPolicy,
    backoff_ms=st.sampled_from([0, 1, 10, 50]),
    multiplier=st.sampled_from([1.0, 3.0]),
    max_backoff_ms=st.just(60),
    jitter=st.sampled_from([0.0, 0.5]),
)
"""Back-offs of the order of the harness's clock (1 ms per command, 20 ms deadlines)."""


def _better(a: TaskState, b: TaskState) -> bool:
    """``a`` must be served before ``b``: higher priority, or same priority and earlier."""
    return a.rank < b.rank


def _round_trip(state: SchedulerState) -> tuple[dict[str, Any], SchedulerState]:
    """A snapshot as it travels (through JSON), and the state restored from it."""
    snapshot = to_snapshot(state)
    assert json.loads(json.dumps(snapshot)) == snapshot, "a snapshot is JSON data only"
    assert snapshot["version"] == SNAPSHOT_VERSION
    return snapshot, from_snapshot(json.loads(json.dumps(snapshot)))


class Harness:
    """What streams/scheduler.py does with one consumed record, minus Kafka."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        breaker_failures: int = 3,
    ) -> None:
        self.state = SchedulerState(capacity=capacity, dedup_window=dedup_window)
        self.breaker_failures = breaker_failures
        """Failed attempts in a row that open an agent's circuit (0: never)."""
        self.log: list[Folded] = []
        """Everything folded, in order: the tasks, agents and control topics."""
        self.head = ChainHead()
        self.witnessed: list[WitnessEntry] = []
        self._ids = itertools.count(1)
        self.now = 1_700_000_000_000_000
        self.snapshot: tuple[dict[str, Any], int] | None = None
        """The last snapshot taken, and how much of the log it covers."""
        self.replica: SchedulerState | None = None
        """Restored from the last snapshot, it gets every later input; its outputs must
        be the live state's."""
        self.retry_due: dict[str, int] = {}
        """Task id -> when its pending retry may be dispatched, at the earliest."""
        self.answers: list[tuple[int, WitnessEntry]] = []
        """Witness entries decided on, each with the length of the log when it came."""

    def take_snapshot(self) -> None:
        snapshot, self.replica = _round_trip(self.state)
        assert self.replica == self.state
        self.snapshot = (snapshot, len(self.log))

    def _fold(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, TaskRetryScheduled):
                task = self.state.tasks[event.task_id]
                delay = retry_of(task).delay_us(task.task_id, task.attempt)
                assert event.due == self.now + delay > self.now
                assert event.attempt == task.attempt < task.max_attempts
                self.retry_due[event.task_id] = event.due
            elif isinstance(event, TaskDispatched):
                due = self.retry_due.pop(event.task_id, None)
                assert due is None or self.now >= due, "a retry waits for its due time"
            evolve(self.state, event)
            if self.replica is not None:
                evolve(self.replica, event)
            self.log.append(event)

    def breakers(self) -> list[AgentCircuitOpened | AgentCircuitHalfOpened]:
        """What the shell decides before dispatching: circuits that open, then circuits
        whose cool-down is over."""
        state = self.state
        snapshot = copy.deepcopy(state)
        opened = tripped(state, self.now, threshold=self.breaker_failures, cooldown_us=BREAK_US)
        assert state == snapshot, "tripped() must not change the state"
        for event in opened:
            n = state.failures[event.agent_id]
            assert n >= self.breaker_failures or event.agent_id in state.probing
            assert event.agent_id not in state.breakers
            assert event.until == self.now + BREAK_US
        if self.replica is not None:
            assert (
                tripped(
                    self.replica, self.now, threshold=self.breaker_failures, cooldown_us=BREAK_US
                )
                == opened
            )
        self._fold(opened)
        probes = half_opened(state, self.now)
        assert {p.agent_id for p in probes} == {
            key for (until, *_), key in state.breakers.members() if until <= self.now
        }
        self._fold(probes)
        return [*opened, *probes]

    def schedule(self) -> list[TaskDispatched]:
        state = self.state
        self.now += 1000
        self.breakers()
        queued_before = {t.task_id for t in state.tasks.values() if t.status is TaskStatus.QUEUED}
        idle_before = {
            (a.agent_id, a.pool) for a in state.agents.values() if _takes_work(state, a.agent_id)
        }
        snapshot = copy.deepcopy(state)
        dispatched = schedule(state, self.now, answer_within_us=ANSWER_US)
        assert state == snapshot, "schedule() must not change the state"
        assert [dataclasses.replace(d, deadline=None) for d in dispatched] == (
            reference_schedule(state)
        )
        assert all(d.deadline == self.now + ANSWER_US for d in dispatched)
        if self.replica is not None:
            assert schedule(self.replica, self.now, answer_within_us=ANSWER_US) == dispatched
        if state.halted:
            assert dispatched == []
        _check_priority(state, queued_before, idle_before, dispatched)
        for name, n in Counter(d.pool for d in dispatched).items():
            before = state.pools[name].in_flight
            assert before + n <= state.capacity_of(name), f"{name} over its capacity"
        for d in dispatched:
            assert state.agents[d.agent_id].pool == d.pool, "an agent runs its own pool's tasks"
        for (name, key), n in Counter(
            (d.pool, state.tasks[d.task_id].limited_key)
            for d in dispatched
            if state.tasks[d.task_id].limited_key is not None
        ).items():
            assert key is not None
            pool = state.pools[name]
            assert pool.running.get(key, 0) + n <= pool.limits[key], f"{key} over its limit"
        self._fold(dispatched)
        assert schedule(state, self.now) == [], "schedule() must reach a fixpoint in one call"
        return dispatched

    def command(
        self,
        cause: TaskSubmitted | DeliberationRequested | CancelRequested | WitnessEntry,
        tenant: str | None = None,
    ) -> list[Emitted]:
        self.now += 1000
        snapshot = copy.deepcopy(self.state)
        decided = decide(self.state, cause, self.now, tenant=tenant)
        if isinstance(cause, WitnessEntry):
            self.answers.append((len(self.log), cause))
        assert self.state == snapshot, "decide() must not change the state"
        if self.replica is not None:
            assert decide(self.replica, cause, self.now, tenant=tenant) == decided
        self._fold(decided)
        return [*decided, *self.schedule()]

    def fact(
        self,
        event: AgentRegistered
        | AgentFailed
        | AgentRetired
        | HostBeat
        | HostLeaving
        | Halt
        | Resume
        | PoolConfigured,
    ) -> list[Emitted]:
        self._fold([event])
        if isinstance(event, HostBeat):
            back = revived(self.state, event)
            lease = self.state.hosts[event.host_id]
            # Only a beat that promises more than the lease judged lost brings it back.
            expected = lease.lost_agents if lease.overdue() is not None else set()
            assert {r.agent_id for r in back} == expected & self.state.suspects.keys()
            self._fold(back)
            assert lease.overdue() is None or not lease.lost_agents & self.state.suspects.keys()
        if isinstance(event, Halt):
            running = {t.task_id for t in self.dispatched()}
            cancelled = halted(self.state, event)
            assert {c.task_id for c in cancelled if isinstance(c, TaskCancelled)} == (
                running if event.cancel_running else set()
            )
            self._fold(cancelled)
            assert self.schedule() == [], "nothing is dispatched while halted"
            return list(cancelled)
        if isinstance(event, AgentRegistered):
            reinstated = reinstate(self.state, event)
            assert all(r.agent_id == event.agent_id for r in reinstated)
            self._fold(reinstated)
            assert event.agent_id not in self.state.suspects
        return self.schedule()

    def tick(self, elapsed_us: int) -> list[Emitted]:
        """Time passes: attempts past their deadline are stalled, retries whose back-off
        is over are queued again, then the schedule."""
        self.now += elapsed_us
        state = self.state
        lost = self._judge_leases()
        failed = self._failed()
        due = set(due_timers(state, self.now))
        running = {t.task_id for t in state.tasks.values() if t.status is TaskStatus.DISPATCHED}
        waiting = {t.task_id for t in state.tasks.values() if t.status is TaskStatus.RETRYING}
        snapshot = copy.deepcopy(state)
        expired = expire(state, self.now)
        assert state == snapshot, "expire() must not change the state"
        if self.replica is not None:
            assert expire(self.replica, self.now) == expired
        late = {
            t.task_id for t in state.tasks.values() if (t.expires_at or self.now + 1) <= self.now
        }
        ended = {e.task_id for e in expired if isinstance(e, TaskExpired)}
        assert ended == late, "a task expires when its start_by or finish_by passed"
        stalled = [e for e in expired if isinstance(e, TaskStalled)]
        assert {e.task_id for e in stalled} == (due & running) - ended
        events = iter(expired)
        requeued = set()
        for event in events:
            if isinstance(event, TaskDependencyFailed | TaskExpired):
                continue
            if isinstance(event, TaskQueued):  # a back-off is over
                assert event.task_id in waiting
                requeued.add(event.task_id)
                continue
            assert isinstance(event, TaskStalled)
            then = next(events)
            assert isinstance(then, TaskQueued | TaskRetryScheduled | TaskDeadLettered)
            assert then.task_id == event.task_id
            if isinstance(then, TaskDeadLettered):
                assert then.witness_sequence is None
                assert "stalled" in then.reason
        assert requeued == (due & waiting) - ended
        queued = [e.sequence for e in expired if isinstance(e, TaskQueued)]
        assert queued == list(range(state.next_sequence, state.next_sequence + len(queued)))
        self._fold(expired)
        assert not set(due_timers(self.state, self.now)) & due, "folding ends the due timers"
        assert all((t.expires_at or self.now + 1) > self.now for t in self.state.tasks.values())
        return [*lost, *failed, *expired, *self.schedule()]

    def _judge_leases(self) -> list[Any]:
        """Hosts whose lease ran out are lost, each once per lease, their attempts stalled."""
        state = self.state
        lost_before = self._lost(self.now)
        snapshot = copy.deepcopy(state)
        lost = lost_hosts(state, self.now)
        assert state == snapshot, "lost_hosts() must not change the state"
        if self.replica is not None:
            assert lost_hosts(self.replica, self.now) == lost
        judged = [e for e in lost if isinstance(e, HostLost)]
        assert {e.host_id for e in judged} == set(lost_before)
        for e in judged:
            assert e.agent_ids == sorted(
                a.agent_id for a in state.agents.values() if a.host_id == e.host_id
            )
        stalls = {e.task_id for e in lost if isinstance(e, TaskStalled)}
        assert stalls == {t for tasks in lost_before.values() for t in tasks}
        self._fold(lost)
        assert self._lost(self.now) == {}, "a lost host is judged once per lease"
        return lost

    def _failed(self) -> list[HostFailed]:
        """Lost hosts silent past the grace period are failed, each once per lease."""
        state = self.state
        failing = {  # lost (not left), silent past the grace period, not failed yet
            host_id
            for host_id, lease in state.hosts.items()
            if lease.judged is not None
            and lease.overdue() is None
            and lease.leaving_until is None
            and (lease.left or -1) < lease.expires_at
            and (lease.failed or -1) < lease.expires_at
            and lease.expires_at + FAIL_US <= self.now
            and any(
                a.host_id == host_id and a.agent_id in lease.lost_agents
                for a in state.agents.values()
            )
        }
        snapshot = copy.deepcopy(state)
        failed = failed_hosts(state, self.now, FAIL_US)
        assert state == snapshot, "failed_hosts() must not change the state"
        assert {e.host_id for e in failed} == failing
        for e in failed:  # its agents still lost, not those registered again since
            assert e.agent_ids
            assert set(e.agent_ids) <= state.hosts[e.host_id].lost_agents
        self._fold(failed)
        assert failed_hosts(state, self.now, FAIL_US) == [], "failed once per lease"
        due = failures_due(state, FAIL_US)
        assert due is None or due > self.now
        return failed

    def _lost(self, now: int) -> dict[str, set[str]]:
        """Hosts whose lease ran out by ``now`` and not judged yet: their running tasks."""
        return {
            host_id: {
                task_id
                for agent_id, task_id in self.state.assignments.items()
                if (a := self.state.agents.get(agent_id)) is not None and a.host_id == host_id
            }
            for host_id, lease in self.state.hosts.items()
            if lease.expires_at <= now and (lease.judged or 0) < lease.expires_at
        }

    def beat(
        self, host_id: str, lease_us: int, over_limit: str | None = None, spare: int = 1
    ) -> list[Emitted]:
        agents = sorted(a.agent_id for a in self.state.agents.values() if a.host_id == host_id)
        lease = self.state.hosts.get(host_id)
        leaving = lease.leaving_until if lease is not None else None
        expires_at = min(self.now + lease_us, leaving or self.now + lease_us)  # as hosts do
        return self.fact(
            HostBeat(
                host_id=host_id,
                pool="p0",
                agent_ids=agents,
                expires_at=expires_at,
                over_limit=over_limit,
                spare=spare,
            )
        )

    def leave(self, host_id: str, drain_us: int) -> list[Emitted]:
        agents = sorted(a.agent_id for a in self.state.agents.values() if a.host_id == host_id)
        leaving = HostLeaving(
            host_id=host_id, pool="p0", agent_ids=agents, until=self.now + drain_us, reason="stop"
        )
        return self.fact(leaving)

    def register(
        self, agent_id: str, host_id: str = "h0", pool: str | None = None
    ) -> list[TaskDispatched]:
        return self.fact(
            AgentRegistered(
                agent_id=agent_id,
                pool=pool or POOL_OF.get(agent_id, "p0"),
                host_id=host_id,
                agent_ref="agents:fn",
            )
        )

    def entry(
        self,
        subject_type: str,
        task_id: str | None = None,
        agent_id: str | None = None,
        detail: str = "",
        attempt: int | None = None,
    ) -> WitnessEntry:
        n = next(self._ids)
        entry = next_entry(
            self.head,
            subject_type=subject_type,
            subject_event_id=f"event-{n}",
            subject_digest=digest(f"record {n}".encode()),
            recorded_at=n,
            task_id=task_id,
            agent_id=agent_id,
            detail=detail,
            attempt=attempt,
        )
        self.head = self.head.advance(entry)
        self.witnessed.append(entry)
        return entry

    def finish(self, task: TaskState, *, failed: bool) -> tuple[WitnessEntry, list[Emitted]]:
        """The runtime reports the task's outcome and the witness processor witnesses it."""
        entry = self.entry(
            "task.failed" if failed else "agent.output",
            task.task_id,
            task.agent_id,
            "Boom" if failed else "",
            task.attempt,
        )
        return entry, self.command(entry)

    def halt(self, *, cancel_running: bool = False) -> None:
        cancelled = self.fact(Halt(reason="test", operator="op", cancel_running=cancel_running))
        assert all(isinstance(e, TaskCancelled | TaskDependencyFailed) for e in cancelled)
        if cancel_running:
            assert not self.dispatched(), "halted and cancelled: nothing runs"
        assert self.command(self.entry("system.halt", detail="test")) == []

    def resume(self) -> list[TaskDispatched]:
        dispatched = self.fact(Resume(reason="test", operator="op"))
        # Its witness entry dispatches nothing more, but to an agent whose circuit's
        # cool-down ends meanwhile (time moves on with each step).
        soon = {
            agent
            for (until, *_), agent in self.state.breakers.members()
            if until <= self.now + 2000
        }
        later = self.command(self.entry("system.resume", detail="test"))
        assert {d.agent_id for d in later if isinstance(d, TaskDispatched)} <= soon, later
        return [*dispatched, *(d for d in later if isinstance(d, TaskDispatched))]

    def dispatched(self) -> list[TaskState]:
        return sorted(
            (t for t in self.state.tasks.values() if t.status is TaskStatus.DISPATCHED),
            key=lambda t: t.task_id,
        )

    def drive(self, failed: Any = lambda task: False) -> None:
        """Resume, register every agent and witness outcomes until nothing is live. A task
        stuck for want of an agent in its pool (agents move) gets one moved there; time
        passes while every live task waits out a back-off."""
        if self.state.halted:
            self.resume()
        for name, capacity in sorted(self.state.capacities.items()):
            if capacity == 0:  # closed by an operator: opened again
                self.fact(PoolConfigured(pool=name, capacity=1, reason="drive", operator="op"))
        for agent_id in sorted(POOL_OF):
            if agent_id not in self.state.agents:
                self.register(agent_id)
        for host_id, lease in sorted(self.state.hosts.items()):
            if lease.over_limit is not None:  # room again: a beat that promises no less
                self.beat(host_id, max(1000, lease.expires_at - self.now))
        for _ in range(1000):
            queued = [t for t in self.state.tasks.values() if t.status is TaskStatus.QUEUED]
            if running := self.dispatched():
                for task in running:
                    self.finish(task, failed=failed(task))
            elif (due := next_due(self.state)) is not None and (not queued or self.state.breakers):
                self.tick(max(0, due - self.now))
            elif stuck := min(queued, key=lambda t: t.rank, default=None):
                movers = [stuck.agent_id or ""] if stuck.targeted else AGENTS_BY_POOL[stuck.pool]
                for agent_id in movers:
                    self.register(agent_id, pool=stuck.pool)
                assert self.dispatched(), "an agent in its pool lets the best stuck task run"
            else:
                return
        raise AssertionError("the schedule did not quiesce")


def _takes_work(state: SchedulerState, agent_id: str) -> bool:
    """Free for a task: not busy, stalled, failed, retired, tripped, nor on a host leaving."""
    return (
        agent_id not in state.assignments
        and agent_id not in state.suspects
        and agent_id not in state.failed
        and agent_id not in state.retired
        and agent_id not in state.breakers
        and not _leaving(state, agent_id)
    )


def _leaving(state: SchedulerState, agent_id: str) -> bool:
    """Its host said it is leaving, or that it is over its limits: no new work."""
    lease = state.hosts.get(state.agents[agent_id].host_id)
    return lease is not None and (lease.leaving_until is not None or lease.over_limit is not None)


def _check_priority(
    state: SchedulerState,
    queued_before: set[str],
    idle_before: set[tuple[str, str]],
    dispatched: list[TaskDispatched],
) -> None:
    """Nothing dispatched is worse than a task of its pool left queued that could have run.

    An untargeted task left queued could have run in place of any worse dispatched
    task. A targeted one could too if its agent was idle in its pool, unless that agent went to a
    better task that was targeted at it (an untargeted holder could have taken another
    agent: the one the worse task got). So no untargeted task is ever left behind for a
    worse untargeted one, and an untargeted task never steals a better task's agent.
    """
    chosen = {d.task_id for d in dispatched}
    holders = {d.agent_id: state.tasks[d.task_id] for d in dispatched}
    keys_running = Counter(
        (t.pool, t.limited_key)
        for t in [
            *(t for t in state.tasks.values() if t.status is TaskStatus.DISPATCHED),
            *(state.tasks[d.task_id] for d in dispatched),
        ]
        if t.limited_key is not None
    )
    for d in dispatched:
        task = state.tasks[d.task_id]
        if task.targeted:
            assert d.agent_id == task.agent_id, "a targeted task runs on its own agent only"
        for task_id in queued_before - chosen:
            left = state.tasks[task_id]
            if left.pool != task.pool:
                continue
            key = left.limited_key
            if key is not None and keys_running[(left.pool, key)] >= _limit(state, left.pool, key):
                continue  # its key had no room
            if left.targeted:
                if (left.agent_id, left.pool) not in idle_before:
                    continue
                holder = holders.get(left.agent_id or "")
                if holder is not None and holder.targeted and _better(holder, left):
                    continue
            assert not _better(left, task), f"{left.task_id} left behind for {task.task_id}"


def _limit(state: SchedulerState, pool: str, key: str) -> int:
    return state.pools[pool].limits[key]


def reference_schedule(state: SchedulerState) -> list[TaskDispatched]:
    """The oracle: the scheduler before it kept indexes, which scanned every agent and
    sorted every queue on every call. The indexed one must give exactly this."""
    if state.halted:
        return []
    queued: dict[str, list[TaskState]] = defaultdict(list)
    running = Counter(t.pool for t in state.tasks.values() if t.status is TaskStatus.DISPATCHED)
    for task in state.tasks.values():
        if task.status is TaskStatus.QUEUED:
            queued[task.pool].append(task)
    dispatched: list[TaskDispatched] = []
    for pool in sorted(queued):
        free = state.capacity_of(pool) - running[pool]
        idle = {
            a.agent_id: a
            for a in state.agents.values()
            if a.pool == pool and _takes_work(state, a.agent_id)
        }
        waiting = sorted(queued[pool], key=lambda t: t.rank)
        limits = state.pools[pool].limits
        keys_running = Counter(
            t.limited_key
            for t in state.tasks.values()
            if t.status is TaskStatus.DISPATCHED and t.pool == pool and t.limited_key is not None
        )
        wanted: dict[str, tuple[int, ...]] = {}
        for task in waiting:
            if task.targeted and task.agent_id in idle:
                wanted.setdefault(task.agent_id, task.rank)
        for task in waiting:
            if free <= 0 or not idle:
                break
            key = task.limited_key
            if key is not None and keys_running[key] >= limits[key]:
                continue  # its key has no room left
            if task.targeted:
                agent = idle.get(task.agent_id or "")
            elif unclaimed := sorted(a for a in idle if a not in wanted):
                agent = idle[unclaimed[0]]
            else:
                outranked = [(c, a) for a, c in wanted.items() if a in idle and c > task.rank]
                agent = idle[max(outranked)[1]] if outranked else None
            if agent is None:
                continue
            del idle[agent.agent_id]
            wanted.pop(agent.agent_id, None)
            free -= 1
            if key is not None:
                keys_running[key] += 1
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


def recovered(log: list[Folded], start: SchedulerState) -> SchedulerState:
    """``start`` (an empty state, or one restored from a snapshot) with ``log`` folded."""
    for event in log:
        evolve(start, event)
    return start


def interleavings(log: list[Folded]) -> list[list[Folded]]:
    """The tasks topic entirely before, and entirely after, the agents and control
    topics: per-topic order is all that recovery can count on."""
    facts = (*AGENTS_TOPIC_EVENTS, Halt, Resume, PoolConfigured)
    tasks_topic = [e for e in log if not isinstance(e, facts)]
    other_topics = [e for e in log if isinstance(e, facts)]
    return [[*tasks_topic, *other_topics], [*other_topics, *tasks_topic]]


def assert_same_state(live: SchedulerState, fresh: SchedulerState) -> None:
    """Equal facts, dedup windows and indexes (heap layouts aside), and equal snapshots."""
    assert fresh == live
    assert to_snapshot(fresh) == to_snapshot(live)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.submitted: dict[str, TaskSubmitted] = {}
        self.commands: list[TaskSubmitted | DeliberationRequested] = []
        self.expanded: set[str] = set()
        self.targets: dict[str, str | None] = {}
        self.stalled: list[TaskStalled] = []

    @initialize(capacity=st.integers(1, 3), breaker_failures=st.integers(0, 2))
    def set_capacity(self, capacity: int, breaker_failures: int) -> None:
        self.h = Harness(capacity, breaker_failures=breaker_failures)

    @property
    def state(self) -> SchedulerState:
        return self.h.state

    @rule(
        task_id=st.sampled_from([f"t{i}" for i in range(8)]),
        pool=POOLS,
        priority=PRIORITIES,
        max_attempts=st.integers(1, 3),
        data=st.data(),
    )
    def submit(
        self, task_id: str, pool: str, priority: Priority, max_attempts: int, data: st.DataObject
    ) -> None:
        agent_id = data.draw(st.none() | st.sampled_from(AGENTS_BY_POOL[pool]), label="target")
        retry = data.draw(RETRY_POLICIES, label="retry")
        start_within_ms = data.draw(st.none() | st.integers(5, 40), label="start_within_ms")
        finish_in_ms = data.draw(st.none() | st.integers(5, 80), label="finish_in_ms")
        accepted_at = self.h.now + 1000  # the harness's clock moves 1 ms per command
        finish_by = None if finish_in_ms is None else accepted_at + finish_in_ms * 1000
        # Mostly live tasks: those are the ones a dependent has to wait for.
        live = sorted(t for t in self.state.tasks if t != task_id)
        candidates = live or sorted(t for t in self.targets if t != task_id)
        depends_on = data.draw(
            st.lists(st.sampled_from(candidates), unique=True, max_size=3)
            if candidates
            else st.just([]),
            label="depends_on",
        )
        tenant = data.draw(st.sampled_from([None, "t0", "t1"]), label="tenant")
        key = data.draw(st.sampled_from([None, "k0", "k1"]), label="fairness key")
        key_limit = None if agent_id else data.draw(st.sampled_from([None, 1, 2]), label="limit")
        command = TaskSubmitted(
            task_id=task_id,
            pool=pool,
            priority=priority,
            input=task_id,
            agent_id=agent_id,
            max_attempts=max_attempts,
            **retry.as_fields(),
            depends_on=depends_on,
            start_within_ms=start_within_ms,
            finish_by=finish_by,
            fairness_key=key,
            key_limit=key_limit,
        )
        known = status_of(self.state, task_id) is not None
        assert refusal(self.state, command) is None, "its dependencies are all known"
        sequence = self.state.next_sequence
        qualified = None if agent_id else fairness_key(tenant, key)
        fair = self.state.turns.get(pool)
        behind = 0 if fair is None or qualified is None else fair.last.get(qualified, 0)
        turn = 1 if fair is None else max(fair.virtual, behind) + 1
        weight = self.state.weights.get(pool, {}).get(qualified or "", 1)
        if fair is not None and behind > fair.virtual and fair.used[qualified or ""] < weight:
            turn = behind  # the key's turn has room for another of its tasks
        statuses = {d: status_of(self.state, d) for d in depends_on}
        events = self.h.command(command, tenant=tenant)
        self.commands.append(command)
        if known:
            assert events == []
            return
        self.submitted[task_id] = command
        self.targets[task_id] = agent_id
        waiting = [d for d in depends_on if statuses[d] is not TaskStatus.COMPLETED]
        assert events[0] == TaskQueued(
            task_id=task_id,
            pool=pool,
            priority=priority,
            input=task_id,
            agent_id=agent_id,
            max_attempts=max_attempts,
            deliberation_id=None,
            sequence=sequence,
            **retry.as_fields(),
            depends_on=depends_on,
            waiting_for=waiting,
            start_by=None if start_within_ms is None else accepted_at + start_within_ms * 1000,
            finish_by=finish_by,
            fairness_key=qualified,
            key_limit=key_limit,
            turn=turn,
            aging_turns=self.state.aging.get(pool),
        )
        failed = [d for d in waiting if (s := statuses[d]) is not None and s.failed]
        if failed:
            assert isinstance(events[1], TaskDependencyFailed)
            assert (events[1].task_id, events[1].dependency) == (task_id, failed[0])
            events = events[1:]
        assert all(isinstance(e, TaskDispatched) for e in events[1:])
        dispatched = {e.task_id for e in events if isinstance(e, TaskDispatched)}
        assert not waiting or task_id not in dispatched, "a task waits for its dependencies"

    @precondition(lambda self: bool(self.targets))
    @rule(data=st.data(), whole_deliberation=st.booleans())
    def cancel(self, data: st.DataObject, whole_deliberation: bool) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.targets)), label="cancelled")
        task = self.state.tasks.get(task_id)
        deliberation_id = task_id.split("/")[0] if "/" in task_id else None
        if whole_deliberation and deliberation_id is not None:
            command = CancelRequested(deliberation_id=deliberation_id, reason="enough")
            live = sorted(self.state.by_deliberation.get(deliberation_id, ()))
        else:
            command = CancelRequested(task_id=task_id, reason="enough")
            live = [task_id] if task is not None else []
        refused = refusal(self.state, command)
        repeated = command.task_id is not None and (
            status_of(self.state, command.task_id) is TaskStatus.CANCELLED
        )
        waiting_on_them = {d for t in live for d in self.state.dependents.get(t, ())}
        events = self.h.command(command)
        assert (refused is None) == bool(live or repeated), refused
        cancelled = [e for e in events if isinstance(e, TaskCancelled)]
        assert [e.task_id for e in cancelled] == live
        assert all(e.reason == "cancelled: enough" for e in cancelled)
        failed = {e.task_id for e in events if isinstance(e, TaskDependencyFailed)}
        assert waiting_on_them - set(live) <= failed, "their dependents fail with them"
        for task_id in live:
            assert status_of(self.state, task_id) is TaskStatus.CANCELLED

    @rule(
        deliberation_id=st.sampled_from(["d0", "d1", "d2"]),
        pool=POOLS,
        priority=PRIORITIES,
        data=st.data(),
    )
    def deliberate(
        self, deliberation_id: str, pool: str, priority: Priority, data: st.DataObject
    ) -> None:
        agent_ids = data.draw(
            st.lists(st.sampled_from(AGENTS_BY_POOL[pool]), unique=True), label="agent_ids"
        )
        command = DeliberationRequested(
            deliberation_id=deliberation_id,
            pool=pool,
            priority=priority,
            motion="motion",
            agent_ids=agent_ids,
        )
        known = deliberation_id in self.state.deliberations
        sequence = self.state.next_sequence
        registered = sorted(a.agent_id for a in self.state.agents.values() if a.pool == pool)
        events = self.h.command(command)
        self.commands.append(command)
        if known:
            assert events == []
            return
        expected_agents = agent_ids or registered
        queued = [e for e in events if isinstance(e, TaskQueued)]
        assert [q.agent_id for q in queued] == expected_agents
        assert [q.sequence for q in queued] == list(range(sequence, sequence + len(queued)))
        for q in queued:
            assert q.task_id == deliberation_task_id(deliberation_id, q.agent_id or "")
            assert q.deliberation_id == deliberation_id
            assert q.pool == pool
            self.targets[q.task_id] = q.agent_id
        if queued:
            self.expanded.add(deliberation_id)

    @precondition(lambda self: bool(self.commands))
    @rule(data=st.data())
    def redeliver_command(self, data: st.DataObject) -> None:
        command = data.draw(st.sampled_from(self.commands), label="redelivered")
        if isinstance(command, DeliberationRequested) and command.deliberation_id not in (
            self.expanded
        ):
            return  # expanded to nobody the first time: see the report
        assert self.h.command(command) == []

    @rule(agent_id=st.sampled_from(sorted(POOL_OF)), host_id=st.sampled_from(["h0", "h1"]))
    def register(self, agent_id: str, host_id: str) -> None:
        self.h.register(agent_id, host_id)

    @rule(agent_id=st.sampled_from(sorted(POOL_OF)), pool=POOLS)
    def move_to_pool(self, agent_id: str, pool: str) -> None:
        """A host registers its agent in another pool (busy or idle); drive() moves it back."""
        self.h.register(agent_id, pool=pool)

    @rule()
    def take_snapshot(self) -> None:
        self.h.take_snapshot()

    @precondition(lambda self: bool(self.h.dispatched()))
    @rule(data=st.data(), failed=st.booleans())
    def witness_outcome(self, data: st.DataObject, failed: bool) -> None:
        task = data.draw(st.sampled_from(self.h.dispatched()), label="task")
        attempt, agent_id, sequence = task.attempt, task.agent_id, self.state.next_sequence
        entry, events = self.h.finish(task, failed=failed)
        first, *after = events
        if not failed:
            assert first == TaskCompleted(
                task_id=task.task_id,
                agent_id=agent_id or "",
                output_event_id=entry.subject_event_id,
                witness_sequence=entry.sequence,
            )
        elif attempt < task.max_attempts and task.retry_backoff_ms == 0:
            assert isinstance(first, TaskQueued)
            assert (first.task_id, first.sequence) == (task.task_id, sequence)
            assert first.agent_id == self.targets[task.task_id]
        elif attempt < task.max_attempts:
            assert isinstance(first, TaskRetryScheduled)
            assert (first.task_id, first.attempt, first.reason) == (task.task_id, attempt, "Boom")
        else:
            assert first == TaskDeadLettered(
                task_id=task.task_id,
                agent_id=agent_id or "",
                attempts=attempt,
                reason="Boom",
                witness_sequence=entry.sequence,
            )
        if after and isinstance(after[0], AgentCircuitClosed):  # a probe answered
            assert isinstance(first, TaskCompleted)
            assert after.pop(0) == AgentCircuitClosed(agent_id=first.agent_id)
        released = [e for e in after if isinstance(e, TaskQueued)]
        failed_too = [e for e in after if isinstance(e, TaskDependencyFailed)]
        assert not released or isinstance(first, TaskCompleted)
        assert not failed_too or isinstance(first, TaskDeadLettered)
        assert all(e.waiting_for == [] for e in released)
        assert all(isinstance(e, TaskDispatched) for e in after[len(released + failed_too) :])

    @precondition(lambda self: bool(self.h.dispatched()))
    @rule(data=st.data())
    def witness_from_another_agent(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(self.h.dispatched()), label="task")
        other = data.draw(st.sampled_from([a for a in POOL_OF if a != task.agent_id]))
        subject = data.draw(st.sampled_from(["agent.output", "task.failed"]))
        assert self.h.command(self.h.entry(subject, task.task_id, other)) == []

    @precondition(lambda self: bool(self.h.witnessed))
    @rule()
    def redeliver_last_witness_entry(self) -> None:
        """The common redelivery: the entry just handled, after its retry was dispatched."""
        assert self.h.command(self.h.witnessed[-1]) == []

    @precondition(lambda self: bool(self.h.witnessed))
    @rule(data=st.data())
    def redeliver_witness_entry(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.h.witnessed), label="redelivered")
        assert self.h.command(entry) == []

    @rule(
        host_id=st.sampled_from(["h0", "h1"]),
        lease=st.integers(1000, 2 * ANSWER_US),
        over=st.sampled_from([None, None, "memory 900 MB, over its limit of 800 MB"]),
        spare=st.integers(0, 2),
    )
    def host_beats(self, host_id: str, lease: int, over: str | None, spare: int) -> None:
        """A host's beat: a lost one is back, its agents work again; over its limits,
        they take no new work until a beat says it has room. ``spare``: agents it could
        start for a shortage."""
        self.h.beat(host_id, lease, over, spare)

    @rule(agent_id=st.sampled_from(sorted(POOL_OF)))
    def its_host_gives_up_on_an_agent(self, agent_id: str) -> None:
        """It crashed past its restart budget: said after its crashed attempt ended, so
        never while it runs one."""
        slot = self.state.agents.get(agent_id)
        if slot is not None and agent_id not in self.state.assignments:
            failed = AgentFailed(
                agent_id=agent_id,
                pool=slot.pool,
                host_id=slot.host_id,
                restarts=5,
                window_s=60.0,
                reason="crashed 6 times within 60 s",
            )
            self.h.fact(failed)

    @rule(agent_id=st.sampled_from(sorted(POOL_OF)))
    def its_host_retires_an_idle_agent(self, agent_id: str) -> None:
        """The pool shrank: its host retires it while idle (a dispatch may cross that:
        the scheduler folds the retirement after dispatching to it)."""
        slot = self.state.agents.get(agent_id)
        if slot is not None:
            retired = AgentRetired(
                agent_id=agent_id, pool=slot.pool, host_id=slot.host_id, reason="idle for 60 s"
            )
            self.h.fact(retired)

    @rule()
    def shortages_are_judged(self) -> None:
        """After a step's dispatches: pools whose tasks could start but find no idle agent
        are said starved, each at most once a second, only with a live host that has room
        to grow."""
        state, now = self.state, self.h.now
        snapshot = copy.deepcopy(state)
        said = starved(state, now)
        assert state == snapshot, "starved() must not change the state"
        live = {
            lease.pool
            for lease in state.hosts.values()
            if lease.takes_work
            and lease.expires_at > now
            and not lease.lost_agents
            and lease.spare > 0
        }
        for name, pool in state.pools.items():
            room = state.capacity_of(name) - pool.in_flight
            short = (
                not state.halted
                and name in live
                and name not in state.ready
                and room > 0
                and bool(pool.untargeted or pool.heads)
            )
            mine = [e for e in said if e.pool == name]
            recent = pool.starved_at is not None and now - pool.starved_at < STARVED_EVERY_US
            assert len(mine) == (1 if short and not recent else 0), (name, mine, short, recent)
            for e in mine:
                assert 0 < e.waiting <= room
                assert e.hosts >= 1
        self.h._fold(said)
        assert starved(state, now) == [], "said once a second at most"

    @rule(host_id=st.sampled_from(["h0", "h1"]), drain=st.integers(0, 2 * ANSWER_US))
    def host_leaves(self, host_id: str, drain: int) -> None:
        """A host says it is stopping: its agents take nothing new from now on."""
        self.h.leave(host_id, drain)

    @precondition(
        lambda self: self.state.timers.first() is not None or hosts_due(self.state) is not None
    )
    @rule(elapsed=st.integers(0, 2 * ANSWER_US))
    def time_passes(self, elapsed: int) -> None:
        for event in self.h.tick(elapsed):
            if isinstance(event, TaskStalled):
                self.stalled.append(event)

    @precondition(lambda self: bool(self.stalled))
    @rule(data=st.data())
    def late_answer_of_a_stalled_attempt(self, data: st.DataObject) -> None:
        """Witnessed, but never a second outcome for the attempt the scheduler gave up;
        its agent works again if that attempt is what it is suspect of."""
        stall = data.draw(st.sampled_from(self.stalled), label="stalled attempt")
        subject = data.draw(st.sampled_from(["agent.output", "task.failed"]))
        entry = self.h.entry(subject, stall.task_id, stall.agent_id, attempt=stall.attempt)
        back = self.state.suspects.get(stall.agent_id) == (
            stall.task_id,
            stall.attempt,
        ) and not any(stall.agent_id in lease.lost_agents for lease in self.state.hosts.values())
        events = self.h.command(entry)
        if back:
            assert events[0] == AgentReinstated(agent_id=stall.agent_id, host_id=stall.host_id)
            events = events[1:]
        assert all(isinstance(e, TaskDispatched) for e in events)
        assert stall.agent_id not in self.state.suspects or not back

    @rule(cancel_running=st.booleans())
    def halt(self, cancel_running: bool) -> None:
        running = {t.task_id for t in self.h.dispatched()}
        self.h.halt(cancel_running=cancel_running)
        still = {t.task_id for t in self.h.dispatched()}
        assert still == (set() if cancel_running else running), "drain, or cancel by option"

    @rule()
    def resume(self) -> None:
        self.h.resume()

    @rule(data=st.data())
    def drive_to_quiescence(self, data: st.DataObject) -> None:
        self.h.drive(lambda task: data.draw(st.booleans(), label=f"{task.task_id} fails"))
        self._check_all_terminal()

    def _check_all_terminal(self) -> None:
        terminal = Counter(e.task_id for e in self.h.log if isinstance(e, TERMINAL_EVENTS))
        for task_id in self.targets:
            status = status_of(self.state, task_id)
            assert status is not None, f"{task_id} is forgotten"
            assert status.terminal, f"{task_id} is {status.value}"
            assert terminal[task_id] == 1
        assert self.state.tasks == {}, "finished tasks leave the live state"
        for pool in self.state.pools.values():
            assert pool.in_flight == 0
            assert not pool.untargeted
            assert not pool.targeted
            assert not pool.claimed
        assert self.state.assignments == {}
        assert self.state.ready == set()

    def teardown(self) -> None:
        self.h.drive()
        self._check_all_terminal()

    @rule(
        pool=POOLS,
        capacity=st.integers(0, 3),
        aging=st.sampled_from([None, 1, 2]),
        weights=st.dictionaries(st.sampled_from(["t0", "t1/k0", "k1"]), st.integers(1, 3)),
    )
    def configure_pool(
        self, pool: str, capacity: int, aging: int | None, weights: dict[str, int]
    ) -> None:
        """An operator sets a pool's capacity (lower than what runs, it preempts nothing),
        its aging (tasks accepted from now on) and the weights of fairness keys."""
        self.h.fact(
            PoolConfigured(
                pool=pool,
                capacity=capacity,
                reason="test",
                operator="op",
                aging_turns=aging,
                weights=weights,
            )
        )

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        """In flight is counted right; over capacity only after the capacity was lowered
        (Harness.schedule checks that no dispatch ever goes over it)."""
        dispatched = Counter(t.pool for t in self.h.dispatched())
        for name in set(self.state.pools) | set(dispatched):
            pool = self.state.pools.get(name)
            assert (pool.in_flight if pool is not None else 0) == dispatched[name]
            if name not in self.state.capacities:
                assert dispatched[name] <= self.state.capacity

    @invariant()
    def one_task_per_agent_and_targets_respected(self) -> None:
        running = self.h.dispatched()
        assert len({t.agent_id for t in running}) == len(running)
        assert self.state.assignments == {t.agent_id: t.task_id for t in running}
        for task in running:
            if self.targets.get(task.task_id) is not None:
                assert task.agent_id == self.targets[task.task_id]

    @invariant()
    def queues_hold_exactly_the_queued_tasks(self) -> None:
        entries = sorted(
            (rank, task_id, name, target)
            for name, pool in self.state.pools.items()
            for target, queue in [
                (None, pool.untargeted),
                *pool.targeted.items(),
                *((None, q) for q in pool.keyed.values()),
            ]
            for rank, task_id in queue.members()
        )
        queued = sorted(
            (t.rank, t.task_id, t.pool, t.agent_id if t.targeted else None)
            for t in self.state.tasks.values()
            if t.status is TaskStatus.QUEUED
        )
        assert entries == queued

    @invariant()
    def every_dispatched_or_retrying_task_and_only_those_has_its_timer(self) -> None:
        waiting = (TaskStatus.DISPATCHED, TaskStatus.RETRYING)
        assert sorted(key for _, key in self.state.timers) == sorted(
            t.task_id for t in self.state.tasks.values() if t.status in waiting
        )
        for task in self.state.tasks.values():
            if task.status is TaskStatus.RETRYING:
                assert self.state.timers.rank(task.task_id) == (self.h.retry_due[task.task_id],)

    @invariant()
    def an_agent_that_stalled_gets_no_work_until_it_registers_again(self) -> None:
        assert not {t.agent_id for t in self.h.dispatched()} & self.state.suspects.keys()
        for agent_id in self.state.suspects:
            slot = self.state.agents[agent_id]
            pool = self.state.pools.get(slot.pool)
            assert pool is None or agent_id not in pool.unclaimed
            assert pool is None or pool.claimed.rank(agent_id) is None

    @invariant()
    def an_agent_its_host_gave_up_on_gets_no_work_until_it_registers_again(self) -> None:
        failed: set[str] = set()
        for event in self.h.log:
            if isinstance(event, AgentFailed):
                failed.add(event.agent_id)
            elif isinstance(event, AgentRegistered):
                failed.discard(event.agent_id)
            elif isinstance(event, TaskDispatched):
                assert event.agent_id not in failed, f"{event.task_id} to failed {event.agent_id}"
        assert failed == self.state.failed.keys()

    @invariant()
    def an_agent_its_host_retired_gets_no_work_until_it_registers_again(self) -> None:
        retired: set[str] = set()
        for event in self.h.log:
            if isinstance(event, AgentRetired):
                retired.add(event.agent_id)
            elif isinstance(event, AgentRegistered):
                retired.discard(event.agent_id)
            elif isinstance(event, TaskDispatched):
                assert event.agent_id not in retired, f"{event.task_id} to retired {event.agent_id}"
        assert retired == self.state.retired

    @invariant()
    def an_agent_whose_circuit_is_open_gets_no_work(self) -> None:
        busy = {t.agent_id for t in self.h.dispatched()}
        assert not busy & {key for _, key in self.state.breakers.members()}
        if self.h.breaker_failures > 0:  # every step ends with the circuits it opens
            for agent_id, n in self.state.failures.items():
                assert n < self.h.breaker_failures, f"{agent_id}: {n} failures, circuit closed"
                assert agent_id not in self.state.probing, f"{agent_id}'s probe failed"

    @invariant()
    def a_lost_hosts_agents_get_no_work_until_it_is_back(self) -> None:
        host_of: dict[str, str] = {}
        benched: set[str] = set()  # agents of hosts judged lost, until beaten or registered
        judged: dict[str, int] = {}
        for event in self.h.log:
            if isinstance(event, AgentRegistered):
                host_of[event.agent_id] = event.host_id
                benched.discard(event.agent_id)
            elif isinstance(event, HostLost):
                benched |= set(event.agent_ids)
                judged[event.host_id] = event.expires_at
            elif isinstance(event, HostBeat) and event.expires_at > judged.get(event.host_id, -1):
                benched -= {a for a in benched if host_of.get(a) == event.host_id}
        assert not {t.agent_id for t in self.h.dispatched()} & benched

    @invariant()
    def a_leaving_hosts_agents_take_no_new_work_until_it_registers_again(self) -> None:
        host_of: dict[str, str] = {}
        leaving: set[str] = set()
        for event in self.h.log:
            if isinstance(event, AgentRegistered):
                host_of[event.agent_id] = event.host_id
                leaving.discard(event.host_id)
            elif isinstance(event, HostLeaving):
                leaving.add(event.host_id)
            elif isinstance(event, TaskDispatched):
                assert host_of[event.agent_id] not in leaving, f"{event} to a leaving host"

    @invariant()
    def a_host_over_its_limits_gets_no_new_work_until_a_later_beat_has_room(self) -> None:
        host_of: dict[str, str] = {}
        newest: dict[str, HostBeat] = {}
        for event in self.h.log:
            if isinstance(event, AgentRegistered):
                host_of[event.agent_id] = event.host_id
            elif isinstance(event, HostBeat):
                newest[event.host_id] = event
            elif isinstance(event, TaskDispatched):
                beat = newest.get(host_of[event.agent_id])
                assert beat is None or beat.over_limit is None, f"{event} to a host over limits"

    @invariant()
    def idle_agents_are_indexed_by_their_best_claim(self) -> None:
        idle = [a for a in self.state.agents.values() if _takes_work(self.state, a.agent_id)]
        for agent in idle:
            pool = self.state.pools[agent.pool]
            claims = [
                t.rank
                for t in self.state.tasks.values()
                if t.status is TaskStatus.QUEUED
                and t.targeted
                and (t.agent_id, t.pool) == (agent.agent_id, agent.pool)
            ]
            best = min(claims) if claims else None
            assert pool.claimed.rank(agent.agent_id) == best
            worst_first = pool.claimed_worst_first.rank(agent.agent_id)
            assert worst_first == (None if best is None else tuple(-r for r in best))
            assert (agent.agent_id in pool.unclaimed) == (not claims)
        indexed = sum(len(p.unclaimed) + len(p.claimed) for p in self.state.pools.values())
        assert indexed == len(idle)

    @invariant()
    def nothing_submitted_is_lost(self) -> None:
        assert all(status_of(self.state, task_id) is not None for task_id in self.targets)
        terminal = Counter(e.task_id for e in self.h.log if isinstance(e, TERMINAL_EVENTS))
        assert all(n == 1 for n in terminal.values())

    @invariant()
    def a_task_runs_only_after_its_dependencies_completed(self) -> None:
        for task in self.state.tasks.values():
            pending = {
                d for d in task.depends_on if status_of(self.state, d) is not (TaskStatus.COMPLETED)
            }
            assert task.waiting_for == pending
            assert (task.status is TaskStatus.WAITING) == bool(pending)
            for dependency in pending:
                assert dependency in self.state.tasks, "a failed dependency fails its dependents"
        for task_id, command in self.submitted.items():
            if status_of(self.state, task_id) is TaskStatus.COMPLETED:
                assert all(
                    status_of(self.state, d) is TaskStatus.COMPLETED for d in command.depends_on
                )
            if status_of(self.state, task_id) is TaskStatus.DEPENDENCY_FAILED:
                assert any(
                    (s := status_of(self.state, d)) is not None and s.failed
                    for d in command.depends_on
                )

    @invariant()
    def expiries_are_indexed(self) -> None:
        expiries = {k: r for r, k in self.state.expiries.members()}
        assert expiries == {
            t.task_id: (t.expires_at,)
            for t in self.state.tasks.values()
            if t.expires_at is not None
        }

    @invariant()
    def dependents_and_deliberations_are_indexed(self) -> None:
        dependents: dict[str, set[str]] = defaultdict(set)
        deliberations: dict[str, set[str]] = defaultdict(set)
        for task in self.state.tasks.values():
            for dependency in task.waiting_for:
                dependents[dependency].add(task.task_id)
            if task.deliberation_id is not None:
                deliberations[task.deliberation_id].add(task.task_id)
        assert self.state.dependents == dependents
        assert self.state.by_deliberation == deliberations

    @invariant()
    def a_snapshot_restores_the_same_state(self) -> None:
        _, restored = _round_trip(self.state)
        assert_same_state(self.state, restored)

    @invariant()
    def folding_the_log_recovers_the_live_state(self) -> None:
        assert_same_state(self.state, recovered(self.h.log, self._empty()))

    @invariant()
    def recovery_does_not_depend_on_how_topics_interleave(self) -> None:
        for log in interleavings(self.h.log):
            assert_same_state(self.state, recovered(log, self._empty()))

    @invariant()
    def a_snapshot_and_the_tail_in_any_interleaving_recover_the_live_state(self) -> None:
        if self.h.snapshot is None:
            return
        snapshot, covered = self.h.snapshot
        for tail in interleavings(self.h.log[covered:]):
            assert_same_state(self.state, recovered(tail, from_snapshot(snapshot)))

    @invariant()
    def an_agents_history_says_busy_exactly_while_it_runs_a_task(self) -> None:
        """The lifecycle read off the log (as the agent_events read model folds it; a
        failure is the TaskFailed the host wrote, witnessed before the scheduler saw
        it) agrees with the scheduler: last state busy iff the agent runs a task. A
        registration says where an agent runs, not what it does (a host restarted
        while its agent ran a task runs it still); a failure report about a task the
        agent does not run moves nothing."""
        failures: dict[int, list[Event]] = {}
        for at, entry in self.h.answers:
            if entry.subject_type == "task.failed":
                assert entry.task_id is not None
                assert entry.agent_id is not None
                failures.setdefault(at, []).append(
                    TaskFailed(
                        task_id=entry.task_id,
                        agent_id=entry.agent_id,
                        attempt=entry.attempt or 0,
                        error_type=entry.detail or "E",
                        error_message="",
                        deliberation_id=None,
                    )
                )
        now: dict[str, AgentNow] = {}
        for at, event in enumerate([*self.h.log, None]):
            for fact in [*failures.get(at, []), *([event] if event is not None else [])]:
                for change in transitions(fact):
                    now[change.agent_id] = fold(now.get(change.agent_id), change)
        for agent_id in self.state.agents:
            running = self.state.assignments.get(agent_id)
            said = now.get(agent_id)
            assert (said.task_id if said is not None else None) == running, (agent_id, said)
            assert (said is not None and said.state == "busy") == (running is not None)

    @invariant()
    def folding_every_record_twice_changes_nothing(self) -> None:
        doubled = [e for event in self.h.log for e in (event, event)]
        assert_same_state(self.state, recovered(doubled, self._empty()))

    def _empty(self) -> SchedulerState:
        return SchedulerState(capacity=self.state.capacity)


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Hypothesis shrinks a failure for up to 300 s, pytest's default timeout here: past it
# the run would end with a FlakyStrategyDefinition instead of the shrunk failing steps.
TestScheduler = pytest.mark.timeout(900)(SchedulerMachine.TestCase)


# -- Focused examples and properties -------------------------------------------------------


AT_ONCE = RetryPolicy(backoff_ms=0)


def submit(
    task_id: str,
    pool: str = "p0",
    priority: Priority = Priority.NORMAL,
    agent_id: str | None = None,
    max_attempts: int = 1,
    retry: RetryPolicy = AT_ONCE,
    depends_on: tuple[str, ...] = (),
) -> TaskSubmitted:
    """A submission; retries at once unless a retry policy is given."""
    return TaskSubmitted(
        task_id=task_id,
        pool=pool,
        priority=priority,
        input=f"in {task_id}",
        agent_id=agent_id,
        max_attempts=max_attempts,
        **retry.as_fields(),
        depends_on=list(depends_on),
    )


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(1, 4),
    registered=st.lists(st.sampled_from(AGENTS_BY_POOL["p0"]), min_size=1, unique=True),
    backlog=st.lists(
        st.tuples(PRIORITIES, st.none() | st.sampled_from(AGENTS_BY_POOL["p0"])),
        min_size=1,
        max_size=10,
    ),
    data=st.data(),
)
def test_priority_holds_for_a_backlog_released_by_resume(
    capacity: int,
    registered: list[str],
    backlog: list[tuple[Priority, str | None]],
    data: st.DataObject,
) -> None:
    """Harness.schedule checks, at every call, that nothing dispatched is worse than a
    task left queued that could have run (untargeted, or targeted at an idle agent)."""
    h = Harness(capacity)
    for agent in registered:
        h.register(agent)
    h.halt()
    for n, (priority, target) in enumerate(backlog):
        h.command(submit(f"t{n}", priority=priority, agent_id=target))
    h.resume()
    h.drive(lambda task: data.draw(st.booleans(), label=f"{task.task_id} fails"))
    assert h.state.tasks == {}
    assert all(status_of(h.state, f"t{n}") in TERMINAL for n in range(len(backlog)))


def test_default_capacity_is_72_and_holds() -> None:
    h = Harness()
    assert h.state.capacity == DEFAULT_CAPACITY == 72
    for n in range(100):
        h.fact(AgentRegistered(agent_id=f"agent-{n:03}", pool="p0", host_id="h", agent_ref="m:f"))
    dispatched = [
        e
        for n in range(100)
        for e in h.command(submit(f"task-{n:03}"))
        if isinstance(e, TaskDispatched)
    ]
    assert len(dispatched) == 72
    assert h.state.pools["p0"].in_flight == 72
    h.finish(h.dispatched()[0], failed=False)
    assert h.state.pools["p0"].in_flight == 72
    statuses = Counter(status_of(h.state, f"task-{n:03}") for n in range(100))
    assert statuses == {TaskStatus.COMPLETED: 1, TaskStatus.DISPATCHED: 72, TaskStatus.QUEUED: 27}


@settings(max_examples=40, deadline=None)
@given(st.lists(PRIORITIES, min_size=1, max_size=12))
def test_halted_schedule_dispatches_nothing_and_resume_serves_by_priority(
    priorities: list[Priority],
) -> None:
    h = Harness(capacity=2)
    for agent in AGENTS_BY_POOL["p0"]:
        h.register(agent)
    h.halt()
    for n, priority in enumerate(priorities):
        assert [
            e
            for e in h.command(submit(f"t{n}", priority=priority))
            if isinstance(e, TaskDispatched)
        ] == []
        assert schedule(h.state, h.now) == []
    dispatched = h.resume()
    expected = sorted(range(len(priorities)), key=lambda n: (int(priorities[n]), n))[:2]
    assert [d.task_id for d in dispatched] == [f"t{n}" for n in expected]


def test_retries_fail_twice_then_complete_on_attempt_3() -> None:
    h = Harness()
    h.register("a0")
    events = h.command(submit("t", max_attempts=3))
    assert [type(e) for e in events] == [TaskQueued, TaskDispatched]
    attempts = [events[1].attempt]  # type: ignore[union-attr]
    for _ in range(2):
        _, events = h.finish(h.state.tasks["t"], failed=True)
        assert [type(e) for e in events] == [TaskQueued, TaskDispatched]
        attempts.append(events[1].attempt)  # type: ignore[union-attr]
    entry, events = h.finish(h.state.tasks["t"], failed=False)
    assert attempts == [1, 2, 3]
    assert events == [
        TaskCompleted(
            task_id="t",
            agent_id="a0",
            output_event_id=entry.subject_event_id,
            witness_sequence=entry.sequence,
        )
    ]
    assert status_of(h.state, "t") is TaskStatus.COMPLETED
    assert "t" not in h.state.tasks  # finished tasks leave the live state
    assert h.command(entry) == []
    assert h.command(submit("t", max_attempts=3)) == []


def test_an_attempt_without_answer_by_its_deadline_is_stalled_and_runs_elsewhere() -> None:
    h = Harness()
    h.register("a0", host_id="dead")
    first = h.command(submit("t", max_attempts=2))[1]
    assert isinstance(first, TaskDispatched)
    assert first.deadline == h.now + ANSWER_US
    h.register("a1", host_id="alive")  # the harness's clock moves 1 ms a step
    assert h.tick(ANSWER_US - 2000) == []  # not yet: 1 ms short of the deadline
    stall, retry, again = h.tick(1000)
    assert stall == TaskStalled(
        task_id="t",
        agent_id="a0",
        host_id="dead",
        attempt=1,
        reason="attempt 1 of 2 stalled: no answer by its deadline",
    )
    assert isinstance(retry, TaskQueued)
    assert isinstance(again, TaskDispatched)
    assert (again.agent_id, again.attempt) == ("a1", 2)  # not the agent that stalled
    assert "a0" in h.state.suspects  # no work for it until it is heard from again
    _, events = h.finish(h.state.tasks["t"], failed=False)
    assert [type(e) for e in events] == [TaskCompleted]
    assert h.state.pools["p0"].in_flight == 0


@pytest.mark.parametrize("subject_type", ["agent.output", "task.failed"])
def test_a_stalled_agent_whose_late_answer_is_witnessed_gets_work_again(
    subject_type: str,
) -> None:
    """An answer held back (e.g. behind a dead host's open transaction) stalls a healthy
    agent; its answer, witnessed late, completes nothing but shows the agent is back."""
    h = Harness()
    h.register("a0", host_id="h0")
    h.command(submit("t", max_attempts=2))
    h.tick(ANSWER_US)  # stalled; queued again with no agent to take it
    assert h.dispatched() == []
    late = h.command(h.entry(subject_type, "t", "a0", attempt=1))
    assert late[0] == AgentReinstated(agent_id="a0", host_id="h0")
    assert [(d.task_id, d.agent_id, d.attempt) for d in late[1:]] == [("t", "a0", 2)]
    assert "a0" not in h.state.suspects
    assert h.command(h.entry(subject_type, "t", "a0", attempt=1)) == []  # once


def test_a_late_answer_of_an_agent_lost_with_its_host_waits_for_the_host() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.command(submit("t", max_attempts=2))
    h.tick(10_000)  # h0 lost, t stalled with it
    assert h.command(h.entry("agent.output", "t", "a0", attempt=1)) == []
    assert "a0" in h.state.suspects  # its host's next beat brings it back


def test_a_stalled_last_attempt_dead_letters_the_task_with_the_reason() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t"))
    stall, dead = h.tick(ANSWER_US)
    assert isinstance(stall, TaskStalled)
    assert dead == TaskDeadLettered(
        task_id="t",
        agent_id="a0",
        attempts=1,
        reason="attempt 1 of 1 stalled: no answer by its deadline",
        witness_sequence=None,
    )
    assert status_of(h.state, "t") is TaskStatus.DEAD_LETTERED
    assert next_due(h.state) is None


def test_an_agent_that_stalled_works_again_once_registered_again() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t1", max_attempts=2))
    h.tick(ANSWER_US)  # stalled, queued again, but no agent may take it
    assert h.dispatched() == []
    assert h.command(submit("t2")) == [
        TaskQueued(
            task_id="t2",
            pool="p0",
            priority=Priority.NORMAL,
            input="in t2",
            agent_id=None,
            max_attempts=1,
            deliberation_id=None,
            sequence=3,
            retry_backoff_ms=0,
            fairness_key="",
            turn=3,
        )
    ]
    dispatched = h.register("a0", host_id="h0-restarted")
    assert h.log[-2:-1] == [AgentReinstated(agent_id="a0", host_id="h0-restarted")]
    assert [(d.task_id, d.attempt) for d in dispatched] == [("t1", 2)]


def test_third_failure_of_three_attempts_dead_letters_with_attribution() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t", max_attempts=3))
    for _ in range(2):
        h.finish(h.state.tasks["t"], failed=True)
    entry, events = h.finish(h.state.tasks["t"], failed=True)
    assert events == [
        TaskDeadLettered(
            task_id="t", agent_id="a0", attempts=3, reason="Boom", witness_sequence=entry.sequence
        )
    ]
    assert status_of(h.state, "t") is TaskStatus.DEAD_LETTERED
    assert h.command(entry) == []


def test_a_failed_attempt_waits_out_its_backoff_without_holding_its_agent() -> None:
    h = Harness()
    h.register("a0")
    policy = RetryPolicy(backoff_ms=100, multiplier=2.0, max_backoff_ms=150, jitter=0.0)
    h.command(submit("t", max_attempts=4, retry=policy))
    decided_at = h.now + 1000  # the harness's clock moves 1 ms per command
    _, events = h.finish(h.state.tasks["t"], failed=True)
    assert events == [
        TaskRetryScheduled(
            task_id="t", agent_id="a0", attempt=1, due=decided_at + 100_000, reason="Boom"
        )
    ]
    assert isinstance(events[0], TaskRetryScheduled)
    due = events[0].due
    assert next_due(h.state) == due
    other = h.command(submit("other"))  # the agent and the capacity are free meanwhile
    assert [(d.task_id, d.agent_id) for d in other[1:]] == [("other", "a0")]
    h.finish(h.state.tasks["other"], failed=False)
    assert h.tick(due - 1 - h.now) == []  # not yet
    requeued, dispatched = h.tick(1)
    assert isinstance(requeued, TaskQueued)
    assert requeued.task_id == "t"
    assert isinstance(dispatched, TaskDispatched)
    assert (dispatched.task_id, dispatched.attempt) == ("t", 2)
    decided_at = h.now + 1000
    _, events = h.finish(h.state.tasks["t"], failed=True)
    assert events[0] == TaskRetryScheduled(
        task_id="t", agent_id="a0", attempt=2, due=decided_at + 150_000, reason="Boom"
    ), "200 ms capped at 150"
    _, restored = _round_trip(h.state)  # the wait survives a restart
    assert next_due(restored) == decided_at + 150_000
    assert restored.tasks["t"].status is TaskStatus.RETRYING


def test_a_permanent_failure_is_dead_lettered_at_once_whatever_attempts_remain() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t", max_attempts=5))
    entry = h.entry("task.failed", "t", "a0", "OutputRejected (permanent)", attempt=1)
    assert h.command(entry) == [
        TaskDeadLettered(
            task_id="t",
            agent_id="a0",
            attempts=1,
            reason="permanent failure: OutputRejected (permanent)",
            witness_sequence=entry.sequence,
        )
    ]


def test_a_stalled_attempt_is_retried_after_its_backoff() -> None:
    h = Harness()
    h.register("a0")
    h.register("a1")
    h.command(submit("t", max_attempts=2, retry=RetryPolicy(backoff_ms=5, jitter=0.0)))
    decided_at = h.now + ANSWER_US
    stall, retry = h.tick(ANSWER_US)
    assert isinstance(stall, TaskStalled)
    assert retry == TaskRetryScheduled(
        task_id="t", agent_id=stall.agent_id, attempt=1, due=decided_at + 5_000, reason=stall.reason
    )
    assert h.tick(decided_at + 4_999 - h.now) == []
    requeued, dispatched = h.tick(1)
    assert isinstance(requeued, TaskQueued)
    assert isinstance(dispatched, TaskDispatched)
    assert (dispatched.attempt, dispatched.agent_id) == (2, "a1"), "not on the stalled agent"


@settings(max_examples=200, deadline=None)
@given(
    policy=st.builds(
        RetryPolicy,
        backoff_ms=st.integers(0, 10_000),
        multiplier=st.floats(1.0, 10.0),
        max_backoff_ms=st.integers(10_000, 100_000),
        jitter=st.floats(0.0, 1.0),
    ),
    task_id=st.text(max_size=8),
    attempt=st.integers(1, 200),
)
@example(  # slow growth: still below the cap after 60 attempts
    policy=RetryPolicy(backoff_ms=1, multiplier=1.125, max_backoff_ms=10_000, jitter=0.0),
    task_id="",
    attempt=62,
)
def test_backoff_grows_to_its_cap_within_its_jitter(
    policy: RetryPolicy, task_id: str, attempt: int
) -> None:
    assert policy.invalid() is None
    delay = policy.delay_us(task_id, attempt)
    assert delay == policy.delay_us(task_id, attempt), "deterministic: replays decide the same"
    if policy.backoff_ms == 0:
        assert delay == 0
        return
    base = min(policy.max_backoff_ms, policy.backoff_ms * policy.multiplier ** (attempt - 1))
    assert base * 1000 * (1 - policy.jitter) - 1 <= delay <= base * 1000 * (1 + policy.jitter) + 1


def test_retry_policies_that_make_no_sense_are_refused() -> None:
    assert RetryPolicy(backoff_ms=-1).invalid() == (
        "retry_backoff_ms must be 0-31,622,400,000 (a year)"
    )
    assert RetryPolicy(multiplier=0.5).invalid() == "retry_multiplier must be between 1 and 1000"
    assert RetryPolicy(backoff_ms=5000, max_backoff_ms=10).invalid() == (
        "retry_backoff_max_ms must be at least retry_backoff_ms"
    )
    assert RetryPolicy(jitter=1.5).invalid() == "retry_jitter must be between 0 and 1"
    spread = {RetryPolicy(jitter=0.5).delay_us(f"t{i}", 1) for i in range(50)}
    assert len(spread) > 40, "tasks that failed together come back spread out"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    capacity=st.integers(1, 14),
    explicit=st.booleans(),
    others=st.integers(0, 3),
)
def test_deliberation_gives_each_agent_its_own_task(
    n: int, capacity: int, explicit: bool, others: int
) -> None:
    h = Harness(capacity)
    agents = [f"member-{i:02}" for i in range(n)]
    for agent in agents:
        h.fact(AgentRegistered(agent_id=agent, pool="council", host_id="h", agent_ref="m:f"))
    for i in range(others):
        h.fact(
            AgentRegistered(agent_id=f"other-{i}", pool="elsewhere", host_id="h", agent_ref="m:f")
        )
    request = DeliberationRequested(
        deliberation_id="d",
        pool="council",
        priority=Priority.HIGH,
        motion="m",
        agent_ids=agents if explicit else [],
    )
    events = h.command(request)
    queued = [e for e in events if isinstance(e, TaskQueued)]
    assert sorted(q.agent_id or "" for q in queued) == agents
    assert [q.sequence for q in queued] == list(range(1, n + 1))
    assert {q.task_id for q in queued} == {deliberation_task_id("d", a) for a in agents}
    assert h.command(request) == []
    while running := h.dispatched():
        for task in running:
            h.finish(task, failed=False)
    dispatches = [e for e in h.log if isinstance(e, TaskDispatched)]
    assert len(dispatches) == n
    for d in dispatches:
        assert d.task_id == deliberation_task_id("d", d.agent_id)
        assert d.deliberation_id == "d"
    assert h.state.tasks == {}
    assert all(status_of(h.state, d.task_id) is TaskStatus.COMPLETED for d in dispatches)
    assert h.command(request) == []


def test_witness_entries_of_halts_and_unknown_tasks_decide_nothing() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t"))
    assert decide(h.state, h.entry("system.halt"), h.now) == []
    assert decide(h.state, h.entry("agent.output", "nope", "a0"), h.now) == []
    assert decide(h.state, h.entry("something.else", "t", "a0"), h.now) == []


def test_an_agent_moved_to_another_pool_serves_that_pool_only() -> None:
    h = Harness()
    h.register("a0")
    h.halt()
    h.command(submit("t0", pool="p0"))
    h.command(submit("t1", pool="p1"))
    h.register("a0", pool="p1")
    assert [(d.task_id, d.agent_id) for d in h.resume()] == [("t1", "a0")]
    h.finish(h.state.tasks["t1"], failed=False)
    assert h.dispatched() == []  # a0 is idle, but in p1
    assert [d.task_id for d in h.register("a0", pool="p0")] == ["t0"]


def test_a_busy_agent_that_moves_is_freed_into_its_new_pool() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t0", pool="p0"))
    h.register("a0", pool="p1")
    h.command(submit("t2", pool="p0"))
    h.command(submit("t3", pool="p1"))
    assert h.dispatched()[0].task_id == "t0"
    _, events = h.finish(h.state.tasks["t0"], failed=False)
    assert [(type(e), e.task_id) for e in events] == [(TaskCompleted, "t0"), (TaskDispatched, "t3")]
    assert h.state.pools["p0"].in_flight == 0
    assert status_of(h.state, "t2") is TaskStatus.QUEUED


# -- Bounded memory: the dedup windows ---------------------------------------------------


def test_finished_tasks_are_remembered_within_the_dedup_window_only() -> None:
    h = Harness(dedup_window=2)
    h.register("a0")
    for n in range(3):
        h.command(submit(f"t{n}"))
        h.finish(h.state.tasks[f"t{n}"], failed=False)
    assert h.state.tasks == {}
    assert [status_of(h.state, f"t{n}") for n in range(3)] == [
        None,  # the oldest, forgotten
        TaskStatus.COMPLETED,
        TaskStatus.COMPLETED,
    ]
    assert h.command(submit("t2")) == []
    # Beyond the window a submission is new again: idempotence holds within the window.
    assert [type(e) for e in h.command(submit("t0"))] == [TaskQueued, TaskDispatched]
    assert_same_state(h.state, recovered(h.log, SchedulerState(dedup_window=2)))


def test_expanded_deliberations_are_remembered_within_the_dedup_window_only() -> None:
    h = Harness(dedup_window=1)
    for agent in ("a0", "a1"):
        h.register(agent)
    h.halt()

    def request(deliberation_id: str, agent_id: str) -> DeliberationRequested:
        return DeliberationRequested(
            deliberation_id=deliberation_id,
            pool="p0",
            priority=Priority.NORMAL,
            motion="m",
            agent_ids=[agent_id],
        )

    assert len(h.command(request("d0", "a0"))) == 1
    assert len(h.command(request("d1", "a1"))) == 1
    assert list(h.state.deliberations.items()) == [("d1", None)]
    assert h.command(request("d1", "a1")) == []
    assert h.command(request("d0", "a0")) == []  # forgotten, but its task is still live


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 3),
    backlog=st.lists(st.tuples(POOLS, PRIORITIES, st.booleans()), max_size=8),
    data=st.data(),
)
def test_small_windows_forget_oldest_first_and_recovery_agrees(
    window: int, backlog: list[tuple[str, Priority, bool]], data: st.DataObject
) -> None:
    h = Harness(capacity=2, dedup_window=window)
    for agent_id in sorted(POOL_OF):
        h.register(agent_id)
    for n, (pool, priority, targeted) in enumerate(backlog):
        target = data.draw(st.sampled_from(AGENTS_BY_POOL[pool])) if targeted else None
        h.command(submit(f"t{n}", pool=pool, priority=priority, agent_id=target, max_attempts=2))
        if data.draw(st.booleans(), label="snapshot"):
            h.take_snapshot()
    h.drive(lambda task: data.draw(st.booleans(), label=f"{task.task_id} fails"))
    finished = [e.task_id for e in h.log if isinstance(e, TaskCompleted | TaskDeadLettered)]
    assert [t for t in finished if status_of(h.state, t) is not None] == finished[-window:]
    for log in interleavings(h.log):
        assert_same_state(h.state, recovered(log, SchedulerState(capacity=2, dedup_window=window)))
    if h.snapshot is not None:
        snapshot, covered = h.snapshot
        for tail in interleavings(h.log[covered:]):
            assert_same_state(h.state, recovered(tail, from_snapshot(snapshot)))


# -- Dependencies and cancellation ---------------------------------------------------


def test_a_task_waits_for_all_its_dependencies_then_runs_in_its_submission_place() -> None:
    h = Harness(capacity=2)
    h.register("a0")
    h.register("a1")
    h.command(submit("a"))
    h.command(submit("b"))
    [queued] = h.command(submit("c", depends_on=("a", "b")))
    assert isinstance(queued, TaskQueued)
    assert (queued.depends_on, queued.waiting_for, queued.sequence) == (["a", "b"], ["a", "b"], 3)
    assert status_of(h.state, "c") is TaskStatus.WAITING
    h.command(submit("d"))  # later, with nothing to wait for: queued behind the pool
    _, events = h.finish(h.state.tasks["a"], failed=False)
    assert [type(e) for e in events] == [TaskCompleted, TaskDispatched]  # d takes a0
    assert h.state.tasks["c"].waiting_for == {"b"}
    _, events = h.finish(h.state.tasks["b"], failed=False)
    _completed, released, dispatched = events
    assert isinstance(released, TaskQueued)
    assert (released.task_id, released.waiting_for, released.sequence) == ("c", [], 3)
    assert isinstance(dispatched, TaskDispatched)
    assert dispatched.task_id == "c"


def test_a_queued_task_ranks_by_its_submission_once_released() -> None:
    h = Harness(capacity=1)
    h.register("a0")
    h.command(submit("a"))
    h.command(submit("c", depends_on=("a",)))
    h.command(submit("d"))
    _, events = h.finish(h.state.tasks["a"], failed=False)
    assert [(type(e), e.task_id) for e in events] == [
        (TaskCompleted, "a"),
        (TaskQueued, "c"),
        (TaskDispatched, "c"),  # submitted before d
    ]


def test_a_dead_letter_fails_its_dependents_transitively_naming_where_it_began() -> None:
    h = Harness(capacity=1)
    h.register("a0")
    h.command(submit("a"))
    h.command(submit("b", depends_on=("a",)))
    h.command(submit("c", depends_on=("b",)))
    h.command(submit("other"))
    _, events = h.finish(h.state.tasks["a"], failed=True)
    dead, b_failed, c_failed, next_dispatch = events
    assert isinstance(dead, TaskDeadLettered)
    assert b_failed == TaskDependencyFailed(
        task_id="b", dependency="a", culprit="a", reason="dependency 'a' was dead-lettered"
    )
    assert c_failed == TaskDependencyFailed(
        task_id="c",
        dependency="b",
        culprit="a",
        reason="dependency 'b' failed a dependency; it began at 'a'",
    )
    assert isinstance(next_dispatch, TaskDispatched)
    assert next_dispatch.task_id == "other"
    assert h.state.dependents == {}
    # A task submitted later on a failed dependency fails at once.
    late = h.command(submit("e", depends_on=("c",)))
    assert [type(e) for e in late] == [TaskQueued, TaskDependencyFailed]
    assert status_of(h.state, "e") is TaskStatus.DEPENDENCY_FAILED


def test_a_completed_dependency_does_not_hold_back_a_later_submission() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("a"))
    h.finish(h.state.tasks["a"], failed=False)
    queued, dispatched = h.command(submit("b", depends_on=("a",)))
    assert isinstance(queued, TaskQueued)
    assert queued.waiting_for == []
    assert isinstance(dispatched, TaskDispatched)


def test_unknown_dependencies_and_self_dependencies_are_refused() -> None:
    h = Harness()
    h.command(submit("a"))
    assert refusal(h.state, submit("b", depends_on=("a",))) is None
    assert refusal(h.state, submit("b", depends_on=("a", "nope"))) == (
        "depends on 1 unknown task(s): 'nope'; submit dependencies first"
    )
    assert refusal(h.state, submit("a", depends_on=("nope",))) is None  # a duplicate
    assert invalid_command(submit("b", depends_on=("b",))) == "task 'b' cannot depend on itself"
    assert invalid_command(submit("b", depends_on=("a", "a"))) == (
        "depends_on must not repeat a task"
    )
    # Without the refusal, decide() never lets an unknown dependency wait for ever.
    events = h.command(submit("b", depends_on=("nope",)))
    assert [type(e) for e in events] == [TaskQueued, TaskDependencyFailed]


def test_cancelling_frees_a_running_tasks_agent_and_a_queued_tasks_place() -> None:
    h = Harness(capacity=1)
    h.register("a0", host_id="h7")
    h.command(submit("run"))
    h.command(submit("wait"))
    h.command(submit("after", depends_on=("run",)))
    events = h.command(CancelRequested(task_id="run", reason="user asked"))
    cancelled, dependent, dispatched = events
    assert cancelled == TaskCancelled(
        task_id="run", agent_id="a0", host_id="h7", attempt=1, reason="cancelled: user asked"
    )
    assert isinstance(dependent, TaskDependencyFailed)
    assert dependent.culprit == "run"
    assert isinstance(dispatched, TaskDispatched)
    assert dispatched.task_id == "wait"
    assert h.command(CancelRequested(task_id="wait")) == [
        TaskCancelled(task_id="wait", agent_id="a0", host_id="h7", attempt=1, reason="cancelled")
    ]
    h.command(submit("queued"))  # capacity is free again: it runs
    assert status_of(h.state, "queued") is TaskStatus.DISPATCHED
    # The cancelled attempt's late answer is witnessed and changes nothing.
    assert h.command(h.entry("agent.output", "run", "a0", attempt=1)) == []
    assert refusal(h.state, CancelRequested(task_id="run")) is None  # idempotent
    assert h.command(CancelRequested(task_id="run")) == []
    h.finish(h.state.tasks["queued"], failed=False)
    assert refusal(h.state, CancelRequested(task_id="queued")) == (
        "task 'queued' is already completed"
    )
    assert refusal(h.state, CancelRequested(task_id="x")) == (
        "no task 'x' is known to the scheduler"
    )


def test_cancelling_a_deliberation_cancels_each_of_its_unfinished_tasks() -> None:
    h = Harness(capacity=1)
    for agent in ("a0", "a1", "a2"):
        h.register(agent)
    h.command(
        DeliberationRequested(
            deliberation_id="d", pool="p0", priority=Priority.NORMAL, motion="m", agent_ids=[]
        )
    )
    h.finish(h.state.tasks["d/a0"], failed=False)
    assert sorted(h.state.by_deliberation["d"]) == ["d/a1", "d/a2"]
    events = h.command(CancelRequested(deliberation_id="d"))
    assert [(type(e), e.task_id) for e in events] == [
        (TaskCancelled, "d/a1"),
        (TaskCancelled, "d/a2"),
    ]
    assert status_of(h.state, "d/a0") is TaskStatus.COMPLETED
    assert h.state.by_deliberation == {}
    assert refusal(h.state, CancelRequested(deliberation_id="d")) == (
        "deliberation 'd' has no unfinished task"
    )
    assert invalid_command(CancelRequested()) is not None
    assert invalid_command(CancelRequested(task_id="d/a0")) is None


def test_a_task_not_started_in_time_or_not_finished_by_its_deadline_expires() -> None:
    h = Harness(capacity=1)
    h.register("a0", host_id="h3")
    h.command(submit("busy"))  # holds the only place
    late = dataclasses.replace(submit("late"), start_within_ms=10)
    accepted_at = h.now + 1000  # the harness's clock moves 1 ms per command and schedule
    [queued] = h.command(late)
    assert isinstance(queued, TaskQueued)
    assert queued.start_by == accepted_at + 10_000
    h.command(submit("after", depends_on=("late",)))
    assert next_due(h.state) == queued.start_by
    assert h.tick(6_000) == []  # 1 ms short
    expired, dependent = h.tick(1_000)
    assert expired == TaskExpired(
        task_id="late",
        agent_id=None,
        host_id=None,
        attempt=0,
        reason="expired: not started within its schedule-to-start limit",
    )
    assert isinstance(dependent, TaskDependencyFailed)
    assert dependent.reason == "dependency 'late' expired"
    # Started in time, a start_by is over; a finish_by still applies to the running task.
    h.finish(h.state.tasks["busy"], failed=False)
    bounded = dataclasses.replace(
        submit("bounded"), start_within_ms=10, finish_by=h.now + 1000 + 50_000
    )
    queued, dispatched = h.command(bounded)
    assert isinstance(dispatched, TaskDispatched)
    assert h.state.expiries.rank("bounded") == (bounded.finish_by,)
    [running_expired] = h.tick(50_000)
    assert running_expired == TaskExpired(
        task_id="bounded",
        agent_id="a0",
        host_id="h3",
        attempt=1,
        reason="expired: not finished by its deadline",
    )
    assert status_of(h.state, "bounded") is TaskStatus.EXPIRED
    assert h.state.pools.get("p0") is None or h.state.pools["p0"].in_flight == 0
    assert invalid_command(dataclasses.replace(submit("x"), start_within_ms=0)) is not None


def test_a_deliberation_never_waits_for_ever_for_agents_that_are_not_there() -> None:
    h = Harness()
    everyone = DeliberationRequested(
        deliberation_id="d", pool="p1", priority=Priority.HIGH, motion="m", agent_ids=[]
    )
    assert refusal(h.state, everyone) == "pool 'p1' has no registered agent to put the motion to"
    h.register("a3")  # in p1
    assert refusal(h.state, everyone) is None
    named = dataclasses.replace(everyone, deliberation_id="n", agent_ids=["a3", "a4"])
    assert refusal(h.state, named) is None  # named agents are waited for, a while
    events = h.command(named)
    queued = {e.task_id: e for e in events if isinstance(e, TaskQueued)}
    assert queued["n/a3"].start_by is None  # registered: no limit
    assert queued["n/a4"].start_by == h.now - 1000 + REGISTRATION_GRACE_US
    h.finish(h.state.tasks["n/a3"], failed=False)
    [expired] = h.tick(REGISTRATION_GRACE_US)
    assert expired == TaskExpired(
        task_id="n/a4",
        agent_id=None,
        host_id=None,
        attempt=0,
        reason="expired: agent 'a4' is not registered in 'p1'",
    )


# -- Snapshots and timers ------------------------------------------------------------


def test_a_snapshot_is_versioned_and_anything_else_is_refused() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t0"))
    h.command(submit("t1", priority=Priority.HIGH, agent_id="a1"))
    snapshot, restored = _round_trip(h.state)
    assert snapshot["version"] == SNAPSHOT_VERSION == 8
    assert_same_state(h.state, restored)
    # A version 7 snapshot (before weights) still reads: one task took each key's turn.
    seven = {k: v for k, v in to_snapshot(h.state).items() if k != "weights"}
    seven = {
        **seven,
        "version": 7,
        "turns": {name: [virtual, last] for name, (virtual, last, _) in seven["turns"].items()},
    }
    assert_same_state(h.state, from_snapshot(seven))
    # A version 6 snapshot (before hosts could leave) still reads: none is leaving.
    h.beat("h0", lease_us=5_000)
    h.leave("h0", drain_us=1_000)
    six = to_snapshot(h.state)
    six = {**six, "version": 6, "hosts": [row[:5] for row in six["hosts"]]}
    assert from_snapshot(six).hosts["h0"].leaving_until is None
    leaving = h.state.hosts["h0"].leaving_until
    assert leaving is not None
    assert from_snapshot(to_snapshot(h.state)).hosts["h0"].leaving_until == leaving
    # A version 5 snapshot (before fairness) still reads: its tasks take turn 0.
    fields = len(snapshot["task_fields"]) - 4
    old = {
        **{k: v for k, v in snapshot.items() if k not in ("turns", "limits", "aging")},
        "version": 5,
        "task_fields": snapshot["task_fields"][:fields],
        "tasks": [row[:fields] for row in snapshot["tasks"]],
    }
    assert {t.task_id: t.turn for t in from_snapshot(old).tasks.values()} == {"t0": 0, "t1": 0}
    with pytest.raises(ValueError, match="version 4"):
        from_snapshot({**snapshot, "version": 4})  # before circuit breakers
    with pytest.raises(ValueError, match="not a scheduler snapshot"):
        from_snapshot({"version": SNAPSHOT_VERSION, "capacity": 72})
    with pytest.raises(ValueError, match="task fields"):
        from_snapshot({**snapshot, "task_fields": snapshot["task_fields"][::-1]})


def test_a_snapshot_restored_with_another_capacity_schedules_by_it() -> None:
    h = Harness(capacity=1)
    for agent in ("a0", "a1"):
        h.register(agent)
    h.command(submit("t0"))
    h.command(submit("t1"))
    assert schedule(h.state, h.now) == []  # the pool is full
    wider = from_snapshot(to_snapshot(h.state), capacity=2)
    assert [(d.task_id, d.agent_id) for d in schedule(wider, h.now)] == [("t1", "a1")]


def test_timers_come_due_in_order_without_being_consumed_and_survive_a_snapshot() -> None:
    state = SchedulerState()
    assert next_due(state) is None
    assert due_timers(state, 2**62) == []
    for key, due in [("retry:t2", 300), ("lease:t1", 100), ("retry:t3", 300), ("lease:t4", 500)]:
        state.timers.add(key, (due,))
    assert next_due(state) == 100
    assert due_timers(state, 99) == []
    assert due_timers(state, 300) == ["lease:t1", "retry:t2", "retry:t3"]
    assert next_due(state) == 100, "due_timers() is pure"
    state.timers.discard("lease:t1")
    state.timers.add("retry:t3", (50,))  # moved
    assert next_due(state) == 50
    assert due_timers(state, 300) == ["retry:t3", "retry:t2"]
    _, restored = _round_trip(state)
    assert restored.timers == state.timers
    assert due_timers(restored, 2**62) == ["retry:t3", "retry:t2", "lease:t4"]


# -- The ordered containers --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.none() | st.integers(0, 4))))
def test_a_ranked_set_walks_its_members_in_rank_order(ops: list[tuple[str, int | None]]) -> None:
    ranked, model = RankedSet(), dict[str, tuple[int, ...]]()
    for item, rank in ops:
        if rank is None:
            ranked.discard(item)
            model.pop(item, None)
        else:
            ranked.add(item, (rank,))
            model[item] = (rank,)
        expected = sorted((r, i) for i, r in model.items())
        assert list(ranked) == expected
        assert list(ranked) == expected, "a walk leaves the set as it was"
        assert ranked.first() == (expected[0] if expected else None)
        assert sorted(ranked.members()) == expected
        assert len(ranked) == len(model)
        assert ranked == RankedSet(expected)


def test_a_ranked_set_stays_linear_in_its_members_under_churn() -> None:
    ranked = RankedSet()
    for n in range(10_000):
        ranked.add(f"x{n}", (n % 7, n))
        if n >= 10:
            ranked.discard(f"x{n - 10}")  # mostly from inside the heap, not its top
    assert len(ranked) == 10
    assert len(ranked._heap) <= 2 * len(ranked) + 33  # private, but the bound is the point


def test_a_recent_window_forgets_the_oldest_key_first() -> None:
    window = Recent[int](2)
    window.add("a", 1)
    window.add("b", 2)
    window.add("a", 3)  # already remembered: keeps its age
    window.add("c", 4)
    assert list(window.items()) == [("b", 2), ("c", 4)]
    assert "a" not in window
    assert window.get("b") == 2


# -- Regressions: bugs these properties found -------------------------------------------


def test_stale_failure_entry_after_redispatch_to_the_same_agent_yields_nothing() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t", max_attempts=2))
    entry, events = h.finish(h.state.tasks["t"], failed=True)
    assert entry.attempt == 1
    assert [type(e) for e in events] == [TaskQueued, TaskDispatched]
    assert h.state.tasks["t"].attempt == 2
    assert h.state.tasks["t"].agent_id == "a0"
    assert h.command(entry) == []  # not a dead letter while attempt 2 runs
    assert h.state.tasks["t"].status is TaskStatus.DISPATCHED


def test_folding_a_duplicate_task_queued_changes_nothing() -> None:
    state = SchedulerState()
    for agent in ("a0", "a1"):
        evolve(state, AgentRegistered(agent_id=agent, pool="p0", host_id="h", agent_ref="m:f"))
    (queued,) = decide(state, submit("t"), 0)
    evolve(state, queued)
    evolve(state, queued)  # the same record, redelivered during recovery
    assert [d.task_id for d in schedule(state, 0)] == ["t"]


def test_recovery_does_not_depend_on_the_order_of_topics() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t1"))
    h.command(submit("t2"))
    tasks_topic = [e for e in h.log if not isinstance(e, AgentRegistered | Halt | Resume)]
    agents_topic = [e for e in h.log if isinstance(e, AgentRegistered)]
    fresh = recovered([*tasks_topic, *agents_topic], SchedulerState())
    assert_same_state(h.state, fresh)
    assert schedule(fresh, h.now) == []  # a0 is still busy with t1


def test_untargeted_task_does_not_take_the_agent_a_better_targeted_task_needs() -> None:
    h = Harness(capacity=2)
    for agent in ("a0", "a1"):
        h.register(agent)
    h.halt()
    h.command(submit("u", priority=Priority.CRITICAL))
    h.command(submit("r", priority=Priority.HIGH, agent_id="a0"))
    h.command(submit("d", priority=Priority.LOW))
    assert sorted((d.task_id, d.agent_id) for d in h.resume()) == [("r", "a0"), ("u", "a1")]


# -- Host leases ---------------------------------------------------------------------------


def test_a_host_whose_lease_runs_out_loses_its_running_attempts_to_another_host() -> None:
    h = Harness()
    h.register("a0", host_id="dead")
    h.register("a1", host_id="dead")
    h.beat("dead", lease_us=5_000)
    running = h.command(submit("t0", max_attempts=2))[1]
    assert isinstance(running, TaskDispatched)
    h.command(submit("t1"))  # its only attempt: dead-lettered with the host
    h.register("a2", host_id="alive")
    h.command(submit("t2"))  # runs on the live host
    h.beat("alive", lease_us=1_000_000)
    assert hosts_due(h.state) == h.state.hosts["dead"].expires_at
    assert h.tick(h.state.hosts["dead"].expires_at - h.now - 1) == []  # 1 µs short
    lost, *rest = h.tick(1)
    assert lost == HostLost(
        host_id="dead",
        pool="p0",
        agent_ids=["a0", "a1"],
        expires_at=h.state.hosts["dead"].expires_at,
        reason="host 'dead' sent no beat before its lease ran out",
    )
    stalls = [e for e in rest if isinstance(e, TaskStalled)]
    assert {(s.task_id, s.reason) for s in stalls} == {
        ("t0", "attempt 1 of 2 stalled: host 'dead' lost"),
        ("t1", "attempt 1 of 1 stalled: host 'dead' lost"),
    }
    assert status_of(h.state, "t1") is TaskStatus.DEAD_LETTERED
    assert h.state.tasks["t0"].status is TaskStatus.QUEUED  # a2 is busy with t2
    assert h.tick(0) == []  # judged once
    assert hosts_due(h.state) == h.state.hosts["alive"].expires_at
    _, events = h.finish(h.state.tasks["t2"], failed=False)
    again = events[-1]
    assert isinstance(again, TaskDispatched)
    assert (again.task_id, again.agent_id, again.attempt) == ("t0", "a2", 2)


def test_a_lost_host_that_beats_again_gets_work_again() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.tick(10_000)
    assert "a0" in h.state.suspects
    assert h.command(submit("t0"))[1:] == []  # nobody to run it
    dispatched = h.beat("h0", lease_us=5_000)  # it was cut off, not dead
    assert h.log[-2] == AgentReinstated(agent_id="a0", host_id="h0")
    assert [(d.task_id, d.agent_id) for d in dispatched] == [("t0", "a0")]
    assert h.beat("h0", lease_us=5_000) == []  # reinstated once


def test_an_agent_that_stalled_on_a_live_host_is_not_reinstated_by_its_beats() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=10 * ANSWER_US)
    h.command(submit("t0"))
    h.tick(ANSWER_US)  # no answer by its deadline: the agent, not the host, is suspect
    assert "a0" in h.state.suspects
    assert h.beat("h0", lease_us=10 * ANSWER_US) == []
    assert "a0" in h.state.suspects  # until its host registers it again


def test_a_leaving_host_takes_no_new_work_and_what_it_leaves_unanswered_goes_elsewhere() -> None:
    h = Harness()
    h.register("a0", host_id="old")
    h.register("a1", host_id="old")
    h.beat("old", lease_us=5_000_000)
    running = h.command(submit("t0", max_attempts=2))[1]
    assert isinstance(running, TaskDispatched)
    assert h.leave("old", drain_us=ANSWER_US // 2) == []
    until = h.state.hosts["old"].leaving_until
    assert until is not None
    assert h.command(submit("t1"))[1:] == []  # a1 is idle, but its host is leaving
    dispatched = h.register("n0", host_id="new")
    assert [(d.task_id, d.agent_id) for d in dispatched] == [("t1", "n0")]
    h.beat("new", lease_us=60_000_000)
    h.beat("old", lease_us=5_000_000)  # beats during its drain promise no more than that
    assert hosts_due(h.state) == until
    lost, *rest = h.tick(until - h.now)
    assert isinstance(lost, HostLost)
    assert lost.reason == "host 'old' left: its agents retire, its drain is over"
    assert [(s.task_id, s.attempt) for s in rest if isinstance(s, TaskStalled)] == [("t0", 1)]
    h.finish(h.state.tasks["t1"], failed=False)
    again = h.log[-1]
    assert isinstance(again, TaskDispatched)
    assert (again.task_id, again.agent_id, again.attempt) == ("t0", "n0", 2)


def test_an_attempt_its_host_left_unanswered_is_not_counted_against_the_task() -> None:
    """A graceful stop is the operator's doing: a task with one attempt, stalled because
    its host left, runs again elsewhere (one attempt more allowed), never dead-lettered;
    a host that is lost counts the attempt as before."""
    h = Harness()
    h.register("a0", host_id="old")
    h.register("n0", host_id="new")
    h.beat("old", lease_us=60_000_000)
    h.beat("new", lease_us=60_000_000)
    h.command(submit("t0"))  # a0 (the smallest id) runs it
    busy = h.command(submit("t1"))[1]
    assert isinstance(busy, TaskDispatched)
    assert busy.agent_id == "n0"
    assert h.state.tasks["t0"].agent_id == "a0"
    h.leave("old", drain_us=1_000)
    _, stall, queued = h.tick(1_000)
    assert isinstance(stall, TaskStalled)
    assert stall.reason == (
        "attempt 1 of 1 stalled: host 'old' left (not counted: one more attempt allowed)"
    )
    assert isinstance(queued, TaskQueued)
    assert queued.max_attempts == 2
    assert h.state.tasks["t0"].max_attempts == 2
    h.finish(h.state.tasks["t1"], failed=False)
    again = h.log[-1]
    assert isinstance(again, TaskDispatched)
    assert (again.task_id, again.agent_id, again.attempt) == ("t0", "n0", 2)
    h.finish(h.state.tasks["t0"], failed=False)
    assert status_of(h.state, "t0") is TaskStatus.COMPLETED


def test_a_host_started_again_after_leaving_gets_work() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.leave("h0", drain_us=1_000)
    h.tick(1_000)  # its drain is over: left
    assert h.command(submit("t0"))[1:] == []
    h.beat("h0", lease_us=5_000)  # a beat late on its way: no more than the lease judged
    assert "a0" in h.state.suspects
    dispatched = h.register("a0", host_id="h0")  # started anew
    assert [(d.task_id, d.agent_id) for d in dispatched] == [("t0", "a0")]
    assert h.state.hosts["h0"].leaving_until is None


def test_a_host_over_its_limits_gets_no_new_work_until_a_later_beat_has_room() -> None:
    h = Harness()
    h.register("a0", host_id="full")
    h.register("b0", host_id="roomy")
    running = h.command(submit("t0"))[1]
    assert isinstance(running, TaskDispatched)
    assert running.agent_id == "a0"
    over = "memory 900 MB, over its limit of 800 MB"
    assert h.beat("full", lease_us=5_000_000, over_limit=over) == []
    assert h.state.hosts["full"].over_limit == over
    second = h.command(submit("t1"))[1]
    assert isinstance(second, TaskDispatched)
    assert second.agent_id == "b0"  # the other host's agent
    assert h.command(submit("t2"))[1:] == []
    _, after = h.finish(h.state.tasks["t0"], failed=False)  # what it ran finishes
    assert [type(e) for e in after] == [TaskCompleted]  # t2 waits: a0's host is over
    _, restored = _round_trip(h.state)
    assert_same_state(h.state, restored)
    assert restored.hosts["full"].over_limit == over
    room = h.beat("full", lease_us=1_000)  # a beat with room, whatever lease it promises
    assert [(d.task_id, d.agent_id) for d in room if isinstance(d, TaskDispatched)] == [
        ("t2", "a0")
    ]


def test_host_leases_survive_a_snapshot() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.tick(10_000)
    h.register("a1", host_id="h1")
    h.beat("h1", lease_us=5_000)
    _, restored = _round_trip(h.state)
    assert_same_state(h.state, restored)
    assert restored.hosts["h0"].lost_agents == {"a0"}
    assert hosts_due(restored) == h.state.hosts["h1"].expires_at


# -- Circuit breakers ------------------------------------------------------------------------


def _logged(h: Harness, kind: type[T]) -> list[T]:
    return [e for e in h.log if isinstance(e, kind)]


def _fail_on(h: Harness, agent_id: str, task_id: str) -> list[Emitted]:
    """Submit a task only ``agent_id`` may run, and fail its one attempt."""
    h.command(submit(task_id, agent_id=agent_id))
    _, events = h.finish(h.state.tasks[task_id], failed=True)
    return events


def test_an_agent_failing_three_times_in_a_row_gets_no_work_until_its_probe_answers() -> None:
    h = Harness(breaker_failures=3)
    h.register("a0")
    h.register("a1")
    _fail_on(h, "a0", "t0")
    _fail_on(h, "a0", "t1")
    assert "a0" not in h.state.breakers
    _fail_on(h, "a0", "t2")
    opened = _logged(h, AgentCircuitOpened)
    assert opened == [
        AgentCircuitOpened(
            agent_id="a0",
            failures=3,
            until=opened[0].until,
            reason="circuit open: 3 attempts failed in a row",
        )
    ]
    assert opened[0].until == h.now + BREAK_US  # decided at the last step
    assert "a0" in h.state.breakers
    assert next_due(h.state) == opened[0].until
    # While open, untargeted work goes to a1 only, and a0's own work waits.
    h.command(submit("t3", agent_id="a0"))
    assert h.state.tasks["t3"].status is TaskStatus.QUEUED
    assert [d.agent_id for d in h.command(submit("t4")) if isinstance(d, TaskDispatched)] == ["a1"]
    h.finish(h.state.tasks["t4"], failed=False)
    dispatched = h.tick(opened[0].until - h.now - 1000)  # the next step is at `until`
    assert _logged(h, AgentCircuitHalfOpened) == [AgentCircuitHalfOpened(agent_id="a0")]
    assert [(d.task_id, d.agent_id) for d in dispatched] == [("t3", "a0")]  # the probe
    _, answered = h.finish(h.state.tasks["t3"], failed=False)
    assert AgentCircuitClosed(agent_id="a0") in answered
    assert "a0" not in h.state.probing
    assert "a0" not in h.state.failures


def test_a_failed_probe_opens_the_circuit_again_at_once() -> None:
    h = Harness(breaker_failures=2)
    h.register("a0")
    _fail_on(h, "a0", "t0")
    _fail_on(h, "a0", "t1")
    h.tick(BREAK_US)  # half-open: one probe
    assert "a0" in h.state.probing
    _fail_on(h, "a0", "t2")
    again = _logged(h, AgentCircuitOpened)[1:]
    assert [(e.failures, e.reason) for e in again] == [(1, "circuit open: its probe task failed")]


def test_an_answer_ends_a_run_of_failures() -> None:
    h = Harness(breaker_failures=3)
    h.register("a0")
    _fail_on(h, "a0", "t0")
    _fail_on(h, "a0", "t1")
    h.command(submit("t2", agent_id="a0"))
    h.finish(h.state.tasks["t2"], failed=False)
    assert "a0" not in h.state.failures
    _fail_on(h, "a0", "t3")
    assert not _logged(h, AgentCircuitOpened)


def test_no_breakers_with_a_threshold_of_zero() -> None:
    h = Harness(breaker_failures=0)
    h.register("a0")
    for i in range(10):
        _fail_on(h, "a0", f"t{i}")
    assert not _logged(h, AgentCircuitOpened)
    assert h.state.failures == {"a0": 10}


# -- Fairness and per-key limits -------------------------------------------------------


def _served_in_turn(h: Harness) -> list[str]:
    """Finish what runs, one at a time, until nothing runs: the order tasks ran in."""
    order = [t.task_id for t in h.dispatched()]
    while running := h.dispatched():
        h.finish(running[0], failed=False)
        order += [t.task_id for t in h.dispatched() if t.task_id not in order]
    return order


def test_tenants_of_equal_priority_take_turns_whatever_they_queued() -> None:
    h = Harness(capacity=1)
    for n in range(6):
        h.command(submit(f"a{n}"), tenant="acme")
    for n in range(2):
        h.command(submit(f"b{n}"), tenant="bolt")
    h.command(submit("urgent", priority=Priority.HIGH), tenant="acme")
    h.register("a0")
    # Priority first; then acme's backlog does not hold bolt back: one each in turn.
    assert _served_in_turn(h) == ["urgent", "a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_a_key_that_was_quiet_gets_no_credit_for_it() -> None:
    h = Harness(capacity=1)
    h.register("a0")
    for n in range(4):
        h.command(submit(f"a{n}", pool="p0"), tenant="acme")
    h.finish(h.dispatched()[0], failed=False)  # a0 ran alone; a1 runs now
    h.command(submit("b0"), tenant="bolt")
    h.command(submit("b1"), tenant="bolt")
    # bolt joins at the turn being served (after acme's task of that turn, which came
    # first): it does not catch up on the turns it missed.
    assert _served_in_turn(h) == ["a1", "a2", "b0", "a3", "b1"]


def test_one_tenant_alone_is_served_in_arrival_order() -> None:
    h = Harness(capacity=1)
    for n in range(5):
        h.command(submit(f"t{n}"), tenant="acme")
    h.register("a0")
    assert _served_in_turn(h) == [f"t{n}" for n in range(5)]


def test_a_key_never_has_more_than_its_limit_in_flight_and_others_use_the_rest() -> None:
    h = Harness(capacity=10)
    for agent in AGENTS_BY_POOL["p0"]:  # three agents
        h.register(agent)

    def keyed(task_id: str, key: str, limit: int) -> TaskSubmitted:
        return dataclasses.replace(submit(task_id), fairness_key=key, key_limit=limit)

    for n in range(5):
        h.command(keyed(f"c{n}", "customer-1", 2), tenant="acme")
    running = lambda: [t.task_id for t in h.dispatched()]  # noqa: E731
    assert running() == ["c0", "c1"]  # the third agent stays idle for customer-1
    h.command(keyed("d0", "customer-2", 2), tenant="acme")
    assert running() == ["c0", "c1", "d0"]
    h.command(submit("other"), tenant="acme")
    h.finish(h.state.tasks["c0"], failed=False)
    assert running() == ["c1", "c2", "d0"]  # c2's turn came before other's
    h.finish(h.state.tasks["d0"], failed=False)
    assert running() == ["c1", "c2", "other"]  # c3 would be customer-1's third
    assert h.state.pools["p0"].running == {"acme/customer-1": 2}
    # The same key under another tenant is another key, with its own room.
    h.command(keyed("x0", "customer-1", 1), tenant="xyz")
    h.finish(h.state.tasks["other"], failed=False)
    assert running() == ["c1", "c2", "x0"]
    assert_same_state(h.state, from_snapshot(to_snapshot(h.state)))
    assert _served_in_turn(h)[-2:] == ["c3", "c4"]
    assert "p0" not in h.state.pools or not h.state.pools["p0"].limits


def test_fairness_and_limits_are_validated() -> None:
    assert invalid_command(dataclasses.replace(submit("t"), key_limit=0)) == (
        "key_limit must be 1-1,000,000"
    )
    assert "fairness_key" in (
        invalid_command(dataclasses.replace(submit("t"), fairness_key="a/b")) or ""
    )
    targeted = dataclasses.replace(submit("t", agent_id="a0"), key_limit=2)
    assert "not to one agent's" in (invalid_command(targeted) or "")


def test_a_burst_released_at_once_still_keeps_each_key_to_its_limit() -> None:
    """One schedule() call with many idle agents: a key's tasks beyond its room stay
    queued while other keys' tasks behind them run."""
    h = Harness(capacity=10)
    h.halt()
    for n in range(4):
        h.command(
            dataclasses.replace(submit(f"c{n}"), fairness_key="customer-1", key_limit=2),
            tenant="acme",
        )
    h.command(submit("z", priority=Priority.LOW), tenant="acme")
    for agent in AGENTS_BY_POOL["p0"]:
        h.register(agent)
    h.resume()
    assert [t.task_id for t in h.dispatched()] == ["c0", "c1", "z"]


def test_with_aging_a_low_task_waits_a_bounded_number_of_turns() -> None:
    def low_place(aging: int | None) -> int:
        h = Harness(capacity=1)
        h.fact(PoolConfigured(pool="p0", capacity=1, reason="t", operator="op", aging_turns=aging))
        h.halt()
        h.command(submit("low", priority=Priority.LOW))
        for n in range(20):
            h.command(submit(f"c{n:02}", priority=Priority.CRITICAL))
        h.register("a0")
        h.resume()
        return _served_in_turn(h).index("low")

    assert low_place(None) == 20, "strict priority: low goes last"
    # Accepted at turn 1, LOW (level 3) ranks as turn 1 + 3 x 2 = 7: after the critical
    # tasks of turns 2-6 (c00 took turn 2), ahead of c05, which has turn 7 but came later.
    assert low_place(2) == 5
    assert low_place(1) == 2


def test_a_key_of_weight_w_is_served_w_tasks_for_each_of_a_key_of_weight_1() -> None:
    h = Harness(capacity=1)
    weights = {"acme": 3, "bolt/batch": 2}
    h.fact(PoolConfigured(pool="p0", capacity=1, reason="t", operator="op", weights=weights))
    for n in range(8):
        h.command(submit(f"a{n}"), tenant="acme")
    for n in range(5):
        h.command(dataclasses.replace(submit(f"b{n}"), fairness_key="batch"), tenant="bolt")
    for n in range(3):
        h.command(submit(f"c{n}"), tenant="cork")  # not named: weighs 1
    h.register("a0")
    assert _served_in_turn(h) == [
        *("a0", "a1", "a2", "b0", "b1", "c0"),
        *("a3", "a4", "a5", "b2", "b3", "c1"),
        *("a6", "a7", "b4", "c2"),
    ]
    assert_same_state(h.state, from_snapshot(to_snapshot(h.state)))


def test_weights_apply_to_tasks_queued_from_then_on_and_a_setting_without_drops_them() -> None:
    h = Harness(capacity=1)
    for n in range(4):
        h.command(submit(f"a{n}"), tenant="acme")
    h.fact(PoolConfigured(pool="p0", capacity=1, reason="t", operator="op", weights={"acme": 2}))
    for n in range(4, 8):
        h.command(submit(f"a{n}"), tenant="acme")
    h.command(submit("b0"), tenant="bolt")
    h.command(submit("b1"), tenant="bolt")
    # a0-a3 took turns 1-4 one each; from then on two a turn: a4 joins a3 on turn 4, a5
    # and a6 share turn 5, a7 takes 6. bolt has turns 1 and 2 of its own.
    h.register("a0")
    assert _served_in_turn(h) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5", "a6", "a7"]
    assert h.state.weights == {"p0": {"acme": 2}}
    h.fact(PoolConfigured(pool="p0", capacity=1, reason="t", operator="op"))
    assert h.state.weights == {}


def test_weights_are_validated() -> None:
    def weighing(weights: dict[str, int]) -> str | None:
        return invalid_command(
            PoolConfigured(pool="p0", capacity=1, reason="t", operator="op", weights=weights)
        )

    assert weighing({"acme": 1000, "acme/batch": 1}) is None
    assert weighing({"acme": 0}) == "the weight of 'acme' must be 1-1,000"
    assert weighing({"acme": 1001}) == "the weight of 'acme' must be 1-1,000"
    assert weighing({"a/b/c": 2}) == "weights: 'a/b/c' is not a fairness key (tenant or tenant/key)"
    assert weighing({"": 2}) == "weights: '' is not a fairness key (tenant or tenant/key)"
    assert weighing({"a\x00": 2}) == "a weighted key must not contain NUL characters"
    assert weighing({f"k{n}": 1 for n in range(1001)}) == "weights name 1,001 keys, more than 1,000"


def test_aging_is_validated() -> None:
    bad = PoolConfigured(pool="p0", capacity=1, reason="t", operator="op", aging_turns=0)
    assert invalid_command(bad) == "aging_turns must be 1-1,000,000"


def test_a_lost_host_still_silent_past_the_grace_period_fails_once_then_comes_back() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.register("a1", host_id="h0")
    h.beat("h0", lease_us=5_000)
    expires_at = h.state.hosts["h0"].expires_at
    lost = h.tick(5_000)[0]
    assert isinstance(lost, HostLost)
    assert failures_due(h.state, FAIL_US) == expires_at + FAIL_US
    short = expires_at + FAIL_US - 1 - h.now  # 1 µs short
    assert [e for e in h.tick(short) if isinstance(e, HostFailed)] == []
    (failed,) = [e for e in h.tick(1) if isinstance(e, HostFailed)]
    assert failed == HostFailed(
        host_id="h0",
        pool="p0",
        agent_ids=["a0", "a1"],
        expires_at=expires_at,
        reason="host 'h0' silent 0 s after its lease ran out, past the grace period of "
        "0.025 s: its agents failed",
    )
    assert failures_due(h.state, FAIL_US) is None
    assert h.tick(10 * FAIL_US) == []  # failed once
    restored = from_snapshot(json.loads(json.dumps(to_snapshot(h.state))))
    assert failed_hosts(restored, h.now, FAIL_US) == []  # the snapshot remembers it
    # It comes back by itself (it was cut off): its agents work again, as after a loss.
    h.beat("h0", lease_us=5_000)
    dispatched = h.command(submit("t0"))[1:]
    assert [d.agent_id for d in dispatched] == ["a0"]
    # Lost again later: that lease is judged, and failed, anew.
    h.tick(5_000)
    assert [e.host_id for e in h.tick(FAIL_US) if isinstance(e, HostFailed)] == ["h0"]


def test_a_host_that_left_is_not_failed() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.leave("h0", 0)
    h.tick(5_000)
    assert failed_hosts(h.state, h.now + 100 * FAIL_US, FAIL_US) == []
    assert failures_due(h.state, FAIL_US) is None


def test_a_host_that_left_and_started_again_is_not_failed_for_the_lease_it_left() -> None:
    """Found by the state machine: its registration ends its leaving, and the lease it
    left with used to be judged failed, naming the agent it runs again."""
    h = Harness()
    h.register("a0", host_id="h0")
    h.register("a1", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.leave("h0", 0)
    h.tick(5_000)  # its drain is over: lost, as left
    h.register("a0", host_id="h0")  # started again, with one agent, before beating
    assert h.state.hosts["h0"].leaving_until is None
    assert failed_hosts(h.state, h.now + 100 * FAIL_US, FAIL_US) == []
    restored = from_snapshot(json.loads(json.dumps(to_snapshot(h.state))))
    assert failed_hosts(restored, h.now + 100 * FAIL_US, FAIL_US) == []


def test_a_lost_host_fails_with_the_agents_that_did_not_come_back() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.register("a1", host_id="h0")
    h.beat("h0", lease_us=5_000)
    h.tick(5_000)  # lost
    h.register("a0", host_id="h0")  # restarted with a0 only, and no beat yet
    (failed,) = [e for e in h.tick(FAIL_US) if isinstance(e, HostFailed)]
    assert failed.agent_ids == ["a1"]
    h.register("a1", host_id="h0")
    h2 = Harness()
    h2.register("a0", host_id="h0")
    h2.beat("h0", lease_us=5_000)
    h2.tick(5_000)
    h2.register("a0", host_id="h0")  # every agent came back: nothing failed
    assert [e for e in h2.tick(FAIL_US) if isinstance(e, HostFailed)] == []
