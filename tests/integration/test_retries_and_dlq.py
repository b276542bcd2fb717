"""Retries with back-off, permanent failures, listing and the dead-letter queue, on the
embedded stack: the Python client, the processors and the ``conclave`` CLI a user runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conclave.client import Client
from conclave.domain.events import Priority
from conclave.domain.retry import RetryPolicy
from conclave.runtime.agents import AgentContext, TransientFailure
from projections import queries
from tests.integration.conftest import System, eventually, has_status
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration


async def test_a_flaky_agent_succeeds_after_retries_that_wait_out_their_backoff(
    system: System,
) -> None:
    db, client, pool = system.db, system.client, system.pool

    async def flaky(ctx: AgentContext) -> str:
        if ctx.attempt < 3:
            raise TransientFailure(f"rate limited on attempt {ctx.attempt}")
        return f"done on attempt {ctx.attempt}"

    policy = RetryPolicy(backoff_ms=400, multiplier=2.0, max_backoff_ms=10_000, jitter=0.0)
    async with system.running(2, flaky):
        task_id = await client.submit("x", pool=pool, max_attempts=3, retry=policy)
        await eventually(lambda: has_status(db, task_id, "completed"))
    view = await queries.get_task(db, task_id)
    assert view.output is not None
    assert view.output.content == "done on attempt 3"
    first, second = view.failures
    assert (first.attempt, second.attempt) == (1, 2)
    assert first.message == "rate limited on attempt 1"
    # Each retry was dispatched no earlier than its due time: 400 ms, then 800 ms.
    assert second.failed_at - first.failed_at >= 400_000
    assert view.finished_at is not None
    assert view.finished_at - second.failed_at >= 800_000


async def test_a_retrying_task_shows_when_it_runs_again(system: System) -> None:
    db, client, pool = system.db, system.client, system.pool

    async def once_unlucky(ctx: AgentContext) -> str:
        if ctx.attempt == 1:
            raise TransientFailure("try again later")
        return "ok"

    async with system.running(1, once_unlucky):
        task_id = await client.submit(
            "x", pool=pool, max_attempts=2, retry=RetryPolicy(backoff_ms=6000, jitter=0.0)
        )
        await eventually(lambda: has_status(db, task_id, "retrying"), within=10)
        shown = await asyncio.to_thread(cli, system.settings, "task", "show", task_id)
        assert "next attempt" in shown.stdout, shown.stdout
        assert "TransientFailure: try again later" in shown.stdout
        listed = await asyncio.to_thread(cli, system.settings, "tasks", "--pool", pool)
        assert "retrying" in listed.stdout, listed.stdout
        assert "TransientFailure" in listed.stdout  # why it waits
        await eventually(lambda: has_status(db, task_id, "completed"))


async def test_dead_letters_are_listed_shown_and_redriven_from_the_cli(system: System) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool

    async def first_time_unlucky(ctx: AgentContext) -> str:
        if "~" not in ctx.task_id:  # the original fails; a redrive (<id>~<n>) succeeds
            raise RuntimeError(f"cannot do {ctx.input}")
        return f"did {ctx.input}"

    at_once = RetryPolicy(backoff_ms=0)
    async with system.running(2, first_time_unlucky):
        ids = [
            await client.submit(f"job {i}", task_id=f"{pool}-job{i}", pool=pool, retry=at_once)
            for i in range(3)
        ]
        for task_id in ids:
            await eventually(lambda t=task_id: has_status(db, t, "dead_lettered"))  # type: ignore[misc]

        listed = await asyncio.to_thread(cli, settings, "dlq", "list", "--pool", pool, "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(t["task_id"] for t in json.loads(listed.stdout)["tasks"]) == ids

        shown = await asyncio.to_thread(cli, settings, "dlq", "show", ids[0])
        assert "cannot do job 0" in shown.stdout, shown.stdout

        one = await asyncio.to_thread(cli, settings, "dlq", "redrive", ids[0])
        assert one.returncode == 0, one.stderr
        assert one.stdout.split() == [ids[0], "->", f"{ids[0]}~1"]
        await eventually(lambda: has_status(db, f"{ids[0]}~1", "completed"))

        # Filters choose what --all runs; dlq list with them shows it first (in any case).
        chosen = await asyncio.to_thread(
            cli, settings, "dlq", "list", "--pool", pool, "--error", "JOB 1", "--json"
        )
        assert [t["task_id"] for t in json.loads(chosen.stdout)["tasks"]] == [ids[1]]
        one_more = await asyncio.to_thread(
            cli, settings, "dlq", "redrive", "--all", "--pool", pool, "--error", "job 1"
        )
        assert one_more.stdout.split() == [ids[1], "->", f"{ids[1]}~1"], one_more.stderr
        # --all redrives the one not redriven yet, once however often it is run.
        rest = await asyncio.to_thread(cli, settings, "dlq", "redrive", "--all", "--pool", pool)
        assert rest.returncode == 0, rest.stderr
        assert rest.stdout.split() == [ids[2], "->", f"{ids[2]}~1"]
        again = await asyncio.to_thread(cli, settings, "dlq", "redrive", "--all", "--pool", pool)
        assert again.stdout == "", again.stdout
        for task_id in ids[1:]:
            await eventually(lambda t=task_id: has_status(db, f"{t}~1", "completed"))  # type: ignore[misc]

    redriven = await queries.get_task(db, f"{ids[0]}~1")
    assert (redriven.redrive_of, redriven.input, redriven.attempt) == (ids[0], "job 0", 1)
    assert redriven.retry == at_once  # the policy it was submitted with, not the default
    completed = await asyncio.to_thread(
        cli, settings, "tasks", "--pool", pool, "--status", "completed", "--json", "--limit", "2"
    )
    page = json.loads(completed.stdout)
    assert len(page["tasks"]) == 2
    assert page["cursor"] is not None
    more = await asyncio.to_thread(
        cli, settings, "tasks", "--pool", pool, "--status", "completed", "--json",
        "--after", page["cursor"],
    )  # fmt: skip
    listed_ids = [t["task_id"] for t in page["tasks"] + json.loads(more.stdout)["tasks"]]
    assert sorted(listed_ids) == sorted(f"{t}~1" for t in ids)

    not_dead = await asyncio.to_thread(cli, settings, "dlq", "redrive", f"{ids[0]}~1")
    assert not_dead.returncode != 0
    assert not_dead.stderr.strip() == f"error: task '{ids[0]}~1' is completed, not dead-lettered"
    stray = await asyncio.to_thread(cli, settings, "dlq", "redrive", ids[1], "--error", "x")
    assert stray.returncode != 0
    assert "the filters go with --all" in stray.stderr
    bad = await asyncio.to_thread(cli, settings, "tasks", "--status", "lost")
    assert bad.returncode != 0
    assert "status must be one of" in bad.stderr
    assert "Traceback" not in bad.stderr


async def test_pools_show_queues_per_priority_and_tasks_keep_their_tenant(system: System) -> None:
    settings, db, pool = system.settings, system.db, system.pool

    async def pools() -> dict[str, Any]:
        shown = await asyncio.to_thread(cli, settings, "pools", "--json")
        assert shown.returncode == 0, shown.stderr
        return next((p for p in json.loads(shown.stdout) if p["pool"] == pool), {})

    async with Client(dataclasses.replace(settings, tenant="acme"), producer_name="acme") as acme:
        ids = [
            await acme.submit("n1", pool=pool),
            await acme.submit("n2", pool=pool),
            await acme.submit("h1", pool=pool, priority=Priority.HIGH),
        ]
        waiting = await eventually(
            lambda: _matching(pools(), lambda p: sum(p.get("queued", {}).values()) == 3)
        )
        assert waiting["queued"] == {"critical": 0, "high": 1, "normal": 2, "low": 0}
        assert (waiting["agents"], waiting["in_flight"]) == (0, 0)
        assert waiting["capacity"] == settings.pool_capacity
        async with system.running(1):
            for task_id in ids:
                await eventually(lambda t=task_id: has_status(db, t, "completed"))  # type: ignore[misc]
            done = await eventually(lambda: _matching(pools(), lambda p: p["completed"] == 3))
            assert (done["agents"], sum(done["queued"].values())) == (1, 0)
    listed = await asyncio.to_thread(
        cli, settings, "tasks", "--pool", pool, "--tenant", "acme", "--json"
    )
    assert sorted(t["task_id"] for t in json.loads(listed.stdout)["tasks"]) == sorted(ids)
    assert {t["tenant"] for t in json.loads(listed.stdout)["tasks"]} == {"acme"}
    other = await asyncio.to_thread(
        cli, settings, "tasks", "--pool", pool, "--tenant", "default", "--json"
    )
    assert json.loads(other.stdout)["tasks"] == []


async def _matching(view: Awaitable[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> Any:
    found = await view
    return found if found and test(found) else None
