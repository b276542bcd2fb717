"""The broker down for 30 s, and PostgreSQL down for 30 s, while Conclave works.

Each test runs on an embedded stack of its own (the session's keeps serving the other
tests). Every process must wait, retry with back-off, say so in one line, and carry on
by itself when the service is back; afterwards every invariant holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from conclave.bus import ensure_topics
from conclave.devstack import EmbeddedStack, throwaway_stack
from conclave.errors import BrokerUnavailable
from conclave.settings import Settings
from tests.faults.conftest import (
    Cluster,
    _print_logs,
    check_invariants,
    submit,
    until_all_terminal,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

OUTAGE_S = 30.0


@pytest.fixture
async def own() -> AsyncIterator[tuple[Cluster, EmbeddedStack]]:
    async with throwaway_stack("conclave-outage-") as (stack, info):
        settings = Settings.from_env(
            {**info.env(), "CONCLAVE_TOPIC_PREFIX": "outage", "CONCLAVE_POOL_CAPACITY": "8"}
        )
        await ensure_topics(settings)
        (stack.home / "processes").mkdir()
        cluster = Cluster(settings, stack.home / "processes")
        try:
            yield cluster, stack
        finally:
            cluster.stop_all()
            _print_logs(cluster.home)


def outage_lines(cluster: Cluster, name: str) -> list[str]:
    process = cluster.processes[name]
    return [line for line in process.text().splitlines() if "unavailable" in line]


async def test_broker_unresponsive_for_30_s_under_load(own: tuple[Cluster, EmbeddedStack]) -> None:
    """Frozen (SIGSTOP), as a partitioned or overloaded broker is: requests time out."""
    cluster, stack = own
    cluster.worker("w1")
    cluster.runtime("h1", "upool", agents=8, latency_ms=100)
    cluster.projector()
    task_ids = await submit(cluster.settings, "upool", 240)
    await asyncio.sleep(1.0)
    pid = stack.status().kafka.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(OUTAGE_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    for name in ("w1", "h1", "projector"):
        assert cluster.processes[name].popen.poll() is None, f"{name} gave up"
    await check_invariants(cluster, task_ids)


async def test_broker_stopped_for_30_s_while_work_keeps_coming(
    own: tuple[Cluster, EmbeddedStack],
) -> None:
    """Stopped: every connection refused for 30 s while a client keeps submitting.

    The embedded broker cannot be stopped in the middle of Conclave's work without
    damage of its own (measured, see docs/processing.md): it loses what it acknowledged
    in its last second, and a transaction open at the stop can stay open for ever after
    the restart, with its producer id given to another. So it is stopped between two
    bursts (the "broker busy" case is the frozen broker above), and the next burst is
    submitted while it is down: the client waits, and everything resumes by itself.
    """
    cluster, stack = own
    cluster.worker("w1")
    cluster.runtime("h1", "opool", agents=8, latency_ms=20)
    cluster.projector()
    task_ids = await submit(cluster.settings, "opool", 120)
    await until_all_terminal(cluster.settings, task_ids)
    await asyncio.sleep(2.5)  # the broker writes what it holds to disk every ~2 s
    await asyncio.to_thread(stack._stop_kafka)
    with pytest.raises(BrokerUnavailable, match="not reachable"):
        await submit(cluster.settings, "opool", 1, prefix="refused")  # a clear error, no hang
    during = asyncio.create_task(_submit_until_accepted(cluster.settings, 120, prefix="during"))
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(stack.up)  # the same port again
    task_ids += await during
    names = ("w1", "h1", "projector")
    for name in names:
        assert cluster.processes[name].popen.poll() is None, f"{name} gave up"
    lines = {name: outage_lines(cluster, name) for name in names}
    await check_invariants(cluster, task_ids)
    for name, said in lines.items():
        assert len(said) == 1, (name, said)  # once per outage and process
        assert "Kafka" in said[0]


async def _submit_until_accepted(settings: Settings, count: int, *, prefix: str) -> list[str]:
    """What a client script does while the broker is down: try again a little later."""
    while True:
        try:
            return await submit(settings, "opool", count, prefix=prefix)
        except BrokerUnavailable:
            await asyncio.sleep(1.0)


async def test_postgresql_down_for_30_s_under_load(own: tuple[Cluster, EmbeddedStack]) -> None:
    cluster, stack = own
    cluster.worker("w1")
    cluster.runtime("h1", "gpool", agents=8, latency_ms=20)
    cluster.projector()
    task_ids = await submit(cluster.settings, "gpool", 200)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(stack._stop_postgres)
    task_ids += await submit(cluster.settings, "gpool", 100, prefix="during")
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(stack.up)
    assert cluster.processes["projector"].popen.poll() is None, "the projector gave up"
    said = outage_lines(cluster, "projector")
    await check_invariants(cluster, task_ids)
    assert len(said) == 1, said
    assert "PostgreSQL" in said[0]
