"""``conclave replay`` as an operator runs it: separate processes against the session's
stack, with the shared worker and live projector running."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest

from conclave.devstack import StackInfo
from tests.integration.conftest import System, eventually, has_status

pytestmark = pytest.mark.integration


async def _conclave(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a thread: the worker and projector it needs run in this event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "conclave.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_replay_check_as_of_schema_list_and_drop_from_the_shell(
    stack: StackInfo, system: System
) -> None:
    env = {**os.environ, **stack.env(), "CONCLAVE_TOPIC_PREFIX": system.settings.topic_prefix}
    async with system.running(2):
        ids = [await system.client.submit(f"cli{i}", pool=system.pool) for i in range(2)]
        for task_id in ids:
            await eventually(lambda t=task_id: has_status(system.db, t, "completed"))  # type: ignore[misc]

    replayed = await _conclave(env, "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "read-model digests" in replayed.stdout
    assert " NO " not in replayed.stdout
    assert "swapped in" in replayed.stdout
    assert re.search(r"digest witnessed at sequence \d+", replayed.stdout), replayed.stdout
    positions = re.search(r"positions covered: (.+)", replayed.stdout)
    assert positions is not None
    vector = positions[1].replace(" ", "")

    checked = await _conclave(env, "replay", "--check")
    assert checked.returncode == 0, checked.stderr
    assert "check only" in checked.stdout

    name = f"asof_cli_{os.getpid()}"
    built = await _conclave(env, "replay", "--as-of-offsets", vector, "--into", name)
    assert built.returncode == 0, built.stderr
    assert f"built schema {name}" in built.stdout
    try:
        listed = await _conclave(env, "--schema", name, "tasks", "--pool", system.pool, "--json")
        assert listed.returncode == 0, listed.stderr
        assert all(task_id in listed.stdout for task_id in ids)
        assert name in (await _conclave(env, "replay", "--list")).stdout
    finally:
        dropped = await _conclave(env, "replay", "--drop", name)
    assert dropped.returncode == 0, dropped.stderr
    again = await _conclave(env, "replay", "--drop", name)
    assert again.returncode == 1
    assert "no schema" in again.stderr
    assert "Traceback" not in again.stderr
    missing = await _conclave(env, "--schema", name, "tasks")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
