"""Which decoded events are acceptable commands. Pure."""

from __future__ import annotations

from conclave.domain.events import DeliberationRequested, Event, Halt, Resume, TaskSubmitted

__all__ = ["MAX_ID_LENGTH", "invalid_command"]

MAX_ID_LENGTH = 200


def invalid_command(event: Event) -> str | None:
    """Why ``event`` is not a valid command, or ``None`` when it is."""
    match event:
        case TaskSubmitted():
            if not event.task_id or len(event.task_id) > MAX_ID_LENGTH:
                return "task_id must be 1-200 characters"
            if not event.pool:
                return "pool must not be empty"
            if event.max_attempts < 1:
                return "max_attempts must be at least 1"
            return None
        case DeliberationRequested():
            if not event.deliberation_id or len(event.deliberation_id) > MAX_ID_LENGTH:
                return "deliberation_id must be 1-200 characters"
            if len(set(event.agent_ids)) != len(event.agent_ids):
                return "agent_ids must not repeat"
            return None
        case Halt() | Resume():
            return None
        case _:
            return f"{event.TYPE} is not a command"
