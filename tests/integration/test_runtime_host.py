"""The runtime host reading dispatches again after an outage, while new ones arrive."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from conclave.bus import TransactionalProducer, fence
from conclave.errors import Fenced
from projections.rows import TERMINAL
from tests.integration.conftest import System, task_status

pytestmark = pytest.mark.integration


async def _unended(db: asyncpg.Pool, task_ids: list[str]) -> list[str]:
    return [t for t in task_ids if await task_status(db, t) not in TERMINAL]


async def test_dispatches_arriving_while_the_host_reads_again_are_all_run(system: System) -> None:
    """After an outage the host seeks back to its committed position; a fetch already
    under way then returns the re-read records, and every dispatch among them must run.
    (A host that threw that fetch away lost the dispatches in it: seen once in CI as
    one task of 240 dispatched and never answered after a frozen broker.)"""
    async with system.running(4) as host:
        task_ids: list[str] = []
        for round in range(40):
            submitted = [
                system.client.submit(f"round {round} job {i}", pool=system.pool) for i in range(3)
            ]
            task_ids += await asyncio.gather(*submitted)
            await asyncio.sleep(0.01 * (round % 5))
            host.resync()
        deadline = asyncio.get_running_loop().time() + 60
        while missing := await _unended(system.db, task_ids):
            assert asyncio.get_running_loop().time() < deadline, (
                f"{len(missing)} of {len(task_ids)} tasks never ended: {missing[:5]}"
            )
            await asyncio.sleep(0.1)


async def test_a_host_fenced_by_the_scheduler_claims_its_writer_again_and_goes_on(
    system: System,
) -> None:
    """What the scheduler does to a host it judged lost (cut off or paused, not dead):
    its next transaction is fenced; with no successor, it claims the next incarnation."""
    async with system.running(2) as host:
        await system.submit_visible("before")
        before = host._writer.incarnation if host._writer else 0
        await fence(system.settings, host.group_id, host._tp)
        await system.submit_visible("after the fence")
        assert not host.failed.is_set()
        assert host._writer is not None
        assert host._writer.incarnation > before


async def test_a_host_whose_successor_took_over_stops(system: System) -> None:
    """Two processes with one host id: the older one is a zombie once the newer claims."""
    async with system.running(2) as host:
        await system.submit_visible("before")
        successor = TransactionalProducer(system.settings, host.group_id, host._tp)
        await successor.start()
        try:
            await system.client.submit("to the zombie", pool=system.pool)
            async with asyncio.timeout(30):
                await host.failed.wait()
            assert isinstance(host.failure, Fenced)
        finally:
            await successor.stop()
