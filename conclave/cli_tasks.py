"""``conclave tasks``, ``conclave task show`` and ``conclave dlq list|show|redrive``: the
task schedule from the shell. Thin: the queries live in :mod:`projections.queries`, the
commands in :class:`conclave.client.Client`. Tables by default, ``--json`` for scripts;
every refusal is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from conclave.domain.events import Priority
from conclave.domain.scheduler_state import TaskStatus
from conclave.errors import ConclaveError, NotFound, Rejected
from conclave.settings import Settings
from projections.queries import (
    DeliberationView,
    Page,
    PoolView,
    TaskFilter,
    TaskSummary,
    TaskView,
)

__all__ = [
    "deliberation_app",
    "dlq_app",
    "finished",
    "list_pools",
    "list_tasks",
    "parse_priority",
    "show_deliberation",
    "task_app",
]

T = TypeVar("T")

task_app = typer.Typer(help="One task: inspect it.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead-lettered tasks: list, inspect, run again.", no_args_is_help=True)
deliberation_app = typer.Typer(
    help="One deliberation: its agents, then their answers together.", no_args_is_help=True
)

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

STATUSES = tuple(s.value for s in TaskStatus)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Limit = Annotated[int, typer.Option(min=1, max=10_000, help="At most this many rows.")]
After = Annotated[
    str | None, typer.Option(help="The cursor a previous page printed: the page after it.")
]
PoolOption = Annotated[str | None, typer.Option("--pool", help="Only this pool.")]
WaitTimeout = Annotated[
    float, typer.Option("--timeout", min=0.1, help="With --wait or --follow: give up after S.")
]


def _query(run: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    from projections.database import connect

    async def go() -> T:
        pool = await connect(Settings.from_env(), reader=True)
        try:
            return await run(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except ValueError as exc:  # a cursor from elsewhere, a malformed argument
        raise ConclaveError(str(exc)) from None


def _when(us: int | None) -> str:
    if us is None:
        return "-"
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _in(us: int | None) -> str:
    """A time as people read it: how far from now (``in 2.0 s``, ``1.5 s ago``)."""
    if us is None:
        return "-"
    seconds = us / 1e6 - time.time()
    return f"in {seconds:.1f} s" if seconds >= 0 else f"{-seconds:.1f} s ago"


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str) -> int:
    """``15m``, ``2h``, ``1d`` (that long ago) or an ISO 8601 time (UTC unless it says
    otherwise), as µs since the epoch."""
    match = _RELATIVE.match(text.strip())
    if match is not None:
        return int((time.time() - float(match[1]) * _UNIT_S[match[2]]) * 1e6)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither a duration (15m, 2h, 1d) nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1e6)


def parse_priority(value: str) -> Priority:
    """A priority option, or the CLI's one-line refusal."""
    try:
        return Priority.parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _summary_table(page: Page, *, dead: bool = False) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("task", "status", "pool", "priority", "agent", "attempts", "queued"):
        table.add_column(column)
    table.add_column("error" if dead else "next attempt / error", overflow="fold")
    for t in page.tasks:
        note = t.error or ""
        if t.status == "retrying":
            note = f"{_in(t.next_attempt_at)} ({t.error})"
        table.add_row(
            t.task_id,
            t.status,
            t.pool,
            t.priority,
            t.agent_id or "-",
            f"{t.attempt}/{t.max_attempts}",
            _when(t.queued_at),
            note,
        )
    return table


def _print_page(page: Page, as_json: bool, *, dead: bool = False) -> None:
    if as_json:
        _print_json({"tasks": [dataclasses.asdict(t) for t in page.tasks], "cursor": page.cursor})
        return
    if not page.tasks:
        out.print("no tasks")
        return
    out.print(_summary_table(page, dead=dead))
    if page.cursor is not None:
        out.print(f"more: --after {page.cursor}")


PriorityOption = Annotated[
    str | None, typer.Option(help="Only this priority: critical, high, normal, low.")
]
AgentOption = Annotated[str | None, typer.Option(help="Only tasks run last by this agent.")]
TenantOption = Annotated[str | None, typer.Option(help="Only this tenant's tasks.")]
SinceOption = Annotated[
    str | None, typer.Option(help="Queued since: 15m, 2h, 1d or an ISO 8601 time.")
]
UntilOption = Annotated[str | None, typer.Option(help="Queued before (same forms).")]
ErrorOption = Annotated[
    str | None,
    typer.Option(
        "--error",
        help="Only tasks whose error, or a failed attempt's 'Type: message', contains this"
        " text (any case).",
    ),
]


def task_filter(
    status: str | None = None,
    pool: str | None = None,
    priority: str | None = None,
    agent: str | None = None,
    tenant: str | None = None,
    since: str | None = None,
    until: str | None = None,
    error: str | None = None,
) -> TaskFilter:
    """The listing filter the options name, or the CLI's one-line refusal."""
    if status is not None and status not in STATUSES:
        raise typer.BadParameter(f"status must be one of {', '.join(STATUSES)}")
    return TaskFilter(
        status=status,
        pool=pool,
        priority=parse_priority(priority).label if priority is not None else None,
        agent_id=agent,
        tenant=tenant,
        since=parse_time(since) if since is not None else None,
        until=parse_time(until) if until is not None else None,
        error=error,
    )


def list_tasks(
    status: Annotated[
        str | None, typer.Option(help=f"Only tasks with this status: {', '.join(STATUSES)}.")
    ] = None,
    pool: PoolOption = None,
    priority: PriorityOption = None,
    agent: AgentOption = None,
    tenant: TenantOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    error: ErrorOption = None,
    limit: Limit = 50,
    after: After = None,
    as_json: AsJson = False,
) -> None:
    """List tasks, newest first, with filters; a page at a time."""
    from projections.queries import list_tasks as query

    where = task_filter(status, pool, priority, agent, tenant, since, until, error)
    page = _query(lambda db: query(db, where, limit=limit, after=after))
    _print_page(page, as_json)


@task_app.command("show")
def task_show(
    task_id: Annotated[str, typer.Argument()],
    as_json: AsJson = False,
    follow: Annotated[
        bool, typer.Option("--follow", help="Print each change until the task is finished.")
    ] = False,
    timeout: WaitTimeout = 600,
) -> None:
    """Status, output (only once witnessed), witness sequence and attempt history."""
    from projections.queries import get_task

    if follow:
        view = finished(task_id, timeout, follow=True)
    else:
        view = _query(lambda db: get_task(db, task_id))
    if as_json:
        _print_json(dataclasses.asdict(view))
        return
    out.print(_task_table(view))


@deliberation_app.command("show")
def deliberation_show(
    deliberation_id: Annotated[str, typer.Argument()],
    as_json: AsJson = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until every agent has answered or failed.")
    ] = False,
    timeout: WaitTimeout = 600,
) -> None:
    """Each agent's status; the answers, all together, once every agent is done."""
    show_deliberation(deliberation_id, as_json=as_json, wait_s=timeout if wait else None)


def show_deliberation(deliberation_id: str, *, as_json: bool, wait_s: float | None) -> None:
    from projections.queries import get_deliberation

    async def poll(db: asyncpg.Pool) -> DeliberationView:
        deadline = time.monotonic() + (wait_s or 0)
        while True:
            try:
                view = await get_deliberation(db, deliberation_id)
            except Rejected:
                raise
            except NotFound:
                if wait_s is None or time.monotonic() > deadline:
                    raise
            else:
                if view.revealed or wait_s is None:
                    return view
                if time.monotonic() > deadline:
                    raise ConclaveError(
                        f"deliberation {deliberation_id!r} not done within {wait_s:g} s"
                    )
            await asyncio.sleep(0.2)

    view = _query(poll)
    if as_json:
        _print_json(dataclasses.asdict(view))
        return
    table = Table(box=None, header_style="bold", title=f"deliberation {deliberation_id}")
    for column in ("agent", "status", "answer"):
        table.add_column(column, overflow="fold")
    for agent_id, status in view.statuses.items():
        if not view.revealed:
            shown = "(sealed until every agent is done)"
        elif agent_id in view.answers:
            shown = view.answers[agent_id].content
        else:
            shown = view.failures.get(agent_id, "-")
        table.add_row(agent_id, status, shown)
    out.print(table)


def finished(task_id: str, timeout_s: float, *, follow: bool = False) -> TaskView:
    """The task once it is finished (read model), polling; with ``follow``, a line on
    stderr each time its status or attempt changes. A task the scheduler rejected raises
    :class:`~conclave.errors.Rejected`; one not finished in time, ``ConclaveError``."""
    from projections.queries import get_task
    from projections.rows import TERMINAL

    async def poll(db: asyncpg.Pool) -> TaskView:
        deadline = time.monotonic() + timeout_s
        seen: tuple[str, int] | None = None
        while True:
            try:
                view: TaskView | None = await get_task(db, task_id)
            except Rejected:
                raise
            except NotFound:
                view = None  # not folded into the read model yet
            if view is not None and follow and (view.status, view.attempt) != seen:
                seen = (view.status, view.attempt)
                err.print(f"{_when(time.time_ns() // 1000)} {task_id}: {view.status}"
                          f" (attempt {view.attempt} of {view.max_attempts})")  # fmt: skip
            if view is not None and view.status in TERMINAL:
                return view
            if time.monotonic() > deadline:
                status = view.status if view is not None else "not seen yet"
                raise ConclaveError(
                    f"task {task_id!r} not finished within {timeout_s:g} s (it is {status})"
                )
            await asyncio.sleep(0.1)

    return _query(poll)


def _task_table(view: TaskView) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("task", view.task_id)
    table.add_row("status", view.status)
    table.add_row("tenant", view.tenant)
    table.add_row("pool / priority", f"{view.pool} / {view.priority}")
    table.add_row("agent", view.agent_id or "-")
    table.add_row("attempts", f"{view.attempt} of {view.max_attempts}")
    table.add_row("queued", _when(view.queued_at))
    if view.finished_at is not None:
        table.add_row("finished", _when(view.finished_at))
    if view.status == "retrying":
        table.add_row(
            "next attempt", f"{_when(view.next_attempt_at)} ({_in(view.next_attempt_at)})"
        )
    if view.redrive_of is not None:
        table.add_row("redrive of", view.redrive_of)
    if view.start_by is not None and view.attempt == 0:
        table.add_row("start by", _when(view.start_by))
    if view.finish_by is not None:
        table.add_row("finish by", _when(view.finish_by))
    if view.dependencies:
        table.add_row("depends on", ", ".join(f"{d} ({s})" for d, s in view.dependencies.items()))
    if view.sealed:
        table.add_row("output", "(sealed until every agent of its deliberation is done)")
    if view.output is not None:
        table.add_row("output", view.output.content)
        table.add_row("witness sequence", str(view.output.witness_sequence))
    if view.unsolicited_outputs:
        table.add_row(
            "unsolicited",
            f"{view.unsolicited_outputs} other witnessed output(s), not the task's answer",
        )
    for f in view.failures:
        kind = "permanent" if f.permanent else "failed"
        table.add_row(
            f"attempt {f.attempt} {kind}",
            f"{_when(f.failed_at)} {f.agent_id}: {f.error_type}: {f.message}",
        )
    if view.error:
        table.add_row("error", view.error)
    return table


@dlq_app.command("list")
def dlq_list(
    pool: PoolOption = None,
    priority: PriorityOption = None,
    agent: AgentOption = None,
    tenant: TenantOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    error: ErrorOption = None,
    limit: Limit = 50,
    after: After = None,
    as_json: AsJson = False,
) -> None:
    """Dead-lettered tasks, newest first; the filters are those of ``dlq redrive --all``."""
    from projections.queries import list_tasks as query

    where = task_filter("dead_lettered", pool, priority, agent, tenant, since, until, error)
    _print_page(_query(lambda db: query(db, where, limit=limit, after=after)), as_json, dead=True)


@dlq_app.command("show")
def dlq_show(task_id: Annotated[str, typer.Argument()], as_json: AsJson = False) -> None:
    """One dead-lettered task with every attempt: agent, error, time."""
    task_show(task_id, as_json)


@dlq_app.command("redrive")
def dlq_redrive(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Dead-lettered tasks.")] = None,
    all_: Annotated[
        bool,
        typer.Option(
            "--all", help="Every dead-lettered task (the filters choose which; see dlq list)."
        ),
    ] = False,
    pool: PoolOption = None,
    priority: PriorityOption = None,
    agent: AgentOption = None,
    tenant: TenantOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    error: ErrorOption = None,
    max_attempts: Annotated[
        int | None, typer.Option(min=1, help="Attempts of the new run (default: as before).")
    ] = None,
) -> None:
    """Run dead-lettered tasks again, each as a new task ``<id>~<n>`` with a fresh attempt
    budget, linked to the one it redrives; prints the new ids. ``--all`` takes the
    filters of ``dlq list``, so ``dlq list`` with them shows first what it would run."""
    if bool(task_ids) == all_:
        raise typer.BadParameter("name dead-lettered tasks, or --all (not both)")
    filters = (pool, priority, agent, tenant, since, until, error)
    if not all_ and any(f is not None for f in filters):
        raise typer.BadParameter("the filters go with --all")
    where = task_filter("dead_lettered", *filters) if all_ else None
    redriven = _query(lambda db: _redrive(db, task_ids or [], where, max_attempts))
    for old, new in redriven:
        out.print(f"{old} -> {new}")
    err.print(f"redriven {len(redriven)} task(s)")


async def _redrive(
    db: asyncpg.Pool,
    task_ids: list[str],
    where: TaskFilter | None,
    max_attempts: int | None,
) -> list[tuple[str, str]]:
    """``task_ids``, or with ``where`` every dead-lettered task it matches (not redriven
    yet)."""
    from conclave.client import Client
    from projections.queries import get_task, list_tasks, next_redrive_id

    views: list[TaskView] = []
    if where is not None:
        after: str | None = None
        while True:
            page = await list_tasks(db, where, limit=500, after=after)
            views += [
                await get_task(db, t.task_id) for t in page.tasks if not await _redriven(db, t)
            ]
            if page.cursor is None:
                break
            after = page.cursor
    else:
        for task_id in task_ids:
            view = await get_task(db, task_id)
            if view.status != "dead_lettered":
                raise ConclaveError(f"task {task_id!r} is {view.status}, not dead-lettered")
            views.append(view)
    redriven: list[tuple[str, str]] = []
    settings = Settings.from_env()
    for tenant in sorted({v.tenant for v in views}):
        # The new task is the tenant's, like the one it runs again.
        async with Client(
            dataclasses.replace(settings, tenant=tenant), producer_name="dlq"
        ) as client:
            for view in (v for v in views if v.tenant == tenant):
                new_id = await client.submit(
                    view.input,
                    task_id=await next_redrive_id(db, view.task_id),
                    pool=view.pool,
                    priority=Priority.parse(view.priority),
                    # a deliberation's task is its agent's; any other runs on any agent
                    agent_id=view.agent_id if view.deliberation_id is not None else None,
                    max_attempts=max_attempts or view.max_attempts,
                    retry=view.retry,
                    redrive_of=view.task_id,
                )
                redriven.append((view.task_id, new_id))
    return redriven


async def _redriven(db: asyncpg.Pool, task: TaskSummary) -> bool:
    """Whether a redrive of ``task`` exists already (``--all`` runs each once)."""
    row = await db.fetchval("SELECT 1 FROM tasks WHERE redrive_of = $1 LIMIT 1", task.task_id)
    return row is not None


def list_pools(as_json: AsJson = False) -> None:
    """Pools: agents, capacity, tasks in flight, queued per priority, retrying, finished."""
    from projections.queries import list_pools as query

    settings = Settings.from_env()
    views = _query(query)
    if as_json:
        _print_json(
            [
                {**dataclasses.asdict(v), "capacity": v.capacity or settings.pool_capacity}
                for v in views
            ]
        )
        return
    if not views:
        out.print("no pools")
        return
    table = Table(box=None, header_style="bold")
    columns = ["pool", "agents", "in flight / capacity", "fairness", *(p.label for p in Priority)]
    finished = ["completed", "dead", "cancelled", "expired", "dep. failed"]
    for column in [*columns, "waiting", "retrying", *finished]:
        table.add_column(column, justify="left" if column == "pool" else "right")
    for v in views:
        table.add_row(
            v.pool,
            str(v.agents),
            f"{v.in_flight} / {v.capacity if v.capacity is not None else settings.pool_capacity}"
            + ("" if v.capacity is not None else "*"),
            _fairness(v),
            *(str(v.queued[p.label]) for p in Priority),
            str(v.waiting),
            str(v.retrying),
            str(v.completed),
            str(v.dead_lettered),
            str(v.cancelled),
            str(v.expired),
            str(v.dependency_failed),
        )
    out.print(table)
    err.print(
        "queued per priority; * the default capacity as configured here "
        "(CONCLAVE_POOL_CAPACITY), others set with `conclave capacity`; fairness: "
        "--aging and --weight KEY=W as set there (keys not named weigh 1)"
    )


def _fairness(view: PoolView) -> str:
    parts = [f"aging {view.aging_turns}"] if view.aging_turns is not None else []
    parts += [f"{key}={weight}" for key, weight in sorted(view.weights.items())]
    return " ".join(parts) or "-"
