"""Submitting as a user does from the shell: ``conclave submit --wait``, input from a
file or stdin, inputs too large for one record, ``task show --follow``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conclave.client import Client
from conclave.errors import InvalidCommand
from conclave.runtime.agents import AgentContext, PermanentFailure
from conclave.settings import Settings
from tests.integration.conftest import System

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


async def test_an_input_larger_than_one_record_is_refused_before_it_is_sent(
    system: System, tmp_path: Path
) -> None:
    big = tmp_path / "big.txt"
    big.write_text("x" * 2_000_000)  # 2 MB: the argument list could not even hold it
    refused = await asyncio.to_thread(
        conclave, system.settings, "submit", "--file", str(big), "--pool", system.pool
    )
    assert refused.returncode != 0
    assert "input is 2,000,000 bytes; at most 900,000" in refused.stderr
    assert "Traceback" not in refused.stderr
    async with Client(system.settings) as client:
        with pytest.raises(InvalidCommand, match="pass a reference"):
            await client.submit("é" * 500_000, pool=system.pool)
