"""Log lines: JSON off a terminal, readable on one, each naming the trace, span, task and
agent of the work it is about."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from conclave import logs


@pytest.fixture
def restored() -> Iterator[None]:
    """:func:`logs.configure` takes the root logger over: give it back to pytest after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restored")
def test_a_line_off_a_terminal_is_json_with_the_ids_of_its_work() -> None:
    stream = io.StringIO()  # not a terminal: auto means JSON
    logs.configure("INFO", "auto", stream)
    log = logging.getLogger("conclave.test")
    tracer = TracerProvider().get_tracer("test")
    log.info("no work in particular")
    with tracer.start_as_current_span("agent.run") as span, logs.about("t-1", "a-7"):
        log.warning("attempt %d failed", 2)
        log.warning("about another task", extra={"task_id": "t-2"})
    log.debug("below the level")

    plain, about, other = lines(stream)
    assert plain["message"] == "no work in particular"
    assert plain["level"] == "INFO"
    assert plain["logger"] == "conclave.test"
    assert plain["time"].endswith("+00:00")
    assert not {"task_id", "agent_id", "trace_id", "span_id"} & set(plain)
    context = span.get_span_context()
    assert about == about | {
        "message": "attempt 2 failed",
        "level": "WARNING",
        "task_id": "t-1",
        "agent_id": "a-7",
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }
    assert other["task_id"] == "t-2"  # what the call says wins
    assert other["agent_id"] == "a-7"


@pytest.mark.usefixtures("restored")
def test_a_line_on_a_terminal_is_readable_with_its_ids_at_the_end() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "text", stream)
    with logs.about("t-1", "a-7"):
        logging.getLogger("streams.core").warning("scheduler-0: host 'h1' lost")
    logging.getLogger("streams.core").info("back")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("WARNING streams.core: scheduler-0: host 'h1' lost [task=t-1 agent=a-7]")
    assert second.endswith("INFO streams.core: back")
    assert first[2] == ":"  # begins with the time of day, HH:MM:SS.mmm
    assert first[8] == "."


@pytest.mark.usefixtures("restored")
def test_an_exception_is_in_the_json_line_not_on_lines_of_its_own() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream)
    try:
        raise RuntimeError("the broker went away")
    except RuntimeError:
        logging.getLogger("conclave").exception("supervisor stopped")
    (line,) = lines(stream)
    assert "RuntimeError: the broker went away" in line["exc_info"]
