"""Which decoded events are acceptable commands. Pure."""

from __future__ import annotations

from conclave.domain.events import DeliberationRequested, Event, Halt, Resume, TaskSubmitted
from conclave.domain.retry import retry_of

__all__ = ["MAX_ID_LENGTH", "invalid_command"]

MAX_ID_LENGTH = 200


def invalid_command(event: Event) -> str | None:
    """Why ``event`` is not a valid command, or ``None`` when it is."""
    match event:
        case TaskSubmitted():
            if (reason := _bad_id("task_id", event.task_id)) is not None:
                return reason
            if event.agent_id is not None and (reason := _bad_id("agent_id", event.agent_id)):
                return reason
            if not event.pool:
                return "pool must not be empty"
            if "\x00" in event.input:
                return "input must not contain NUL characters"
            if event.max_attempts < 1:
                return "max_attempts must be at least 1"
            if event.redrive_of is not None and (reason := _bad_id("redrive_of", event.redrive_of)):
                return reason
            return retry_of(event).invalid()
        case DeliberationRequested():
            if (reason := _bad_id("deliberation_id", event.deliberation_id)) is not None:
                return reason
            if not event.pool:
                return "pool must not be empty"
            if "\x00" in event.motion:
                return "motion must not contain NUL characters"
            for agent_id in event.agent_ids:
                if (reason := _bad_id("agent_ids", agent_id)) is not None:
                    return reason
            if len(set(event.agent_ids)) != len(event.agent_ids):
                return "agent_ids must not repeat"
            return None
        case Halt() | Resume():
            return None
        case _:
            return f"{event.TYPE} is not a command"


def _bad_id(field: str, value: str) -> str | None:
    """Ids are 1-200 characters without ``/``: ``/`` joins a deliberation's task ids."""
    if not value or len(value) > MAX_ID_LENGTH:
        return f"{field} must be 1-{MAX_ID_LENGTH} characters"
    if "/" in value:
        return f"{field} must not contain '/'"
    return None
