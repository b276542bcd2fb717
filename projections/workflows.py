"""Queries of the workflow read models: workflows and their steps (with each step's
task attempts, from ``tasks``)."""

from __future__ import annotations

from dataclasses import dataclass

from conclave.errors import NotFound
from projections.database import Database

__all__ = ["WORKFLOW_STATUSES", "StepView", "WorkflowView", "get_workflow", "list_workflows"]


@dataclass(frozen=True, slots=True)
class StepView:
    step: str
    task_id: str
    status: str
    pool: str
    agent_id: str | None
    priority: str
    depends_on: list[str]
    attempts: int
    """Attempts the step's task began (0 before its first dispatch)."""
    max_attempts: int
    task_status: str | None
    """The task's own status (``running``, ``retrying``, ...), once the scheduler has it."""
    input: str | None
    output: str | None
    submitted_at: int | None
    ended_at: int | None


@dataclass(frozen=True, slots=True)
class WorkflowView:
    workflow_id: str
    tenant: str
    name: str
    status: str
    input_json: str
    failed_step: str | None
    reason: str | None
    started_at: int
    ended_at: int | None
    steps: list[StepView]


_WORKFLOW = (
    "SELECT workflow_id, tenant, name, status, input_json, failed_step, reason, started_at,"
    " ended_at FROM workflows"
)


WORKFLOW_STATUSES = ("running", "completed", "failed", "cancelled", "rejected")


async def list_workflows(
    db: Database, *, status: str | None = None, limit: int = 100, tenant: str | None = None
) -> list[WorkflowView]:
    """The newest workflows first (steps not included); with ``tenant``, only its own."""
    rows = await db.fetch(
        f"{_WORKFLOW} WHERE ($1::text IS NULL OR status = $1)"
        " AND ($3::text IS NULL OR tenant = $3)"
        " ORDER BY started_at DESC, workflow_id LIMIT $2",
        status,
        limit,
        tenant,
    )
    return [WorkflowView(**dict(r), steps=[]) for r in rows]


async def get_workflow(
    db: Database, workflow_id: str, *, tenant: str | None = None
) -> WorkflowView:
    """One workflow with its steps; with ``tenant``, another tenant's is :class:`NotFound`
    (as if it did not exist)."""
    row = await db.fetchrow(f"{_WORKFLOW} WHERE workflow_id = $1", workflow_id)
    if row is None or (tenant is not None and row["tenant"] != tenant):
        raise NotFound(f"no workflow {workflow_id!r}")
    steps = await db.fetch(
        "SELECT s.step, s.task_id, s.status, s.pool, s.agent_id, s.priority, s.depends_on,"
        " coalesce(t.attempt, 0) AS attempts, s.max_attempts, t.status AS task_status,"
        " s.input, s.output, s.submitted_at, s.ended_at"
        " FROM workflow_steps s LEFT JOIN tasks t ON t.task_id = s.task_id"
        " WHERE s.workflow_id = $1 ORDER BY s.position",
        workflow_id,
    )
    return WorkflowView(**dict(row), steps=[StepView(**dict(s)) for s in steps])
