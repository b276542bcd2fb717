"""The running system for integration tests: processors, projector, hosts.

Everything runs in the test process against the session's real embedded broker
and PostgreSQL. Each test uses pools and agent ids of its own, so tests share
the processors without sharing capacity or agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from conclave.bus import ensure_topics
from conclave.client import Client
from conclave.errors import NotFound
from conclave.runtime.agents import AgentFn, SimulatedAgent
from conclave.runtime.host import HostConfig, RuntimeHost
from conclave.settings import Settings
from projections import queries
from projections.database import connect, migrate
from projections.projector import Projector
from streams.worker import Worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
async def db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    await ensure_topics(settings)
    pool = await connect(settings)
    await migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def processors(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[Worker]:
    """One worker running every shard, for the whole session."""
    worker = Worker(settings, "test-worker")
    await worker.start()
    await worker.ready()
    yield worker
    await worker.stop()


class RunningProjector:
    """The projector folding in the background; tests can pause it."""

    def __init__(self, settings: Settings, db: asyncpg.Pool) -> None:
        self.settings = settings
        self.db = db
        self.projector: Projector | None = None
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.projector = Projector(self.settings, self.db)
        await self.projector.start()
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.projector.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        try:
            if self.task is not None:
                await self.task
        finally:  # a projector that died still holds its lock's connection: give it back
            if self.projector is not None:
                await self.projector.stop()
            self.task = self.projector = None

    def died(self) -> BaseException | None:
        """What ended the projector, if it ended without being stopped."""
        task = self.task
        if task is None or not task.done() or self.stop_event.is_set() or task.cancelled():
            return None
        return task.exception()


_running_projectors: list[RunningProjector] = []


@pytest.fixture(scope="session")
async def projector(
    settings: Settings, db: asyncpg.Pool, processors: Worker
) -> AsyncIterator[RunningProjector]:
    running = RunningProjector(settings, db)
    await running.start()
    _running_projectors.append(running)
    yield running
    _running_projectors.remove(running)
    await running.stop()


@pytest.fixture(autouse=True)
async def _projector_alive() -> AsyncIterator[None]:
    """Fail the test during which the session's projector died, with why, and start a
    new one: otherwise every later test waits out its timeouts for read models that
    never move."""
    yield
    for running in _running_projectors:
        if (exc := running.died()) is not None:
            with contextlib.suppress(Exception):
                await running.stop()  # re-raises ``exc``, gives the lock back
            await running.start()
            raise AssertionError(f"the projector died: {exc!r}") from exc


@pytest.fixture
def pool_name() -> str:
    return f"pool-{secrets.token_hex(3)}"


HostFactory = Callable[..., contextlib.AbstractAsyncContextManager[RuntimeHost]]


@pytest.fixture
def host(settings: Settings, processors: Worker) -> HostFactory:
    """``async with host(pool, n, agent=...) as h:`` runs a runtime host for the block."""

    @contextlib.asynccontextmanager
    async def run(
        pool: str, agents: int, agent: AgentFn | None = None, prefix: str | None = None
    ) -> AsyncIterator[RuntimeHost]:
        prefix = prefix or f"{pool}-agent"
        config = HostConfig(pool=pool, agent_ids=[f"{prefix}-{i:03d}" for i in range(agents)])
        runtime = RuntimeHost(settings, config, agent or SimulatedAgent(latency_ms=5, jitter=0.2))
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.stop()

    return run


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings, producer_name="test") as c:
        yield c


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, within: float = 30.0, every: float = 0.05
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + within
    value: Any = None
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(every)
    pytest.fail(f"condition not met within {within} s (last value: {value!r})")


async def task_status(db: asyncpg.Pool, task_id: str) -> str | None:
    status: str | None = await db.fetchval("SELECT status FROM tasks WHERE task_id = $1", task_id)
    return status


async def has_status(db: asyncpg.Pool, task_id: str, status: str) -> bool:
    return await task_status(db, task_id) == status


@dataclass(frozen=True)
class System:
    """The running system as a test sees it: one pool of its own on shared processors."""

    settings: Settings
    db: asyncpg.Pool
    projector: RunningProjector
    client: Client
    pool: str
    host: HostFactory

    def running(
        self, agents: int, agent: AgentFn | None = None
    ) -> contextlib.AbstractAsyncContextManager[RuntimeHost]:
        """A runtime host with ``agents`` agents in this test's pool, for the block."""
        return self.host(self.pool, agents, agent)

    async def submit_visible(self, input: str, **options: Any) -> str:
        """Submit a task to this test's pool and wait until its output is visible."""
        task_id = await self.client.submit(input, pool=self.pool, **options)
        await eventually(lambda: output_visible(self.db, task_id))
        return task_id


@pytest.fixture
def system(
    settings: Settings,
    db: asyncpg.Pool,
    projector: RunningProjector,
    host: HostFactory,
    client: Client,
    pool_name: str,
) -> System:
    return System(settings, db, projector, client, pool_name, host)


async def output_visible(db: asyncpg.Pool, task_id: str) -> bool:
    """Whether a reader can see the task's output (it exists and is witnessed)."""
    try:
        view = await queries.get_task(db, task_id)
    except NotFound:
        return False
    return view.output is not None
