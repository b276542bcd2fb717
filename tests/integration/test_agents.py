"""Agents as an operator sees them: ``conclave agents``, and circuit breakers on the
embedded stack (the session's worker runs with the default threshold, 10 failures)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import TransactionalProducer, topics_for
from conclave.domain.events import HostBeat, PoolStarved, now_us
from conclave.runtime.agents import AgentContext, SimulatedAgent, TransientFailure
from conclave.runtime.host import HostConfig, RuntimeHost
from conclave.runtime.limits import HostLimits
from conclave.settings import Settings
from conclave.topics import BROADCAST_HEADER, pool_partition
from projections import queries
from tests.integration.conftest import System, eventually, has_status, output_visible
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

        # Its history: every change of state, why, and the event that caused it.
        history = json.loads(cli(settings, "agents", "show", broken, "--json").stdout)
        states = [h["state"] for h in history]
        assert states[0] == "registered"
        assert states.count("busy") == 10
        assert states[-1] == "circuit_open", states
        assert history[-1]["reason"] == "circuit open: 10 attempts failed in a row"
        ends = [h for h in history if h["state"] == "idle"]
        assert len(ends) == 10
        assert ends[0]["reason"] == (
            f"attempt 1 of {doomed[0]} failed: TransientFailure: its model endpoint is down"
        )
        assert all(h["source"].startswith(f"{settings.topic_prefix}.") for h in history)
        shown_table = cli(settings, "agents", "show", broken, "--limit", "2").stdout
        assert "circuit_open" in shown_table
        assert "registered" not in shown_table  # the last two changes only
        unknown = cli(settings, "agents", "show", f"{pool}-nobody")
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == f"error: no agent '{pool}-nobody'"


async def _all_have(db: asyncpg.Pool, task_ids: list[str], status: str) -> bool:
    return all([await has_status(db, t, status) for t in task_ids])


async def _state_of(settings: Settings, pool: str, agent_id: str, state: str) -> bool:
    shown = json.loads(cli(settings, "agents", "--pool", pool, "--json").stdout)
    return any(a["agent_id"] == agent_id and a["state"] == state for a in shown)


async def test_a_host_that_died_inside_a_transaction_is_fenced_so_others_outputs_flow(
    system: System,
) -> None:
    """A runtime host killed with -9 between writing an output and committing leaves a
    transaction open on the outputs partition: every read_committed reader (the witness)
    stops there, and the embedded broker never times it out. Once the scheduler judges
    the host lost it fences the host's writer, which aborts that transaction."""
    settings, client, pool = system.settings, system.client, system.pool
    topics = topics_for(settings)
    partition = pool_partition(pool, 1)
    zombie = TransactionalProducer(
        settings, f"{settings.topic_prefix}.runtime.zombie", TopicPartition(topics.tasks, partition)
    )
    await zombie.start()
    writer = zombie._producer
    assert writer is not None
    await writer.begin_transaction()
    await writer.send_and_wait(topics.outputs, b"half an answer", partition=partition)
    # Its last beat: it dies now, its lease runs out in a second.
    await client._producer.send(
        topics.agents,
        "zombie",
        HostBeat(host_id="zombie", pool=pool, agent_ids=[], expires_at=now_us() + 1_000_000),
        partition=partition,
    )
    try:
        async with system.running(1):
            task_id = await client.submit("after the zombie", pool=pool)
            # Witnessed and completed only once the zombie's transaction is aborted.
            await eventually(lambda: has_status(system.db, task_id, "completed"), within=60)
        with pytest.raises(KafkaError):  # fenced: the zombie can never commit
            await writer.commit_transaction()
    finally:
        with contextlib.suppress(KafkaError, TimeoutError):
            async with asyncio.timeout(5):
                await writer.stop()


async def test_a_host_that_stops_says_so_its_agents_retire_and_its_open_work_goes_elsewhere(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM's path (``RuntimeHost.stop``): the host says it is leaving, so nothing new
    is dispatched to it; an attempt still running after the drain is stopped, and once
    the host is gone it is retried on another host at once, not after a lease. Judged
    as having left, not lost: no warning."""
    db, client, pool = system.db, system.client, system.pool
    caplog.set_level(logging.INFO, logger="streams.scheduler")

    async def stuck(ctx: AgentContext) -> str:
        await asyncio.sleep(600)
        return "never"

    async with system.host(pool, 2, stuck, prefix=f"{pool}-old") as old:
        task_id = await client.submit("long", pool=pool, max_attempts=2)
        await eventually(lambda: has_status(db, task_id, "dispatched"))
        leaving_at = now_us()

    async def gone() -> bool:  # the projector may be a moment behind the host's stop
        views = await queries.list_hosts(db, now_us())
        return any(
            h.host_id == old.config.host_id and h.state in ("leaving", "left") for h in views
        )

    await eventually(gone, within=10)
    # Submitted while it drained or after it left: for the next host, not for the old one.
    later = await client.submit("later", pool=pool)

    async def left() -> bool:
        views = await queries.list_hosts(db, now_us())
        return any(h.host_id == old.config.host_id and h.state == "left" for h in views)

    await eventually(left, within=10)
    agents = await queries.list_agents(db, now_us(), silent_after_us=10**9, in_pool=pool)
    assert {a.agent_id: a.state for a in agents} == {
        f"{pool}-old-000": "retired",
        f"{pool}-old-001": "retired",
    }
    view = await queries.get_task(db, task_id)
    assert view.status in ("queued", "retrying")  # stalled: waiting for an agent
    async with system.host(pool, 1, prefix=f"{pool}-new"):
        await eventually(lambda: _all_have(db, [task_id, later], "completed"))
    view = await queries.get_task(db, task_id)
    assert (view.agent_id, view.attempt) == (f"{pool}-new-000", 2)
    assert [(f.attempt, f.error_type) for f in view.failures] == [(1, "Stalled")]
    assert "left" in view.failures[0].message
    assert now_us() - leaving_at < 30_000_000
    lost = [r for r in caplog.records if old.config.host_id in r.getMessage()]
    assert any("left" in r.getMessage() for r in lost)
    assert not [r for r in lost if r.levelno >= logging.WARNING]


async def test_a_host_over_its_memory_limit_gets_no_new_work_and_says_why(system: System) -> None:
    db, client, pool = system.db, system.client, system.pool
    config = HostConfig(
        pool=pool,
        agent_ids=[f"{pool}-full-000"],
        host_id=f"{pool}-full",
        limits=HostLimits(max_rss_mb=1),  # this process is over that from the start
    )
    full = RuntimeHost(system.settings, config, SimulatedAgent(latency_ms=5, jitter=0.2))
    await full.start()
    try:

        async def over() -> queries.HostView | None:
            views = await queries.list_hosts(db, now_us())
            return next((h for h in views if h.host_id == config.host_id and h.over_limit), None)

        view = await eventually(over)
        assert view.state == "over_limit"
        assert view.rss_bytes is not None
        assert view.rss_bytes > 2**20
        assert view.cpu_percent is not None
        assert view.over_limit is not None
        assert view.over_limit.endswith("over its limit of 1 MB")
        ids = [await client.submit(f"x{i}", pool=pool) for i in range(6)]
        async with system.host(pool, 2, prefix=f"{pool}-roomy"):
            await eventually(lambda: _all_have(db, ids, "completed"))
        ran = {(await queries.get_task(db, task_id)).agent_id for task_id in ids}
        assert ran <= {f"{pool}-roomy-000", f"{pool}-roomy-001"}, ran
        agents = await queries.list_agents(
            db, now_us(), silent_after_us=10**9, host_id=config.host_id
        )
        # The newest beat's words: its memory figure may have moved since ``view``.
        [reason] = [a.suspended_reason for a in agents]
        assert reason is not None
        assert reason.startswith("host over its limits: ")
        assert reason.endswith("over its limit of 1 MB")
    finally:
        await full.stop()


def test_a_host_does_not_start_while_the_machine_is_used_over_its_spawn_limit(
    settings: Settings,
) -> None:
    said = cli(settings, "runtime", "--agents", "3", "--spawn-max-memory-percent", "1")
    assert said.returncode != 0
    assert "not starting 3 agent(s): the machine's memory is" in said.stderr
    assert "over the spawn limit of 1 %" in said.stderr
    assert "Traceback" not in said.stderr
    assert "Unclosed" not in said.stderr  # the clients made for it are closed


def test_a_host_whose_maximum_is_below_its_minimum_is_refused_in_one_line(
    settings: Settings,
) -> None:
    said = cli(settings, "runtime", "--agents", "3", "--max-agents", "2")
    assert said.returncode != 0
    assert said.stderr.strip() == "error: --max-agents 2 is below --agents 3"


async def test_agents_are_found_by_capability(system: System) -> None:
    db, pool = system.db, system.pool
    config = HostConfig(
        pool=pool,
        agent_ids=[f"{pool}-sum-000", f"{pool}-sum-001"],
        host_id=f"{pool}-sum",
        capabilities=["translate", "summarise"],
        version="1.2.0",
    )
    able = RuntimeHost(system.settings, config, SimulatedAgent(latency_ms=5, jitter=0.2))
    async with system.host(pool, 1, prefix=f"{pool}-plain"):
        await able.start()
        try:

            async def who(capability: str | None) -> list[queries.AgentView]:
                return await queries.list_agents(
                    db, now_us(), silent_after_us=10**9, in_pool=pool, capability=capability
                )

            found = await eventually(lambda: _two(who("summarise")))
            assert [(a.agent_id, a.capabilities, a.version) for a in found] == [
                (f"{pool}-sum-000", ["summarise", "translate"], "1.2.0"),
                (f"{pool}-sum-001", ["summarise", "translate"], "1.2.0"),
            ]
            everyone = {a.agent_id: (a.capabilities, a.version) for a in await who(None)}
            assert everyone[f"{pool}-plain-000"] == ([], None)
            assert await who("paint") == []
            # In a thread: the hosts beat meanwhile.
            shown = await asyncio.to_thread(
                cli, system.settings, "agents", "--capability", "translate", "--json"
            )
            assert [a["agent_id"] for a in json.loads(shown.stdout)] == [
                f"{pool}-sum-000",
                f"{pool}-sum-001",
            ]
        finally:
            await able.stop()


async def _two(found: Awaitable[list[queries.AgentView]]) -> list[queries.AgentView] | None:
    agents = await found
    return agents if len(agents) == 2 else None


async def test_a_crashing_agent_is_restarted_afresh_until_its_budget_is_spent_then_fails(
    system: System,
) -> None:
    """An agent that crashes (an error it did not raise on purpose) is restarted with an
    empty memory, twice within its budget; the third crash fails it: no more work for it,
    said in ``conclave agents`` and its history, until its host starts again."""
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    broken, other = f"{pool}-agent-000", f"{pool}-agent-001"

    async def agent(ctx: AgentContext) -> str:
        runs = ctx.memory["runs"] = ctx.memory.get("runs", 0) + 1
        if ctx.agent_id == broken and ctx.input.startswith("crash"):
            raise KeyError(f"run {runs} of this life")
        return f"{ctx.agent_id}: run {runs} of this life"

    config = HostConfig(
        pool=pool, agent_ids=[broken, other], host_id=f"{pool}-h", restarts=2, restart_window_s=600
    )
    host = RuntimeHost(settings, config, agent)
    await host.start()
    try:
        warm = await system.submit_visible("warm up", agent_id=broken)  # run 1 of its first life
        crashing = []
        for i in range(3):  # one at a time: each crash is judged before the next dispatch
            crash = await client.submit(f"crash {i}", pool=pool, agent_id=broken, max_attempts=1)
            crashing.append(crash)
            await eventually(lambda: has_status(db, crashing[-1], "dead_lettered"))
        await eventually(lambda: _state_of(settings, pool, broken, "failed"))
        shown = json.loads(cli(settings, "agents", "--pool", pool, "--json").stdout)
        mine = {a["agent_id"]: a for a in shown}
        assert mine[broken]["restarts"] == 2
        assert mine[broken]["suspended_reason"] == (
            "crashed 3 times within 600 s, over its restart budget of 2: "
            f"KeyError: 'run 1 of this life' (task {crashing[2]}, attempt 1)"
        )
        assert mine[other]["state"] != "failed"  # idle, or silent if its beat is late
        assert mine[other]["suspended_reason"] is None
        # Its memory was emptied at each restart: every crash was run 1 of a new life
        # (the first crash, run 2 of the first, is what the warm-up left in it).
        history = json.loads(cli(settings, "agents", "show", broken, "--json").stdout)
        said = [
            (h["state"], h["reason"])
            for h in history
            if h["state"] in ("idle", "restarting", "failed")
        ]
        afresh = ("idle", "started afresh: its memory is empty")
        assert said[1:] == [
            ("idle", f"attempt 1 of {crashing[0]} failed: KeyError: 'run 2 of this life'"),
            ("restarting", "restart 1 within 600 s: crashed: KeyError: 'run 2 of this life' "
             f"(task {crashing[0]}, attempt 1)"),
            afresh,
            ("idle", f"attempt 1 of {crashing[1]} failed: KeyError: 'run 1 of this life'"),
            ("restarting", "restart 2 within 600 s: crashed: KeyError: 'run 1 of this life' "
             f"(task {crashing[1]}, attempt 1)"),
            afresh,
            ("idle", f"attempt 1 of {crashing[2]} failed: KeyError: 'run 1 of this life'"),
            ("failed", mine[broken]["suspended_reason"]),
        ]  # fmt: skip
        assert said[0] == ("idle", f"answered {warm}")
        # Failed: a task for it waits, the pool's other agent takes the rest.
        waiting = await client.submit("hello", pool=pool, agent_id=broken)
        elsewhere = await system.submit_visible("anyone")
        assert (await queries.get_task(db, elsewhere)).agent_id == other
        assert await has_status(db, waiting, "queued")
    finally:
        await host.stop()
    # Its host started again: the agent is registered afresh and takes its task.
    again = RuntimeHost(settings, config, agent)
    await again.start()
    try:
        await eventually(lambda: output_visible(db, waiting))
        view = await queries.get_task(db, waiting)
        assert view.output is not None
        assert view.output.content == f"{broken}: run 1 of this life"
        await eventually(lambda: _state_of(settings, pool, broken, "idle"))
    finally:
        await again.stop()


async def test_a_pool_grows_while_its_tasks_wait_for_agents_and_shrinks_back_once_they_idle(
    system: System,
) -> None:
    """Autoscaling: a host of 1 agent (up to 4) grows while tasks wait for agents, each
    new agent registered and working at once; idle past the timeout, the new ones retire
    (said in ``conclave agents`` and their history) and the host is back to 1; more work
    grows it again."""
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    first, *spares = [f"{pool}-agent-{n:03d}" for n in range(4)]

    async def agent(ctx: AgentContext) -> str:
        await asyncio.sleep(0.3)
        return f"{ctx.agent_id} did {ctx.input}"

    config = HostConfig(
        pool=pool,
        agent_ids=[first],
        spare_agent_ids=spares,
        host_id=f"{pool}-h",
        idle_retire_s=2.0,
    )
    host = RuntimeHost(settings, config, agent)
    await host.start()
    try:
        await system.submit_visible("warm up")  # the host has beaten: the pool is live
        tasks = [await client.submit(f"job {i}", pool=pool) for i in range(24)]
        await eventually(lambda: _all_have(db, tasks, "completed"))
        ran = Counter([(await queries.get_task(db, t)).agent_id for t in tasks])
        assert set(ran) == {first, *spares}, ran  # it grew to its maximum
        # Idle past the timeout, the agents it started retire; the first one stays.
        for spare in spares:
            await eventually(lambda: _state_of(settings, pool, spare, "retired"), within=15)  # noqa: B023
        assert list(host.agents) == [first]
        shown = json.loads(cli(settings, "agents", "--pool", pool, "--json").stdout)
        mine = {a["agent_id"]: a for a in shown}
        assert mine[first]["state"] in ("idle", "silent")
        assert mine[spares[0]]["suspended_reason"].endswith("s: the pool shrank")
        history = json.loads(cli(settings, "agents", "show", spares[-1], "--json").stdout)
        states = [h["state"] for h in history]
        assert states[0] == "registered"
        assert "busy" in states
        assert states[-1] == "retired"
        # More work than one agent does: it grows again, from its first spare on.
        more = [await client.submit(f"more {i}", pool=pool) for i in range(12)]
        await eventually(lambda: _all_have(db, more, "completed"))
        again = {(await queries.get_task(db, t)).agent_id for t in more}
        assert spares[0] in again, again
    finally:
        await host.stop()


async def test_a_pool_broadcast_that_is_not_a_starved_pool_is_dead_lettered_with_its_reason(
    system: System,
) -> None:
    """What carries the pool's broadcast header on the tasks topic must be the scheduler's
    ``pool.starved`` for that pool: anything else reaches a dead letter, and the host goes
    on (it grows on the next real word)."""
    settings, db, pool = system.settings, system.db, system.pool
    config = HostConfig(
        pool=pool,
        agent_ids=[f"{pool}-agent-000"],
        spare_agent_ids=[f"{pool}-agent-001"],
        host_id=f"{pool}-h",
    )
    host = RuntimeHost(settings, config, SimulatedAgent(latency_ms=0))
    await host.start()
    codec = host.producer.codec
    garbage = b"\x00 not avro " + pool.encode()
    beat = HostBeat(host_id="x", pool=pool, agent_ids=[], expires_at=now_us())
    not_starved = codec.encode(host.producer.envelope(beat), beat)
    other = PoolStarved(pool=f"{pool}-other", waiting=5, hosts=1, at=now_us())
    wrong_pool = codec.encode(host.producer.envelope(other), other)
    topics = topics_for(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        partitions = await host.producer.partitions(topics.tasks)
        for value in (garbage, not_starved, wrong_pool):
            await producer.send_and_wait(
                topics.tasks,
                value,
                partition=pool_partition(pool, partitions),
                headers=[(BROADCAST_HEADER, pool.encode())],
            )

        async def letters() -> list[asyncpg.Record]:
            rows = await db.fetch(
                "SELECT * FROM dead_letters WHERE processor = $1 AND original = ANY($2::bytea[])"
                " ORDER BY source_offset",
                host.name,
                [garbage, not_starved, wrong_pool],
            )
            return rows if len(rows) == 3 else []

        rows = await eventually(letters)
        assert "bad magic" in rows[0]["reason"]
        assert rows[1]["reason"] == "host.beat carries a pool broadcast header"
        assert rows[2]["reason"] == f"pool.starved of '{pool}-other' under this pool's"
        assert list(host.agents) == [f"{pool}-agent-000"]  # none of it grew the pool
        assert await system.submit_visible("still working")
    finally:
        await producer.stop()
        await host.stop()
