"""Queries over the read models.

Witnessed before visible: every query that returns an agent's output joins
``witness_entries``; an output whose witness entry is not projected yet does
not exist for readers.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from conclave.domain.events import WitnessEntry
from conclave.errors import NotFound

__all__ = [
    "OutputView",
    "TaskView",
    "deliberation",
    "get_task",
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
class TaskView:
    task_id: str
    status: str
    pool: str
    priority: str
    agent_id: str | None
    attempt: int
    deliberation_id: str | None
    error: str | None
    queued_at: int
    dispatched_at: int | None
    finished_at: int | None
    output: OutputView | None
    failures: list[tuple[int, str, str, str]]
    """(attempt, agent, error type, message) of every failed attempt, oldest first."""


_VISIBLE_OUTPUT = """
    SELECT o.event_id, o.agent_id, o.content, o.latency_us, w.sequence
      FROM outputs o JOIN witness_entries w ON w.subject_event_id = o.event_id
"""


async def get_task(pool: asyncpg.Pool, task_id: str) -> TaskView:
    row = await pool.fetchrow("SELECT * FROM tasks WHERE task_id = $1", task_id)
    if row is None:
        raise NotFound(f"no task {task_id!r}")
    outputs = await pool.fetch(
        _VISIBLE_OUTPUT + " WHERE o.task_id = $1 ORDER BY w.sequence DESC LIMIT 1", task_id
    )
    failures = await pool.fetch(
        """SELECT attempt, agent_id, error_type, error_message FROM task_failures
           WHERE task_id = $1 ORDER BY attempt""",
        task_id,
    )
    return TaskView(
        task_id=row["task_id"],
        status=row["status"],
        pool=row["pool"],
        priority=row["priority"],
        agent_id=row["agent_id"],
        attempt=row["attempt"],
        deliberation_id=row["deliberation_id"],
        error=row["error"],
        queued_at=row["queued_at"],
        dispatched_at=row["dispatched_at"],
        finished_at=row["finished_at"],
        output=_output(outputs[0]) if outputs else None,
        failures=[
            (f["attempt"], f["agent_id"], f["error_type"], f["error_message"]) for f in failures
        ],
    )


async def deliberation(pool: asyncpg.Pool, deliberation_id: str) -> list[TaskView]:
    """Every task of a deliberation, by agent id."""
    ids = await pool.fetch(
        "SELECT task_id FROM tasks WHERE deliberation_id = $1 ORDER BY agent_id", deliberation_id
    )
    return [await get_task(pool, r["task_id"]) for r in ids]


async def visible_outputs(pool: asyncpg.Pool, deliberation_id: str) -> list[OutputView]:
    rows = await pool.fetch(
        _VISIBLE_OUTPUT + " WHERE o.deliberation_id = $1 ORDER BY o.agent_id", deliberation_id
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
