"""Workflows on the real embedded broker and PostgreSQL: a fan-out/fan-in DAG whose last
step's input is rendered from two earlier outputs, a failing step that fails the workflow
(the rest never runs), a workflow cancelled as a whole, a ``conclave worker`` killed -9
mid-workflow that resumes with every step run exactly once, bad records dead-lettered
without bricking a restart, and YAML through the CLI (``workflow run --wait``, ``show``,
``workflows``, ``submit-batch``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conclave.bus import EventProducer, ensure_topics, read_history, topics_for
from conclave.children import ChildProcesses
from conclave.client import Client
from conclave.devstack import StackInfo
from conclave.domain.events import (
    DeadLetterRecord,
    TaskSubmitted,
    WorkflowEnded,
    WorkflowRejected,
    WorkflowRunRequested,
    WorkflowStepCompleted,
    WorkflowStepSubmitted,
)
from conclave.errors import InvalidCommand, SchemaError
from conclave.runtime.agents import AgentContext, PermanentFailure
from conclave.runtime.host import HostConfig, RuntimeHost
from conclave.settings import Settings
from schemas.codec import default_codec
from streams.core import Emitter, ShardRunner
from streams.worker import Worker
from streams.workflows import WorkflowShard
from tests.integration.conftest import System, eventually

pytestmark = pytest.mark.integration


def fan(pool: str) -> dict[str, Any]:
    return {
        "name": "fan",
        "steps": [
            {"name": "a", "pool": pool, "input": "a:{{ input.topic }}"},
            {"name": "b", "pool": pool, "input": "b:{{ steps.a.output }}"},
            {"name": "c", "pool": pool, "input": "c:{{ steps.a.output }}"},
            {"name": "d", "pool": pool, "input": "d:{{ steps.b.output }}+{{ steps.c.output }}"},
        ],
    }


async def workflow_row(db: asyncpg.Pool, wid: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM workflows WHERE workflow_id = $1", wid
    )
    return row


async def ended(db: asyncpg.Pool, wid: str, within: float = 60) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        row = await workflow_row(db, wid)
        return row if row is not None and row["status"] != "running" else None

    found: asyncpg.Record = await eventually(probe, within=within)
    return found


async def steps(db: asyncpg.Pool, wid: str) -> dict[str, asyncpg.Record]:
    rows = await db.fetch("SELECT * FROM workflow_steps WHERE workflow_id = $1", wid)
    return {r["step"]: r for r in rows}


async def test_fan_out_and_in_renders_the_last_input_from_both_branches(system: System) -> None:
    calls: list[str] = []

    async def agent(ctx: AgentContext) -> str:
        calls.append(ctx.task_id)
        await asyncio.sleep(0.05)
        return f"<{ctx.input}>"

    async with system.running(2, agent):
        wid = await system.client.run_workflow(fan(system.pool), {"topic": "tides"})
        row = await ended(system.db, wid)
    assert row["status"] == "completed", row["reason"]
    got = await steps(system.db, wid)
    assert {s: r["status"] for s, r in got.items()} == dict.fromkeys("abcd", "completed")
    assert got["a"]["output"] == "<a:tides>"
    assert got["d"]["input"] == "d:<b:<a:tides>>+<c:<a:tides>>"
    assert got["d"]["output"] == "<d:<b:<a:tides>>+<c:<a:tides>>>"
    assert sorted(calls) == [f"{wid}.{s}" for s in "abcd"]  # each step ran once
    # the step's answer is the task's accepted one
    for r in got.values():
        accepted = await system.db.fetchval(
            "SELECT output_event_id FROM tasks WHERE task_id = $1", r["task_id"]
        )
        assert r["output_event_id"] == accepted


async def test_a_failing_step_fails_the_workflow_and_the_rest_never_runs(system: System) -> None:
    calls: list[str] = []
    stopped = asyncio.Event()

    async def agent(ctx: AgentContext) -> str:
        calls.append(ctx.input)
        if ctx.input.startswith("b:"):
            await asyncio.sleep(0.2)
            raise PermanentFailure("b cannot")
        if ctx.input.startswith("c:"):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                stopped.set()
                raise
        return "A"

    async with system.running(2, agent):
        wid = await system.client.run_workflow(fan(system.pool), {"topic": "t"})
        row = await ended(system.db, wid)
        async with asyncio.timeout(30):
            await stopped.wait()  # c's agent was stopped
    assert row["status"] == "failed"
    assert row["failed_step"] == "b"
    assert "dead_lettered" in row["reason"]
    assert "PermanentFailure" in row["reason"]
    got = await eventually(lambda: _steps_settled(system.db, wid))
    assert {s: r["status"] for s, r in got.items()} == {
        "a": "completed",
        "b": "failed",
        "c": "cancelled",
        "d": "skipped",
    }
    assert not any(c.startswith("d:") for c in calls)
    assert (
        await system.db.fetchval("SELECT count(*) FROM tasks WHERE task_id = $1", f"{wid}.d") == 0
    )
    assert (
        await system.db.fetchval("SELECT status FROM tasks WHERE task_id = $1", f"{wid}.c")
        == "cancelled"
    )


async def _steps_settled(db: asyncpg.Pool, wid: str) -> dict[str, asyncpg.Record] | None:
    got = await steps(db, wid)
    return got if all(r["status"] not in ("pending", "submitted") for r in got.values()) else None


async def test_cancel_a_running_workflow_as_a_whole(system: System) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def agent(ctx: AgentContext) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "never"

    definition = fan(system.pool)
    # e reads no output: it goes to the scheduler at once, its task waiting for a's
    definition["steps"].append({"name": "e", "pool": system.pool, "depends_on": ["a"]})
    async with system.running(1, agent):
        wid = await system.client.run_workflow(definition, {"topic": "t"})

        async def running() -> bool:
            return (
                await system.db.fetchval("SELECT status FROM tasks WHERE task_id = $1", f"{wid}.a")
                == "dispatched"
            )

        await eventually(running)
        # Working, not only dispatched: a cancel that reaches the host before the agent
        # starts stops the attempt before the agent ever runs (nothing to see stopping).
        async with asyncio.timeout(30):
            await started.wait()
        await system.client.cancel_workflow(wid, reason="changed my mind")
        row = await ended(system.db, wid)
        async with asyncio.timeout(30):
            await stopped.wait()
    assert row["status"] == "cancelled"
    assert row["reason"] == "cancelled: changed my mind"
    got = await eventually(lambda: _steps_settled(system.db, wid))
    assert {s: r["status"] for s, r in got.items()} == {
        "a": "cancelled",
        "b": "skipped",
        "c": "skipped",
        "d": "skipped",
        "e": "cancelled",
    }

    async def tasks_ended() -> bool:
        rows = await system.db.fetch(
            "SELECT task_id, status FROM tasks WHERE task_id = ANY($1)", [f"{wid}.a", f"{wid}.e"]
        )
        return {r["task_id"]: r["status"] for r in rows} == {
            f"{wid}.a": "cancelled",
            f"{wid}.e": "dependency_failed",  # the scheduler ended it with a
        }

    await eventually(tasks_ended)


async def test_invalid_workflows_are_refused_before_sending(client: Client) -> None:
    cycle = {"steps": [{"name": "a", "depends_on": ["b"]}, {"name": "b", "depends_on": ["a"]}]}
    with pytest.raises(InvalidCommand, match="cycle: a -> b -> a"):
        await client.run_workflow(cycle)
    with pytest.raises(InvalidCommand, match="unknown step 'x'"):
        await client.run_workflow({"steps": [{"name": "a", "input": "{{ steps.x.output }}"}]})
    with pytest.raises(InvalidCommand, match="workflow_id"):
        await client.run_workflow({"steps": [{"name": "a"}]}, workflow_id="a.b")


# -- a processor of its own: restarts, kills, bad records --------------------------------


async def fresh(settings: Settings) -> Settings:
    own = settings.with_(topic_prefix=f"{settings.topic_prefix}w{secrets.token_hex(3)}")
    await ensure_topics(own)
    return own


@contextlib.asynccontextmanager
async def shard(settings: Settings) -> AsyncIterator[ShardRunner]:
    """The workflow shard running for the block, as a worker runs it."""
    topics = topics_for(settings)
    emitter = Emitter(default_codec(), topics, "workflows", settings.tenant)
    runner = ShardRunner(settings, WorkflowShard(topics, 1, emitter))
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


async def history(settings: Settings, topics: list[str]) -> list[Any]:
    """The events of ``topics`` (records that hold none skipped)."""
    codec = default_codec()
    found = []
    async for r in read_history(settings, topics):
        with contextlib.suppress(SchemaError):
            found.append(codec.decode(r.value)[1])
    return found


async def test_bad_records_are_dead_lettered_and_never_brick_a_restart(settings: Settings) -> None:
    own = await fresh(settings)
    topics = topics_for(own)
    producer = EventProducer(own, producer="test")
    await producer.start()
    try:
        async with shard(own):
            for value in (b"\x00garbage", b"", None):
                await producer.send_raw(topics.workflow_requests, "w", value, partition=0)
            forged = WorkflowEnded(
                workflow_id="w", outcome="completed", failed_step=None, reason=""
            )
            await producer.send(topics.workflow_requests, "w", forged, partition=0)
            await producer.send_raw(topics.workflows, "w", b"\xc3\x01junk", partition=0)
        async with shard(own):
            # still deciding: a definition the client would refuse, sent raw, is rejected
            bad = WorkflowRunRequested(
                workflow_id="w1",
                definition_json=json.dumps({"steps": [{"name": "a", "depends_on": ["a"]}]}),
                input_json="null",
            )
            await producer.send(topics.workflow_requests, "w1", bad, partition=0)

            async def rejected() -> list[WorkflowRejected]:
                found = await history(own, [topics.workflows])
                return [e for e in found if isinstance(e, WorkflowRejected)]

            (refusal,) = await eventually(rejected, within=20)
            assert "depends on itself" in refusal.reason

        async def dead() -> list[DeadLetterRecord]:
            found = [
                e
                for e in await history(own, [topics.deadletter])
                if isinstance(e, DeadLetterRecord) and e.processor == "workflows"
            ]
            return found if len(found) >= 5 else []

        letters = await eventually(dead, within=20)
        reasons = " | ".join(d.reason for d in letters)
        assert "null value" in reasons
        assert "empty value" in reasons
        assert "workflow.ended does not belong on" in reasons
        assert any(d.source_topic == topics.workflows for d in letters)  # at recovery
    finally:
        await producer.stop()


async def test_a_worker_killed_mid_workflow_resumes_and_runs_every_step_once(
    settings: Settings,
) -> None:
    """``conclave worker`` (scheduler, witness and workflow shards) killed with -9 while a
    sequential workflow runs; restarted with the same id, the workflow resumes from its
    last completed step: every step submitted once, run once, and the workflow completes."""
    own = await fresh(settings)
    topics = topics_for(own)
    pool = f"pool-{secrets.token_hex(3)}"
    n = 8
    definition = {
        "steps": [
            {"name": "s0", "pool": pool, "input": "0"},
            *(
                {"name": f"s{i}", "pool": pool, "input": f"{{{{ steps.s{i - 1}.output }}}}+1"}
                for i in range(1, n)
            ),
        ]
    }
    calls: Counter[str] = Counter()

    async def agent(ctx: AgentContext) -> str:
        calls[ctx.task_id] += 1
        await asyncio.sleep(0.3)
        return str(eval_sum(ctx.input))

    children = ChildProcesses(own)
    children.spawn("worker", ["worker", "--id", "kw"], ready_marker=b"processors running")
    host = RuntimeHost(own, HostConfig(pool=pool, agent_ids=[f"{pool}-agent-0"]), agent)
    try:
        await children.ready("worker")
        await host.start()
        async with Client(own) as client:
            wid = await client.run_workflow(definition)
        await eventually(lambda: _true(len(calls) >= 3), within=60)
        await kill(children, "worker")
        children.spawn("worker", ["worker", "--id", "kw"], ready_marker=b"processors running")
        await children.ready("worker")

        async def end() -> list[WorkflowEnded]:
            found = await history(own, [topics.workflows])
            return [e for e in found if isinstance(e, WorkflowEnded)]

        (result,) = await eventually(end, within=90)
    finally:
        await host.stop()
        children.stop()
        for name in list(children.children):
            await kill(children, name)
    assert result.outcome == "completed", result.reason
    decisions = await history(own, [topics.workflows])
    submitted = Counter(e.step for e in decisions if isinstance(e, WorkflowStepSubmitted))
    assert submitted == Counter(f"s{i}" for i in range(n))  # each once
    completed = {e.step: e.output for e in decisions if isinstance(e, WorkflowStepCompleted)}
    assert completed[f"s{n - 1}"] == str(n - 1)
    commands = [e for e in await history(own, topics.commands) if isinstance(e, TaskSubmitted)]
    assert Counter(c.task_id for c in commands) == Counter(f"{wid}.s{i}" for i in range(n))
    assert calls == Counter(f"{wid}.s{i}" for i in range(n))  # every step ran exactly once


def eval_sum(text: str) -> int:
    """``3+1`` -> 4 (the agent's arithmetic; no eval)."""
    return sum(int(part) for part in text.split("+"))


async def kill(children: ChildProcesses, name: str) -> None:
    child = children.children.pop(name)
    child.kill()
    child.wait()
    await asyncio.sleep(0.3)
    if child.stderr is not None:
        child.stderr.close()


async def _true(value: bool) -> bool:
    return value


# -- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def env(stack: StackInfo, settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        **stack.env(),
        "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix,
        "COLUMNS": "200",
    }


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
    async with asyncio.timeout(120):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


YAML = """\
name: research
steps:
  research:
    pool: {pool}
    input: "find sources on {{{{ input.topic }}}}"
  outline:
    pool: {pool}
    priority: high
    max_attempts: 2
    input: "outline from {{{{ steps.research.output }}}}"
"""


async def test_yaml_through_the_cli(
    system: System, env: dict[str, str], tmp_path: Path, processors: Worker
) -> None:
    async def agent(ctx: AgentContext) -> str:
        return f"done({ctx.input})"

    path = tmp_path / "flow.yaml"
    path.write_text(YAML.format(pool=system.pool))
    async with system.running(1, agent):
        wid = f"cli-{secrets.token_hex(3)}"
        run = await cli(
            env, "workflow", "run", str(path), "--input", '{"topic": "tides"}', "--id", wid,
            "--wait", "--timeout", "60",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "completed" in run.stdout
        shown = await cli(env, "workflow", "show", wid)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert f"workflow {wid} (research): completed" in lines[0]
        outline = next(line for line in lines if line.strip().startswith("outline"))
        assert f"{wid}.outline" in outline
        assert "1/2" in outline  # attempts of max attempts
        assert "done(outline from done(find sources on tides))" in outline
        listed = json.loads((await cli(env, "workflows", "--json")).stdout)
        assert any(w["workflow_id"] == wid and w["status"] == "completed" for w in listed)

        bad = tmp_path / "cycle.yaml"
        bad.write_text("steps:\n  a: {depends_on: b}\n  b: {depends_on: a}\n")
        refused = await cli(env, "workflow", "run", str(bad))
        assert refused.returncode == 1
        assert refused.stderr.strip() == "error: cycle: a -> b -> a"
        missing = await cli(env, "workflow", "show", "no-such-workflow")
        assert missing.returncode == 1
        assert "no workflow 'no-such-workflow'" in missing.stderr
        assert "Traceback" not in refused.stderr + missing.stderr

        batch = tmp_path / "batch.jsonl"
        batch.write_text(
            "\n".join(
                [json.dumps(f"item {i}") for i in range(5)]
                + [json.dumps({"input": "last", "priority": "high", "pool": system.pool})]
            )
        )
        sent = await cli(env, "submit-batch", str(batch), "--pool", system.pool)
        assert sent.returncode == 0, sent.stderr
        ids = sent.stdout.split()
        assert len(ids) == 6

        async def all_done() -> bool:
            done = await system.db.fetchval(
                "SELECT count(*) FROM tasks WHERE task_id = ANY($1) AND status = 'completed'", ids
            )
            return bool(done == 6)

        await eventually(all_done)
        broken = tmp_path / "broken.jsonl"
        broken.write_text('"ok"\n{"input": 3}\n')
        refused = await cli(env, "submit-batch", str(broken))
        assert refused.returncode == 1
        assert refused.stderr.strip().startswith(f"error: {broken}:2:")
