"""Agents as an operator sees them: ``conclave agents``, and circuit breakers on the
embedded stack (the session's worker runs with the default threshold, 10 failures)."""

from __future__ import annotations

import json

import asyncpg
import pytest

from conclave.runtime.agents import AgentContext, TransientFailure
from conclave.settings import Settings
from projections import queries
from tests.integration.conftest import System, eventually, has_status
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration


async def test_an_agent_failing_ten_times_in_a_row_gets_no_work_while_its_circuit_is_open(
    system: System,
) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    broken = f"{pool}-agent-000"

    async def agent(ctx: AgentContext) -> str:
        if ctx.agent_id == broken:
            raise TransientFailure("its model endpoint is down")
        return f"did {ctx.input}"

    async with system.running(2, agent):
        doomed = [await client.submit(f"doomed {i}", pool=pool, agent_id=broken) for i in range(10)]
        await eventually(lambda: _all_have(db, doomed, "dead_lettered"))
        await eventually(lambda: _state_of(settings, pool, broken, "circuit_open"))
        # While it is open, every task goes to the other agent, never to the broken one.
        fine = [await client.submit(f"fine {i}", pool=pool) for i in range(6)]
        await eventually(lambda: _all_have(db, fine, "completed"))
        views = [await queries.get_task(db, t) for t in fine]
        assert {v.agent_id for v in views} == {f"{pool}-agent-001"}

        shown = json.loads(cli(settings, "agents", "--pool", pool, "--json").stdout)
        mine = {a["agent_id"]: a for a in shown}
        assert mine[broken]["state"] == "circuit_open"
        assert mine[broken]["suspended_reason"] == "circuit open: 10 attempts failed in a row"
        table = cli(settings, "agents", "--pool", pool, "--state", "circuit_open").stdout
        assert broken in table
        assert f"{pool}-agent-001" not in table


async def _all_have(db: asyncpg.Pool, task_ids: list[str], status: str) -> bool:
    return all([await has_status(db, t, status) for t in task_ids])


async def _state_of(settings: Settings, pool: str, agent_id: str, state: str) -> bool:
    shown = json.loads(cli(settings, "agents", "--pool", pool, "--json").stdout)
    return any(a["agent_id"] == agent_id and a["state"] == state for a in shown)
