"""Invariant 7: bad input becomes a dead-letter record with reason and original bytes;
processing goes on."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import asyncpg
import pytest

from conclave.domain.events import (
    AgentOutput,
    Halt,
    PoolConfigured,
    Priority,
    TaskCompleted,
    TaskSubmitted,
)
from conclave.errors import NotFound
from conclave.settings import Settings
from projections import queries
from schemas.codec import MAGIC, default_codec
from tests.integration.conftest import (
    System,
    eventually,
    output_visible,
)
from tests.integration.test_skeleton import cli, run_cli

pytestmark = pytest.mark.integration


async def test_garbage_on_command_topic_is_dead_lettered_and_valid_tasks_complete(
    system: System,
) -> None:
    db, client, pool_name = system.db, system.client, system.pool
    topic = client.topics.command(Priority.NORMAL)
    garbage = b"\x00\xffnot avro at all" + pool_name.encode()
    unknown = MAGIC + bytes.fromhex("0123456789abcdef") + pool_name.encode()
    codec = default_codec()
    not_a_command = codec.encode(
        client._producer.envelope(
            TaskCompleted(task_id="x", agent_id="y", output_event_id="z", witness_sequence=1)
        ),
        TaskCompleted(task_id="x", agent_id="y", output_event_id="z", witness_sequence=1),
    )
    async with system.running(2):
        before = await client.submit("before garbage", pool=pool_name)
        await client.send_raw(topic, "junk", garbage)
        await client.send_raw(topic, "junk", unknown)
        await client.send_raw(topic, "junk", not_a_command)
        after = await client.submit("after garbage", pool=pool_name)
        for task_id in (before, after):
            await eventually(lambda t=task_id: output_visible(db, t))  # type: ignore[misc]

    async def letters() -> list[asyncpg.Record]:
        rows = await db.fetch(
            "SELECT * FROM dead_letters WHERE source_topic = $1 AND processor = 'scheduler' "
            "AND original = ANY($2::bytea[]) ORDER BY source_offset",
            topic,
            [garbage, unknown, not_a_command],
        )
        return rows if len(rows) == 3 else []

    rows = await eventually(letters)
    assert [bytes(r["original"]) for r in rows] == [garbage, unknown, not_a_command]
    assert "bad magic" in rows[0]["reason"]
    assert "unknown schema fingerprint 0123456789abcdef" in rows[1]["reason"]
    assert rows[2]["error_type"] == "InvalidCommand"
    assert "task.completed is not a command" in rows[2]["reason"]
    offsets = [r["source_offset"] for r in rows]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == 3


def test_cli_mistakes_are_one_line_and_non_zero(settings: Settings) -> None:
    missing = cli(settings, "task", "show", "no-such-task")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no task 'no-such-task'"

    bad_priority = cli(settings, "submit", "x", "--priority", "urgent")
    assert bad_priority.returncode == 2
    assert "unknown priority 'urgent'" in bad_priority.stderr
    assert "Traceback" not in bad_priority.stderr

    bad_id = cli(settings, "submit", "x", "--id", "../x")
    assert bad_id.returncode == 1
    assert bad_id.stderr.strip() == "error: task_id must not contain '/'"
    assert bad_id.stdout == "", "no id is printed for a task that will not exist"

    bad_retry = cli(settings, "submit", "x", "--retry-jitter", "3")
    assert bad_retry.returncode == 2
    assert "retry-jitter must be between 0 and 1" in bad_retry.stderr


async def test_a_command_the_scheduler_refuses_is_rejected_visibly_and_once(
    system: System,
) -> None:
    """From a producer that skips the client's checks: the submitter still finds out why."""
    db, client, pool_name = system.db, system.client, system.pool
    codec = default_codec()
    normal = client.topics.command(Priority.NORMAL)
    partition = await client._partition(normal, pool_name)

    def encoded(command: TaskSubmitted) -> bytes:
        return codec.encode(client._producer.envelope(command), command)

    zero = TaskSubmitted(
        task_id=f"{pool_name}-zero", pool=pool_name, priority=Priority.NORMAL, input="x",
        max_attempts=0,
    )  # fmt: skip
    urgent = TaskSubmitted(
        task_id=f"{pool_name}-urgent", pool=pool_name, priority=Priority.CRITICAL, input="x"
    )
    stranger = TaskSubmitted(
        task_id=f"{pool_name}-stranger", pool=pool_name, priority=Priority.NORMAL, input="x"
    )
    no_tenant = dataclasses.replace(client._producer.envelope(stranger), tenant="acme/batch")
    zero_bytes = encoded(zero)
    async with system.running(1):
        for _ in range(2):  # a redelivered command is rejected once
            await client.send_raw(normal, zero.task_id, zero_bytes, partition=partition)
        await client.send_raw(normal, urgent.task_id, encoded(urgent), partition=partition)
        await client.send_raw(
            normal, stranger.task_id, codec.encode(no_tenant, stranger), partition=partition
        )
        await system.submit_visible("valid work goes on")

    async def reasons() -> dict[str, str]:
        rows = await db.fetch(
            "SELECT subject_id, reason FROM rejections WHERE subject_id = ANY($1::text[])",
            [zero.task_id, urgent.task_id, stranger.task_id],
        )
        return {r["subject_id"]: r["reason"] for r in rows} if len(rows) >= 3 else {}

    found = await eventually(reasons)
    assert (
        await db.fetchval("SELECT count(*) FROM rejections WHERE subject_id = $1", zero.task_id)
        == 1
    )
    assert found[zero.task_id] == "max_attempts must be 1-1,000"
    assert found[urgent.task_id].startswith("priority critical does not match the topic")
    assert found[stranger.task_id] == "tenant must not contain '/'"
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE task_id = $1", stranger.task_id) == 0
    shown = await asyncio.to_thread(cli, system.settings, "task", "show", zero.task_id)
    assert shown.returncode == 1
    assert shown.stderr.strip() == (
        f"error: task '{zero.task_id}' was rejected: max_attempts must be 1-1,000"
    )
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE task_id = $1", zero.task_id) == 0


def test_cli_without_a_stack_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCLAVE_")}
    result = run_cli({**env, "CONCLAVE_HOME": "/nonexistent/conclave-home"}, "task", "show", "x")
    assert result.returncode == 1
    assert "run `conclave dev up`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_with_unreachable_broker_says_so(settings: Settings) -> None:
    env = {
        **os.environ,
        "CONCLAVE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "CONCLAVE_DATABASE_URL": settings.database_url,
    }
    result = run_cli(env, "submit", "hello")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: Kafka at 127.0.0.1:1 is not reachable"


async def test_events_on_the_wrong_topic_are_dead_lettered_not_obeyed(system: System) -> None:
    db, client, pool_name = system.db, system.client, system.pool
    codec = default_codec()
    halt = Halt(reason=f"smuggled {pool_name}", operator="x")
    halt_bytes = codec.encode(client._producer.envelope(halt), halt)
    stray = TaskSubmitted(
        task_id=f"{pool_name}-stray", pool=pool_name, priority=Priority.LOW, input="x"
    )
    stray_bytes = codec.encode(client._producer.envelope(stray), stray)
    async with system.running(1):
        # A HALT on a command topic would stop dispatching without being witnessed.
        await client.send_raw(client.topics.command(Priority.CRITICAL), "system", halt_bytes)
        await client.send_raw(client.topics.agents, stray.task_id, stray_bytes)
        await system.submit_visible("still dispatched")

    async def letters() -> dict[str, asyncpg.Record]:
        rows = await db.fetch(
            "SELECT * FROM dead_letters WHERE processor = 'scheduler' "
            "AND original = ANY($1::bytea[])",
            [halt_bytes, stray_bytes],
        )
        return {r["error_type"]: r for r in rows} if len(rows) == 2 else {}

    rows = await eventually(letters)
    assert "belongs on" in rows["InvalidCommand"]["reason"]
    assert "control" in rows["InvalidCommand"]["reason"]
    assert rows["InvalidEvent"]["reason"].startswith("task.submitted does not belong on")
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE task_id = $1", stray.task_id) == 0


async def test_a_record_postgresql_refuses_is_dead_lettered_and_projection_goes_on(
    system: System,
) -> None:
    db, client, pool_name = system.db, system.client, system.pool
    # Valid Avro, but PostgreSQL text cannot hold NUL: produced past the runtime's checks.
    refused = AgentOutput(
        task_id=f"{pool_name}-nul",
        agent_id="a",
        attempt=1,
        content="bad\x00answer",
        latency_us=1,
        deliberation_id=None,
    )
    # Valid Avro too, but an attempt beyond the column's 32 bits: asyncpg refuses to encode
    # it before anything reaches the server (once taken for an outage: the projector
    # retried it for ever and every read model froze).
    too_big = dataclasses.replace(refused, task_id=f"{pool_name}-big", content="ok", attempt=2**40)
    codec = default_codec()
    value = codec.encode(client._producer.envelope(refused), refused)
    big_value = codec.encode(client._producer.envelope(too_big), too_big)
    async with system.running(1):
        await client.send_raw(client.topics.outputs, refused.task_id, value)
        await client.send_raw(client.topics.outputs, too_big.task_id, big_value)
        await system.submit_visible("after the refused records")

    async def letter(original: bytes) -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT * FROM dead_letters WHERE processor = 'projector' AND original = $1", original
        )

    row = await eventually(lambda: letter(value))
    assert row["source_topic"] == client.topics.outputs
    assert row["error_type"] == "CharacterNotInRepertoireError"
    assert "read model refused it" in row["reason"]
    row = await eventually(lambda: letter(big_value))
    assert row["error_type"] == "OverflowError"
    assert "out of int32 range" in row["reason"]
    # Nor is it witnessed: an entry no read model could keep would be a hole in the
    # chain verified from PostgreSQL.
    witnessed = await eventually(
        lambda: db.fetchrow(
            "SELECT * FROM dead_letters WHERE processor LIKE 'witness%' AND original = $1",
            big_value,
        )
    )
    assert witnessed["reason"] == "attempt must be 0-1,000"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM witness_entries WHERE task_id = $1", too_big.task_id
        )
        == 0
    )
    for task_id in (refused.task_id, too_big.task_id):
        assert await db.fetchval("SELECT count(*) FROM outputs WHERE task_id = $1", task_id) == 0


async def test_an_event_on_the_wrong_history_topic_is_dead_lettered_not_projected(
    system: System,
) -> None:
    db, client = system.db, system.client
    misplaced = Halt(reason=f"on the tasks topic {system.pool}", operator="x")
    value = default_codec().encode(client._producer.envelope(misplaced), misplaced)
    await client.send_raw(client.topics.tasks, "system", value)

    async def letter() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT * FROM dead_letters WHERE processor = 'projector' AND original = $1", value
        )

    row = await eventually(letter)
    assert row["error_type"] == "InvalidEvent"
    assert row["reason"] == f"system.halt is not projected from {client.topics.tasks}"
    assert (
        await db.fetchval("SELECT count(*) FROM system_events WHERE reason = $1", misplaced.reason)
        == 0
    )


async def test_only_the_accepted_output_is_a_tasks_answer(system: System) -> None:
    """Anyone who can write to the outputs topic can get a record witnessed; it is never
    shown as a task's answer unless the scheduler accepted it."""
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    async with system.running(1):
        task_id = await system.submit_visible("the real question")
    real = await queries.get_task(db, task_id)
    assert real.output is not None
    forged = [
        AgentOutput(
            task_id=target,
            agent_id=real.agent_id or "",
            attempt=1,
            content="forged answer",
            latency_us=1,
            deliberation_id=None,
        )
        for target in (task_id, f"{pool}-never-submitted")
    ]
    event_ids = []
    for output in forged:
        envelope = client._producer.envelope(output)
        event_ids.append(envelope.event_id)
        await client.send_raw(
            client.topics.outputs, output.task_id, default_codec().encode(envelope, output)
        )

    async def witnessed() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM witness_entries WHERE subject_event_id = ANY($1::text[])",
            event_ids,
        )
        return bool(n == len(event_ids))

    await eventually(witnessed)  # witnessed like everything ...
    view = await queries.get_task(db, task_id)
    assert view.output == real.output  # ... but not the answer
    assert view.unsolicited_outputs == 1
    shown = await asyncio.to_thread(cli, settings, "task", "show", task_id)
    assert "forged" not in shown.stdout, shown.stdout
    assert "1 other witnessed output(s)" in shown.stdout
    with pytest.raises(NotFound):
        await queries.get_task(db, f"{pool}-never-submitted")


async def test_a_pool_configuration_no_one_could_have_sent_is_dead_lettered_everywhere(
    system: System,
) -> None:
    """A negative capacity, produced past the client's checks: refused by the scheduler,
    the witness and the projector alike, with the reason, and folded by none of them."""
    db, client, pool_name = system.db, system.client, system.pool
    bad = PoolConfigured(pool=pool_name, capacity=-1, reason="typo", operator="x")
    value = default_codec().encode(client._producer.envelope(bad), bad)
    await client.send_raw(client.topics.control, "system", value, partition=0)

    async def letters() -> list[asyncpg.Record]:
        rows = await db.fetch(
            "SELECT processor, reason FROM dead_letters WHERE original = $1 ORDER BY processor",
            value,
        )
        return rows if len(rows) >= 3 else []

    rows = await eventually(letters)
    processors = {r["processor"].split("-")[0].split(":")[0] for r in rows}
    assert {"projector", "scheduler", "witness"} <= processors, rows
    assert all(r["reason"] == "capacity must be 0-1,000,000" for r in rows)
    assert await db.fetchval("SELECT count(*) FROM pool_settings WHERE pool = $1", pool_name) == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM witness_entries WHERE subject_type = 'pool.configured'"
            " AND detail LIKE $1",
            f"{pool_name}:%",
        )
        == 0
    )
    async with system.running(1):
        await system.submit_visible("the pool still runs at its default capacity")
