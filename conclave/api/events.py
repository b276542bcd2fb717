"""``GET /v1/events``: server-sent events of a tenant's task changes, agent states and
the witness log's head.

The simplest honest feed: each connection polls the read models every
``app.state.events_poll_s`` (0.25 s) and sends what differs from its last look, so a
change reaches a reader within a poll of being projected, and nothing is added to the
projector's hot path (a trigger with ``NOTIFY`` per row would be). What changes and
changes back within one poll is not seen; a task that finished in between is sent
finished. A reader that reconnects gets the changes from its reconnection on: fetch
``/v1/tasks`` for what it missed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from conclave.api.app import ApiState, Caller, state_of
from conclave.api.models import Error
from conclave.domain.events import now_us
from conclave.errors import DatabaseUnavailable
from projections import queries

__all__ = ["Changes", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

FINISHED_WINDOW_US = 60_000_000
"""A finished task stays in a poll's view this long (µs, by its event time) so that a
finish projected late is still seen."""
KEEPALIVE_S = 15.0
"""A comment line this often when nothing changes: proxies keep the connection open."""


def _frame(kind: str, data: object, event_id: int) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Changes:
    """One reader's view of its tenant: :meth:`poll` returns what changed since the last."""

    def __init__(self, state: ApiState, tenant: str) -> None:
        self.state = state
        self.tenant = tenant
        self.tasks: dict[str, tuple[str, int]] = {}
        self.agents: dict[str, tuple[str, str | None]] = {}
        self.head = -1

    async def poll(self) -> list[tuple[str, dict[str, object]]]:
        db, settings = self.state.reads, self.state.settings
        now = now_us()
        changes: list[tuple[str, dict[str, object]]] = []
        tasks = await queries.live_tasks(db, self.tenant, now - FINISHED_WINDOW_US)
        seen: dict[str, tuple[str, int]] = {}
        for t in tasks:
            seen[t.task_id] = (t.status, t.attempt)
            if self.tasks.get(t.task_id) != seen[t.task_id]:
                changes.append(("task", _task(t)))
        self.tasks = seen
        agents = await queries.list_agents(
            db, now, silent_after_us=settings.silent_after_us, tenant=self.tenant
        )
        states: dict[str, tuple[str, str | None]] = {}
        for a in agents:
            states[a.agent_id] = (a.state, a.current_task_id)
            if self.agents.get(a.agent_id) != states[a.agent_id]:
                changes.append(
                    (
                        "agent",
                        {
                            "agent_id": a.agent_id,
                            "pool": a.pool,
                            "state": a.state,
                            "current_task_id": a.current_task_id,
                        },
                    )
                )
        self.agents = states
        head = await db.fetchrow(
            "SELECT sequence, recorded_at, entry_hash FROM witness_entries"
            " ORDER BY sequence DESC LIMIT 1"
        )
        sequence = head["sequence"] if head is not None else 0
        if sequence != self.head:
            self.head = sequence
            recorded = head["recorded_at"] if head is not None else None
            digest = bytes(head["entry_hash"]).hex() if head is not None else None
            changes.append(("witness", {"head": sequence, "recorded_at": recorded, "hash": digest}))
        return changes


def _task(t: queries.TaskState) -> dict[str, object]:
    return {
        "task_id": t.task_id,
        "status": t.status,
        "attempt": t.attempt,
        "pool": t.pool,
        "agent_id": t.agent_id,
        "error": t.error,
        "finished_at": t.finished_at,
    }


async def _stream(changes: Changes, poll_s: float) -> AsyncIterator[str]:
    # The state at connection is the baseline: only what changes from now on is sent.
    await changes.poll()
    yield ": connected\n\n"
    event_id = 0
    quiet_since = time.monotonic()
    while True:
        await asyncio.sleep(poll_s)
        try:
            found = await changes.poll()
        except (DatabaseUnavailable, asyncpg.PostgresError, OSError) as exc:
            log.warning("event stream ended: read models unavailable (%s)", type(exc).__name__)
            yield _frame("error", {"detail": "read models unavailable; reconnect"}, event_id + 1)
            return
        for kind, data in found:
            event_id += 1
            yield _frame(kind, data, event_id)
        if found:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events: `task`, `agent` and `witness`, data JSON",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        401: {"model": Error, "description": "No bearer token, or not a valid one"},
        503: {"model": Error, "description": "PostgreSQL is not reachable now"},
    },
)
async def events(request: Request, caller: Caller) -> StreamingResponse:
    """A live stream of this tenant's changes: each task's status (and attempt) as it
    changes, each agent's state, the witness log's head."""
    state = state_of(request)
    changes = Changes(state, caller.tenant)
    poll_s: float = request.app.state.events_poll_s
    return StreamingResponse(
        _stream(changes, poll_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
