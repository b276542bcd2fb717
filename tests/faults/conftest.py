"""Fault injection: Conclave's processes as a user runs them (``conclave worker``,
``conclave runtime``, ``conclave projector``, each its own OS process), killed with -9 at
random moments, plus the invariants every such test checks afterwards.

Each test gets its own topic prefix (so its own topics, shards and read-model schema)
on the session's embedded stack, or a stack of its own when it stops the broker.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition

from conclave.bus import ensure_topics, new_consumer, read_history, topics_for
from conclave.client import Client
from conclave.domain.events import (
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskDependencyFailed,
    TaskDispatched,
    TaskExpired,
    TaskQueued,
    TaskRetryScheduled,
)
from conclave.domain.retry import DEFAULT_RETRY, RetryPolicy
from conclave.errors import SchemaError
from conclave.settings import Settings
from conclave.transparency.keyfiles import read_verifier
from conclave.transparency.proofs import open_checkpoint, tree_of
from conclave.verify import published_checkpoints, rebuild, topic_entries, verify_sources
from projections.database import READ_MODEL_TABLES, connect, migrate
from projections.projector import Projector
from schemas.codec import default_codec

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Conclave processes for one test, all against ``settings``."""

    settings: Settings
    home: Path
    processes: dict[str, Process] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    """More ``CONCLAVE_*`` settings for the processes started from now on."""

    @property
    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "CONCLAVE_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "CONCLAVE_DATABASE_URL": s.database_url,
            "CONCLAVE_TOPIC_PREFIX": s.topic_prefix,
            "CONCLAVE_PARTITIONS": str(s.partitions),
            "CONCLAVE_POOL_CAPACITY": str(s.pool_capacity),
            "CONCLAVE_HOME": str(self.home),
            "CONCLAVE_LOG_LEVEL": os.environ.get("CONCLAVE_LOG_LEVEL", "INFO"),
            "CONCLAVE_WITNESS_KEY": str(s.witness_key or ""),
            "COLUMNS": "200",
            **self.extra_env,
        }

    def start(self, name: str, *args: str, ready: str, timeout_s: float = 60.0) -> Process:
        """``conclave ARGS`` as process ``name``; returns once it printed ``ready``."""
        log = self.home / f"{name}.{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "conclave.cli", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = self.processes[name] = Process(name, popen, log)
        deadline = time.monotonic() + timeout_s
        while ready not in process.text():
            if popen.poll() is not None:
                pytest.fail(f"{name} exited with {popen.returncode}: {process.text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready in {timeout_s} s: {process.text()[-2000:]}")
            time.sleep(0.05)
        return process

    def worker(self, worker_id: str) -> Process:
        return self.start(worker_id, "worker", "--id", worker_id, ready="processors running")

    def runtime(
        self,
        host_id: str,
        pool: str,
        agents: int,
        latency_ms: float = 20,
        failure_rate: float = 0.0,
    ) -> Process:
        return self.start(
            host_id,
            "runtime",
            "--host-id",
            host_id,
            "--pool",
            pool,
            "--agents",
            str(agents),
            "--prefix",
            f"{host_id}-agent",
            "--latency-ms",
            str(latency_ms),
            "--failure-rate",
            str(failure_rate),
            ready="running",
        )

    def projector(self, name: str = "projector") -> Process:
        return self.start(name, "projector", ready="projector running")

    def kill(self, name: str) -> None:
        """``kill -9``: no clean-up of any kind."""
        process = self.processes.pop(name)
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait(timeout=10)

    def stop(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM, as an operator would; returns the exit code."""
        process = self.processes[name]
        process.popen.send_signal(signal.SIGTERM)
        code = process.popen.wait(timeout=timeout_s)
        del self.processes[name]
        return code

    def stop_all(self) -> None:
        for name in list(self.processes):
            try:
                self.stop(name, timeout_s=20)
            except subprocess.TimeoutExpired:
                self.kill(name)


@pytest.fixture
async def cluster(settings: Settings) -> AsyncIterator[Cluster]:
    """Processes of this test, on topics (and a read-model schema) of its own."""
    own = settings.with_(topic_prefix=f"f{secrets.token_hex(4)}", pool_capacity=8)
    await ensure_topics(own)
    home = Path(tempfile.mkdtemp(prefix="conclave-faults-"))
    running = Cluster(own, home)
    try:
        yield running
    finally:
        running.stop_all()
        _print_logs(home)  # pytest shows them when the test failed


def _print_logs(home: Path) -> None:
    """The processes' logs, for pytest to show when the test failed (and all of them
    copied to ``$CONCLAVE_TEST_LOGS`` if set, for a closer look)."""
    keep = os.environ.get("CONCLAVE_TEST_LOGS")
    for log in sorted(home.glob("*.log")):
        print(f"----- {log.name}\n{log.read_text(errors='replace')[-6000:]}")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, Path(keep) / log.name)


async def submit_chains(
    settings: Settings, pool: str, chains: int, length: int, *, prefix: str = "c"
) -> dict[str, str]:
    """``chains`` chains of ``length`` tasks, each depending on the one before it;
    returns task id -> the id it depends on (``""`` for a chain's first task)."""
    ids = [f"{prefix}-{c:03d}-{i:03d}" for c in range(chains) for i in range(length)]
    after = {t: "" if i % length == 0 else ids[i - 1] for i, t in enumerate(ids)}
    async with Client(settings, producer_name="faults") as client:
        await client.submit_many(
            [f"job {t}" for t in ids],
            task_ids=ids,
            pool=pool,
            depends_on=[[after[t]] if after[t] else [] for t in ids],
        )
    return after


async def submit(
    settings: Settings,
    pool: str,
    count: int,
    *,
    prefix: str = "t",
    max_attempts: int = 1,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[str]:
    async with Client(settings, producer_name="faults") as client:
        return [
            await client.submit(
                f"job {i}",
                task_id=f"{prefix}-{i:05d}",
                pool=pool,
                max_attempts=max_attempts,
                retry=retry,
            )
            for i in range(count)
        ]


@dataclass
class Ledger:
    """The scheduler's decisions, read back from the tasks topic."""

    terminal: Counter[str] = field(default_factory=Counter)
    """Task id -> how many terminal events (completed, dead-lettered, cancelled, expired
    or dependency-failed) it has."""
    completed_at: dict[str, int] = field(default_factory=dict)
    """Task id -> the tasks-topic offset of its completion (one partition per pool)."""
    first_dispatched_at: dict[str, int] = field(default_factory=dict)
    peak_in_flight: dict[str, int] = field(default_factory=dict)
    """Pool -> the most tasks it ever had dispatched and unfinished at once."""
    dispatches: int = 0


async def ledger(settings: Settings) -> Ledger:
    codec = default_codec()
    found = Ledger()
    holding: dict[str, str] = {}  # task -> pool, while dispatched
    in_flight: Counter[str] = Counter()
    async for record in read_history(settings, [topics_for(settings).tasks]):
        try:
            _, event = codec.decode(record.value)
        except SchemaError:
            continue
        match event:
            case TaskDispatched():
                found.dispatches += 1
                found.first_dispatched_at.setdefault(event.task_id, record.offset)
                if event.task_id not in holding:
                    holding[event.task_id] = event.pool
                    in_flight[event.pool] += 1
                    found.peak_in_flight[event.pool] = max(
                        found.peak_in_flight.get(event.pool, 0), in_flight[event.pool]
                    )
            case (
                TaskQueued()
                | TaskRetryScheduled()
                | TaskCompleted()
                | TaskDeadLettered()
                | TaskCancelled()
                | TaskExpired()
                | TaskDependencyFailed()
            ):
                if not isinstance(event, TaskQueued | TaskRetryScheduled):
                    found.terminal[event.task_id] += 1
                if isinstance(event, TaskCompleted):
                    found.completed_at.setdefault(event.task_id, record.offset)
                pool = holding.pop(event.task_id, None)
                if pool is not None:
                    in_flight[pool] -= 1
    return found


async def until_all_terminal(
    settings: Settings, task_ids: Iterable[str], *, within_s: float = 120.0
) -> Ledger:
    wanted = set(task_ids)
    deadline = time.monotonic() + within_s
    while True:
        found = await ledger(settings)
        missing = wanted - set(found.terminal)
        if not missing:
            return found
        if time.monotonic() > deadline:
            where = await whereabouts(settings, sorted(missing)[0])
            pytest.fail(
                f"{len(missing)} of {len(wanted)} tasks never ended: {sorted(missing)[:5]}; "
                f"the first one's records: {where}; transactions left open: "
                f"{await held_back(settings) or 'none'}"
            )
        await asyncio.sleep(0.5)


async def whereabouts(settings: Settings, task_id: str) -> list[str]:
    """Every record about ``task_id`` on every topic, in topic order: where it got stuck."""
    topics = topics_for(settings)
    codec = default_codec()
    found = []
    for topic in [*topics.commands, topics.tasks, topics.outputs, topics.witness]:
        async for record in read_history(settings, [topic]):
            try:
                _, event = codec.decode(record.value)
            except SchemaError:
                continue
            if getattr(event, "task_id", None) == task_id:
                found.append(f"{topic}[{record.partition}]@{record.offset}:{event.TYPE}")
    return found


async def held_back(settings: Settings) -> list[str]:
    """Partitions whose committed readers stop short of the end: a transaction left open
    there hides every later record from ``read_committed`` readers."""
    topics = topics_for(settings)
    committed = new_consumer(settings)
    everything = new_consumer(settings, isolation_level="read_uncommitted")
    found = []
    try:
        await committed.start()
        await everything.start()
        tps = [
            TopicPartition(t, p)
            for t in (topics.tasks, topics.outputs, topics.witness)
            for p in sorted(committed.partitions_for_topic(t) or {0})
        ]
        stable, ends = await committed.end_offsets(tps), await everything.end_offsets(tps)
        found = [
            f"{tp.topic}[{tp.partition}]: readers stop at {stable[tp]} of {ends[tp]}"
            for tp in tps
            if stable[tp] < ends[tp]
        ]
    finally:
        await committed.stop()
        await everything.stop()
    return found


async def check_invariants(cluster: Cluster, task_ids: Iterable[str]) -> Ledger:
    """Every task ended exactly once, no pool over capacity, the chain verifies from the
    topic, and (once the projector caught up) the read models equal a rebuild."""
    settings = cluster.settings
    found = await until_all_terminal(settings, task_ids)
    doubled = {t: n for t, n in found.terminal.items() if n != 1}
    assert not doubled, f"tasks that ended more than once: {doubled}"
    assert all(n <= settings.pool_capacity for n in found.peak_in_flight.values()), (
        found.peak_in_flight
    )
    for result in await verify_sources(settings, "topic"):
        assert result.violation is None, result.violation
    await checkpoints_sign_the_chain(settings)
    await projected_on_its_own(cluster, found.terminal)
    await read_models_equal_rebuild(cluster)
    return found


async def checkpoints_sign_the_chain(settings: Settings) -> None:
    """Every checkpoint published through the faults opens with the log's public key and
    signs the root of the entries on the topic at its size: a crash between an entry and
    its checkpoint never signs a tree that is not the log's."""
    assert settings.witness_key is not None
    public = read_verifier(str(settings.witness_key.with_suffix(".vkey")))
    tree = tree_of((await topic_entries(settings))[0])
    published = await published_checkpoints(settings)
    assert published, "no checkpoint was published"
    for checkpoint in published:
        opened = open_checkpoint(checkpoint.note, [public]).checkpoint
        assert opened.size <= tree.size, (opened.size, tree.size)
        assert opened.root == tree.root(opened.size), f"checkpoint of size {opened.size}"


async def read_models_equal_rebuild(cluster: Cluster) -> None:
    """The read models the projector built through the faults (plus a catch-up from its
    stored positions, as after a restart) equal a rebuild from offset 0."""
    cluster.stop_all()  # nothing may write (heartbeats!) between the two snapshots
    settings = cluster.settings
    db = await connect(settings)
    try:
        await migrate(db)
        catch_up = Projector(settings, db)
        await catch_up.start()
        await catch_up.catch_up()
        await catch_up.stop()
        before = await _tables(db)
        await rebuild(settings)
        after = await _tables(db)
    finally:
        await db.close()
    for table in READ_MODEL_TABLES:
        assert after[table] == before[table], f"{table} differs after a rebuild"


async def projected_on_its_own(
    cluster: Cluster, task_ids: Iterable[str], within_s: float = 60
) -> None:
    """The projector that lived through the faults reaches every task's end by itself."""
    wanted = set(task_ids)
    db = await connect(cluster.settings)
    try:
        deadline = time.monotonic() + within_s
        while True:
            rows = await db.fetch(
                "SELECT task_id FROM tasks WHERE task_id = ANY($1::text[])"
                " AND status IN ('completed', 'dead_lettered')",
                list(wanted),
            )
            if len(rows) == len(wanted):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the projector shows {len(rows)} of {len(wanted)} tasks finished")
            await asyncio.sleep(0.5)
    finally:
        await db.close()


async def _tables(db: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    tables: dict[str, list[tuple[object, ...]]] = {}
    for table in READ_MODEL_TABLES:
        rows = await db.fetch(f"SELECT * FROM {table}")
        tables[table] = sorted((tuple(r.values()) for r in rows), key=repr)
    return tables
