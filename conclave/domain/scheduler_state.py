"""The scheduler's state, the indexes that make every event O(log n), and snapshots.

:mod:`conclave.domain.scheduling` says what events mean; this module keeps the
state's indexes consistent with its tasks and agents whatever the rules do, and
writes the state out as JSON-compatible data and back. Pure, stdlib only.

Only the facts are in a snapshot (live tasks, agents, assignments, the dedup
windows, timers); the indexes are rebuilt from them, so a snapshot costs time
linear in the live state, never in history.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from conclave.domain.events import Priority
from conclave.domain.ordered import Rank, RankedSet, Recent
from conclave.domain.retry import DEFAULT_RETRY

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_DEDUP_WINDOW",
    "NOTHING",
    "SNAPSHOT_VERSION",
    "AgentSlot",
    "HostLease",
    "PoolState",
    "SchedulerState",
    "TaskState",
    "TaskStatus",
    "Turns",
    "from_snapshot",
    "to_snapshot",
]

NOTHING: frozenset[str] = frozenset()
"""The empty set of dependencies that every task without any shares."""
DEFAULT_CAPACITY = 72
DEFAULT_DEDUP_WINDOW = 100_000
SNAPSHOT_VERSION = 8
"""2: tasks carry their retry policy; a task may wait out a retry back-off.
3: tasks carry their dependencies (a task may wait for them) and their deadlines.
4: runtime hosts' leases.
5: agents' circuit breakers.
6: fairness keys, turns, per-key limits and aging (a version 5 snapshot still reads: its
tasks have none, turn 0, and its pools start their fair turns afresh).
7: hosts that are leaving (a version 5 or 6 snapshot still reads: none is).
8: weights of fairness keys, and how many tasks of a key took its latest turn (a
version 5 to 7 snapshot still reads: every key weighs 1, so one did); hosts over their
limits (none in an older snapshot)."""


class TaskStatus(enum.Enum):
    WAITING = "waiting"
    """Accepted, waiting for dependencies to complete: in no queue, holding nothing."""
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RETRYING = "retrying"
    """Waiting out the back-off after a failed attempt: no agent, no capacity, a timer."""
    COMPLETED = "completed"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DEPENDENCY_FAILED = "dependency_failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def failed(self) -> bool:
        """Terminal without an answer: a task depending on it can never run."""
        return self in _TERMINAL and self is not TaskStatus.COMPLETED


_TERMINAL = frozenset(
    {
        TaskStatus.COMPLETED,
        TaskStatus.DEAD_LETTERED,
        TaskStatus.CANCELLED,
        TaskStatus.EXPIRED,
        TaskStatus.DEPENDENCY_FAILED,
    }
)


@dataclass(slots=True)
class TaskState:
    """A live task: waiting, queued, dispatched or retrying. Finished tasks are only in
    the dedup window."""

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
    retry_backoff_ms: int = DEFAULT_RETRY.backoff_ms
    retry_multiplier: float = DEFAULT_RETRY.multiplier
    retry_backoff_max_ms: int = DEFAULT_RETRY.max_backoff_ms
    retry_jitter: float = DEFAULT_RETRY.jitter
    depends_on: tuple[str, ...] = ()
    """As submitted."""
    waiting_for: frozenset[str] = NOTHING
    """Dependencies not completed yet; non-empty exactly while ``WAITING``. Immutable,
    and the one shared empty set for most tasks: no allocation per task."""
    start_by: int | None = None
    """Not dispatched by then (µs since the epoch): expired."""
    finish_by: int | None = None
    """Not finished by then: expired."""
    fairness_key: str | None = None
    """``tenant`` or ``tenant/key``: who the task takes turns with in its pool."""
    key_limit: int | None = None
    """At most this many untargeted tasks of ``fairness_key`` in flight in the pool."""
    turn: int = 0
    """Its place in fair queuing (:attr:`Turns.virtual`)."""
    aging_turns: int | None = None
    """Its pool's aging when it was accepted: ``None``, strict priority."""

    @property
    def limited_key(self) -> str | None:
        """The key whose limit this task counts against: only untargeted tasks have one."""
        if self.key_limit is None or self.targeted:
            return None
        return self.fairness_key or ""

    @property
    def expires_at(self) -> int | None:
        """When the task expires unless something happens first: its ``start_by`` until
        its first dispatch, its ``finish_by`` in any case."""
        due = [self.finish_by]
        if self.attempt == 0:
            due.append(self.start_by)
        return min((d for d in due if d is not None), default=None)

    @property
    def rank(self) -> Rank:
        """Served in this order within a pool: priority, then turn, then arrival; with
        aging, turn plus ``aging_turns`` per priority level, then arrival (a low task
        waits at most that many turns per level for the ones above it)."""
        if self.aging_turns is None:
            return (int(self.priority), self.turn, self.sequence)
        return (0, self.turn + self.aging_turns * int(self.priority), self.sequence)


@dataclass(slots=True)
class AgentSlot:
    agent_id: str
    pool: str
    host_id: str


@dataclass(slots=True)
class HostLease:
    """What the scheduler knows of a runtime host's liveness, from its ``HostBeat``s."""

    pool: str
    expires_at: int
    """The latest lease any beat of the host promised (µs since the epoch)."""
    judged: int | None = None
    """The lease a ``HostLost`` judged run out, if any: each lease is judged once."""
    lost_agents: set[str] = field(default_factory=set)
    """Its agents taken out of work when it was judged lost, until they are reinstated
    (the host beats or registers them again)."""
    leaving_until: int | None = None
    """The host said it is stopping (``HostLeaving``): its agents take no new work, and
    its lease ends then. Until it registers agents again (started anew)."""
    over_limit: str | None = None
    """Why its newest beat said it takes no new work (memory or CPU over its limit)."""
    failed: int | None = None
    """The lease a ``HostFailed`` judged (lost, then silent past the grace period)."""
    spare: int = 0
    """How many more agents its newest beat said it could start for a shortage."""
    left: int | None = None
    """The lease a ``HostLost`` judged ended by the host's drain: never failed, even
    once the host registers agents again (which ends its leaving)."""

    @property
    def takes_work(self) -> bool:
        return self.leaving_until is None and self.over_limit is None

    def overdue(self) -> int | None:
        """When this lease runs out unless a newer beat comes; ``None`` once judged."""
        if self.judged is not None and self.judged >= self.expires_at:
            return None
        return self.expires_at


@dataclass(slots=True)
class Turns:
    """A pool's fair queuing (start-time fair queuing, weighted in whole turns). Kept apart from
    :class:`PoolState`, which is dropped whenever a pool is empty: when that happens
    depends on how recovery interleaves topics, and turns must not."""

    virtual: int = 0
    """The clock: the largest turn of a task dispatched in the pool. A task of key ``k``
    queued for an attempt takes turn ``max(virtual, last[k]) + 1`` (targeted tasks,
    which have no key, ``virtual + 1``), so keys of equal priority take turns and a key
    that was quiet gets no credit for it. A key of weight ``w`` puts ``w`` tasks on each
    of its turns: ``last[k]`` again while fewer than ``w`` took it."""
    last: dict[str, int] = field(default_factory=dict)
    """Fairness key -> the turn of its latest task, while that is ahead of ``virtual``."""
    used: dict[str, int] = field(default_factory=dict)
    """Fairness key (those in ``last``) -> how many of its tasks took turn ``last[k]``."""


@dataclass(slots=True)
class PoolState:
    """One pool's indexes. An agent registered in the pool and not assigned a task is
    idle, and is in ``unclaimed`` or in ``claimed``: claimed if a queued task of this
    pool targets it. A pool with no agents, no queued and no running task is dropped,
    so that pool names seen once do not pile up."""

    in_flight: int = 0
    """Dispatched, unfinished tasks of the pool."""
    members: set[str] = field(default_factory=set)
    """Agents registered in the pool (busy or idle): who a deliberation asks."""
    untargeted: RankedSet = field(default_factory=RankedSet)
    """Queued tasks any agent may run, by rank."""
    targeted: dict[str, RankedSet] = field(default_factory=dict)
    """Agent id -> queued tasks of this pool that only it may run, by rank."""
    unclaimed: RankedSet = field(default_factory=RankedSet)
    """Idle agents no queued task waits for, by agent id."""
    claimed: RankedSet = field(default_factory=RankedSet)
    """Idle agents a queued task waits for, by the rank of the best such task."""
    claimed_worst_first: RankedSet = field(default_factory=RankedSet)
    """The same agents, worst claim first: the ones an untargeted task may take."""
    keyed: dict[str, RankedSet] = field(default_factory=dict)
    """Key -> its queued untargeted tasks that count against a limit, by rank: apart from
    ``untargeted`` so that a key at its limit costs nothing to skip."""
    limits: dict[str, int] = field(default_factory=dict)
    """Key -> how many of its tasks may be in flight: set by the latest task queued with a
    limit, dropped when the key has nothing queued or running."""
    running: dict[str, int] = field(default_factory=dict)
    """Key -> its limited tasks in flight (keys with none are absent)."""
    heads: RankedSet = field(default_factory=RankedSet)
    """Keys with room under their limit and a queued task, by the rank of their best."""
    starved_at: int | None = field(default=None, compare=False)
    """When the pool was last said to be short of agents (``PoolStarved``): a throttle,
    not a fact. Not in snapshots, nor compared: after a restart, or folded before the
    pool's tasks, a shortage is said again at once, which is harmless."""

    @property
    def empty(self) -> bool:
        return not (
            self.in_flight or self.members or self.untargeted or self.targeted or self.keyed
        )

    def place_key(self, key: str) -> None:
        """Keep ``key`` in ``heads`` exactly while it has room and a queued task."""
        queue = self.keyed.get(key)
        best = queue.first() if queue is not None else None
        running = self.running.get(key, 0)
        if best is not None and running < self.limits.get(key, 0):
            self.heads.add(key, best[0])
        else:
            self.heads.discard(key)
            if best is None and not running:
                self.limits.pop(key, None)


@dataclass(slots=True)
class SchedulerState:
    capacity: int = DEFAULT_CAPACITY
    """Tasks in flight per pool, at most, for pools with no capacity of their own. Fixed
    for the life of a state: ``ready`` depends on it, so assigning it later leaves
    ``ready`` stale; to change it, pass ``capacity`` to :func:`from_snapshot`."""
    capacities: dict[str, int] = field(default_factory=dict)
    """Pool -> its own capacity, as configured (``PoolConfigured``) at run time."""
    aging: dict[str, int] = field(default_factory=dict)
    """Pool -> its aging (``PoolConfigured.aging_turns``), for pools that age."""
    weights: dict[str, dict[str, int]] = field(default_factory=dict)
    """Pool -> fairness key -> its weight (``PoolConfigured.weights``), for pools with any."""
    dedup_window: int = DEFAULT_DEDUP_WINDOW
    """How many finished task ids (and expanded deliberation ids) are remembered; read
    once, when the windows are made."""
    halted: bool = False
    next_sequence: int = 1
    tasks: dict[str, TaskState] = field(default_factory=dict)
    """Live tasks only: waiting, queued, dispatched or retrying."""
    agents: dict[str, AgentSlot] = field(default_factory=dict)
    assignments: dict[str, str] = field(default_factory=dict)
    """Agent id -> the dispatched task it works on. Kept apart from the agent registry
    so that folding a dispatch before its agent's registration still marks it busy."""
    turns: dict[str, Turns] = field(default_factory=dict)
    """Pool -> its fair turns, for pools that ever queued a task with a turn."""
    pools: dict[str, PoolState] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    """Pools where a dispatch is possible now (halt aside): all that schedule() reads."""
    timers: RankedSet = field(default_factory=RankedSet)
    """Deadlines by task id, ranked ``(due,)`` in µs since the epoch, added and discarded
    by the folds: the answer deadline of a dispatched attempt, or the end of a retrying
    task's back-off (a task is never both)."""
    suspects: dict[str, tuple[str, int] | None] = field(default_factory=dict)
    """Agents whose last attempt stalled (-> that attempt: task id, attempt number), or
    whose host was lost (-> None): given no work until they are reinstated."""
    failed: dict[str, str] = field(default_factory=dict)
    """Agents their host gave up on (``agent.failed``: crashed past their restart budget)
    -> why: given no work until their host registers them again."""
    retired: set[str] = field(default_factory=set)
    """Agents their host retired (``agent.retired``: the pool shrank): given no work until
    registered again."""
    hosts: dict[str, HostLease] = field(default_factory=dict)
    """Host id -> its lease, for every host that ever beat."""
    failures: dict[str, int] = field(default_factory=dict)
    """Agent id -> attempts it failed in a row (failed, stalled, lost with its host) since
    its last answer or since its circuit opened; agents with none are absent."""
    breakers: RankedSet = field(default_factory=RankedSet)
    """Agents whose circuit is open, ranked ``(until,)``: no work for them until then."""
    probing: set[str] = field(default_factory=set)
    """Agents whose circuit is half-open: one failure opens it again, an answer closes it."""
    dependents: dict[str, set[str]] = field(default_factory=dict)
    """Task id -> the waiting tasks that still wait for it."""
    by_deliberation: dict[str, set[str]] = field(default_factory=dict)
    """Deliberation id -> its live tasks: what cancelling the deliberation cancels."""
    expiries: RankedSet = field(default_factory=RankedSet)
    """Task id -> when it expires (:attr:`TaskState.expires_at`), ranked ``(due,)``:
    apart from ``timers``, since a task may have both an expiry and an answer deadline
    or a back-off."""
    finished: Recent[TaskStatus] = field(init=False)
    """Terminal status of the last ``dedup_window`` finished tasks, oldest first."""
    deliberations: Recent[None] = field(init=False)
    """Deliberations already expanded into tasks: a redelivered request adds none."""

    def __post_init__(self) -> None:
        self.finished = Recent(self.dedup_window)
        self.deliberations = Recent(self.dedup_window)

    # -- Index upkeep: called by evolve after it changes tasks, agents or assignments.

    def capacity_of(self, name: str) -> int:
        return self.capacities.get(name, self.capacity)

    def pool(self, name: str) -> PoolState:
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = PoolState()
        return pool

    def enqueue(self, task: TaskState) -> None:
        pool = self.pool(task.pool)
        if task.targeted:
            assert task.agent_id is not None
            pool.targeted.setdefault(task.agent_id, RankedSet()).add(task.task_id, task.rank)
            self.place(task.agent_id)  # its best claim may have changed
        elif (key := task.limited_key) is not None:
            assert task.key_limit is not None
            pool.keyed.setdefault(key, RankedSet()).add(task.task_id, task.rank)
            pool.limits[key] = task.key_limit
            pool.place_key(key)
        else:
            pool.untargeted.add(task.task_id, task.rank)
        self.refresh(task.pool)

    def unqueue(self, task: TaskState) -> None:
        pool = self.pool(task.pool)
        if task.targeted:
            assert task.agent_id is not None
            queue = pool.targeted[task.agent_id]
            queue.discard(task.task_id)
            if not queue:
                del pool.targeted[task.agent_id]
            self.place(task.agent_id)
        elif (key := task.limited_key) is not None:
            queue = pool.keyed[key]
            queue.discard(task.task_id)
            if not queue:
                del pool.keyed[key]
            pool.place_key(key)
        else:
            pool.untargeted.discard(task.task_id)
        self.refresh(task.pool)

    def wait(self, task: TaskState) -> None:
        """Index a waiting task under each dependency it waits for."""
        for dependency in task.waiting_for:
            self.dependents.setdefault(dependency, set()).add(task.task_id)

    def unwait(self, task: TaskState) -> None:
        for dependency in task.waiting_for:
            waiting = self.dependents.get(dependency)
            if waiting is not None:
                waiting.discard(task.task_id)
                if not waiting:
                    del self.dependents[dependency]

    def track(self, task: TaskState) -> None:
        if task.deliberation_id is not None:
            self.by_deliberation.setdefault(task.deliberation_id, set()).add(task.task_id)
        self.reckon(task)

    def reckon(self, task: TaskState) -> None:
        """Keep the task's expiry in ``expiries`` (or none) as its state changes."""
        if task.start_by is None and task.finish_by is None:
            return  # never had one (most tasks): nothing to keep
        due = task.expires_at
        if due is None:
            self.expiries.discard(task.task_id)
        else:
            self.expiries.add(task.task_id, (due,))

    def untrack(self, task: TaskState) -> None:
        if task.start_by is not None or task.finish_by is not None:
            self.expiries.discard(task.task_id)
        if task.deliberation_id is None:
            return
        members = self.by_deliberation.get(task.deliberation_id)
        if members is not None:
            members.discard(task.task_id)
            if not members:
                del self.by_deliberation[task.deliberation_id]

    def start(self, task: TaskState) -> None:
        """A queued task is dispatched: it takes its pool's capacity, its key's room, and
        moves the pool's fair clock."""
        pool = self.pool(task.pool)
        pool.in_flight += 1
        if (key := task.limited_key) is not None:
            pool.running[key] = pool.running.get(key, 0) + 1
        if task.turn:
            turns = self.turns.setdefault(task.pool, Turns())
            turns.virtual = max(turns.virtual, task.turn)
            key = task.fairness_key
            if key is not None and turns.last.get(key, 0) <= turns.virtual:
                turns.last.pop(key, None)  # caught up: no turn to remember
                turns.used.pop(key, None)
        self.unqueue(task)  # from the queue of its target or key, if it has one

    def release(self, task: TaskState) -> None:
        """Free the capacity and the agent a dispatched task held, and stop waiting."""
        pool = self.pool(task.pool)
        pool.in_flight -= 1
        if (key := task.limited_key) is not None:
            left = pool.running[key] - 1
            if left:
                pool.running[key] = left
            else:
                del pool.running[key]
            pool.place_key(key)
        self.timers.discard(task.task_id)
        agent_id = task.agent_id or ""
        if self.assignments.get(agent_id) == task.task_id:
            del self.assignments[agent_id]
            self.place(agent_id)
        self.refresh(task.pool)

    def place(self, agent_id: str) -> None:
        """Put an agent where it belongs in its pool's idle indexes: nowhere if busy or
        unregistered, else unclaimed, or claimed by the best queued task targeting it."""
        slot = self.agents.get(agent_id)
        if slot is None:
            return
        pool = self.pool(slot.pool)
        queue = pool.targeted.get(agent_id)
        best = queue.first() if queue is not None else None
        host = self.hosts.get(slot.host_id)
        if (
            agent_id in self.assignments
            or agent_id in self.suspects
            or agent_id in self.failed
            or agent_id in self.retired
            or agent_id in self.breakers
            or (host is not None and not host.takes_work)
        ):
            self.unplace(slot)
        elif best is None:
            pool.claimed.discard(agent_id)
            pool.claimed_worst_first.discard(agent_id)
            pool.unclaimed.add(agent_id, ())
        else:
            pool.unclaimed.discard(agent_id)
            pool.claimed.add(agent_id, best[0])
            pool.claimed_worst_first.add(agent_id, tuple(-r for r in best[0]))
        self.refresh(slot.pool)

    def unplace(self, slot: AgentSlot) -> None:
        pool = self.pool(slot.pool)
        pool.unclaimed.discard(slot.agent_id)
        pool.claimed.discard(slot.agent_id)
        pool.claimed_worst_first.discard(slot.agent_id)

    def refresh(self, name: str) -> None:
        """Whether the pool can dispatch: capacity left, and a claimed idle agent (its
        task can run) or an unclaimed idle agent and an untargeted task."""
        pool = self.pools.get(name)
        if pool is not None and pool.empty:
            del self.pools[name]
            pool = None
        if (
            pool is not None
            and pool.in_flight < self.capacity_of(name)
            and (pool.claimed or (pool.unclaimed and (pool.untargeted or pool.heads)))
        ):
            self.ready.add(name)
        else:
            self.ready.discard(name)


_TASK_FIELDS = tuple(f.name for f in fields(TaskState))
"""A live task is a row in a snapshot (a list, fields in this order): in JSON a third
of the size of an object per task, and about twice as fast to encode."""
_PRIORITIES = {int(p): p for p in Priority}
_STATUSES = {s.value: s for s in TaskStatus}


def to_snapshot(state: SchedulerState) -> dict[str, Any]:
    """The state as JSON-compatible data; :func:`from_snapshot` restores it exactly."""
    return {
        "version": SNAPSHOT_VERSION,
        "capacity": state.capacity,
        "dedup_window": state.dedup_window,
        "halted": state.halted,
        "next_sequence": state.next_sequence,
        "agents": [[a.agent_id, a.pool, a.host_id] for a in state.agents.values()],
        "assignments": dict(state.assignments),
        "task_fields": list(_TASK_FIELDS),
        "tasks": [
            [
                t.task_id,
                t.pool,
                int(t.priority),
                t.input,
                t.agent_id,
                t.targeted,
                t.max_attempts,
                t.deliberation_id,
                t.sequence,
                t.status.value,
                t.attempt,
                t.retry_backoff_ms,
                t.retry_multiplier,
                t.retry_backoff_max_ms,
                t.retry_jitter,
                list(t.depends_on) or None,  # null, not [], for most tasks: lists cost
                sorted(t.waiting_for) or None,  # a JSON parse (and its GC) far more
                t.start_by,
                t.finish_by,
                t.fairness_key,
                t.key_limit,
                t.turn,
                t.aging_turns,
            ]
            for t in state.tasks.values()
        ],
        "finished": [[task_id, status.value] for task_id, status in state.finished.items()],
        "deliberations": [d for d, _ in state.deliberations.items()],
        "timers": [[key, due] for (due, *_), key in state.timers.members()],
        "suspects": sorted([a, *(s or ())] for a, s in state.suspects.items()),
        "failed": dict(sorted(state.failed.items())),
        "retired": sorted(state.retired),
        "capacities": dict(state.capacities),
        "hosts": [
            [
                host_id,
                h.pool,
                h.expires_at,
                h.judged,
                sorted(h.lost_agents),
                h.leaving_until,
                h.over_limit,
                h.failed,
                h.spare,
                h.left,
            ]
            for host_id, h in sorted(state.hosts.items())  # the same whatever the fold order
        ],
        "failures": dict(sorted(state.failures.items())),
        "breakers": sorted([key, until] for (until, *_), key in state.breakers.members()),
        "probing": sorted(state.probing),
        "turns": {
            name: [t.virtual, dict(t.last), dict(t.used)] for name, t in sorted(state.turns.items())
        },
        "aging": dict(sorted(state.aging.items())),
        "weights": {name: dict(sorted(w.items())) for name, w in sorted(state.weights.items())},
        "limits": {
            name: dict(pool.limits) for name, pool in sorted(state.pools.items()) if pool.limits
        },
    }


def from_snapshot(data: Mapping[str, Any], *, capacity: int | None = None) -> SchedulerState:
    """The state :func:`to_snapshot` wrote, indexes rebuilt; ``ValueError`` if ``data``
    is not a snapshot of this version. ``capacity`` replaces the snapshot's: it is
    configuration, and may have changed since."""
    version = data.get("version")
    if version not in (5, 6, 7, SNAPSHOT_VERSION):
        raise ValueError(f"scheduler snapshot version {version!r} is not supported")
    task_fields = list(_TASK_FIELDS if version >= 6 else _TASK_FIELDS[:-4])
    try:
        state = SchedulerState(
            capacity=int(data["capacity"]) if capacity is None else capacity,
            dedup_window=int(data["dedup_window"]),
            halted=bool(data["halted"]),
            next_sequence=int(data["next_sequence"]),
        )
        for agent_id, pool, host_id in data["agents"]:
            state.agents[agent_id] = AgentSlot(agent_id, pool, host_id)
            state.pool(pool).members.add(agent_id)
        state.assignments.update(data["assignments"])
        if data["task_fields"] != task_fields:
            raise ValueError(f"task fields {data['task_fields']!r}")
        # The queues enqueue() builds one task at a time, built whole (heapify is O(n)).
        queues: dict[tuple[str, str | None], list[tuple[Rank, str]]] = {}
        keyed: dict[tuple[str, str], list[tuple[Rank, str]]] = {}
        for row in data["tasks"]:
            # A version 5 row lacks the last four fields (their defaults); then the two
            # enums and the set, from JSON.
            task = TaskState(*row)
            task.priority, task.status = _PRIORITIES[row[2]], _STATUSES[row[9]]
            task.depends_on = tuple(task.depends_on or ())
            task.waiting_for = frozenset(task.waiting_for) if task.waiting_for else NOTHING
            state.tasks[task.task_id] = task
            state.wait(task)
            state.track(task)
            if task.status is TaskStatus.DISPATCHED:
                state.pool(task.pool).in_flight += 1
            elif task.status is TaskStatus.QUEUED:  # a waiting or retrying one is in none
                target = task.agent_id if task.targeted else None
                if (key := task.limited_key) is not None:
                    keyed.setdefault((task.pool, key), []).append((task.rank, task.task_id))
                else:
                    queues.setdefault((task.pool, target), []).append((task.rank, task.task_id))
        for (name, target), members in queues.items():
            if target is None:
                state.pool(name).untargeted = RankedSet(members)
            else:
                state.pool(name).targeted[target] = RankedSet(members)
        _restore_fairness(state, keyed, data)
        for task_id, status in data["finished"]:
            state.finished.add(task_id, _STATUSES[status])
        for deliberation_id in data["deliberations"]:
            state.deliberations.add(deliberation_id, None)
        state.timers = RankedSet(((due,), key) for key, due in data["timers"])
        # Absent before deadlines existed; bare agent ids before late answers counted.
        for suspect in data.get("suspects", ()):
            agent_id, *stall = [suspect] if isinstance(suspect, str) else suspect
            state.suspects[agent_id] = (str(stall[0]), int(stall[1])) if stall else None
        state.failed.update(data.get("failed", {}))  # absent before restart budgets
        state.retired.update(data.get("retired", ()))  # absent before autoscaling
        state.capacities.update(data["capacities"])
        for host_id, pool, expires_at, judged, lost_agents, *later in data["hosts"]:
            state.hosts[host_id] = HostLease(
                pool,
                expires_at,
                judged,
                set(lost_agents),
                *later,  # leaving: none before 7; over its limits: none before 8; failed,
            )  # spare: none before host.beat v4; left: none before it either
        state.failures.update(data["failures"])
        state.breakers = RankedSet(((until,), key) for key, until in data["breakers"])
        state.probing = set(data["probing"])
        for agent_id in state.agents:
            state.place(agent_id)
        for name in list(state.pools):
            state.refresh(name)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"not a scheduler snapshot: {exc!r}") from exc
    return state


def _restore_fairness(
    state: SchedulerState,
    keyed: Mapping[tuple[str, str], list[tuple[Rank, str]]],
    data: Mapping[str, Any],
) -> None:
    """The queues, running counts and limits of limited keys, and each pool's turns
    (absent before version 6)."""
    for task in state.tasks.values():
        if task.status is TaskStatus.DISPATCHED and (key := task.limited_key) is not None:
            running = state.pool(task.pool).running
            running[key] = running.get(key, 0) + 1
    for (name, key), members in keyed.items():
        state.pool(name).keyed[key] = RankedSet(members)
    for name, limits in data.get("limits", {}).items():
        state.pool(name).limits.update(limits)
    state.aging.update(data.get("aging", {}))
    state.weights.update({name: dict(w) for name, w in data.get("weights", {}).items()})
    for name, (virtual, last, *used) in data.get("turns", {}).items():
        # Before version 8 every key weighed 1: one task took each of its turns.
        state.turns[name] = Turns(
            int(virtual), dict(last), used[0] if used else dict.fromkeys(last, 1)
        )
    for pool in state.pools.values():
        for key in set(pool.keyed) | set(pool.running):
            pool.place_key(key)
