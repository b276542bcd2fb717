"""Agents talking to agents on the real embedded broker and PostgreSQL.

An agent asks another (on another host) from inside its task and returns the answer; an
ask nobody answers times out within its bound; a message whose TTL passed while its
recipient's host was down is dead-lettered with the reason ``expired`` and never
delivered, while one still valid is delivered after the restart; a broadcast reaches
every agent of the pool once; an unknown recipient gets an error answer; a host decodes
only the messages addressed to it or its pool; the read model lists what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from conclave.bus import EventProducer
from conclave.devstack import StackInfo
from conclave.domain.events import AgentMessage, Heartbeat, Priority
from conclave.errors import ConclaveError
from conclave.messaging import AskTimeout, Messenger, RemoteError, UnknownRecipient
from conclave.runtime.agents import AgentContext
from conclave.runtime.host import HostConfig, RuntimeHost
from conclave.settings import Settings
from conclave.topics import HOST_HEADER
from projections import queries
from projections.messages import recent_messages
from tests.integration.conftest import System, eventually

pytestmark = pytest.mark.integration


class Talker:
    """A task's input ``RECIPIENT PAYLOAD``: ask RECIPIENT, answer with its reply. Messages
    are recorded; asks answered (unless ``silent``), a payload ``fail`` raises."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.received: list[tuple[str, str, str]] = []

    async def __call__(self, ctx: AgentContext) -> str:
        recipient, _, payload = ctx.input.partition(" ")
        try:
            return await ctx.ask(recipient, payload, timeout=5.0)
        except ConclaveError as exc:
            return f"{type(exc).__name__}: {exc}"

    async def on_message(self, ctx: AgentContext, message: AgentMessage) -> str | None:
        self.received.append((ctx.agent_id, message.kind, message.payload))
        if message.payload == "slow":
            await asyncio.sleep(1.0)
        if message.payload == "fail":
            raise ValueError("asked to fail")
        if self.silent:
            return None
        return f"{ctx.agent_id} got {message.payload}"


@contextlib.asynccontextmanager
async def messenger(settings: Settings) -> AsyncIterator[Messenger]:
    async with Messenger(settings, name="test-client") as m:
        yield m


async def test_an_agent_asks_another_and_gets_the_answer(system: System) -> None:
    talker = Talker()
    other = f"{system.pool}-b"
    async with (
        system.running(1, talker),
        system.host(other, 1, talker, prefix=f"{other}-agent") as b,
    ):
        b_id = b.config.agent_ids[0]
        task_id = await system.submit_visible(f"{b_id} ping")
        view = await queries.get_task(system.db, task_id)
        assert view.output is not None
        assert view.output.content == f"{b_id} got ping"
        assert talker.received == [(b_id, "query", "ping")]

    async def listed() -> list[str]:
        return [m.kind for m in await recent_messages(system.db, agent=b_id)]

    await eventually(lambda: _has(listed, {"query"}))
    rows = await recent_messages(system.db, limit=500)
    asked = next(m for m in rows if m.agent_id == b_id and m.kind == "query")
    answers = [m for m in rows if m.correlation_id == asked.message_id]
    assert [(m.kind, m.sender, m.payload) for m in answers] == [
        ("response", b_id, f"{b_id} got ping")
    ]


async def _has(probe: object, kinds: set[str]) -> bool:
    assert callable(probe)
    return kinds <= set(await probe())


async def test_client_asks_and_remote_errors_come_back(system: System) -> None:
    talker = Talker()
    async with system.running(2, talker) as host, messenger(system.settings) as m:
        a, b = host.config.agent_ids
        assert await m.ask(a, "hello", timeout=5) == f"{a} got hello"
        assert (await m.ask(f"pool:{system.pool}", "anyone?", timeout=5)).endswith("got anyone?")
        with pytest.raises(RemoteError, match="ValueError: asked to fail") as failed:
            await m.ask(b, "fail", timeout=5)
        assert failed.value.error_type == "ValueError"


async def test_an_ask_nobody_answers_times_out_within_its_bound(system: System) -> None:
    talker = Talker(silent=True)
    async with system.running(1, talker) as host, messenger(system.settings) as m:
        (a,) = host.config.agent_ids
        started = time.monotonic()
        with pytest.raises(AskTimeout, match=rf"no answer from '{a}' within 0.5 s"):
            await m.ask(a, "are you there?", timeout=0.5)
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 1.0
        await eventually(lambda: _received(talker, 1), within=5)


async def _received(talker: Talker, n: int) -> bool:
    return len(talker.received) >= n


async def test_an_expired_message_is_dead_lettered_and_never_delivered(
    system: System, settings: Settings, db: asyncpg.Pool
) -> None:
    talker = Talker()
    config = HostConfig(pool=system.pool, agent_ids=[f"{system.pool}-late"], host_id=system.pool)
    host = RuntimeHost(settings, config, talker)
    await host.start()
    async with messenger(settings) as m:
        assert (
            await m.ask(config.agent_ids[0], "warm-up", timeout=5)
            == f"{system.pool}-late got warm-up"
        )
        await host.stop()
        late = await m.tell(config.agent_ids[0], "too late", ttl=0.2)
        kept = await m.tell(config.agent_ids[0], "still valid", ttl=60)
        await asyncio.sleep(0.5)
        host = RuntimeHost(settings, config, talker)  # the same host id: its inbox resumes
        await host.start()
        try:
            await eventually(lambda: _received(talker, 2), within=10)
            rows = await recent_messages(db, agent=config.agent_ids[0], limit=10)

            async def dead_lettered() -> list[asyncpg.Record]:
                found: list[asyncpg.Record] = await db.fetch(
                    "SELECT * FROM dead_letters WHERE source_topic = $1 AND processor = $2",
                    host.topics.messages,
                    host.name,
                )
                return found

            letters = await eventually(dead_lettered, within=10)
            await asyncio.sleep(0.3)  # nothing else arrives late
        finally:
            await host.stop()
    assert [p for _, _, p in talker.received] == ["warm-up", "still valid"]
    assert len(letters) == 1
    assert letters[0]["reason"] == "expired"
    assert letters[0]["error_type"] == "MessageExpired"
    assert {r.message_id for r in rows} >= {late, kept}
    _, decoded = host.producer.codec.decode(letters[0]["original"])
    assert isinstance(decoded, AgentMessage)
    assert decoded.message_id == late


async def test_a_message_that_expires_waiting_behind_another_is_not_delivered(
    system: System,
) -> None:
    talker = Talker()
    async with system.running(1, talker) as host, messenger(system.settings) as m:
        (a,) = host.config.agent_ids
        await m.tell(a, "slow")  # its handler takes 1 s; the next message waits its turn
        queued = await m.tell(a, "short-lived", ttl=0.3)
        after = await m.tell(a, "patient", ttl=30)
        await eventually(lambda: _received(talker, 2), within=10)

        async def letters() -> list[asyncpg.Record]:
            found: list[asyncpg.Record] = await system.db.fetch(
                "SELECT * FROM dead_letters WHERE source_topic = $1 AND processor = $2",
                host.topics.messages,
                host.name,
            )
            return found

        (letter,) = await eventually(letters, within=10)
    assert [p for _, _, p in talker.received] == ["slow", "patient"]
    counted = {"pool": system.pool, "outcome": "expired"}
    assert REGISTRY.get_sample_value("conclave_agent_messages_total", counted) == 1
    counted["outcome"] = "handled"
    assert REGISTRY.get_sample_value("conclave_agent_messages_total", counted) == 2
    assert letter["reason"] == "expired"
    _, decoded = host.producer.codec.decode(letter["original"])
    assert isinstance(decoded, AgentMessage)
    assert decoded.message_id != after
    assert decoded.message_id == queued


async def test_within_a_fetch_higher_priority_is_delivered_first(
    system: System, settings: Settings
) -> None:
    talker = Talker()
    config = HostConfig(pool=system.pool, agent_ids=[f"{system.pool}-p"], host_id=system.pool)
    host = RuntimeHost(settings, config, talker)
    await host.start()
    await host.stop()  # its inbox position is committed: what comes next waits for it
    async with messenger(settings) as m:
        for payload, priority in (("low", Priority.LOW), ("normal", Priority.NORMAL)):
            await m.tell(config.agent_ids[0], payload, priority=priority)
        await m.tell(config.agent_ids[0], "critical", priority=Priority.CRITICAL)
    host = RuntimeHost(settings, config, talker)
    await host.start()
    try:
        await eventually(lambda: _received(talker, 3), within=10)
    finally:
        await host.stop()
    assert [p for _, _, p in talker.received] == ["critical", "normal", "low"]


async def test_a_broadcast_reaches_every_agent_of_the_pool_once(system: System) -> None:
    talker = Talker()
    other_pool = Talker()
    async with (
        system.running(2, talker) as one,
        system.host(system.pool, 3, talker, prefix=f"{system.pool}-two") as two,
        system.host(f"{system.pool}-x", 2, other_pool, prefix=f"{system.pool}-x"),
        messenger(system.settings) as m,
    ):
        await m.broadcast(system.pool, "all hands")
        everyone = {*one.config.agent_ids, *two.config.agent_ids}
        await eventually(lambda: _received(talker, len(everyone)), within=10)
        await asyncio.sleep(0.5)  # no second copy arrives
    assert sorted(a for a, _, _ in talker.received) == sorted(everyone)
    assert {(k, p) for _, k, p in talker.received} == {("notification", "all hands")}
    assert other_pool.received == []


class Announcer(Talker):
    """Broadcasts its task's input to its own pool."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.senders: list[str] = []

    async def __call__(self, ctx: AgentContext) -> str:
        self.senders.append(ctx.agent_id)
        await ctx.broadcast(self.pool, ctx.input)
        return "sent"


async def test_an_agents_broadcast_reaches_the_others_not_itself(system: System) -> None:
    announcer = Announcer(system.pool)
    async with system.running(3, announcer) as host:
        await system.submit_visible("news")
        await eventually(lambda: _received(announcer, 2), within=10)
        await asyncio.sleep(0.3)
    (sender,) = announcer.senders
    assert sorted(a for a, _, _ in announcer.received) == sorted(
        set(host.config.agent_ids) - {sender}
    )


async def test_an_unknown_recipient_gets_an_error_answer(system: System) -> None:
    async with messenger(system.settings) as m:
        started = time.monotonic()
        with pytest.raises(UnknownRecipient, match="no agent or pool named 'nobody-here'"):
            await m.ask("nobody-here", "hello?", timeout=10)
        with pytest.raises(UnknownRecipient, match="'pool:no-such-pool'"):
            await m.ask("pool:no-such-pool", "hello?", timeout=10)
        with pytest.raises(UnknownRecipient):
            await m.tell("broadcast:no-such-pool", "hello?")
        assert time.monotonic() - started < 9  # answered, not timed out

    async def recorded() -> list[tuple[str, str]]:
        rows = await recent_messages(system.db, agent="nobody-here")
        answers = await recent_messages(system.db, agent="test-client", limit=500)
        ids = {r.message_id for r in rows}
        return [(a.kind, a.sender) for a in answers if a.correlation_id in ids]

    assert await eventually(recorded) == [("error", "conclave")]


async def test_a_host_decodes_only_its_own_messages(system: System) -> None:
    talker = Talker()
    async with (
        system.running(1, talker) as mine,
        system.host(system.pool, 1, talker, prefix=f"{system.pool}-other") as other,
        messenger(system.settings) as m,
    ):
        (a,) = mine.config.agent_ids
        for i in range(20):
            assert await m.ask(a, f"n{i}", timeout=5) == f"{a} got n{i}"
        assert mine.messenger.partition == other.messenger.partition  # same records read
        assert mine.messenger.decoded == 20
        assert other.messenger.decoded == 0
        await m.broadcast(system.pool, "both")
        await eventually(lambda: _received(talker, 22), within=10)
        assert other.messenger.decoded == 1


async def test_bad_messages_are_refused_before_sending(system: System) -> None:
    async with system.running(1, Talker()) as host, messenger(system.settings) as m:
        (a,) = host.config.agent_ids
        with pytest.raises(ConclaveError, match="exceeds 900000"):
            await m.tell(a, "x" * 900_001)
        with pytest.raises(ConclaveError, match="unknown message kind 'gossip'"):
            await m.tell(a, "hi", kind="gossip")
        with pytest.raises(ConclaveError, match="ttl must be positive"):
            await m.tell(a, "hi", ttl=0)


async def test_bad_records_in_an_inbox_are_dead_lettered_and_the_host_goes_on(
    system: System,
) -> None:
    talker = Talker()
    async with system.running(1, talker) as host, messenger(system.settings) as m:
        (a,) = host.config.agent_ids
        header = [(HOST_HEADER, host.config.host_id.encode())]
        async with EventProducer(system.settings, producer="test") as producer:
            topic, partition = host.topics.messages, host.messenger.partition
            await producer.send_raw(topic, a, b"garbage", header, partition=partition)
            beat = Heartbeat(agent_id=a, host_id="h", task_id=None, rss_bytes=1)
            await producer.send(topic, a, beat, partition=partition, headers=header)
        assert await m.ask(a, "still there?", timeout=5) == f"{a} got still there?"

        async def letters() -> list[str]:
            rows = await system.db.fetch(
                "SELECT reason FROM dead_letters WHERE source_topic = $1 AND processor = $2"
                " ORDER BY source_offset",
                host.topics.messages,
                host.name,
            )
            return [r["reason"] for r in rows]

        reasons = await eventually(lambda: _count(letters, 2))
        assert reasons[0] == "not an Avro single-object record (bad magic)"
        assert reasons[1] == "agent.heartbeat carries a message header"


async def _count(probe: object, n: int) -> list[str] | None:
    assert callable(probe)
    found: list[str] = await probe()
    return found if len(found) >= n else None


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
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


async def test_messages_from_the_shell(system: System, stack: StackInfo) -> None:
    env = {
        **os.environ,
        **stack.env(),
        "CONCLAVE_TOPIC_PREFIX": system.settings.topic_prefix,
        "COLUMNS": "200",
    }
    talker = Talker(silent=True)
    async with (
        system.running(1, Talker()) as host,
        system.host(f"{system.pool}-s", 1, talker, prefix=f"{system.pool}-silent") as quiet,
    ):
        (a,) = host.config.agent_ids
        asked = await cli(env, "message", "send", a, "hi [b]", "--ask", "--timeout", "10")
        assert (asked.returncode, asked.stdout.strip()) == (0, f"{a} got hi [b]"), asked.stderr
        told = await cli(env, "message", "send", a, "fyi", "--ttl", "30")
        assert told.returncode == 0, told.stderr
        assert len(told.stdout.strip()) == 32  # the message id
        (q,) = quiet.config.agent_ids
        slow = await cli(env, "message", "send", q, "hello?", "--ask", "--timeout", "0.5")
        assert slow.returncode == 1
        assert slow.stderr.strip() == f"error: no answer from '{q}' within 0.5 s"
        unknown = await cli(env, "message", "send", "nobody-at-all", "x", "--ask")
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == "error: no agent or pool named 'nobody-at-all'"

    async def listed() -> list[dict[str, object]] | None:
        shown = await cli(env, "messages", "--agent", a, "--json")
        assert shown.returncode == 0, shown.stderr
        rows: list[dict[str, object]] = json.loads(shown.stdout)
        return rows if len(rows) >= 2 else None

    rows = await eventually(listed, within=20)
    assert {(r["kind"], r["payload"]) for r in rows} >= {
        ("query", "hi [b]"),
        ("notification", "fyi"),
    }
    table = await cli(env, "messages", "--agent", a)
    assert "hi [b]" in table.stdout
    assert "notification" in table.stdout
