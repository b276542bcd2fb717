"""Submitting as a user does from the shell: ``conclave submit --wait``, input from a
file or stdin, inputs too large for one record, ``task show --follow``."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from conclave import payloads
from conclave.client import Client
from conclave.domain.events import now_us
from conclave.errors import InvalidCommand, NotFound
from conclave.runtime.agents import AgentContext, PermanentFailure
from conclave.settings import Settings
from projections import queries
from tests.integration.conftest import System, eventually, has_status

pytestmark = pytest.mark.integration


def conclave(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conclave.cli", *args],
        env={
            **os.environ,
            "COLUMNS": "200",
            "CONCLAVE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CONCLAVE_DATABASE_URL": settings.database_url,
            "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix,
        },
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


async def echo(ctx: AgentContext) -> str:
    if ctx.input.startswith("fail"):
        raise PermanentFailure("will not")
    return f"echo: {ctx.input}"


async def test_submit_wait_prints_the_answer_or_the_failure(system: System, tmp_path: Path) -> None:
    settings, pool = system.settings, system.pool
    question = tmp_path / "question.txt"
    question.write_text("from a file\nwith two lines")
    async with system.running(1, echo):
        answered = await asyncio.to_thread(
            conclave, settings, "submit", "hello", "--pool", pool, "--wait"
        )
        assert answered.returncode == 0, answered.stderr
        assert answered.stdout.strip() == "echo: hello"
        assert "submitted" in answered.stderr
        assert "completed" in answered.stderr  # --wait follows the task on stderr

        from_file = await asyncio.to_thread(
            conclave, settings, "submit", "--file", str(question), "--pool", pool, "--wait"
        )
        assert from_file.stdout.strip() == "echo: from a file\nwith two lines"
        from_stdin = await asyncio.to_thread(
            conclave, settings, "submit", "-", "--pool", pool, "--wait", stdin="piped in"
        )
        assert from_stdin.stdout.strip() == "echo: piped in"

        failed = await asyncio.to_thread(
            conclave, settings, "submit", "fail now", "--pool", pool, "--wait"
        )
        assert failed.returncode != 0
        assert "dead_lettered" in failed.stderr
        assert "PermanentFailure" in failed.stderr

        task_id = (
            await asyncio.to_thread(conclave, settings, "submit", "x", "--pool", pool)
        ).stdout
        followed = await asyncio.to_thread(
            conclave, settings, "task", "show", task_id.strip(), "--follow"
        )
        assert followed.returncode == 0, followed.stderr
        assert "echo: x" in followed.stdout
        assert "completed" in followed.stderr


async def test_an_input_larger_than_one_record_goes_by_reference_and_the_agent_sees_it_whole(
    system: System, tmp_path: Path
) -> None:
    seen: dict[str, str] = {}

    async def measure(ctx: AgentContext) -> str:
        seen[ctx.task_id] = ctx.input
        data = ctx.input.encode()
        return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"

    big = tmp_path / "big.txt"
    text = "".join(f"line {n} é\n" for n in range(200_000))  # ~2.6 MB: 6 chunks
    big.write_text(text)
    async with system.running(1, measure):
        submitted = await asyncio.to_thread(
            conclave, system.settings, "submit", "--file", str(big), "--pool", system.pool, "--wait"
        )
        assert submitted.returncode == 0, submitted.stderr
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert f"{len(text.encode())} bytes, sha256 {digest}" in submitted.stdout
        # The scheduler and the read models hold the reference, not the bytes.
        (task_id,) = seen
        stored = await system.db.fetchval("SELECT input FROM tasks WHERE task_id = $1", task_id)
        assert stored.startswith(payloads.PREFIX)
        assert len(stored) < 2000
        # A reference whose chunks are not what was stored fails the attempt, permanently.
        ref = payloads.parse(stored)
        assert ref is not None
        forged = dataclasses.replace(ref, sha256="0" * 64).text()
        bad = await system.client.submit(forged, pool=system.pool)
        await eventually(lambda: has_status(system.db, bad, "dead_lettered"))
        failure = await queries.get_task(system.db, bad)
        assert "PayloadUnavailable" in (failure.error or "")
    async with Client(system.settings) as client:
        with pytest.raises(InvalidCommand, match="at most 67,108,864 even by reference"):
            await client.submit("x" * (payloads.MAX_PAYLOAD_BYTES + 1), pool=system.pool)


async def test_a_deliberations_answers_are_revealed_together(system: System) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    release = asyncio.Event()

    async def council(ctx: AgentContext) -> str:
        if ctx.agent_id.endswith("1"):
            await release.wait()  # the slow member
        if ctx.agent_id.endswith("2"):
            raise PermanentFailure("abstains by error")
        return f"{ctx.agent_id}: aye"

    async with system.running(3, council) as host:
        agents = sorted(host.config.agent_ids)
        deliberation_id = await client.deliberate("motion", agent_ids=agents, pool=pool)
        first = f"{deliberation_id}/{agents[0]}"
        await eventually(lambda: has_status(db, first, "completed"))
        early = await queries.get_task(db, first)
        assert early.sealed
        assert early.output is None  # answered and witnessed, not yet visible
        assert await queries.visible_outputs(db, deliberation_id) == []
        sealed = await queries.get_deliberation(db, deliberation_id)
        assert not sealed.revealed
        assert sealed.answers == {}
        release.set()
        shown = await asyncio.to_thread(
            conclave, settings, "deliberation", "show", deliberation_id, "--wait"
        )
    assert shown.returncode == 0, shown.stderr
    assert f"{agents[0]}: aye" in shown.stdout
    assert f"{agents[1]}: aye" in shown.stdout
    assert "dead_lettered: permanent failure" in shown.stdout, shown.stdout
    view = await queries.get_deliberation(db, deliberation_id)
    assert view.revealed
    assert sorted(view.answers) == agents[:2]
    assert list(view.failures) == [agents[2]]
    assert view.failures[agents[2]].startswith("dead_lettered: permanent failure")
    late = await queries.get_task(db, first)
    assert late.output is not None
    assert not late.sealed


async def test_a_deliberations_deadline_reveals_the_answers_given_by_then(
    system: System,
) -> None:
    db, client, pool = system.db, system.client, system.pool

    async def one_never_answers(ctx: AgentContext) -> str:
        if ctx.agent_id.endswith("1"):
            await asyncio.sleep(3600)
        return f"{ctx.agent_id}: nay"

    async with system.running(2, one_never_answers) as host:
        agents = sorted(host.config.agent_ids)
        deliberation_id = await client.deliberate(
            "motion", agent_ids=agents, pool=pool, finish_by=now_us() + 1_500_000
        )
        view = await eventually(lambda: _revealed(db, deliberation_id))
    assert list(view.answers) == [agents[0]]
    assert view.failures == {agents[1]: "expired: not finished by its deadline"}


async def _revealed(db: asyncpg.Pool, deliberation_id: str) -> queries.DeliberationView | None:
    try:
        view = await queries.get_deliberation(db, deliberation_id)
    except NotFound:
        return None
    return view if view.revealed else None


async def test_a_deliberation_put_to_a_pool_without_agents_is_rejected(system: System) -> None:
    shown = await asyncio.to_thread(
        conclave, system.settings, "deliberate", "anyone?", "--pool", f"{system.pool}-empty",
        "--wait", "--timeout", "30",
    )  # fmt: skip
    assert shown.returncode != 0
    assert "was rejected: pool" in shown.stderr, shown.stderr
    assert "has no registered agent" in shown.stderr
