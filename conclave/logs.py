"""Log lines an operator can search: JSON when nobody is watching, readable when somebody is.

Every line carries, where they exist, the trace and span of the work it is about (so a
log line leads to its trace and back) and the task and agent ids: from the current
OpenTelemetry span, from :func:`about` (a block of work on one task, e.g. an agent's
run: the agent's own log lines get the ids too) or from ``extra=`` at the call.

Lines carry ids, reasons and counts, never payloads (inputs, answers) or secrets:
nothing in Conclave logs an event's body, and the database URL is never formatted.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Literal, TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

__all__ = ["Format", "about", "configure"]

Format = Literal["auto", "json", "text"]

_IDS = ("task_id", "agent_id", "trace_id", "span_id")
_about: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "conclave_log_about", default=(None, None)
)


@contextlib.contextmanager
def about(task_id: str | None = None, agent_id: str | None = None) -> Iterator[None]:
    """Log lines written in the block (by Conclave or by an agent) name this task and agent."""
    token = _about.set((task_id, agent_id))
    try:
        yield
    finally:
        _about.reset(token)


class _Ids(logging.Filter):
    """Adds the ids of the work a line is about to the record, as attributes."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_id, agent_id = _about.get()
        if task_id is not None and not hasattr(record, "task_id"):
            record.task_id = task_id
        if agent_id is not None and not hasattr(record, "agent_id"):
            record.agent_id = agent_id
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        return True


class _Readable(logging.Formatter):
    """``12:00:01.234 WARNING streams.core: message [task=t1 agent=a1 trace=4bf9...]``."""

    default_time_format = "%H:%M:%S"
    default_msec_format = "%s.%03d"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{name.removesuffix('_id')}={getattr(record, name)}"
            for name in _IDS
            if getattr(record, name, None) is not None
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def _json() -> logging.Formatter:
    # ``time``: ISO 8601 in UTC with microseconds, from the record's creation.
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def configure(level: str | int, fmt: Format = "auto", stream: TextIO | None = None) -> None:
    """Send every log line of the process to ``stream`` (stderr) as JSON or readable text
    (``auto``: readable on a terminal, JSON otherwise), with the ids of its work."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.addFilter(_Ids())
    handler.setFormatter(_Readable() if fmt == "text" else _json())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
