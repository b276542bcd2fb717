"""Queries over the read models.

Witnessed before visible: every query that returns an agent's output joins
``witness_entries``; an output whose witness entry is not projected yet does
not exist for readers.

Deliberations reveal together: each member's answer is witnessed as it arrives, but
no query shows any of them until every task of the deliberation is finished (answered,
failed, stalled past its attempts, cancelled or expired): committed first, then
revealed, so no answer can be read before the others are given.

Only accepted answers are answers: a task's output is the one its completion names
(``tasks.output_event_id``, the attempt the scheduler accepted). Any other output
about the task -- a late answer of a stalled or cancelled attempt, or one written by
somebody else -- is witnessed like everything, but *unsolicited*: counted, never shown
as the task's answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from conclave.domain.events import DeliberationRequested, Priority, TaskSubmitted, WitnessEntry
from conclave.domain.retry import RetryPolicy
from conclave.errors import NotFound, Rejected
from projections.rows import TERMINAL

__all__ = [
    "AGENT_STATES",
    "HOST_STATES",
    "AgentChange",
    "AgentView",
    "DeliberationView",
    "Failure",
    "HostView",
    "OutputView",
    "Page",
    "PoolView",
    "SystemView",
    "TaskFilter",
    "TaskState",
    "TaskSummary",
    "TaskView",
    "agent_history",
    "deliberation",
    "get_deliberation",
    "get_task",
    "list_agents",
    "list_hosts",
    "list_pools",
    "list_tasks",
    "list_tasks_query",
    "live_tasks",
    "next_redrive_id",
    "system",
    "visible_outputs",
    "witness_entries",
]


@dataclass(frozen=True, slots=True)
class OutputView:
    event_id: str
    agent_id: str
    content: str
    latency_us: int
    witness_sequence: int


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt: the agent raised, timed out, or stalled (no answer in time)."""

    attempt: int
    agent_id: str
    error_type: str
    message: str
    permanent: bool
    failed_at: int


@dataclass(frozen=True, slots=True)
class TaskView:
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
    output: OutputView | None
    failures: list[Failure]
    """Every failed attempt, oldest first: the task's attempt history."""
    unsolicited_outputs: int
    """Witnessed outputs about this task that are not its accepted answer."""
    start_by: int | None
    """Not dispatched by then (µs since the epoch), it expires."""
    finish_by: int | None
    """Not finished by then, it expires."""
    dependencies: dict[str, str]
    """Each task it depends on, as submitted -> that task's status now (``unknown`` if
    the read model does not have it)."""
    sealed: bool
    """A deliberation's task whose answer waits for the others': ``output`` is ``None``
    until every task of the deliberation is finished."""
    retry: RetryPolicy
    """Its retry policy, as submitted."""


@dataclass(frozen=True, slots=True)
class DeliberationView:
    """A deliberation as its readers see it: nothing of the answers until all are in."""

    deliberation_id: str
    revealed: bool
    """Every task is finished: the answers are visible, together."""
    statuses: dict[str, str]
    """Agent id -> its task's status."""
    answers: dict[str, OutputView]
    """Agent id -> its accepted, witnessed answer; empty until revealed."""
    failures: dict[str, str]
    """Agent id -> why it gave no answer (once revealed)."""


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """One line of a task listing."""

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


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a listing shows; ``None`` matches anything."""

    status: str | None = None
    pool: str | None = None
    priority: str | None = None
    agent_id: str | None = None
    tenant: str | None = None
    since: int | None = None
    """Queued at or after, µs since the epoch."""
    until: int | None = None
    """Queued before, µs since the epoch."""
    error: str | None = None
    """Whose error, or one of whose failed attempts (``Type: message``), contains this
    text, in any case."""


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[TaskSummary]
    cursor: str | None
    """Pass it as ``after`` for the next page; ``None`` on the last page."""


_VISIBLE_OUTPUT = """
    SELECT o.event_id, o.agent_id, o.content, o.latency_us, w.sequence
      FROM outputs o JOIN witness_entries w ON w.subject_event_id = o.event_id
"""


async def get_task(pool: asyncpg.Pool, task_id: str, *, tenant: str | None = None) -> TaskView:
    """One task; with ``tenant``, only that tenant's (another's is :class:`NotFound`, as if
    it did not exist: the HTTP API never tells a tenant what another has)."""
    row = await pool.fetchrow(
        "SELECT * FROM tasks WHERE task_id = $1 AND ($2::text IS NULL OR tenant = $2)",
        task_id,
        tenant,
    )
    if row is None:
        raise await _missing(pool, "task", task_id, TaskSubmitted.TYPE, tenant)
    outputs = await pool.fetch(_VISIBLE_OUTPUT + " WHERE o.task_id = $1", task_id)
    accepted = [o for o in outputs if o["event_id"] == row["output_event_id"]]
    sealed = row["deliberation_id"] is not None and not await _all_finished(
        pool, row["deliberation_id"]
    )
    failures = await pool.fetch(
        """SELECT attempt, agent_id, error_type, error_message, permanent, failed_at
             FROM task_failures WHERE task_id = $1 ORDER BY attempt, failed_at""",
        task_id,
    )
    known: dict[str, str] = {}
    if row["depends_on"]:  # most tasks have none: no round trip for them
        statuses = await pool.fetch(
            "SELECT task_id, status FROM tasks WHERE task_id = ANY($1::text[])"
            " AND ($2::text IS NULL OR tenant = $2)",
            row["depends_on"],
            tenant,
        )
        known = {r["task_id"]: r["status"] for r in statuses}
    return TaskView(
        task_id=row["task_id"],
        tenant=row["tenant"],
        status=row["status"],
        pool=row["pool"],
        priority=row["priority"],
        input=row["input"],
        agent_id=row["agent_id"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        deliberation_id=row["deliberation_id"],
        error=row["error"],
        queued_at=row["queued_at"],
        dispatched_at=row["dispatched_at"],
        finished_at=row["finished_at"],
        next_attempt_at=row["next_attempt_at"],
        redrive_of=row["redrive_of"],
        output=_output(accepted[0]) if accepted and not sealed else None,
        sealed=sealed,
        retry=RetryPolicy(
            backoff_ms=row["retry_backoff_ms"],
            multiplier=row["retry_multiplier"],
            max_backoff_ms=row["retry_backoff_max_ms"],
            jitter=row["retry_jitter"],
        ),
        unsolicited_outputs=len(outputs) - len(accepted),
        start_by=row["start_by"],
        finish_by=row["finish_by"],
        failures=[
            Failure(
                attempt=f["attempt"],
                agent_id=f["agent_id"],
                error_type=f["error_type"],
                message=f["error_message"],
                permanent=f["permanent"],
                failed_at=f["failed_at"],
            )
            for f in failures
        ],
        dependencies={d: known.get(d, "unknown") for d in row["depends_on"]},
    )


_SUMMARY_COLUMNS = tuple(TaskSummary.__dataclass_fields__)


async def list_tasks(
    pool: asyncpg.Pool,
    where: TaskFilter = TaskFilter(),
    *,
    limit: int = 50,
    after: str | None = None,
) -> Page:
    """Tasks matching ``where``, newest queued first (ties by id), ``limit`` per page.

    Keyset pagination: ``after`` is the cursor of the previous page, so a page costs the
    same however deep it is. A task that is retried moves up (its ``queued_at`` changes)."""
    sql, args = list_tasks_query(where, limit=limit, after=after)
    rows = await pool.fetch(sql, *args)
    tasks = [TaskSummary(*r) for r in rows[:limit]]
    last = tasks[-1] if len(rows) > limit else None
    return Page(tasks, f"{last.queued_at}:{last.task_id}" if last is not None else None)


def list_tasks_query(
    where: TaskFilter, *, limit: int, after: str | None
) -> tuple[str, list[object]]:
    """The SQL of :func:`list_tasks` and its arguments (one row more than a page: whether
    there is a next one). A tenant's pages walk the index ``tasks_by_tenant_queued``."""
    clauses: list[str] = []
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    for column in ("status", "pool", "priority", "agent_id", "tenant"):
        value = getattr(where, column)
        if value is not None:
            clauses.append(f"{column} = {arg(value)}")
    if where.since is not None:
        clauses.append(f"queued_at >= {arg(where.since)}")
    if where.until is not None:
        clauses.append(f"queued_at < {arg(where.until)}")
    if where.error is not None:
        text = arg(where.error)
        clauses.append(
            f"(strpos(lower(error), lower({text})) > 0 OR EXISTS (SELECT 1 FROM task_failures f"
            f" WHERE f.task_id = tasks.task_id AND strpos(lower(f.error_type || ': '"
            f" || f.error_message), lower({text})) > 0))"
        )
    if after is not None:
        queued_at, task_id = _parse_cursor(after)
        clauses.append(f"(queued_at, task_id) < ({arg(queued_at)}, {arg(task_id)})")
    sql = f"SELECT {', '.join(_SUMMARY_COLUMNS)} FROM tasks"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY queued_at DESC, task_id DESC LIMIT {arg(limit + 1)}"
    return sql, args


def _parse_cursor(cursor: str) -> tuple[int, str]:
    queued_at, sep, task_id = cursor.partition(":")
    if not sep or not queued_at.isdigit():
        raise ValueError(f"not a cursor of this listing: {cursor!r}")
    return int(queued_at), task_id


async def next_redrive_id(pool: asyncpg.Pool, task_id: str) -> str:
    """The id under which a dead-lettered task runs again: ``<first id>~<n>``, one more
    than any redrive of the same first task so far (a deliberation's ``d/agent`` becomes
    ``d+agent~1``). Two operators redriving at once get
    the same id, and the scheduler runs it once."""
    root = task_id.rsplit("~", 1)[0] if _is_redrive(task_id) else task_id
    root = root.replace("/", "+")  # a deliberation's task id; "/" is not for other ids
    rows = await pool.fetch("SELECT task_id FROM tasks WHERE starts_with(task_id, $1)", root + "~")
    taken = [int(r["task_id"].rsplit("~", 1)[1]) for r in rows if _is_redrive(r["task_id"])]
    return f"{root}~{max(taken, default=0) + 1}"


def _is_redrive(task_id: str) -> bool:
    _, sep, n = task_id.rpartition("~")
    return bool(sep) and n.isdigit()


async def deliberation(pool: asyncpg.Pool, deliberation_id: str) -> list[TaskView]:
    """Every task of a deliberation, by agent id."""
    ids = await pool.fetch(
        "SELECT task_id FROM tasks WHERE deliberation_id = $1 ORDER BY agent_id", deliberation_id
    )
    return [await get_task(pool, r["task_id"]) for r in ids]


async def _all_finished(pool: asyncpg.Pool, deliberation_id: str) -> bool:
    done: bool | None = await pool.fetchval(
        "SELECT bool_and(status = ANY($2::text[])) FROM tasks WHERE deliberation_id = $1",
        deliberation_id,
        sorted(TERMINAL),
    )
    return bool(done)


async def get_deliberation(
    pool: asyncpg.Pool, deliberation_id: str, *, tenant: str | None = None
) -> DeliberationView:
    """A deliberation: each agent's status; its answers and failures once all are in.
    With ``tenant``, only that tenant's (another's is :class:`NotFound`)."""
    rows = await pool.fetch(
        "SELECT agent_id, status, error FROM tasks WHERE deliberation_id = $1"
        " AND ($2::text IS NULL OR tenant = $2) ORDER BY agent_id",
        deliberation_id,
        tenant,
    )
    if not rows:
        raise await _missing(
            pool, "deliberation", deliberation_id, DeliberationRequested.TYPE, tenant
        )
    revealed = all(r["status"] in TERMINAL for r in rows)
    answers = await visible_outputs(pool, deliberation_id) if revealed else []
    return DeliberationView(
        deliberation_id=deliberation_id,
        revealed=revealed,
        statuses={r["agent_id"]: r["status"] for r in rows},
        answers={a.agent_id: a for a in answers},
        failures={
            r["agent_id"]: _why(r["status"], r["error"])
            for r in rows
            if revealed and r["status"] != "completed"
        },
    )


async def _missing(
    pool: asyncpg.Pool, kind: str, subject: str, command: str, tenant: str | None = None
) -> NotFound:
    """Why there is no such task or deliberation: the scheduler rejected the command
    (and said why), or nothing by that id was ever folded (for ``tenant``, if given)."""
    reason = await pool.fetchval(
        "SELECT reason FROM rejections WHERE subject_id = $1 AND command_type = $2"
        " AND ($3::text IS NULL OR tenant = $3) ORDER BY rejected_at LIMIT 1",
        subject,
        command,
        tenant,
    )
    if reason is not None:
        return Rejected(f"{kind} {subject!r} was rejected: {reason}")
    return NotFound(f"no {kind} {subject!r}")


def _why(status: str, error: str | None) -> str:
    """``status: error``, without saying the status twice (``cancelled: ...``)."""
    if error and error.startswith(f"{status}:"):
        return error
    return f"{status}: {error or 'no answer'}"


async def visible_outputs(pool: asyncpg.Pool, deliberation_id: str) -> list[OutputView]:
    """The accepted, witnessed answers of a deliberation's tasks, by agent id: none until
    every task of the deliberation is finished."""
    if not await _all_finished(pool, deliberation_id):
        return []
    rows = await pool.fetch(
        _VISIBLE_OUTPUT + " JOIN tasks t ON t.output_event_id = o.event_id"
        " WHERE t.deliberation_id = $1 ORDER BY o.agent_id",
        deliberation_id,
    )
    return [_output(r) for r in rows]


async def witness_entries(pool: asyncpg.Pool) -> list[WitnessEntry]:
    rows = await pool.fetch("SELECT * FROM witness_entries ORDER BY sequence")
    return [
        WitnessEntry(
            sequence=r["sequence"],
            previous_hash=bytes(r["previous_hash"]),
            entry_hash=bytes(r["entry_hash"]),
            subject_type=r["subject_type"],
            subject_event_id=r["subject_event_id"],
            subject_digest=bytes(r["subject_digest"]),
            recorded_at=r["recorded_at"],
            task_id=r["task_id"],
            agent_id=r["agent_id"],
            detail=r["detail"],
            attempt=r["attempt"],
        )
        for r in rows
    ]


def _output(row: asyncpg.Record) -> OutputView:
    return OutputView(
        event_id=row["event_id"],
        agent_id=row["agent_id"],
        content=row["content"],
        latency_us=row["latency_us"],
        witness_sequence=row["sequence"],
    )


@dataclass(frozen=True, slots=True)
class PoolView:
    """One pool at a glance: its agents and its tasks by state."""

    pool: str
    agents: int
    """Agents registered in the pool."""
    capacity: int | None
    """As an operator last set it (``conclave capacity``); ``None``: the scheduler's
    default (``CONCLAVE_POOL_CAPACITY``)."""
    in_flight: int
    """Dispatched, not finished: what counts against the pool's capacity."""
    aging_turns: int | None
    """A queued task gains a priority level per this many turns; ``None``: strict."""
    weights: dict[str, int]
    """Fairness key -> its weight, for the keys the pool's setting names (others weigh 1)."""
    queued: dict[str, int]
    """Priority label -> tasks waiting for capacity or an agent."""
    waiting: int
    """Tasks waiting for their dependencies (holding nothing)."""
    retrying: int
    """Tasks waiting out a retry back-off (holding no capacity)."""
    completed: int
    dead_lettered: int
    cancelled: int
    expired: int
    dependency_failed: int


async def list_pools(pool: asyncpg.Pool, *, tenant: str | None = None) -> list[PoolView]:
    """Every pool that has agents or tasks, by name. With ``tenant``, tasks are counted
    for that tenant only (agents and capacities are everyone's: the pools are shared)."""
    counts = await pool.fetch(
        "SELECT pool, status, priority, count(*) AS n FROM tasks"
        " WHERE $1::text IS NULL OR tenant = $1 GROUP BY pool, status, priority",
        tenant,
    )
    agents = await pool.fetch(
        "SELECT pool, count(*) AS n FROM agents WHERE pool IS NOT NULL GROUP BY pool"
    )
    settings = await pool.fetch(
        "SELECT DISTINCT ON (pool) pool, capacity, aging_turns, weights FROM pool_settings"
        " ORDER BY pool, configured_at DESC, event_id DESC"
    )
    capacities = {r["pool"]: r["capacity"] for r in settings}
    configured = {r["pool"]: r for r in settings}
    names = sorted({r["pool"] for r in counts} | {r["pool"] for r in agents} | set(capacities))
    by_status: dict[tuple[str, str], int] = {}
    queued: dict[str, dict[str, int]] = {name: {} for name in names}
    for r in counts:
        key = (r["pool"], r["status"])
        by_status[key] = by_status.get(key, 0) + r["n"]
        if r["status"] == "queued":
            queued[r["pool"]][r["priority"]] = r["n"]
    registered = {r["pool"]: r["n"] for r in agents}
    return [
        PoolView(
            pool=name,
            agents=registered.get(name, 0),
            capacity=capacities.get(name),
            in_flight=by_status.get((name, "dispatched"), 0),
            aging_turns=configured[name]["aging_turns"] if name in configured else None,
            weights=_weights(configured[name]["weights"] if name in configured else None),
            queued={p.label: queued[name].get(p.label, 0) for p in Priority},
            waiting=by_status.get((name, "waiting"), 0),
            retrying=by_status.get((name, "retrying"), 0),
            completed=by_status.get((name, "completed"), 0),
            dead_lettered=by_status.get((name, "dead_lettered"), 0),
            cancelled=by_status.get((name, "cancelled"), 0),
            expired=by_status.get((name, "expired"), 0),
            dependency_failed=by_status.get((name, "dependency_failed"), 0),
        )
        for name in names
    ]


def _weights(column: list[str] | None) -> dict[str, int]:
    """``key=weight`` per weighted key, as the projector keeps them."""
    pairs = (entry.rpartition("=") for entry in column or ())
    return {key: int(weight) for key, _, weight in pairs}


HOST_STATES = ("alive", "over_limit", "leaving", "silent", "lost", "failed", "left")
AGENT_STATES = (
    "idle", "busy", "silent", "unresponsive", "lost", "retired", "failed", "circuit_open",
    "probing",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HostView:
    """A runtime host, as its beats and the scheduler's judgement say."""

    host_id: str
    pool: str | None
    state: str
    """``alive`` (its lease holds), ``silent`` (it ran out, the scheduler has not judged
    it yet) or ``lost`` (``host.lost``, and no later beat), ``failed`` (lost, then silent
    past the grace period: ``host.failed``); ``leaving`` (it said it is
    stopping, ``host.leaving``: its agents take no new work) and ``left`` (then judged);
    ``over_limit`` (alive, but its newest beat said it is over its memory or CPU limit:
    its agents take no new work until it has room)."""
    agent_ids: list[str]
    last_beat_at: int | None
    lease_expires_at: int | None
    lost_at: int | None
    lost_reason: str | None
    leaving_until: int | None
    rss_bytes: int | None
    cpu_percent: float | None
    over_limit: str | None
    """Why it takes no new work, while it is ``over_limit``."""
    failed_reason: str | None = None
    """Why the scheduler judged it failed, while it is ``failed``."""


@dataclass(frozen=True, slots=True)
class AgentChange:
    """One change of an agent's state (``agent_events``), with what caused it."""

    occurred_at: int
    state: str
    reason: str
    task_id: str | None
    event_id: str
    source: str
    """``topic:partition@offset`` of the event that caused it."""


OTHER_TENANTS_TASK = "another tenant's task"
"""What a tenant reads instead of the reason of a change about another tenant's task."""


async def agent_history(
    pool: asyncpg.Pool, agent_id: str, *, limit: int = 100, tenant: str | None = None
) -> list[AgentChange]:
    """The agent's last ``limit`` state changes, oldest first (:class:`NotFound` for an
    agent that never registered). Agents serve every tenant: with ``tenant``, a change
    about another tenant's task keeps its state and time, not its task, reason or event
    id (a failure's message is that tenant's)."""
    rows = await pool.fetch(
        """SELECT * FROM (
               SELECT e.occurred_at, e.state, e.source_topic, e.source_partition,
                      e.source_offset, e.step,
                      ($3::text IS NULL OR e.task_id IS NULL OR t.tenant = $3) AS shown,
                      e.reason, e.task_id, e.event_id
                 FROM agent_events e LEFT JOIN tasks t ON t.task_id = e.task_id
                WHERE e.agent_id = $1
                ORDER BY e.occurred_at DESC, e.source_topic DESC, e.source_partition DESC,
                         e.source_offset DESC, e.step DESC
                LIMIT $2) recent
           ORDER BY occurred_at, source_topic, source_partition, source_offset, step""",
        agent_id,
        limit,
        tenant,
    )
    if (
        not rows
        and await pool.fetchval("SELECT 1 FROM agents WHERE agent_id = $1", agent_id) is None
    ):
        raise NotFound(f"no agent {agent_id!r}")
    return [
        AgentChange(
            r["occurred_at"],
            r["state"],
            r["reason"] if r["shown"] else OTHER_TENANTS_TASK,
            r["task_id"] if r["shown"] else None,
            r["event_id"] if r["shown"] else "",
            f"{r['source_topic']}:{r['source_partition']}@{r['source_offset']}",
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class AgentView:
    """A registered agent and what the system knows of it now."""

    agent_id: str
    pool: str | None
    host_id: str
    state: str
    """``lost`` (its host is), ``retired`` (its host left, or retired it as the pool
    shrank), ``failed`` (it crashed past
    its restart budget: its host runs it no more), ``unresponsive`` (the
    scheduler gives it no work: its last attempt stalled), ``circuit_open`` (it failed
    too often: no work until the cool-down ends), ``probing`` (its circuit is half-open:
    one task decides), ``silent`` (no heartbeat for ``silent_after_us``), ``busy`` or
    ``idle`` (its last heartbeat's task)."""
    current_task_id: str | None
    last_heartbeat_at: int | None
    suspended_reason: str | None
    """Why the scheduler gives it no work, if it does not: a stall, a lost host, a crash
    past its restart budget, an open circuit."""
    rss_bytes: int | None
    capabilities: list[str]
    """What it can do, as its registration says."""
    version: str | None
    restarts: int | None = None
    """Restarts after crashes within the window, as its latest restart said."""
    restarted_at: int | None = None


def _host_state(row: asyncpg.Record, now_us: int) -> str:
    lease, lost, leaving = row["lease_expires_at"], row["lost_lease"], row["leaving_until"]
    # A beat after the leaving that promised more is a new start (leases only grow).
    left = leaving is not None and lease is not None and lease <= leaving
    if lost is not None and (lease is None or lost >= lease):
        if left:
            return "left"
        failed = row["failed_lease"]
        return "failed" if failed is not None and failed >= lost else "lost"
    if left:
        return "leaving"
    if lease is None or lease <= now_us:
        return "silent"
    return "over_limit" if row["over_limit"] is not None else "alive"


async def list_hosts(pool: asyncpg.Pool, now_us: int) -> list[HostView]:
    """Every runtime host that ever beat, by id."""
    rows = await pool.fetch("SELECT * FROM hosts ORDER BY host_id")
    return [
        HostView(
            host_id=r["host_id"],
            pool=r["pool"],
            state=(state := _host_state(r, now_us)),
            agent_ids=list(r["agent_ids"]),
            last_beat_at=r["last_beat_at"],
            lease_expires_at=r["lease_expires_at"],
            lost_at=r["lost_at"],
            lost_reason=r["lost_reason"],
            leaving_until=r["leaving_until"],
            rss_bytes=r["rss_bytes"],
            cpu_percent=r["cpu_percent"],
            over_limit=r["over_limit"],
            failed_reason=r["failed_reason"] if state == "failed" else None,
        )
        for r in rows
    ]


async def list_agents(
    pool: asyncpg.Pool,
    now_us: int,
    *,
    silent_after_us: int,
    in_pool: str | None = None,
    host_id: str | None = None,
    state: str | None = None,
    tenant: str | None = None,
    capability: str | None = None,
) -> list[AgentView]:
    """Registered agents by id, with their state at ``now_us``; filtered by pool, host,
    state and capability when given (discovery: who can ``summarise``?). Agents serve
    every tenant; with ``tenant``, an agent's current task is shown only if it is that
    tenant's."""
    rows = await pool.fetch(
        """SELECT a.*, h.lease_expires_at, h.lost_lease, h.leaving_until, h.over_limit,
                  h.failed_lease,
                  ($3::text IS NULL OR t.tenant = $3) AS task_shown FROM agents a
           LEFT JOIN hosts h ON h.host_id = a.host_id
           LEFT JOIN tasks t ON $3::text IS NOT NULL AND t.task_id = a.current_task_id
           WHERE ($1::text IS NULL OR a.pool = $1) AND ($2::text IS NULL OR a.host_id = $2)
             AND ($4::text IS NULL OR a.capabilities @> ARRAY[$4::text])
           ORDER BY a.agent_id""",
        in_pool,
        host_id,
        tenant,
        capability,
    )
    views = []
    for r in rows:
        beat = r["last_heartbeat_at"]
        host = _host_state(r, now_us) if r["lost_lease"] is not None else None
        if host in ("lost", "failed", "left"):
            current = "retired" if host == "left" else host
        elif r["failed_reason"] is not None:
            current = "failed"
        elif r["retired_reason"] is not None:
            current = "retired"
        elif r["suspended_reason"] is not None:
            current = "unresponsive"
        elif r["circuit"] == "open":
            current = "circuit_open"
        elif r["circuit"] == "half_open":
            current = "probing"
        elif beat is None or now_us - beat > silent_after_us:
            current = "silent"
        else:
            current = "busy" if r["current_task_id"] is not None else "idle"
        if state is not None and current != state:
            continue
        views.append(
            AgentView(
                agent_id=r["agent_id"],
                pool=r["pool"],
                host_id=r["host_id"],
                state=current,
                current_task_id=r["current_task_id"] if r["task_shown"] else None,
                last_heartbeat_at=beat,
                suspended_reason=r["failed_reason"]
                or r["retired_reason"]
                or r["suspended_reason"]
                or r["circuit_reason"]
                or (f"host over its limits: {r['over_limit']}" if r["over_limit"] else None),
                rss_bytes=r["rss_bytes"],
                capabilities=list(r["capabilities"] or ()),
                version=r["version"],
                restarts=r["restarts"],
                restarted_at=r["restarted_at"],
            )
        )
    return views


@dataclass(frozen=True, slots=True)
class SystemView:
    """What ``conclave status`` shows beside pools, agents and hosts."""

    halt_reason: str | None
    """Why the system is halted; ``None``: it is not."""
    witness_head: int
    witness_head_at: int | None
    witness_head_hash: str | None
    """The head entry's hash (hex), which covers every entry before it; ``None``: empty."""
    checkpoint_origin: str | None
    checkpoint_size: int | None
    """Entries the last signed checkpoint covers; ``None``: none published yet."""
    checkpoint_at: int | None
    dead_lettered_since: int
    """Tasks dead-lettered since the time asked for."""
    bad_records_since: int
    """Records dead-lettered as malformed (not tasks) since then."""


async def system(pool: asyncpg.Pool, since_us: int, *, tenant: str | None = None) -> SystemView:
    """The halt, the witness head, the last checkpoint, and dead letters since ``since_us``
    (with ``tenant``, that tenant's dead-lettered tasks only)."""
    halt = await pool.fetchrow(
        "SELECT kind, reason FROM system_events ORDER BY occurred_at DESC LIMIT 1"
    )
    head = await pool.fetchrow(
        "SELECT sequence, recorded_at, entry_hash FROM witness_entries"
        " ORDER BY sequence DESC LIMIT 1"
    )
    checkpoint = await pool.fetchrow(
        "SELECT origin, tree_size, signed_at FROM checkpoints ORDER BY signed_at DESC LIMIT 1"
    )
    dead = await pool.fetchval(
        "SELECT count(*) FROM tasks WHERE status = 'dead_lettered' AND finished_at >= $1"
        " AND ($2::text IS NULL OR tenant = $2)",
        since_us,
        tenant,
    )
    bad = await pool.fetchval("SELECT count(*) FROM dead_letters WHERE recorded_at >= $1", since_us)
    return SystemView(
        halt_reason=halt["reason"] if halt is not None and halt["kind"] == "system.halt" else None,
        witness_head=head["sequence"] if head is not None else 0,
        witness_head_at=head["recorded_at"] if head is not None else None,
        witness_head_hash=bytes(head["entry_hash"]).hex() if head is not None else None,
        checkpoint_origin=checkpoint["origin"] if checkpoint is not None else None,
        checkpoint_size=checkpoint["tree_size"] if checkpoint is not None else None,
        checkpoint_at=checkpoint["signed_at"] if checkpoint is not None else None,
        dead_lettered_since=int(dead),
        bad_records_since=int(bad),
    )


@dataclass(frozen=True, slots=True)
class TaskState:
    """Where a task is now: what a live feed of changes compares."""

    task_id: str
    status: str
    attempt: int
    pool: str
    agent_id: str | None
    error: str | None
    finished_at: int | None


async def live_tasks(pool: asyncpg.Pool, tenant: str, finished_since: int) -> list[TaskState]:
    """A tenant's unfinished tasks and those finished since ``finished_since`` (µs), by
    id: a poller that compares two calls sees every change between them (a task that
    both started and finished in between shows up finished)."""
    rows = await pool.fetch(
        """SELECT task_id, status, attempt, pool, agent_id, error, finished_at FROM tasks
            WHERE tenant = $1 AND (status <> ALL($2::text[]) OR finished_at >= $3)
            ORDER BY task_id""",
        tenant,
        sorted(TERMINAL),
        finished_since,
    )
    return [TaskState(*r) for r in rows]
