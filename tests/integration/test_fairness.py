"""Fairness between tenants and keys, per-key limits and idempotency keys on the
embedded stack: real processors, a real runtime host, the Python client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from conclave.client import Client, idempotent_task_id
from conclave.errors import InvalidCommand
from conclave.runtime.agents import AgentContext, AgentFn
from tests.integration.conftest import System, eventually, has_status

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def tenant_client(system: System, tenant: str) -> AsyncIterator[Client]:
    async with Client(dataclasses.replace(system.settings, tenant=tenant)) as client:
        yield client


async def all_completed(system: System, ids: list[str]) -> bool:
    return all([await has_status(system.db, i, "completed") for i in ids])


async def test_a_key_never_has_more_than_its_limit_running_while_idle_agents_serve_others(
    system: System,
) -> None:
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()

    async def agent(ctx: AgentContext) -> str:
        key = ctx.input.split(":")[0]
        running[key] += 1
        most[key] = max(most[key], running[key])
        try:
            await asyncio.sleep(0.1)
        finally:
            running[key] -= 1
        return ctx.input

    client, pool = system.client, system.pool
    ids = [
        *await client.submit_many(
            [f"c1:{n}" for n in range(12)], pool=pool, fairness_key="c1", key_limit=2
        ),
        *await client.submit_many(
            [f"c2:{n}" for n in range(6)], pool=pool, fairness_key="c2", key_limit=3
        ),
        *await client.submit_many([f"free:{n}" for n in range(8)], pool=pool),
    ]
    async with system.running(8, agent):
        await eventually(lambda: all_completed(system, ids), within=60)
    assert most["c1"] == 2, "c1 ran two at a time, never more"
    assert most["c2"] == 3
    assert most["free"] >= 3, "the tasks with no limit used the agents the others left"


async def test_tenants_take_turns_whatever_one_of_them_queued(system: System) -> None:
    started: list[str] = []

    async def agent(ctx: AgentContext) -> str:
        started.append(ctx.input)
        await asyncio.sleep(0.01)
        return ctx.input

    places = await bolts_places(system, agent, started, acme_tasks=30, bolt_tasks=5)
    # One agent: they run one at a time, bolt's five taking every other turn.
    assert places == [1, 3, 5, 7, 9], started[:12]
    tenants = dict(
        await system.db.fetch(
            "SELECT tenant, count(*) FROM tasks WHERE pool = $1 GROUP BY tenant", system.pool
        )
    )
    assert tenants == {"acme": 30, "bolt": 5}


async def test_an_idempotency_key_runs_once_per_tenant(system: System) -> None:
    runs: Counter[str] = Counter()

    async def agent(ctx: AgentContext) -> str:
        runs[ctx.task_id] += 1
        return ctx.input

    pool = system.pool
    key = f"order-{pool}"
    async with tenant_client(system, "acme") as acme, tenant_client(system, "bolt") as bolt:
        first = await acme.submit("charge", pool=pool, idempotency_key=key)
        again = await acme.submit("charge", pool=pool, idempotency_key=key)
        other = await bolt.submit("charge", pool=pool, idempotency_key=key)
        with pytest.raises(InvalidCommand, match="not both"):
            await acme.submit("x", pool=pool, task_id="t", idempotency_key=key)
        async with system.running(2, agent):
            await eventually(lambda: all_completed(system, [first, other]))
            # Submitted again once it ran: still a no-op returning the same id.
            assert await acme.submit("charge", pool=pool, idempotency_key=key) == first
            await asyncio.sleep(0.5)
    assert first == again == idempotent_task_id("acme", key)
    assert other == idempotent_task_id("bolt", key) != first
    assert runs == {first: 1, other: 1}


async def test_with_aging_a_low_task_is_not_starved_by_a_stream_of_critical_ones(
    system: System,
) -> None:
    from conclave.domain.events import Priority

    pool = system.pool
    said = await configured(system, "aging_turns", "--aging", "1", "--reason", "aging test")
    assert "aging 1 turn(s) per level" in said
    started, agent = recorder()

    low = await system.client.submit("low", pool=pool, priority=Priority.LOW)
    await eventually(lambda: has_status(system.db, low, "queued"))  # accepted first: turn 1
    critical = [
        await system.client.submit(f"c{n:02}", pool=pool, priority=Priority.CRITICAL)
        for n in range(10)
    ]
    await eventually(lambda: all_statuses(system, critical, "queued"))
    async with system.running(1, agent):
        await eventually(lambda: all_completed(system, [low, *critical]), within=60)
    # LOW (level 3) ranks as turn 1 + 3: after two critical tasks, not after all ten.
    assert started.index("low") == 2, started


async def all_statuses(system: System, ids: list[str], status: str) -> bool:
    return all([await has_status(system.db, i, status) for i in ids])


async def test_a_heavier_tenant_is_served_more_tasks_per_turn(system: System) -> None:
    from tests.integration.test_skeleton import cli

    pool = system.pool
    said = await configured(system, "weights", "--weight", "acme=3", "--reason", "w")
    assert "acme weighs 3" in said
    started, agent = recorder()

    places = await bolts_places(system, agent, started, acme_tasks=24, bolt_tasks=4)
    # One agent: three of acme's for each of bolt's, turn by turn.
    assert places == [3, 7, 11, 15], started[:16]
    shown = json.loads(cli(system.settings, "pools", "--json").stdout)
    assert [p["weights"] for p in shown if p["pool"] == pool] == [{"acme": 3}]
    detail = await system.db.fetchval(
        "SELECT detail FROM witness_entries WHERE subject_type = 'pool.configured'"
        " AND starts_with(detail, $1)",
        f"{pool}: ",
    )
    assert detail == f"{pool}: capacity 1, weights acme=3: w"
    refused = cli(system.settings, "capacity", pool, "1", "--weight", "acme=0")
    assert refused.returncode != 0
    assert "the weight of 'acme' must be 1-1,000" in refused.stderr
    assert "Traceback" not in refused.stderr


async def configured(system: System, column: str, *options: str) -> str:
    """``conclave capacity POOL 1 OPTIONS``, waiting until the setting's ``column`` is
    projected; what the CLI said."""
    from tests.integration.test_skeleton import cli

    pool = system.pool
    said = cli(system.settings, "capacity", pool, "1", *options)
    await eventually(
        lambda: system.db.fetchval(f"SELECT {column} FROM pool_settings WHERE pool = $1", pool)
    )
    return said.stdout


async def bolts_places(
    system: System, agent: AgentFn, started: list[str], *, acme_tasks: int, bolt_tasks: int
) -> list[int]:
    """Tenant acme queues ``acme_tasks``, then bolt ``bolt_tasks``; one agent runs them
    all. Where in the order it ran them bolt's tasks were."""
    async with tenant_client(system, "acme") as acme, tenant_client(system, "bolt") as bolt:
        a = await acme.submit_many([f"acme:{n}" for n in range(acme_tasks)], pool=system.pool)
        b = await bolt.submit_many([f"bolt:{n}" for n in range(bolt_tasks)], pool=system.pool)
    async with system.running(1, agent):
        await eventually(lambda: all_completed(system, [*a, *b]), within=60)
    return [n for n, name in enumerate(started) if name.startswith("bolt")]


def recorder() -> tuple[list[str], AgentFn]:
    """An agent that answers its input at once, and the inputs in the order it ran them."""
    started: list[str] = []

    async def agent(ctx: AgentContext) -> str:
        started.append(ctx.input)
        return ctx.input

    return started, agent
