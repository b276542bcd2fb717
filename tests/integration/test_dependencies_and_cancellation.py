"""Dependencies and cancellation on the embedded stack: the Python client, the
processors, a runtime host and the ``conclave`` CLI a user runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from conclave.domain.retry import RetryPolicy
from conclave.errors import NotFound, Rejected
from conclave.runtime.agents import AgentContext, PermanentFailure
from projections import queries
from tests.integration.conftest import System, eventually, has_status, task_status
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration


class Held:
    """An agent that works until ``release`` is set (inputs ``hold`` picks; the others it
    answers at once). ``stopped`` is set when its host stops it: a cancellation, an
    expiry, a halt that cancels."""

    def __init__(self, hold: Callable[[AgentContext], bool] = lambda ctx: True) -> None:
        self.hold = hold
        self.release = asyncio.Event()
        self.stopped = asyncio.Event()

    async def __call__(self, ctx: AgentContext) -> str:
        if self.hold(ctx):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.stopped.set()
                raise
        return f"did {ctx.input}"


async def test_a_chain_runs_in_order_and_a_dead_letter_fails_what_depends_on_it(
    system: System,
) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    started: list[str] = []

    async def agent(ctx: AgentContext) -> str:
        started.append(ctx.task_id)
        await asyncio.sleep(0.05)
        if ctx.input == "fail":
            raise PermanentFailure("cannot")
        return f"did {ctx.input}"

    ids = {name: f"{pool}-{name}" for name in ("a", "b", "c", "bad", "d", "e")}
    async with system.running(4, agent):
        # Submitted all at once: with four idle agents, only the order of the chain
        # keeps b and c from starting at once.
        await client.submit("a", task_id=ids["a"], pool=pool)
        await client.submit("b", task_id=ids["b"], pool=pool, depends_on=[ids["a"]])
        await client.submit("c", task_id=ids["c"], pool=pool, depends_on=[ids["b"], ids["a"]])
        await client.submit("fail", task_id=ids["bad"], pool=pool, retry=RetryPolicy(0))
        await client.submit("d", task_id=ids["d"], pool=pool, depends_on=[ids["bad"]])
        await client.submit("e", task_id=ids["e"], pool=pool, depends_on=[ids["d"], ids["a"]])
        await eventually(lambda: has_status(db, ids["c"], "completed"))
        await eventually(lambda: has_status(db, ids["e"], "dependency_failed"))

    chain = [t for t in started if t in (ids["a"], ids["b"], ids["c"])]
    assert chain == [ids["a"], ids["b"], ids["c"]]
    assert ids["d"] not in started
    assert ids["e"] not in started
    a, b, c = [await queries.get_task(db, ids[n]) for n in "abc"]
    assert a.finished_at is not None
    assert b.dispatched_at is not None
    assert b.dispatched_at >= a.finished_at
    assert c.dependencies == {ids["b"]: "completed", ids["a"]: "completed"}
    d = await queries.get_task(db, ids["d"])
    assert d.status == "dependency_failed"
    assert d.error == f"dependency {ids['bad']!r} was dead-lettered"
    e = await queries.get_task(db, ids["e"])
    assert e.error == (f"dependency {ids['d']!r} failed a dependency; it began at {ids['bad']!r}")
    shown = await asyncio.to_thread(cli, settings, "task", "show", ids["c"])
    assert f"{ids['b']} (completed)" in shown.stdout, shown.stdout
    listed = await asyncio.to_thread(
        cli, settings, "tasks", "--pool", pool, "--status", "dependency_failed", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    assert f'"{ids["e"]}"' in listed.stdout


async def test_a_task_depending_on_an_unknown_task_is_rejected_and_says_so(
    system: System,
) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    task_id = await client.submit("x", pool=pool, depends_on=[f"{pool}-never-submitted"])

    async def rejected() -> bool:
        try:
            await queries.get_task(db, task_id)
        except Rejected:
            return True
        except NotFound:
            return False  # not folded yet
        return False

    await eventually(rejected)
    shown = await asyncio.to_thread(cli, settings, "task", "show", task_id)
    assert shown.returncode != 0
    assert "unknown task(s)" in shown.stderr, shown.stderr
    refused = await asyncio.to_thread(
        cli, settings, "submit", "x", "--pool", pool, "--id", "self", "--depends-on", "self"
    )
    assert refused.returncode != 0
    assert "cannot depend on itself" in refused.stderr, refused.stderr


async def test_cancelling_a_running_task_stops_its_agent_and_frees_its_place(
    system: System,
) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    agent = Held(lambda ctx: ctx.input == "slow")
    async with system.running(1, agent):
        slow = await client.submit("slow", pool=pool)
        after = await client.submit("after", pool=pool, depends_on=[slow])
        queued = await client.submit("next", pool=pool)  # waits for the only agent
        await eventually(lambda: has_status(db, slow, "dispatched"))
        assert await task_status(db, after) == "waiting"
        sent = await asyncio.to_thread(
            cli, settings, "cancel", slow, "--reason", "no longer needed"
        )
        assert sent.returncode == 0, sent.stderr
        async with asyncio.timeout(30):
            await agent.stopped.wait()
        await eventually(lambda: has_status(db, slow, "cancelled"))
        await eventually(lambda: has_status(db, queued, "completed"))  # the agent is free again
        await eventually(lambda: has_status(db, after, "dependency_failed"))
        # The stopped attempt is reported, witnessed, and is not the task's answer.
        view = await eventually(lambda: _with_failure(db, slow))
    assert view.status == "cancelled"
    assert view.error == "cancelled: no longer needed"
    assert view.output is None
    assert [(f.error_type, f.permanent) for f in view.failures] == [("Cancelled", True)]
    again = await asyncio.to_thread(cli, settings, "cancel", queued)
    assert again.returncode == 0  # sent; the scheduler rejects it, and says why
    await eventually(lambda: _rejected_cancel(db, queued))


async def test_cancelling_a_deliberation_cancels_the_answers_still_outstanding(
    system: System,
) -> None:
    db, client, pool = system.db, system.client, system.pool
    agent = Held(lambda ctx: not ctx.agent_id.endswith("0"))  # all but one think for ever
    async with system.running(3, agent) as host:
        agents = sorted(host.config.agent_ids)
        deliberation_id = await client.deliberate("motion", agent_ids=agents, pool=pool)
        first = f"{deliberation_id}/{agents[0]}"
        await eventually(lambda: has_status(db, first, "completed"))
        await client.cancel(deliberation_id=deliberation_id, pool=pool)
        views = await eventually(lambda: _all_finished(db, deliberation_id))
    assert [v.status for v in views] == ["completed", "cancelled", "cancelled"]


async def _with_failure(db: asyncpg.Pool, task_id: str) -> queries.TaskView | None:
    view = await queries.get_task(db, task_id)
    return view if view.failures else None


async def _rejected_cancel(db: asyncpg.Pool, task_id: str) -> bool:
    reason = await db.fetchval(
        "SELECT reason FROM rejections WHERE subject_id = $1 AND command_type = $2",
        task_id,
        "task.cancel_requested",
    )
    return reason == f"task {task_id!r} is already completed"


async def _all_finished(db: asyncpg.Pool, deliberation_id: str) -> list[queries.TaskView] | None:
    views = await queries.deliberation(db, deliberation_id)
    return views if views and all(v.finished_at is not None for v in views) else None


async def test_tasks_expire_when_not_started_in_time_or_not_finished_by_their_deadline(
    system: System,
) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    agent = Held()  # never answers in time
    # No agent in the pool yet: the task cannot start within its limit.
    unstarted = await client.submit("x", pool=pool, start_within_ms=300)
    await eventually(lambda: has_status(db, unstarted, "expired"))
    view = await queries.get_task(db, unstarted)
    assert view.error == "expired: not started within its schedule-to-start limit"
    assert view.attempt == 0
    async with system.running(1, agent):
        sent = await asyncio.to_thread(
            cli, settings, "submit", "y", "--pool", pool, "--finish-within", "1.5"
        )
        assert sent.returncode == 0, sent.stderr
        bounded = sent.stdout.strip()
        await eventually(lambda: has_status(db, bounded, "dispatched"))
        await eventually(lambda: has_status(db, bounded, "expired"))
        async with asyncio.timeout(30):
            await agent.stopped.wait()  # its agent was stopped
    view = await queries.get_task(db, bounded)
    assert view.error == "expired: not finished by its deadline"
    assert view.finish_by is not None
    assert view.finished_at is not None
    assert view.finish_by <= view.finished_at < view.finish_by + 5_000_000


async def test_a_pools_capacity_changes_at_run_time_and_other_pools_keep_theirs(
    system: System,
) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    running, peak = 0, 0

    async def agent(ctx: AgentContext) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return "ok"

    async with system.running(4, agent):
        await client.configure_pool(pool, capacity=1, reason="background work")
        await eventually(lambda: _configured(db, pool, 1))
        first = [await client.submit(f"one at a time {i}", pool=pool) for i in range(8)]
        for task_id in first:
            await eventually(lambda t=task_id: has_status(db, t, "completed"))  # type: ignore[misc]
        assert peak == 1
        shown = await asyncio.to_thread(cli, settings, "capacity", pool, "3", "--reason", "more")
        assert shown.returncode == 0, shown.stderr
        await eventually(lambda: _configured(db, pool, 3))
        peak = 0
        more = [await client.submit(f"three at a time {i}", pool=pool) for i in range(12)]
        for task_id in more:
            await eventually(lambda t=task_id: has_status(db, t, "completed"))  # type: ignore[misc]
        assert 1 < peak <= 3
    listed = await asyncio.to_thread(cli, settings, "pools", "--json")
    assert listed.returncode == 0, listed.stderr
    assert f'"pool": "{pool}"' in listed.stdout
    witnessed = await db.fetchval(
        "SELECT count(*) FROM witness_entries WHERE subject_type = 'pool.configured'"
        " AND detail LIKE $1",
        f"{pool}: capacity %",
    )
    assert witnessed == 2


async def _configured(db: asyncpg.Pool, pool: str, capacity: int) -> bool:
    """The capacity is in the read model. The scheduler reads the control topic itself,
    as soon as the projector does; the half second after covers a slower fetch."""
    stored = await db.fetchval(
        "SELECT capacity FROM pool_settings WHERE pool = $1 ORDER BY configured_at DESC LIMIT 1",
        pool,
    )
    if stored != capacity:
        return False
    await asyncio.sleep(0.5)
    return True


async def test_halt_drains_by_default_and_cancels_what_runs_when_asked(system: System) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    agent = Held()
    async with system.running(1, agent):
        drained = await client.submit("drained", pool=pool)
        await eventually(lambda: has_status(db, drained, "dispatched"))
        await client.halt("drain", operator="test")
        await asyncio.sleep(1.0)
        agent.release.set()  # a drain lets what runs finish
        await eventually(lambda: has_status(db, drained, "completed"))
        await client.resume("go on", operator="test")
        agent.release.clear()
        cancelled = await client.submit("cancelled", pool=pool)
        await eventually(lambda: has_status(db, cancelled, "dispatched"))
        halted = await asyncio.to_thread(cli, settings, "halt", "emergency", "--cancel-running")
        assert halted.returncode == 0, halted.stderr
        try:
            await eventually(lambda: has_status(db, cancelled, "cancelled"))
            async with asyncio.timeout(30):
                await agent.stopped.wait()
        finally:
            await client.resume("over", operator="test")
    view = await queries.get_task(db, cancelled)
    assert view.error == "cancelled: halted (emergency)"
