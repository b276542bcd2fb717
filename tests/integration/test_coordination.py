"""Resource locks and versioned state on the real embedded broker and PostgreSQL.

Lock contention between two clients, expiry while held (decided by the processor's own
timer), a stale holder refused by its fencing token, a processor restarted (its runner
stopped and a new one started, from the changelog and from a snapshot) that keeps
tokens increasing and versions counting, stale updates rejected with the current
version, bad records dead-lettered without bricking a restart, and the read models and
CLI on the session's worker and projector.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from conclave.bus import EventProducer, ensure_topics, read_history, topics_for
from conclave.children import ChildProcesses
from conclave.coordination import (
    Coordinator,
    LeaseLost,
    LockUnavailable,
    StaleVersion,
    StateRejected,
)
from conclave.devstack import StackInfo
from conclave.domain.coordination import Fence
from conclave.domain.events import DeadLetterRecord, LockExpired, LockGranted, LockWaiting, now_us
from conclave.errors import NotFound
from conclave.runtime.agents import AgentContext, AgentFn
from conclave.settings import Settings
from schemas.codec import default_codec
from streams.coordination import CoordinationShard
from streams.core import Emitter, ShardRunner
from streams.worker import Worker
from tests.integration.conftest import RunningProjector, System, eventually, output_visible

pytestmark = pytest.mark.integration


async def fresh(settings: Settings) -> Settings:
    own = settings.with_(topic_prefix=f"{settings.topic_prefix}c{secrets.token_hex(3)}")
    await ensure_topics(own)
    return own


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, snapshot_every: int = 50_000
) -> AsyncIterator[ShardRunner]:
    """The coordination shard running for the block, as a worker runs it."""
    topics = topics_for(settings)
    emitter = Emitter(default_codec(), topics, "coordination", settings.tenant)
    runner = ShardRunner(
        settings, CoordinationShard(topics, 0, emitter), snapshot_every_events=snapshot_every
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    ready = asyncio.create_task(runner.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()
    try:
        yield runner
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def clients(settings: Settings, n: int) -> AsyncIterator[list[Coordinator]]:
    coordinators = [Coordinator(settings, producer_name=f"client-{i}") for i in range(n)]
    await asyncio.gather(*(c.start() for c in coordinators))
    try:
        yield coordinators
    finally:
        await asyncio.gather(*(c.stop() for c in coordinators))


async def decisions(settings: Settings) -> list[object]:
    codec = default_codec()
    return [
        codec.decode(r.value)[1]
        async for r in read_history(settings, [topics_for(settings).coordination])
    ]


async def test_two_clients_contend_for_one_lock(settings: Settings) -> None:
    own = await fresh(settings)
    async with running(own), clients(own, 2) as (a, b):
        lease = await a.acquire_lock("repo", "alice", ttl=30)
        with pytest.raises(LockUnavailable, match=r"locked by alice until \d{4}-") as refused:
            await b.acquire_lock("repo", "bob", ttl=30, wait=0)
        assert refused.value.held_by == "alice"
        waiting = asyncio.create_task(b.acquire_lock("repo", "bob", ttl=30, wait=10))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # in line behind alice
        await lease.release()
        async with asyncio.timeout(10):
            second = await waiting
        assert (second.holder, second.token) == ("bob", lease.token + 1)
        with pytest.raises(LockUnavailable, match="waited in vain: locked by bob"):
            await a.acquire_lock("repo", "alice", ttl=30, wait=0.3)


async def test_a_lease_that_runs_out_is_expired_by_the_processor_and_its_token_refused(
    settings: Settings,
) -> None:
    own = await fresh(settings)
    async with running(own), clients(own, 2) as (a, b):
        stale = await a.acquire_lock("account-7", "alice", ttl=0.3)
        await asyncio.sleep(0.5)  # alice stalls past her lease; nobody asked for the lock

        async def expired() -> bool:
            return any(isinstance(e, LockExpired) for e in await decisions(own))

        await eventually(expired, within=10)  # the processor's timer, not a request
        fresh_lease = await b.acquire_lock("account-7", "bob", ttl=30, wait=0)
        assert fresh_lease.token == stale.token + 1
        resource = Fence()  # what the guarded resource keeps
        assert resource.admit("account-7", fresh_lease.token) is None
        assert resource.admit("account-7", stale.token) is not None  # alice's late write
        with pytest.raises(LeaseLost, match=f"token {stale.token} is stale"):
            await stale.renew()
        with pytest.raises(LeaseLost):
            await stale.release()
        await fresh_lease.renew(60)
        assert fresh_lease.expires_at > now_us() + 50_000_000


async def test_waiters_are_served_first_come_first_served(settings: Settings) -> None:
    own = await fresh(settings)
    async with running(own), clients(own, 4) as coordinators:
        first = await coordinators[0].acquire_lock("q", "h0", ttl=30)
        order: list[str] = []

        async def wait_then_release(i: int) -> None:
            lease = await coordinators[i].acquire_lock("q", f"h{i}", ttl=30, wait=20)
            order.append(lease.holder)
            await lease.release()

        async def in_line(n: int) -> bool:
            return sum(isinstance(e, LockWaiting) for e in await decisions(own)) >= n

        waiting = []
        for i in (1, 2, 3):
            waiting.append(asyncio.create_task(wait_then_release(i)))
            await eventually(lambda i=i: in_line(i), within=20)  # type: ignore[misc]
        await first.release()
        async with asyncio.timeout(20):
            await asyncio.gather(*waiting)
        assert order == ["h1", "h2", "h3"]


async def test_a_restarted_processor_keeps_tokens_increasing_and_versions_counting(
    settings: Settings,
) -> None:
    own = await fresh(settings)
    async with clients(own, 1) as (client,):
        async with running(own):
            tokens = []
            for _ in range(3):
                lease = await client.acquire_lock("build", "ci", ttl=30)
                tokens.append(lease.token)
                await lease.release()
            held = await client.acquire_lock("build", "ci", ttl=0.5)  # expires while down
            for version in range(3):
                assert await client.update_state("wf", version, {"step": version}) == version + 1
            assert await client.checkpoint_state("wf", "after-3") == 3
        assert tokens == [1, 2, 3]
        await asyncio.sleep(0.6)
        async with running(own) as restarted:  # from the changelog alone
            assert restarted.recovered_events > 0
            with pytest.raises(LeaseLost):
                await held.renew()  # it ran out while the processor was down
            lease = await client.acquire_lock("build", "ci", ttl=30, wait=5)
            assert lease.token == 5
            with pytest.raises(StaleVersion, match="is at version 3, not 2") as stale:
                await client.update_state("wf", 2, {"step": "late"})
            assert stale.value.current_version == 3
            assert await client.update_state("wf", 3, {"step": 3}) == 4
            assert await client.restore_state("wf", "after-3") == 5
            with pytest.raises(StateRejected, match="exists"):
                await client.checkpoint_state("wf", "after-3")
        async with running(own, snapshot_every=1):  # takes a snapshot at its next batch
            assert await client.update_state("wf", 5, {"step": 5}) == 6
            assert await client.update_state("wf", 6, {"step": 6}) == 7
        async with running(own) as from_snapshot:
            assert from_snapshot.recovered_events < restarted.recovered_events
            with pytest.raises(LockUnavailable, match="locked by ci"):
                await client.acquire_lock("build", "other", ttl=30)
            await lease.release()
            assert (await client.acquire_lock("build", "ci", ttl=30)).token == 6
            assert await client.update_state("wf", 7, None) == 8
    granted = [e.fencing_token for e in await decisions(own) if isinstance(e, LockGranted)]
    assert granted == sorted(set(granted))


async def test_bad_records_are_dead_lettered_and_never_brick_a_restart(settings: Settings) -> None:
    own = await fresh(settings)
    topics = topics_for(own)
    producer = EventProducer(own, producer="test")
    await producer.start()
    try:
        garbage = [b"\x00garbage", b"", None]
        async with running(own), clients(own, 1) as (client,):
            for value in garbage:
                await producer.send_raw(topics.coordination_requests, "k", value, partition=0)
            # a decision forged onto the requests topic, and garbage on the changelog
            forged = LockGranted(
                name="k", holder="x", fencing_token=99, expires_at=1, request_id="f"
            )
            await producer.send(topics.coordination_requests, "k", forged, partition=0)
            await producer.send_raw(topics.coordination, "k", b"\xc3\x01junk", partition=0)
            assert (await client.acquire_lock("k", "me", ttl=30)).token == 1
        async with running(own), clients(own, 1) as (client,):
            assert await client.update_state("k2", 0, [1, 2]) == 1

        async def dead() -> list[DeadLetterRecord]:
            codec = default_codec()
            found = []
            async for r in read_history(own, [topics.deadletter]):
                event = codec.decode(r.value)[1]
                assert isinstance(event, DeadLetterRecord)
                if event.processor == "coordination":
                    found.append(event)
            return found if len(found) >= 5 else []

        letters = await eventually(dead, within=20)
        reasons = " | ".join(d.reason for d in letters)
        assert "null value" in reasons
        assert "empty value" in reasons
        assert "lock.granted does not belong on" in reasons
        assert any(d.source_topic == topics.coordination for d in letters)  # at recovery
    finally:
        await producer.stop()


async def test_invalid_requests_are_refused_before_sending(settings: Settings) -> None:
    own = await fresh(settings)
    async with clients(own, 1) as (client,):
        with pytest.raises(ValueError, match="ttl_ms 0"):
            await client.acquire_lock("x", "me", ttl=0)
        with pytest.raises(ValueError, match="lock name is empty"):
            await client.acquire_lock("", "me", ttl=1)


# -- on the session's worker and projector: read models and CLI --------------------------


@pytest.fixture
def env(stack: StackInfo, settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        **stack.env(),
        "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix,
        "COLUMNS": "200",
    }


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own; awaited, so that the session's worker (on this
    event loop) goes on deciding meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conclave.cli",
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


async def test_locks_from_the_shell(env: dict[str, str], processors: Worker) -> None:
    lock = f"shell-{secrets.token_hex(3)}"
    async with Coordinator(processors.settings) as client:
        held = await client.acquire_lock(lock, "agent-1", ttl=60)
        taken = await cli(env, "lock", "acquire", lock, "--holder", "cli", "--ttl", "5")
        assert taken.returncode == 1
        assert taken.stderr.strip().startswith("error: locked by agent-1 until 20")
        other = f"{lock}-cli"
        token = (await cli(env, "lock", "acquire", other, "--holder", "cli", "--ttl", "60")).stdout
        assert token.strip() == "1"
        wrong = await cli(env, "lock", "release", other, "--token", "7", "--holder", "cli")
        assert wrong.returncode == 1
        assert "token 7 is stale" in wrong.stderr
        released = await cli(env, "lock", "release", other, "--token", "1", "--holder", "cli")
        assert released.returncode == 0, released.stderr
        await held.release()


async def test_state_versions_and_locks_in_the_read_models_and_cli(
    settings: Settings,
    env: dict[str, str],
    db: asyncpg.Pool,
    processors: Worker,
    projector: RunningProjector,
) -> None:
    key = f"wf-{secrets.token_hex(3)}"
    lock = f"repo-{secrets.token_hex(3)}"
    async with Coordinator(settings, db=db) as client:
        assert await client.update_state(key, 0, {"step": 1}) == 1
        assert await client.checkpoint_state(key, "start") == 1
        assert await client.update_state(key, 1, {"step": 2}) == 2
        assert await client.restore_state(key, "start") == 3
        assert (await client.read_state(key)).value == {"step": 1}
        assert (await client.read_state(key, 2)).value == {"step": 2}
        history = await client.state_history(key)
        assert [v.version for v in history] == [1, 2, 3]
        assert (history[2].restored_from, history[2].label) == (1, "start")
        lease = await client.acquire_lock(lock, "agent-1", ttl=60)

    async def shown() -> bool:
        row = await db.fetchrow(
            "SELECT holder, fencing_token, state FROM locks WHERE name=$1", lock
        )
        return row is not None and tuple(row) == ("agent-1", lease.token, "held")

    await eventually(shown, within=20)

    listed = await cli(env, "locks", "--json")
    assert listed.returncode == 0, listed.stderr
    assert any(v["name"] == lock and v["holder"] == "agent-1" for v in json.loads(listed.stdout))
    table = await cli(env, "locks")
    assert lock in table.stdout
    assert "agent-1" in table.stdout
    assert (await cli(env, "state", "get", key, "--version", "2")).stdout.strip() == '{"step": 2}'
    stale = await cli(env, "state", "put", key, "--expect", "1", '{"step": 9}')
    assert stale.returncode == 1
    assert stale.stderr.strip() == f"error: stale: {key!r} is at version 3, not 1"
    put = await cli(env, "state", "put", key, "--expect", "3", '{"step": 9}')
    assert (put.returncode, put.stdout.strip()) == (0, "4"), put.stderr
    bad = await cli(env, "state", "put", key, "--expect", "4", "{not json")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    missing = await cli(env, "state", "get", "no-such-key")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no state 'no-such-key'"
    history = await cli(env, "state", "history", key)
    assert "restored 'start' (version 1)" in history.stdout


async def test_agents_take_locks_and_update_shared_state_from_their_context(
    system: System,
) -> None:
    """Four agents, eight tasks, one shared counter: each task takes the lock, reads the
    state, writes the next version. No update is lost and the versions have no gaps."""
    key = f"counter-{secrets.token_hex(3)}"
    lock = f"lock-{key}"

    async def agent(ctx: AgentContext) -> str:
        coordination = ctx.coordination
        assert coordination is not None
        async with await coordination.acquire_lock(lock, ctx.agent_id, ttl=30, wait=60) as lease:
            try:
                current = await coordination.read_state(key)
                version, count = current.version, current.value
            except NotFound:
                version, count = 0, 0
            return str(await coordination.update_state(key, version, count + 1)) + f"@{lease.token}"

    async with system.running(4, agent=with_db(agent, system.db)):
        ids = [await system.client.submit(f"n{i}", pool=system.pool) for i in range(8)]
        for task_id in ids:
            await eventually(lambda t=task_id: output_visible(system.db, t))  # type: ignore[misc]
    rows = await system.db.fetch(
        "SELECT version, value_json FROM state_versions WHERE key = $1 ORDER BY version", key
    )
    assert [(r["version"], json.loads(r["value_json"])) for r in rows] == [
        (v, v) for v in range(1, 9)
    ]


def with_db(agent: AgentFn, db: asyncpg.Pool) -> AgentFn:
    """The agent with its host's coordinator able to read state (the read models)."""

    async def run(ctx: AgentContext) -> str:
        assert ctx.coordination is not None
        ctx.coordination.db = db
        return await agent(ctx)

    return run


async def test_a_worker_killed_mid_load_and_restarted_keeps_tokens_and_versions(
    settings: Settings,
) -> None:
    """``conclave worker`` as a process, killed with -9 while three clients contend for
    one lock and a fourth updates one key; restarted with the same id, it goes on: every
    fencing token granted once and in increasing order, versions 1..N without a gap."""
    own = await fresh(settings)
    children = ChildProcesses(own)
    children.spawn("worker", ["worker", "--id", "kw"], ready_marker=b"processors running")
    stop = asyncio.Event()
    tokens: list[int] = []
    versions: list[int] = []
    try:
        await children.ready("worker")
        async with clients(own, 4) as coordinators:

            async def contend(client: Coordinator, holder: str) -> None:
                while not stop.is_set():
                    lease = await client.acquire_lock("hot", holder, ttl=60, wait=120)
                    tokens.append(lease.token)
                    await lease.release()

            async def update(client: Coordinator) -> None:
                version = 0
                while not stop.is_set():
                    version = await client.update_state("counter", version, version)
                    versions.append(version)

            load = [
                *(asyncio.create_task(contend(c, f"h{i}")) for i, c in enumerate(coordinators[:3])),
                asyncio.create_task(update(coordinators[3])),
            ]
            await eventually(lambda: _true(len(tokens) >= 20 and len(versions) >= 10), within=30)
            await kill(children, "worker")
            before = (len(tokens), len(versions))
            children.spawn("worker", ["worker", "--id", "kw"], ready_marker=b"processors running")
            await children.ready("worker")
            await eventually(
                lambda: _true(len(tokens) >= before[0] + 20 and len(versions) >= before[1] + 10),
                within=60,
            )
            stop.set()
            async with asyncio.timeout(60):
                await asyncio.gather(*load)
    finally:
        stop.set()
        children.stop()
        for name in list(children.children):
            await kill(children, name)
    assert tokens == list(range(1, len(tokens) + 1))
    assert versions == list(range(1, len(versions) + 1))
    granted = [e.fencing_token for e in await decisions(own) if isinstance(e, LockGranted)]
    assert granted == list(range(1, len(granted) + 1))  # every token granted exactly once


async def kill(children: ChildProcesses, name: str) -> None:
    """``kill -9`` and close the pipe its log was read from (once the reader saw the end)."""
    child = children.children.pop(name)
    child.kill()
    child.wait()
    await asyncio.sleep(0.3)
    if child.stderr is not None:
        child.stderr.close()


async def _true(value: bool) -> bool:
    return value
