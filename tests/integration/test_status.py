"""``conclave status`` against a populated stack: one screen that agrees with the read
models and with what the processors committed."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from conclave.settings import Settings
from projections import queries
from tests.integration.conftest import System, eventually, has_status
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration


async def status(settings: Settings) -> dict[str, object]:
    # In a thread: the hosts run in this process, and a loop blocked for the seconds a
    # CLI takes on a loaded machine holds their heartbeats back (agents turn silent).
    shown = await asyncio.to_thread(cli, settings, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    parsed: dict[str, object] = json.loads(shown.stdout)
    return parsed


async def test_status_shows_queues_agents_lag_and_the_witness_head(system: System) -> None:
    settings, db, client, pool = system.settings, system.db, system.client, system.pool
    release = asyncio.Event()

    async def agent(_: object) -> str:
        await release.wait()
        return "done"

    await client.configure_pool(pool, capacity=1, reason="status test")
    async with system.running(2, agent):
        tasks = [await client.submit(f"job {i}", pool=pool) for i in range(3)]

        async def one_running_two_queued() -> bool:
            shown = await status(settings)
            pools = {p["pool"]: p for p in shown["pools"]}  # type: ignore[attr-defined]
            mine = pools.get(pool)
            agents: dict[str, int] = shown["agents"]  # type: ignore[assignment]
            return (
                mine is not None
                and mine["in_flight"] == 1
                and mine["queued"]["normal"] == 2
                and agents.get("busy", 0) >= 1  # once a heartbeat names its task
            )

        await eventually(one_running_two_queued)
        screen = (await asyncio.to_thread(cli, settings, "status")).stdout
        assert pool in screen
        assert "1 / 1" in screen  # in flight / capacity
        busy = re.search(r"busy (\d+)", screen)  # other tests' agents count too
        assert busy is not None, screen
        assert int(busy.group(1)) >= 1, screen
        release.set()
        for task_id in tasks:
            await eventually(lambda t=task_id: has_status(db, t, "completed"))  # type: ignore[misc]

        async def caught_up() -> bool:
            shown = await status(settings)
            lag = {entry["processor"]: entry["records"] for entry in shown["lag"]}  # type: ignore[attr-defined]
            return set(lag) >= {"scheduler-0", "witness-0", "projector"} and not any(lag.values())

        await eventually(caught_up)

    shown = await status(settings)
    entries = await queries.witness_entries(db)
    assert shown["witness_head"] == entries[-1].sequence
    assert shown["halted"] is False
    assert isinstance(shown["agents"], dict)
    assert sum(shown["agents"].values()) >= 2


def test_watch_and_json_together_are_refused_in_one_line(settings: Settings) -> None:
    refused = cli(settings, "status", "--watch", "--json")
    assert refused.returncode != 0
    assert "--watch refreshes a screen" in refused.stderr
    assert "Traceback" not in refused.stderr
