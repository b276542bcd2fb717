"""The scheduler's domain: capacity, HALT, priority, idempotence, no silent drops, recovery.

``Harness`` is the scheduler processor's loop without Kafka (streams/scheduler.py):
decide, fold what was decided, schedule, fold the dispatches. A hypothesis state
machine drives it with random submissions, deliberations, registrations, witnessed
outputs and failures, halts, resumes and redeliveries, and checks the invariants
after every step.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from conclave.domain.events import (
    AgentRegistered,
    DeliberationRequested,
    Halt,
    Priority,
    Resume,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    TaskQueued,
    TaskSubmitted,
    WitnessEntry,
)
from conclave.domain.scheduling import (
    DEFAULT_CAPACITY,
    SchedulerState,
    TaskState,
    TaskStatus,
    decide,
    deliberation_task_id,
    evolve,
    schedule,
)
from conclave.domain.witness import ChainHead, digest, next_entry

AGENTS_BY_POOL = {"p0": ("a0", "a1", "a2"), "p1": ("a3", "a4")}
POOL_OF = {agent: pool for pool, agents in AGENTS_BY_POOL.items() for agent in agents}
POOLS = st.sampled_from(sorted(AGENTS_BY_POOL))
PRIORITIES = st.sampled_from(Priority)

Emitted = TaskQueued | TaskDispatched | TaskCompleted | TaskDeadLettered
Folded = Emitted | AgentRegistered | Halt | Resume


def _better(a: TaskState, b: TaskState) -> bool:
    """``a`` must be served before ``b``: higher priority, or same priority and earlier."""
    return (int(a.priority), a.sequence) < (int(b.priority), b.sequence)


class Harness:
    """What streams/scheduler.py does with one consumed record, minus Kafka."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.state = SchedulerState(capacity=capacity)
        self.log: list[Folded] = []
        """Everything folded, in order: the tasks, agents and control topics."""
        self.head = ChainHead()
        self.witnessed: list[WitnessEntry] = []
        self._ids = itertools.count(1)

    def _fold(self, events: list[Any]) -> None:
        for event in events:
            evolve(self.state, event)
            self.log.append(event)

    def schedule(self) -> list[TaskDispatched]:
        state = self.state
        queued_before = {t.task_id for t in state.tasks.values() if t.status is TaskStatus.QUEUED}
        idle_before = {a for a in state.agents if a not in state.assignments}
        snapshot = copy.deepcopy(state)
        dispatched = schedule(state)
        assert state == snapshot, "schedule() must not change the state"
        if state.halted:
            assert dispatched == []
        _check_priority(state, queued_before, idle_before, dispatched)
        self._fold(dispatched)
        assert schedule(state) == [], "schedule() must reach a fixpoint in one call"
        return dispatched

    def command(self, cause: TaskSubmitted | DeliberationRequested | WitnessEntry) -> list[Emitted]:
        snapshot = copy.deepcopy(self.state)
        decided = decide(self.state, cause)
        assert self.state == snapshot, "decide() must not change the state"
        self._fold(decided)
        return [*decided, *self.schedule()]

    def fact(self, event: AgentRegistered | Halt | Resume) -> list[TaskDispatched]:
        self._fold([event])
        return self.schedule()

    def register(self, agent_id: str, host_id: str = "h0") -> list[TaskDispatched]:
        return self.fact(
            AgentRegistered(
                agent_id=agent_id,
                pool=POOL_OF.get(agent_id, "p0"),
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

    def halt(self) -> None:
        assert self.fact(Halt(reason="test", operator="op")) == []
        assert self.command(self.entry("system.halt", detail="test")) == []

    def resume(self) -> list[TaskDispatched]:
        dispatched = self.fact(Resume(reason="test", operator="op"))
        assert self.command(self.entry("system.resume", detail="test")) == []
        return dispatched

    def dispatched(self) -> list[TaskState]:
        return sorted(
            (t for t in self.state.tasks.values() if t.status is TaskStatus.DISPATCHED),
            key=lambda t: t.task_id,
        )

    def drive(self, failed: Any = lambda task: False) -> None:
        """Resume, register every agent and witness outcomes until nothing is in flight."""
        if self.state.halted:
            self.resume()
        for agent_id in sorted(POOL_OF):
            if agent_id not in self.state.agents:
                self.register(agent_id)
        for _ in range(1000):
            running = self.dispatched()
            if not running:
                return
            for task in running:
                self.finish(task, failed=failed(task))
        raise AssertionError("the schedule did not quiesce")


def _check_priority(
    state: SchedulerState,
    queued_before: set[str],
    idle_before: set[str],
    dispatched: list[TaskDispatched],
) -> None:
    """Nothing dispatched is worse than a task of its pool left queued that could have run.

    An untargeted task left queued could have run in place of any worse dispatched
    task. A targeted one could too if its agent was idle, unless that agent went to a
    better task that was targeted at it (an untargeted holder could have taken another
    agent: the one the worse task got). So no untargeted task is ever left behind for a
    worse untargeted one, and an untargeted task never steals a better task's agent.
    """
    chosen = {d.task_id for d in dispatched}
    holders = {d.agent_id: state.tasks[d.task_id] for d in dispatched}
    for d in dispatched:
        task = state.tasks[d.task_id]
        if task.targeted:
            assert d.agent_id == task.agent_id, "a targeted task runs on its own agent only"
        for task_id in queued_before - chosen:
            left = state.tasks[task_id]
            if left.pool != task.pool:
                continue
            if left.targeted:
                if left.agent_id not in idle_before:
                    continue
                holder = holders.get(left.agent_id or "")
                if holder is not None and holder.targeted and _better(holder, left):
                    continue
            assert not _better(left, task), f"{left.task_id} left behind for {task.task_id}"


def recovered(log: list[Folded], capacity: int) -> SchedulerState:
    state = SchedulerState(capacity=capacity)
    for event in log:
        evolve(state, event)
    return state


def assert_same_state(live: SchedulerState, fresh: SchedulerState) -> None:
    assert fresh.tasks == live.tasks
    assert {p: n for p, n in fresh.in_flight.items() if n} == {
        p: n for p, n in live.in_flight.items() if n
    }
    assert {p: sorted(q) for p, q in fresh.queues.items() if q} == {
        p: sorted(q) for p, q in live.queues.items() if q
    }
    assert fresh.agents == live.agents
    assert fresh.assignments == live.assignments
    assert fresh.halted == live.halted
    assert fresh.next_sequence == live.next_sequence
    assert fresh.deliberations == live.deliberations


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.submitted: dict[str, TaskSubmitted] = {}
        self.commands: list[TaskSubmitted | DeliberationRequested] = []
        self.expanded: set[str] = set()
        self.targets: dict[str, str | None] = {}

    @initialize(capacity=st.integers(1, 3))
    def set_capacity(self, capacity: int) -> None:
        self.h = Harness(capacity)

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
        command = TaskSubmitted(
            task_id=task_id,
            pool=pool,
            priority=priority,
            input=task_id,
            agent_id=agent_id,
            max_attempts=max_attempts,
        )
        known = task_id in self.state.tasks
        sequence = self.state.next_sequence
        events = self.h.command(command)
        self.commands.append(command)
        if known:
            assert events == []
            return
        self.submitted[task_id] = command
        self.targets[task_id] = agent_id
        assert events[0] == TaskQueued(
            task_id=task_id,
            pool=pool,
            priority=priority,
            input=task_id,
            agent_id=agent_id,
            max_attempts=max_attempts,
            deliberation_id=None,
            sequence=sequence,
        )
        assert all(isinstance(e, TaskDispatched) for e in events[1:])

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
        for d in self.h.register(agent_id, host_id):
            assert d.pool == POOL_OF[d.agent_id]

    @precondition(lambda self: bool(self.h.dispatched()))
    @rule(data=st.data(), failed=st.booleans())
    def witness_outcome(self, data: st.DataObject, failed: bool) -> None:
        task = data.draw(st.sampled_from(self.h.dispatched()), label="task")
        attempt, agent_id, sequence = task.attempt, task.agent_id, self.state.next_sequence
        entry, events = self.h.finish(task, failed=failed)
        first = events[0]
        if not failed:
            assert first == TaskCompleted(
                task_id=task.task_id,
                agent_id=agent_id or "",
                output_event_id=entry.subject_event_id,
                witness_sequence=entry.sequence,
            )
        elif attempt < task.max_attempts:
            assert isinstance(first, TaskQueued)
            assert (first.task_id, first.sequence) == (task.task_id, sequence)
            assert first.agent_id == self.targets[task.task_id]
        else:
            assert first == TaskDeadLettered(
                task_id=task.task_id,
                agent_id=agent_id or "",
                attempts=attempt,
                reason="Boom",
                witness_sequence=entry.sequence,
            )
        assert all(isinstance(e, TaskDispatched) for e in events[1:])

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

    @rule()
    def halt(self) -> None:
        self.h.halt()

    @rule()
    def resume(self) -> None:
        self.h.resume()

    @rule(data=st.data())
    def drive_to_quiescence(self, data: st.DataObject) -> None:
        self.h.drive(lambda task: data.draw(st.booleans(), label=f"{task.task_id} fails"))
        self._check_all_terminal()

    def _check_all_terminal(self) -> None:
        terminal = Counter(
            e.task_id for e in self.h.log if isinstance(e, TaskCompleted | TaskDeadLettered)
        )
        for task in self.state.tasks.values():
            assert task.status.terminal, f"{task.task_id} is {task.status.value}"
            assert terminal[task.task_id] == 1
        assert self.state.in_flight == dict.fromkeys(self.state.in_flight, 0)
        assert all(not q for q in self.state.queues.values())
        assert self.state.assignments == {}

    def teardown(self) -> None:
        self.h.drive()
        self._check_all_terminal()

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        dispatched = Counter(t.pool for t in self.h.dispatched())
        for pool in self.state.pools() | set(self.state.in_flight):
            assert self.state.in_flight.get(pool, 0) == dispatched[pool]
            assert dispatched[pool] <= self.state.capacity

    @invariant()
    def one_task_per_agent_and_targets_respected(self) -> None:
        running = self.h.dispatched()
        assert len({t.agent_id for t in running}) == len(running)
        assert self.state.assignments == {t.agent_id: t.task_id for t in running}
        for task in running:
            assert self.state.agents[task.agent_id or ""].pool == task.pool
            if self.targets.get(task.task_id) is not None:
                assert task.agent_id == self.targets[task.task_id]

    @invariant()
    def queues_hold_exactly_the_queued_tasks(self) -> None:
        entries = sorted(e for q in self.state.queues.values() for e in q)
        queued = sorted(
            (int(t.priority), t.sequence, t.task_id)
            for t in self.state.tasks.values()
            if t.status is TaskStatus.QUEUED
        )
        assert entries == queued

    @invariant()
    def nothing_submitted_is_lost(self) -> None:
        assert set(self.submitted) <= set(self.state.tasks)
        terminal = Counter(
            e.task_id for e in self.h.log if isinstance(e, TaskCompleted | TaskDeadLettered)
        )
        assert all(n == 1 for n in terminal.values())

    @invariant()
    def folding_the_log_recovers_the_live_state(self) -> None:
        assert_same_state(self.state, recovered(self.h.log, self.state.capacity))

    @invariant()
    def recovery_does_not_depend_on_how_topics_interleave(self) -> None:
        facts = (AgentRegistered, Halt, Resume)
        tasks_topic = [e for e in self.h.log if not isinstance(e, facts)]
        other_topics = [e for e in self.h.log if isinstance(e, facts)]
        capacity = self.state.capacity
        assert_same_state(self.state, recovered([*tasks_topic, *other_topics], capacity))
        assert_same_state(self.state, recovered([*other_topics, *tasks_topic], capacity))

    @invariant()
    def folding_every_record_twice_changes_nothing(self) -> None:
        doubled = [e for event in self.h.log for e in (event, event)]
        assert_same_state(self.state, recovered(doubled, self.state.capacity))


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase


# -- Focused examples and properties -------------------------------------------------------


def submit(
    task_id: str,
    pool: str = "p0",
    priority: Priority = Priority.NORMAL,
    agent_id: str | None = None,
    max_attempts: int = 1,
) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=task_id,
        pool=pool,
        priority=priority,
        input=f"in {task_id}",
        agent_id=agent_id,
        max_attempts=max_attempts,
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
    assert all(t.status.terminal for t in h.state.tasks.values())


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
    assert h.state.in_flight["p0"] == 72
    h.finish(h.dispatched()[0], failed=False)
    assert h.state.in_flight["p0"] == 72
    assert sum(t.status is TaskStatus.COMPLETED for t in h.state.tasks.values()) == 1


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
        assert schedule(h.state) == []
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
    assert h.state.tasks["t"].status is TaskStatus.COMPLETED
    assert h.state.tasks["t"].attempt == 3
    assert h.command(entry) == []


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
    assert h.command(entry) == []


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
    assert all(t.status is TaskStatus.COMPLETED for t in h.state.tasks.values())
    assert h.command(request) == []


def test_witness_entries_of_halts_and_unknown_tasks_decide_nothing() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t"))
    assert decide(h.state, h.entry("system.halt")) == []
    assert decide(h.state, h.entry("agent.output", "nope", "a0")) == []
    assert decide(h.state, h.entry("something.else", "t", "a0")) == []


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
    (queued,) = decide(state, submit("t"))
    evolve(state, queued)
    evolve(state, queued)  # the same record, redelivered during recovery
    assert [d.task_id for d in schedule(state)] == ["t"]


def test_recovery_does_not_depend_on_the_order_of_topics() -> None:
    h = Harness()
    h.register("a0")
    h.command(submit("t1"))
    h.command(submit("t2"))
    tasks_topic = [e for e in h.log if not isinstance(e, AgentRegistered | Halt | Resume)]
    agents_topic = [e for e in h.log if isinstance(e, AgentRegistered)]
    fresh = recovered([*tasks_topic, *agents_topic], h.state.capacity)
    assert_same_state(h.state, fresh)
    assert schedule(fresh) == []  # a0 is still busy with t1


def test_untargeted_task_does_not_take_the_agent_a_better_targeted_task_needs() -> None:
    h = Harness(capacity=2)
    for agent in ("a0", "a1"):
        h.register(agent)
    h.halt()
    h.command(submit("u", priority=Priority.CRITICAL))
    h.command(submit("r", priority=Priority.HIGH, agent_id="a0"))
    h.command(submit("d", priority=Priority.LOW))
    assert sorted((d.task_id, d.agent_id) for d in h.resume()) == [("r", "a0"), ("u", "a1")]
