"""Invariant 1: every read model is a fold of the topics. Drop, replay, same rows.

Runs last among the integration tests (file name order is not relied on: it
stops the shared projector itself and restarts it afterwards).
"""

from __future__ import annotations

import asyncpg
import pytest

from conclave.bus import read_history, topics_for
from conclave.verify import rebuild
from projections.database import READ_MODEL_TABLES
from projections.projector import Projector
from tests.integration.conftest import System, eventually, task_status

pytestmark = pytest.mark.integration


async def snapshot(db: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    tables: dict[str, list[tuple[object, ...]]] = {}
    for table in READ_MODEL_TABLES:
        rows = await db.fetch(f"SELECT * FROM {table}")
        tables[table] = sorted((tuple(r.values()) for r in rows), key=repr)
    return tables


async def test_drop_and_replay_gives_identical_rows(system: System) -> None:
    settings, db, client, pool_name = system.settings, system.db, system.client, system.pool
    async with system.running(4):
        ids = [await client.submit(f"r{i}", pool=pool_name) for i in range(8)]
        for task_id in ids:
            # Completed, not just visible: the last event of the task has been folded.
            await eventually(lambda t=task_id: _completed(db, t))  # type: ignore[misc]
    # The witness signs a checkpoint of the log's head within its interval (10 s): one
    # published between the fold below and the replay would be a row only the replay has.
    await eventually(lambda: _head_checkpointed(db), within=40)
    # Hosts are stopped: no more heartbeats. The scheduler judges each once its lease has
    # run out (2 s after a graceful stop): a judgement between the replay and the count
    # below would be a record only the count has.
    await eventually(lambda: _every_host_judged(db), within=40)
    # Fold everything there is, then compare.
    await system.projector.stop()
    try:
        catch_up = Projector(settings, db)
        await catch_up.start()
        await catch_up.catch_up()
        await catch_up.stop()
        before = await snapshot(db)
        assert len(before["tasks"]) >= 8
        assert len(before["witness_entries"]) >= 8

        replayed = await rebuild(settings)

        after = await snapshot(db)
        # Every committed record once (offsets also count transaction markers).
        records = [r async for r in read_history(settings, topics_for(settings).history)]
        assert replayed == len(records)
        for table in READ_MODEL_TABLES:
            assert after[table] == before[table], f"{table} differs after replay"
    finally:
        await system.projector.start()


async def _head_checkpointed(db: asyncpg.Pool) -> bool:
    head = await db.fetchval("SELECT max(sequence) FROM witness_entries")
    signed = await db.fetchval("SELECT max(tree_size) FROM checkpoints")
    return head is not None and signed == head


async def _every_host_judged(db: asyncpg.Pool) -> bool:
    open_leases = await db.fetchval(
        "SELECT count(*) FROM hosts WHERE lost_lease IS NULL OR lost_lease < lease_expires_at"
    )
    return open_leases == 0


async def _completed(db: asyncpg.Pool, task_id: str) -> bool:
    return await task_status(db, task_id) == "completed"
