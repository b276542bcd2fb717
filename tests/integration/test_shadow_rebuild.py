"""Rebuild without downtime (shadow schema and swap), digests, the digest witnessed,
and read models as of a point in history. Real broker, real PostgreSQL, the shared
live projector running throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from aiokafka import TopicPartition

from conclave.api import create_app
from conclave.api.tokens import create_token
from conclave.bus import topics_for
from conclave.cli_replay import _commit_digest
from conclave.errors import ConclaveError
from conclave.settings import Settings
from conclave.verify import verify_sources
from projections import queries
from projections.database import connect, schema_for
from projections.digest import digest_schema
from projections.queries import TaskFilter
from projections.rebuild import RebuildError, build_as_of, drop_as_of, list_as_of, rebuild
from tests.integration.conftest import System, eventually, has_status

pytestmark = pytest.mark.integration


async def _completed(system: System, ids: list[str]) -> None:
    for task_id in ids:
        await eventually(lambda t=task_id: has_status(system.db, t, "completed"))  # type: ignore[misc]


async def _caught_up(system: System) -> None:
    projector = system.projector.projector
    assert projector is not None
    await eventually(lambda: _no_lag(system), within=30)


async def _no_lag(system: System) -> bool:
    assert system.projector.projector is not None
    return await system.projector.projector.lag() == 0


async def test_rebuild_equals_live_and_an_altered_row_is_named(system: System) -> None:
    async with system.running(2):
        ids = [await system.client.submit(f"d{i}", pool=system.pool) for i in range(4)]
        await _completed(system, ids)
    checked = await rebuild(system.settings, swap=False)
    assert checked.differ == [], checked.differ
    assert checked.live.by_table()["tasks"].rows >= 4
    assert checked.live.positions == checked.rebuilt.positions
    assert checked.live.positions, "the digests state the positions they cover"

    # Someone edits a live row by hand: the check names the table, and only it.
    await system.db.execute("UPDATE tasks SET input = 'tampered' WHERE task_id = $1", ids[0])
    tampered = await rebuild(system.settings, swap=False)
    assert tampered.differ == ["tasks"]
    assert await system.db.fetchval("SELECT input FROM tasks WHERE task_id = $1", ids[0]) == (
        "tampered"
    ), "a check swaps nothing in"

    # A replay swaps the rebuilt rows in: the edit is gone, and the digests agree again.
    replayed = await rebuild(system.settings)
    assert replayed.differ == ["tasks"]
    assert replayed.swapped
    assert await system.db.fetchval("SELECT input FROM tasks WHERE task_id = $1", ids[0]) == "d0"
    assert (await rebuild(system.settings, swap=False)).differ == []


async def test_queries_answer_and_the_live_projector_goes_on_across_a_swap(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections.projector")
    async with system.running(4):
        before = [await system.client.submit(f"b{i}", pool=system.pool) for i in range(6)]
        await _completed(system, before)
        reads = 0
        failures: list[str] = []
        stop = asyncio.Event()

        async def reader() -> None:
            nonlocal reads
            # Its own pool: sessions that stay open across the swap, as a server's do.
            pool = await connect(system.settings, max_size=2)
            try:
                while not stop.is_set():
                    try:
                        page = await queries.list_tasks(pool, TaskFilter(pool=system.pool))
                        if len(page.tasks) < len(before):
                            failures.append(f"{len(page.tasks)} tasks seen")
                        view = await queries.get_task(pool, before[0])
                        if view.status != "completed":
                            failures.append(f"status {view.status}")
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    reads += 1
                    await asyncio.sleep(0.005)
            finally:
                await pool.close()

        async def submitter() -> list[str]:
            during = []
            while not stop.is_set():
                during.append(await system.client.submit("during", pool=system.pool))
                await asyncio.sleep(0.05)
            return during

        reading = asyncio.create_task(reader())
        submitting = asyncio.create_task(submitter())
        try:
            result = await rebuild(system.settings)
        finally:
            stop.set()
            during = await submitting
            await reading
        assert result.swapped
        assert result.differ == []
        assert reads > 20, "the reader ran during the rebuild"
        assert failures == []
        assert during, "tasks were submitted during the rebuild"
        after = [await system.client.submit(f"a{i}", pool=system.pool) for i in range(3)]
        # Submitted during and after the swap: the live projector folded them into the
        # rebuilt schema, from its positions, none lost.
        await _completed(system, [*during, *after])
    # It noticed the swap (the schema's OID changed) and repositioned, rather than going on
    # from where it was in the schema swapped away.
    assert any("was swapped for a rebuilt one" in r.getMessage() for r in caplog.records)
    assert await _left_over(system) == [], "the old and shadow schemas are dropped after the swap"


async def _left_over(system: System) -> list[str]:
    schema = schema_for(system.settings)
    rows = await system.db.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[])",
        [f"{schema}__shadow", f"{schema}__old"],
    )
    return [r[0] for r in rows]


async def test_the_digest_is_witnessed_and_the_chain_verifies(system: System) -> None:
    control = topics_for(system.settings).control
    refusals = "SELECT count(*) FROM dead_letters WHERE source_topic = $1"
    await _caught_up(system)
    refused_before = await system.db.fetchval(refusals, control)  # other tests' bad records
    result = await rebuild(system.settings)
    sequence = await _commit_digest(system.settings, result, 20.0)
    assert sequence is not None
    row = await eventually(
        lambda: system.db.fetchrow(
            "SELECT subject_type, detail FROM witness_entries WHERE sequence = $1", sequence
        )
    )
    assert row["subject_type"] == "projection.digest"
    stored = await eventually(
        lambda: system.db.fetchrow(
            "SELECT tables, positions FROM projection_digests ORDER BY computed_at DESC LIMIT 1"
        )
    )
    assert sorted(stored["tables"]) == sorted(t.text() for t in result.rebuilt.tables)
    await _caught_up(system)
    # Nobody refused it: the scheduler reads the control topic too, and ignores it.
    assert await system.db.fetchval(refusals, control) == refused_before
    for verified in await verify_sources(system.settings):
        assert verified.violation is None, (verified.source, verified.violation)


async def test_as_of_a_time_gives_exactly_the_earlier_state(system: System) -> None:
    settings, client, pool = system.settings, system.client, system.pool
    async with system.running(2):
        done = [await client.submit(f"early{i}", pool=pool) for i in range(2)]
        await _completed(system, done)
        await client.configure_pool(pool, capacity=0, reason="hold")
        await eventually(
            lambda: system.db.fetchval(
                "SELECT 1 FROM pool_settings WHERE pool = $1 AND capacity = 0", pool
            )
        )
        await asyncio.sleep(1.0)  # the scheduler has it too
        held = [await client.submit(f"held{i}", pool=pool) for i in range(2)]
        for task_id in held:
            await eventually(lambda t=task_id: has_status(system.db, t, "queued"))  # type: ignore[misc]
        await asyncio.sleep(0.3)
        as_of = datetime.now(UTC)
        await asyncio.sleep(0.3)
        late = await client.submit("late", pool=pool)
        await client.configure_pool(pool, capacity=72, reason="release")
        await _completed(system, [*held, late])
    await _caught_up(system)

    name = f"asof_test_{int(time.time() * 1000)}"
    other = f"{name}_o"
    try:
        events, covered = await build_as_of(settings, name, cutoff=as_of)
        assert events > 0
        past = await connect(settings.with_(read_schema=name), reader=True)
        try:
            rows = await past.fetch("SELECT task_id, status FROM tasks WHERE pool = $1", pool)
            assert dict(rows) == {
                done[0]: "completed",
                done[1]: "completed",
                held[0]: "queued",
                held[1]: "queued",
            }
            outputs = await past.fetch(
                "SELECT task_id FROM outputs WHERE task_id = ANY($1::text[])", [*done, *held]
            )
            assert sorted(r[0] for r in outputs) == sorted(done)
            capacities = await past.fetch(
                "SELECT capacity FROM pool_settings WHERE pool = $1", pool
            )
            assert [r[0] for r in capacities] == [0]
            view = await queries.get_task(past, held[0])  # the query layer, pointed there
            assert view.status == "queued"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await past.execute("DELETE FROM tasks")
        finally:
            await past.close()
        # The API pointed there (`conclave --schema NAME api`) answers from it too.
        assert await _api_status(settings.with_(read_schema=name), system, held[0]) == "queued"
        # The live read models are the present.
        assert await has_status(system.db, held[0], "completed")

        # The same point as an offset vector gives the same rows; both are listed.
        await _same_at_offsets_and_listed(settings, name, other, covered, as_of)
    finally:
        for schema in (name, other):
            # Both exist unless the test failed first: then say that failure, not this.
            with contextlib.suppress(RebuildError):
                await drop_as_of(settings, schema)
    names = {s.name for s in await list_as_of(settings)}
    assert name not in names
    assert other not in names
    with pytest.raises(ConclaveError, match="not built by"):
        await drop_as_of(settings, schema_for(settings))
    with pytest.raises(ConclaveError, match="does not exist"):
        await connect(settings.with_(read_schema=name), reader=True)


async def _api_status(settings: Settings, system: System, task_id: str) -> str:
    """The task's status as the API of ``settings`` answers it."""
    _, token = await create_token(system.db, settings.tenant, name="as-of")
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://api",
            headers={"Authorization": f"Bearer {token}"},
        ) as http,
    ):
        answer = await http.get(f"/v1/tasks/{task_id}")
        assert answer.status_code == 200, answer.text
        listed = await http.get("/v1/tasks", params={"pool": system.pool})
        assert task_id in {t["task_id"] for t in listed.json()["tasks"]}
        status: str = answer.json()["status"]
        return status


async def _same_at_offsets_and_listed(
    settings: Settings,
    name: str,
    other: str,
    covered: dict[TopicPartition, int],
    as_of: datetime,
) -> None:
    offsets = {(tp.topic, tp.partition): o for tp, o in covered.items()}
    await build_as_of(settings, other, offsets=offsets)
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with admin.transaction(isolation="repeatable_read", readonly=True):
            a = await digest_schema(admin, name)
            b = await digest_schema(admin, other)
    finally:
        await admin.close()
    assert a.tables == b.tables
    assert a.positions == b.positions

    listed = {s.name: s.description for s in await list_as_of(settings)}
    assert name in listed
    assert other in listed
    assert "as of time" in listed[name]
    with pytest.raises(ConclaveError, match="exists already"):
        await build_as_of(settings, name, cutoff=as_of)
