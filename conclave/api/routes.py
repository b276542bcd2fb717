"""The API's endpoints under ``/v1``: the read models as JSON, and the commands.

Thin, like the CLI: the queries are :mod:`projections.queries` (called with the
token's tenant), the commands :class:`conclave.client.Client` (whose envelope carries
it). A command about a task or deliberation first reads it for the token's tenant, so a
tenant can neither cancel nor redrive another's work, nor learn that it exists.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Path, Query, Request

from conclave.api.app import Caller, state_of
from conclave.api.cursor import decode_cursor, encode_cursor
from conclave.api.models import (
    Accepted,
    AgentChangeOut,
    AgentOut,
    AgentStateName,
    CancelBody,
    DeliberateBody,
    DeliberationAccepted,
    DeliberationOut,
    Error,
    HaltBody,
    HostOut,
    PoolOut,
    PriorityName,
    RedriveBody,
    ResumeBody,
    StatusOut,
    SubmitBody,
    TaskAccepted,
    TaskOut,
    TaskPage,
    TaskSummaryOut,
    WorkflowAccepted,
    WorkflowBody,
    WorkflowOut,
    WorkflowStatusName,
    storable,
)
from conclave.api.tokens import Principal
from conclave.domain.events import Priority, now_us
from conclave.domain.retry import RetryPolicy
from conclave.domain.scheduler_state import TaskStatus
from conclave.domain.validation import MAX_ID_LENGTH
from conclave.errors import InvalidCommand, NotFound
from projections import queries
from projections import workflows as workflow_queries

__all__ = ["router"]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "A command the scheduler would refuse, or a cursor this API did not give out",
        401: "No bearer token, or not a valid one",
        403: "The token may not do this (halt and resume need an admin token)",
        404: "No such resource for this token's tenant",
        409: "The resource is not in a state that allows this",
        413: "Request body over the limit (1 MiB)",
        503: "Kafka or PostgreSQL is not reachable now",
    }
    return {code: {"model": Error, "description": described[code]} for code in (401, 503, *codes)}


router = APIRouter(prefix="/v1")

TaskId = Annotated[str, Path(min_length=1, max_length=2 * MAX_ID_LENGTH + 1)]
WorkflowId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,100}$")]
DeliberationId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]
Filter = Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LENGTH)]


def _clean(**values: str | None) -> None:
    """A 404 for a path id, or a 400 for a filter, that PostgreSQL could not even hold."""
    for name, value in values.items():
        if value is None:
            continue
        try:
            storable(value)
        except ValueError as exc:
            raise InvalidCommand(f"{name} {exc}") from None


def _us(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


# --- reads -----------------------------------------------------------------------------


@router.get("/tasks", responses=_errors(400))
async def list_tasks(
    request: Request,
    caller: Caller,
    status: TaskStatus | None = None,
    pool: Filter = None,
    priority: PriorityName | None = None,
    agent: Filter = None,
    since: Annotated[
        datetime | None, Query(description="Queued at or after (ISO 8601; UTC if no zone)")
    ] = None,
    until: Annotated[datetime | None, Query(description="Queued before")] = None,
    error: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="Whose error, or a failed attempt's 'Type: message', contains this"
            " text (any case)",
        ),
    ] = None,
    cursor: Annotated[
        str | None, Query(max_length=1000, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> TaskPage:
    """This tenant's tasks, newest queued first, a page at a time."""
    _clean(pool=pool, agent=agent, error=error)
    where = queries.TaskFilter(
        status=status.value if status is not None else None,
        pool=pool,
        priority=priority.value if priority is not None else None,
        agent_id=agent,
        tenant=caller.tenant,
        since=_us(since),
        until=_us(until),
        error=error,
    )
    after = decode_cursor(cursor) if cursor is not None else None
    page = await queries.list_tasks(state_of(request).reads, where, limit=limit, after=after)
    return TaskPage(
        tasks=[TaskSummaryOut.model_validate(t) for t in page.tasks],
        next_cursor=encode_cursor(page.cursor) if page.cursor is not None else None,
    )


async def _task(db: asyncpg.Pool, caller: Principal, task_id: str) -> queries.TaskView:
    try:
        storable(task_id)
    except ValueError:
        raise NotFound(f"no task {task_id!r}") from None
    return await queries.get_task(db, task_id, tenant=caller.tenant)


@router.get("/tasks/{task_id:path}", responses=_errors(404))
async def get_task(request: Request, caller: Caller, task_id: TaskId) -> TaskOut:
    """One task: status, witnessed answer (once visible), every failed attempt."""
    return TaskOut.model_validate(await _task(state_of(request).reads, caller, task_id))


async def _deliberation(
    db: asyncpg.Pool, caller: Principal, deliberation_id: str
) -> queries.DeliberationView:
    try:
        storable(deliberation_id)
    except ValueError:
        raise NotFound(f"no deliberation {deliberation_id!r}") from None
    return await queries.get_deliberation(db, deliberation_id, tenant=caller.tenant)


@router.get("/deliberations/{deliberation_id}", responses=_errors(404))
async def get_deliberation(
    request: Request, caller: Caller, deliberation_id: DeliberationId
) -> DeliberationOut:
    """Each agent's status; the answers, all together, once every agent is done."""
    view = await _deliberation(state_of(request).reads, caller, deliberation_id)
    return DeliberationOut.model_validate(view)


@router.get("/pools", responses=_errors())
async def list_pools(request: Request, caller: Caller) -> list[PoolOut]:
    """Pools: agents and capacity (shared), this tenant's tasks by state."""
    state = state_of(request)
    views = await queries.list_pools(state.reads, tenant=caller.tenant)
    default = state.settings.pool_capacity
    return [
        PoolOut.model_validate(
            {
                **dataclasses.asdict(v),
                "capacity": v.capacity if v.capacity is not None else default,
                "default_capacity": v.capacity is None,
                "weights": {
                    key: weight
                    for key, weight in v.weights.items()
                    if key.partition("/")[0] == caller.tenant
                },
            }
        )
        for v in views
    ]


@router.get("/agents", responses=_errors(400))
async def list_agents(
    request: Request,
    caller: Caller,
    pool: Filter = None,
    host: Filter = None,
    state: AgentStateName | None = None,
    capability: Filter = None,
) -> list[AgentOut]:
    """Registered agents with their state; a current task only if it is this tenant's.
    ``capability``: only the agents that registered it (discovery)."""
    _clean(pool=pool, host=host, capability=capability)
    api = state_of(request)
    views = await queries.list_agents(
        api.reads,
        now_us(),
        silent_after_us=api.settings.silent_after_us,
        in_pool=pool,
        host_id=host,
        state=state,
        tenant=caller.tenant,
        capability=capability,
    )
    return [AgentOut.model_validate(v) for v in views]


@router.get("/agents/{agent_id}/history", responses=_errors(404))
async def agent_history(
    request: Request,
    caller: Caller,
    agent_id: Annotated[str, Path(max_length=MAX_ID_LENGTH)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AgentChangeOut]:
    """The agent's last state changes, oldest first, each with why and the event that
    caused it; a change about another tenant's task says only that it was one."""
    try:
        storable(agent_id)
    except ValueError:
        raise NotFound(f"no agent {agent_id!r}") from None
    changes = await queries.agent_history(
        state_of(request).reads, agent_id, limit=limit, tenant=caller.tenant
    )
    return [AgentChangeOut.model_validate(c) for c in changes]


@router.get("/hosts", responses=_errors())
async def list_hosts(request: Request, caller: Caller) -> list[HostOut]:
    """Runtime hosts: alive, silent or lost, with their agents."""
    views = await queries.list_hosts(state_of(request).reads, now_us())
    return [HostOut.model_validate(v) for v in views]


@router.get("/status", responses=_errors())
async def status(request: Request, caller: Caller) -> StatusOut:
    """The halt, the witness log's head and last signed checkpoint, this tenant's dead
    letters of the last hour."""
    hour_ago = now_us() - 3_600_000_000
    view = await queries.system(state_of(request).reads, hour_ago, tenant=caller.tenant)
    return StatusOut.model_validate(
        {**dataclasses.asdict(view), "dead_lettered_last_hour": view.dead_lettered_since}
    )


# --- commands --------------------------------------------------------------------------


@router.post("/tasks", status_code=202, responses=_errors(400, 409, 413))
async def submit(request: Request, caller: Caller, body: SubmitBody) -> TaskAccepted:
    """Submit a task for this tenant; 202 once the broker has it. The same ``task_id``
    (or ``idempotency_key``) twice runs once; a ``task_id`` another tenant has used is
    409."""
    retry = RetryPolicy(
        backoff_ms=body.retry.backoff_ms,
        multiplier=body.retry.multiplier,
        max_backoff_ms=body.retry.max_backoff_ms,
        jitter=body.retry.jitter,
    )
    if (reason := retry.invalid()) is not None:
        raise InvalidCommand(
            reason.replace("retry_", "retry.").replace("backoff_max", "max_backoff")
        )
    state = state_of(request)
    if body.task_id is not None and (
        await state.db.fetchval(
            "SELECT 1 FROM tasks WHERE task_id = $1 AND tenant <> $2", body.task_id, caller.tenant
        )
        is not None
    ):
        raise HTTPException(409, f"task id {body.task_id!r} is taken: choose another")
    for dependency in body.depends_on:
        # Another tenant's task is no dependency: waiting on it would tell its fate.
        if (
            await state.db.fetchval(
                "SELECT 1 FROM tasks WHERE task_id = $1 AND tenant = $2", dependency, caller.tenant
            )
            is None
        ):
            raise InvalidCommand(f"depends_on: no task {dependency!r} (not readable yet?)")
    client = await state.client(caller.tenant)
    task_id = await client.submit(
        body.input,
        task_id=body.task_id,
        pool=body.pool,
        priority=Priority.parse(body.priority.value),
        agent_id=body.agent_id,
        max_attempts=body.max_attempts,
        retry=retry,
        depends_on=body.depends_on,
        start_within_ms=body.start_within_ms,
        finish_by=body.finish_by,
        fairness_key=body.fairness_key,
        key_limit=body.key_limit,
        idempotency_key=body.idempotency_key,
    )
    return TaskAccepted(task_id=task_id)


@router.post("/tasks/{task_id:path}/cancel", status_code=202, responses=_errors(400, 404, 413))
async def cancel_task(
    request: Request, caller: Caller, task_id: TaskId, body: CancelBody | None = None
) -> Accepted:
    """Cancel one of this tenant's tasks (waiting, queued, retrying or running). A
    finished task's cancellation is rejected by the scheduler (see the task)."""
    view = await _task(state_of(request).db, caller, task_id)
    client = await state_of(request).client(caller.tenant)
    await client.cancel(task_id, pool=view.pool, reason=body.reason if body else "")
    return Accepted(detail=f"cancellation of task {task_id} sent")


@router.post(
    "/tasks/{task_id:path}/redrive", status_code=202, responses=_errors(400, 404, 409, 413)
)
async def redrive(
    request: Request, caller: Caller, task_id: TaskId, body: RedriveBody | None = None
) -> TaskAccepted:
    """Run a dead-lettered task again as a new task ``<id>~<n>``, linked to it."""
    view = await _task(state_of(request).db, caller, task_id)
    if view.status != "dead_lettered":
        raise HTTPException(409, f"task {task_id!r} is {view.status}, not dead-lettered")
    state = state_of(request)
    client = await state.client(caller.tenant)
    new_id = await client.submit(
        view.input,
        task_id=await queries.next_redrive_id(state.db, view.task_id),
        pool=view.pool,
        priority=Priority.parse(view.priority),
        # a deliberation's task is its agent's; any other runs on any agent (as the CLI)
        agent_id=view.agent_id if view.deliberation_id is not None else None,
        max_attempts=body.max_attempts if body and body.max_attempts else view.max_attempts,
        retry=view.retry,
        redrive_of=view.task_id,
    )
    return TaskAccepted(task_id=new_id)


@router.post("/deliberations", status_code=202, responses=_errors(400, 413))
async def deliberate(
    request: Request, caller: Caller, body: DeliberateBody
) -> DeliberationAccepted:
    """Put one motion to many agents; their answers are revealed together."""
    client = await state_of(request).client(caller.tenant)
    deliberation_id = await client.deliberate(
        body.motion,
        agent_ids=body.agent_ids,
        deliberation_id=body.deliberation_id,
        pool=body.pool,
        priority=Priority.parse(body.priority.value),
        finish_by=body.finish_by,
    )
    return DeliberationAccepted(deliberation_id=deliberation_id)


@router.post(
    "/deliberations/{deliberation_id}/cancel", status_code=202, responses=_errors(400, 404, 413)
)
async def cancel_deliberation(
    request: Request,
    caller: Caller,
    deliberation_id: DeliberationId,
    body: CancelBody | None = None,
) -> Accepted:
    """Cancel every unfinished task of one of this tenant's deliberations."""
    await _deliberation(state_of(request).db, caller, deliberation_id)
    state = state_of(request)
    pool = await state.db.fetchval(
        "SELECT pool FROM tasks WHERE deliberation_id = $1 AND tenant = $2 LIMIT 1",
        deliberation_id,
        caller.tenant,
    )
    client = await state.client(caller.tenant)
    await client.cancel(
        deliberation_id=deliberation_id, pool=pool, reason=body.reason if body else ""
    )
    return Accepted(detail=f"cancellation of deliberation {deliberation_id} sent")


def _admin(caller: Principal) -> None:
    if not caller.admin:
        raise HTTPException(403, "halt and resume stop every tenant's work: an admin token only")


@router.post("/halt", status_code=202, responses=_errors(403, 413))
async def halt(request: Request, caller: Caller, body: HaltBody) -> Accepted:
    """Stop all dispatching until resumed (witnessed); admin tokens only."""
    _admin(caller)
    client = await state_of(request).client(caller.tenant)
    await client.halt(
        body.reason, operator=f"token:{caller.token_id}", cancel_running=body.cancel_running
    )
    return Accepted(detail="halt sent")


@router.post("/resume", status_code=202, responses=_errors(403, 413))
async def resume(request: Request, caller: Caller, body: ResumeBody) -> Accepted:
    """Lift a halt (witnessed); admin tokens only."""
    _admin(caller)
    client = await state_of(request).client(caller.tenant)
    await client.resume(body.reason, operator=f"token:{caller.token_id}")
    return Accepted(detail="resume sent")


@router.post("/workflows", status_code=202, responses=_errors(400, 409, 413))
async def run_workflow(request: Request, caller: Caller, body: WorkflowBody) -> WorkflowAccepted:
    """Run a workflow for this tenant: a DAG of named steps, each a task whose input
    template reads the workflow's input and earlier steps' outputs. 202 once the broker
    has it; a definition with unknown references, a cycle or input paths the input
    lacks is 400 before anything is sent. The same ``workflow_id`` twice runs once; one
    another tenant has used is 409."""
    state = state_of(request)
    if body.workflow_id is not None and (
        await state.db.fetchval(
            "SELECT 1 FROM workflows WHERE workflow_id = $1 AND tenant <> $2",
            body.workflow_id,
            caller.tenant,
        )
        is not None
    ):
        raise HTTPException(409, f"workflow id {body.workflow_id!r} is taken: choose another")
    client = await state.client(caller.tenant)
    workflow_id = await client.run_workflow(
        body.definition, body.input, workflow_id=body.workflow_id
    )
    return WorkflowAccepted(workflow_id=workflow_id)


@router.get("/workflows", responses=_errors())
async def list_workflows(
    request: Request,
    caller: Caller,
    status: WorkflowStatusName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[WorkflowOut]:
    """This tenant's workflows, newest first (without their steps)."""
    views = await workflow_queries.list_workflows(
        state_of(request).reads, status=status, limit=limit, tenant=caller.tenant
    )
    return [WorkflowOut.model_validate(v) for v in views]


@router.get("/workflows/{workflow_id}", responses=_errors(404))
async def get_workflow(request: Request, caller: Caller, workflow_id: WorkflowId) -> WorkflowOut:
    """One workflow: its status and every step, with the step's task, attempts and
    output."""
    view = await workflow_queries.get_workflow(
        state_of(request).reads, workflow_id, tenant=caller.tenant
    )
    return WorkflowOut.model_validate(view)


@router.post("/workflows/{workflow_id}/cancel", status_code=202, responses=_errors(400, 404, 413))
async def cancel_workflow(
    request: Request, caller: Caller, workflow_id: WorkflowId, body: CancelBody | None = None
) -> Accepted:
    """Cancel one of this tenant's workflows as a whole: running steps are cancelled,
    the others never run. A finished workflow's cancellation is rejected (see it)."""
    state = state_of(request)
    await workflow_queries.get_workflow(state.db, workflow_id, tenant=caller.tenant)
    client = await state.client(caller.tenant)
    await client.cancel_workflow(workflow_id, reason=body.reason if body else "")
    return Accepted(detail=f"cancellation of workflow {workflow_id} sent")
