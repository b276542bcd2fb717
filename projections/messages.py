"""Queries on the ``messages`` read model (agent-to-agent messages, answers included)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

__all__ = ["MessageView", "recent_messages"]


@dataclass(frozen=True, slots=True)
class MessageView:
    message_id: str
    kind: str
    correlation_id: str | None
    sender: str
    recipient: str
    agent_id: str | None
    host_id: str | None
    pool: str | None
    priority: str
    expects_reply: bool
    expires_at: int | None
    payload: str
    sent_at: int


async def recent_messages(
    db: asyncpg.Pool, *, agent: str | None = None, limit: int = 50
) -> list[MessageView]:
    """The newest messages first; with ``agent``, those it sent or that were for it (as
    addressed or as resolved)."""
    rows = await db.fetch(
        """SELECT * FROM messages m
           WHERE $1::text IS NULL OR m.sender = $1 OR m.recipient = $1 OR m.agent_id = $1
           ORDER BY m.sent_at DESC, m.message_id
           LIMIT $2""",
        agent,
        limit,
    )
    return [MessageView(**dict(row)) for row in rows]
