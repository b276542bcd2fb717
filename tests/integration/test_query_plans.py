"""How PostgreSQL answers the main listings: a page is an index walk that stops after
the page, whatever the table holds, not a sort of every matching row."""

from __future__ import annotations

import asyncpg
import pytest

from projections import queries
from projections.queries import TaskFilter

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("after", [None, "1700000000000000:task-1"])
async def test_a_tenants_task_pages_walk_an_index_not_a_sort(
    db: asyncpg.Pool, after: str | None
) -> None:
    sql, args = queries.list_tasks_query(TaskFilter(tenant="tenant-plan"), limit=50, after=after)
    async with db.acquire() as conn, conn.transaction():
        # The test tables are small enough for a scan and a sort to be cheapest: price
        # them out, so that only a plan with no ordered index left still sorts.
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            await conn.execute(f"SET LOCAL {setting} = off")
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {sql}", *args))
    assert "tasks_by_tenant_queued" in plan, plan
    assert "Sort" not in plan, plan
