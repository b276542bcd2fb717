"""invalid_command: which decoded events the scheduler accepts from the command topics."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain import events as ev
from conclave.domain.retry import MAX_DELAY_MS
from conclave.domain.validation import (
    MAX_ATTEMPTS,
    MAX_ID_LENGTH,
    invalid_command,
    invalid_output,
    invalid_tenant,
)


def task(**overrides: Any) -> ev.TaskSubmitted:
    fields: dict[str, Any] = {
        "task_id": "t-1",
        "pool": "default",
        "priority": ev.Priority.NORMAL,
        "input": "hello",
    }
    return ev.TaskSubmitted(**{**fields, **overrides})


def deliberation(**overrides: Any) -> ev.DeliberationRequested:
    fields: dict[str, Any] = {
        "deliberation_id": "d-1",
        "pool": "council",
        "priority": ev.Priority.HIGH,
        "motion": "m",
        "agent_ids": ["a", "b"],
    }
    return ev.DeliberationRequested(**{**fields, **overrides})


VALID = [
    task(),
    task(agent_id="agent-7", max_attempts=5, input=""),
    task(task_id="x" * MAX_ID_LENGTH),
    deliberation(),
    deliberation(agent_ids=[]),
    deliberation(deliberation_id="d" * MAX_ID_LENGTH),
    ev.Halt(reason="", operator="op"),
    ev.Resume(reason="done", operator="op"),
]


@pytest.mark.parametrize("command", VALID, ids=lambda c: type(c).__name__)
def test_valid_commands(command: ev.Event) -> None:
    assert invalid_command(command) is None


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (task(task_id=""), "task_id"),
        (task(task_id="x" * (MAX_ID_LENGTH + 1)), "task_id"),
        (task(pool=""), "pool"),
        (task(max_attempts=0), "max_attempts"),
        (task(max_attempts=-3), "max_attempts"),
        # What a column of 32 bits cannot hold, or a 64-bit µs clock once added to now:
        # refused here rather than wedging the projector or the scheduler later.
        (task(max_attempts=MAX_ATTEMPTS + 1), "max_attempts"),
        (task(max_attempts=41_056_989_129_396_232), "max_attempts"),
        (task(retry_backoff_ms=MAX_DELAY_MS + 1, retry_backoff_max_ms=2**62), "retry_backoff"),
        (task(retry_backoff_max_ms=2**63 - 1), "retry_backoff_max_ms"),
        (task(start_within_ms=2**63 - 1), "start_within_ms"),
        (task(start_within_ms=0), "start_within_ms"),
        (deliberation(deliberation_id=""), "deliberation_id"),
        (deliberation(deliberation_id="d" * (MAX_ID_LENGTH + 1)), "deliberation_id"),
        (deliberation(agent_ids=["a", "b", "a"]), "agent_ids"),
    ],
)
def test_invalid_commands_name_the_field(command: ev.Event, reason: str) -> None:
    message = invalid_command(command)
    assert message is not None
    assert reason in message


NOT_COMMANDS = [
    ev.TaskQueued(
        task_id="t",
        pool="p",
        priority=ev.Priority.LOW,
        input="",
        agent_id=None,
        max_attempts=1,
        deliberation_id=None,
        sequence=1,
    ),
    ev.TaskDispatched(
        task_id="t", pool="p", agent_id="a", host_id="h", attempt=1, input="", deliberation_id=None
    ),
    ev.AgentRegistered(agent_id="a", pool="p", host_id="h", agent_ref="m:f"),
    ev.Heartbeat(agent_id="a", host_id="h", task_id=None, rss_bytes=1),
    ev.AgentOutput(
        task_id="t", agent_id="a", attempt=1, content="c", latency_us=1, deliberation_id=None
    ),
    ev.TaskFailed(
        task_id="t",
        agent_id="a",
        attempt=1,
        error_type="E",
        error_message="m",
        deliberation_id=None,
    ),
    ev.TaskCompleted(task_id="t", agent_id="a", output_event_id="e", witness_sequence=1),
    ev.TaskDeadLettered(task_id="t", agent_id="a", attempts=1, reason="r", witness_sequence=1),
    ev.WitnessEntry(
        sequence=1,
        previous_hash=bytes(32),
        entry_hash=bytes(32),
        subject_type="agent.output",
        subject_event_id="e",
        subject_digest=bytes(32),
        recorded_at=1,
        task_id=None,
        agent_id=None,
        detail="",
    ),
    ev.DeadLetterRecord(
        reason="r",
        error_type="E",
        original=b"",
        source_topic="t",
        source_partition=0,
        source_offset=0,
        processor="p",
    ),
]


@pytest.mark.parametrize("event", NOT_COMMANDS, ids=lambda e: type(e).__name__)
def test_facts_on_a_command_topic_are_rejected(event: ev.Event) -> None:
    assert invalid_command(event) == f"{event.TYPE} is not a command"


@settings(max_examples=200)
@given(
    task_id=st.text(max_size=MAX_ID_LENGTH + 20),
    pool=st.text(max_size=5),
    max_attempts=st.integers(-(2**63), 2**63 - 1),
)
def test_task_submitted_rule(task_id: str, pool: str, max_attempts: int) -> None:
    valid = (
        1 <= len(task_id) <= MAX_ID_LENGTH
        and "/" not in task_id
        and "\x00" not in task_id
        and pool != ""
        and "\x00" not in pool
        and 1 <= max_attempts <= MAX_ATTEMPTS
    )
    verdict = invalid_command(task(task_id=task_id, pool=pool, max_attempts=max_attempts))
    assert (verdict is None) == valid
    assert verdict is None or isinstance(verdict, str)


@settings(max_examples=200)
@given(
    deliberation_id=st.text(max_size=MAX_ID_LENGTH + 20),
    agent_ids=st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=6),
)
def test_deliberation_rule(deliberation_id: str, agent_ids: list[str]) -> None:
    valid = (
        1 <= len(deliberation_id) <= MAX_ID_LENGTH
        and "/" not in deliberation_id
        and "\x00" not in deliberation_id
        and len(set(agent_ids)) == len(agent_ids)
    )
    verdict = invalid_command(deliberation(deliberation_id=deliberation_id, agent_ids=agent_ids))
    assert (verdict is None) == valid


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (task(task_id="d/a"), "task_id must not contain '/'"),
        (task(agent_id=""), "agent_id must be 1-200 characters"),
        (task(agent_id="x/y"), "agent_id must not contain '/'"),
        (deliberation(deliberation_id="a/b"), "deliberation_id must not contain '/'"),
        (deliberation(pool=""), "pool must not be empty"),
        (deliberation(agent_ids=["ok", ""]), "agent_ids must be 1-200 characters"),
        (deliberation(agent_ids=["a/b"]), "agent_ids must not contain '/'"),
    ],
)
def test_ids_that_could_collide_or_never_dispatch_are_rejected(
    command: ev.Event, reason: str
) -> None:
    assert invalid_command(command) == reason


@pytest.mark.parametrize(
    ("tenant", "reason"),
    [
        ("acme", None),
        ("t" * MAX_ID_LENGTH, None),
        ("", "tenant must be 1-200 characters"),
        ("t" * (MAX_ID_LENGTH + 1), "tenant must be 1-200 characters"),
        ("acme/batch", "tenant must not contain '/'"),  # would read as tenant/key
        ("ac\x00me", "tenant must not contain NUL characters"),
    ],
)
def test_a_tenant_is_an_id(tenant: str, reason: str | None) -> None:
    assert invalid_tenant(tenant) == reason


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (task(input="a\x00b"), "input must not contain NUL characters"),
        (deliberation(motion="a\x00b"), "motion must not contain NUL characters"),
        (task(task_id="a\x00"), "task_id must not contain NUL characters"),
        (task(pool="p\x00"), "pool must not contain NUL characters"),
        (deliberation(agent_ids=["\x00"]), "agent_ids must not contain NUL characters"),
        (ev.CancelRequested(task_id="d/\x00"), "task_id must not contain NUL characters"),
        (ev.Halt(reason="\x00", operator="op"), "reason must not contain NUL characters"),
        (ev.Resume(reason="", operator="o\x00"), "operator must not contain NUL characters"),
        (
            ev.PoolConfigured(pool="p", capacity=1, reason="\x00", operator="op"),
            "reason must not contain NUL characters",
        ),
        (
            ev.PoolConfigured(pool="p", capacity=1, reason="", operator="\x00"),
            "operator must not contain NUL characters",
        ),
    ],
)
def test_text_no_read_model_can_store_is_rejected(command: ev.Event, reason: str) -> None:
    assert invalid_command(command) == reason


def output(**overrides: Any) -> ev.AgentOutput:
    fields: dict[str, Any] = {
        "task_id": "t-1",
        "agent_id": "a",
        "attempt": 1,
        "content": "an answer\x00 with anything in it",  # not in the witness entry
        "latency_us": 1,
        "deliberation_id": None,
    }
    return ev.AgentOutput(**{**fields, **overrides})


def failure(**overrides: Any) -> ev.TaskFailed:
    fields: dict[str, Any] = {
        "task_id": "d-1/a",
        "agent_id": "a",
        "attempt": MAX_ATTEMPTS,
        "error_type": "ValueError",
        "error_message": "anything\x00",
        "deliberation_id": "d-1",
    }
    return ev.TaskFailed(**{**fields, **overrides})


@pytest.mark.parametrize(
    "event", [output(), output(attempt=0), output(agent_id="a" * 300), failure()]
)
def test_outputs_a_witness_entry_can_keep_are_witnessed(
    event: ev.AgentOutput | ev.TaskFailed,
) -> None:
    assert invalid_output(event) is None


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (output(attempt=2**40), "attempt must be 0-1,000"),
        (failure(attempt=-1), "attempt must be 0-1,000"),
        (output(task_id=""), "task_id '' is not a task id"),
        (output(task_id="a/b/c"), "task_id 'a/b/c' is not a task id"),
        (output(task_id="t\x00"), "task_id must not contain NUL characters"),
        (failure(agent_id="a\x00"), "agent_id must not contain NUL characters"),
        (failure(error_type="E\x00"), "error_type must not contain NUL characters"),
    ],
)
def test_outputs_no_witness_entry_could_keep_are_refused(
    event: ev.AgentOutput | ev.TaskFailed, reason: str
) -> None:
    assert invalid_output(event) == reason
