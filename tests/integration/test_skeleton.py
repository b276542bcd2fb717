"""The walking skeleton end to end: submit -> schedule -> run -> witness -> project -> query."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from conclave.bus import read_history
from conclave.domain.events import Priority
from conclave.errors import SchemaError
from conclave.runtime.agents import AgentContext
from conclave.settings import Settings
from conclave.verify import verify_sources
from projections import queries
from schemas.codec import default_codec
from tests.integration.conftest import (
    System,
    eventually,
    output_visible,
    task_status,
)

pytestmark = pytest.mark.integration


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``conclave ARGS`` as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "conclave.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``conclave ARGS`` against the session's stack and topic prefix."""
    return run_cli(
        {
            **os.environ,
            "CONCLAVE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CONCLAVE_DATABASE_URL": settings.database_url,
            "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix,
        },
        *args,
    )


async def test_submitted_task_completes_with_witnessed_output(system: System) -> None:
    settings, db = system.settings, system.db
    async with system.running(2):
        task_id = await system.submit_visible("what is 6 x 7?", priority=Priority.HIGH)
        # Visible once witnessed; completed once the scheduler has read the witness entry.
        await eventually(lambda: _is(db, task_id, "completed"))

    view = await queries.get_task(db, task_id)
    assert view.status == "completed"
    assert view.output is not None
    assert "6 x 7" in view.output.content
    entry = await db.fetchrow(
        "SELECT * FROM witness_entries WHERE sequence = $1", view.output.witness_sequence
    )
    assert entry["subject_event_id"] == view.output.event_id
    assert entry["task_id"] == task_id

    shown = await asyncio.to_thread(cli, settings, "task", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "completed" in shown.stdout
    assert str(view.output.witness_sequence) in shown.stdout
    assert view.output.content[:20] in shown.stdout


async def test_output_is_invisible_until_its_witness_entry_is_projected(system: System) -> None:
    db = system.db
    async with system.running(1):
        task_id = await system.submit_visible("hold on")
    view = await queries.get_task(db, task_id)
    assert view.output is not None
    # Remove the witness row (as if not yet projected): the output must vanish for readers.
    saved = await db.fetchrow(
        "DELETE FROM witness_entries WHERE sequence = $1 RETURNING *", view.output.witness_sequence
    )
    try:
        hidden = await queries.get_task(db, task_id)
        assert hidden.output is None
        assert await db.fetchval("SELECT count(*) FROM outputs WHERE task_id = $1", task_id) == 1
    finally:
        await db.execute(
            "INSERT INTO witness_entries VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            *saved.values(),
        )


async def test_same_task_id_submitted_twice_runs_once(system: System) -> None:
    db, client, pool_name = system.db, system.client, system.pool
    async with system.running(2):
        first = await client.submit("once", pool=pool_name, task_id=f"{pool_name}-dup")
        second = await client.submit("once", pool=pool_name, task_id=f"{pool_name}-dup")
        assert first == second
        await eventually(lambda: output_visible(db, first))
        await asyncio.sleep(0.5)  # give a duplicate every chance to show up
    assert await db.fetchval("SELECT count(*) FROM outputs WHERE task_id = $1", first) == 1
    assert await db.fetchval("SELECT count(*) FROM witness_entries WHERE task_id = $1", first) == 1


async def test_halt_stops_dispatching_until_resume_and_both_are_witnessed(system: System) -> None:
    db, client, pool_name = system.db, system.client, system.pool
    async with system.running(1):
        await client.halt("maintenance window", operator="test")
        await eventually(
            lambda: db.fetchval(
                "SELECT 1 FROM witness_entries WHERE subject_type = 'system.halt' "
                "AND detail = 'maintenance window'"
            )
        )
        task_id = await client.submit("wait for me", pool=pool_name)
        await eventually(lambda: task_status(db, task_id))
        await asyncio.sleep(1.0)
        assert await task_status(db, task_id) == "queued"
        await client.resume("window over", operator="test")
        await eventually(lambda: output_visible(db, task_id))
    kinds = [
        r["subject_type"]
        for r in await db.fetch(
            "SELECT subject_type FROM witness_entries WHERE subject_type LIKE 'system.%' "
            "ORDER BY sequence"
        )
    ]
    assert kinds[-2:] == ["system.halt", "system.resume"]


async def test_failing_agent_is_dead_lettered_with_attribution_after_retries(
    system: System,
) -> None:
    db, client, pool_name = system.db, system.client, system.pool

    async def broken(ctx: object) -> str:
        raise RuntimeError("model refused")

    async with system.running(1, broken):
        task_id = await client.submit("fail", pool=pool_name, max_attempts=2)
        await eventually(lambda: _is(db, task_id, "dead_lettered"))
    view = await queries.get_task(db, task_id)
    assert view.attempt == 2
    assert [(f.attempt, f.error_type) for f in view.failures] == [
        (1, "RuntimeError"),
        (2, "RuntimeError"),
    ]
    assert view.failures[0].message == "model refused"
    assert not any(f.permanent for f in view.failures)
    assert view.output is None
    assert view.error == "RuntimeError"


async def test_witness_chain_verifies_from_topic_and_database(system: System) -> None:
    settings, db, client, pool_name = system.settings, system.db, system.client, system.pool
    async with system.running(3):
        ids = [await client.submit(f"q{i}", pool=pool_name) for i in range(5)]
        for task_id in ids:
            await eventually(lambda t=task_id: output_visible(db, t))  # type: ignore[misc]
    await eventually(lambda: _projected_witness_matches_topic(settings, db))
    results = await verify_sources(settings)
    assert [r.source for r in results] == ["topic", "db"]
    assert all(r.violation is None for r in results), results
    assert results[0].head_hex == results[1].head_hex
    ok = await asyncio.to_thread(cli, settings, "witness", "verify")
    assert ok.returncode == 0, ok.stderr


async def test_witness_verify_names_first_bad_sequence(system: System) -> None:
    settings, db = system.settings, system.db
    async with system.running(2):
        for i in range(3):
            await system.submit_visible(f"t{i}")
    sequence = await db.fetchval("SELECT max(sequence) - 1 FROM witness_entries")
    original = await db.fetchval(
        "SELECT subject_digest FROM witness_entries WHERE sequence = $1", sequence
    )
    await db.execute(
        "UPDATE witness_entries SET subject_digest = $2 WHERE sequence = $1", sequence, bytes(32)
    )
    try:
        bad = await asyncio.to_thread(cli, settings, "witness", "verify", "--source", "db")
    finally:
        await db.execute(
            "UPDATE witness_entries SET subject_digest = $2 WHERE sequence = $1", sequence, original
        )
    assert bad.returncode == 1
    assert f"first bad sequence {sequence}" in bad.stderr
    assert "Traceback" not in bad.stderr


async def _projected_witness_matches_topic(settings: Settings, db: asyncpg.Pool) -> bool:
    results = await verify_sources(settings)
    return results[0].entries == results[1].entries


async def test_one_trace_follows_a_task_across_topics(system: System) -> None:
    settings, client = system.settings, system.client
    async with system.running(1):
        task_id = await system.submit_visible("trace me")

    codec = default_codec()
    trace_ids: dict[str, set[str]] = {}
    topics = client.topics
    async for record in read_history(
        settings, [topics.command(Priority.NORMAL), topics.tasks, topics.outputs, topics.witness]
    ):
        try:
            _, event = codec.decode(record.value)
        except SchemaError:
            continue  # other tests put garbage on the command topics
        if getattr(event, "task_id", None) != task_id:
            continue
        headers = dict(record.headers)
        assert "traceparent" in headers, f"{event.TYPE} on {record.topic} has no traceparent"
        trace_id = headers["traceparent"].decode().split("-")[1]
        trace_ids.setdefault(trace_id, set()).add(event.TYPE)
    assert len(trace_ids) == 1, trace_ids
    (types,) = trace_ids.values()
    assert types >= {
        "task.submitted",
        "task.queued",
        "task.dispatched",
        "agent.output",
        "witness.entry",
        "task.completed",
    }


async def test_answers_that_cannot_be_recorded_fail_with_attribution(system: System) -> None:
    db, client, pool_name = system.db, system.client, system.pool

    async def odd(ctx: AgentContext) -> str:
        return 42 if ctx.input == "number" else "x" * 1_000_000  # type: ignore[return-value]

    async with system.running(1, odd):
        # Permanent: the same agent would answer the same way, so attempts left are not used.
        number = await client.submit("number", pool=pool_name, max_attempts=3)
        huge = await client.submit("huge", pool=pool_name, max_attempts=3)
        for task_id in (number, huge):
            await eventually(lambda t=task_id: _is(db, t, "dead_lettered"))  # type: ignore[misc]
    for task_id, message in (
        (number, "agent returned int, not str"),
        (huge, "answer of 1000000 bytes exceeds 900000"),
    ):
        view = await queries.get_task(db, task_id)
        assert [
            (f.attempt, f.agent_id, f.error_type, f.message, f.permanent) for f in view.failures
        ] == [(1, f"{pool_name}-agent-000", "OutputRejected", message, True)]
        assert view.error == "permanent failure: OutputRejected (permanent)"


async def test_an_answer_with_a_nul_character_fails_with_attribution(system: System) -> None:
    db, client, pool_name = system.db, system.client, system.pool

    async def nul(ctx: AgentContext) -> str:
        return "half\x00answer"

    async with system.running(1, nul):
        task_id = await client.submit("say it", pool=pool_name)
        await eventually(lambda: _is(db, task_id, "dead_lettered"))
    view = await queries.get_task(db, task_id)
    assert [(f.attempt, f.agent_id, f.error_type, f.message) for f in view.failures] == [
        (
            1,
            f"{pool_name}-agent-000",
            "OutputRejected",
            "answer contains a NUL character, which no read model can store",
        )
    ]


async def _is(db: asyncpg.Pool, task_id: str, status: str) -> bool:
    return await task_status(db, task_id) == status
