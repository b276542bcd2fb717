"""End-to-end throughput and restart cost of Conclave on the embedded stack.

* ``throughput``: N no-op tasks (agents answer at once) submitted in one go; the clock
  stops when the last one is *completed and visible in the read models*. The worker,
  the runtime host(s) and the projector run as their own processes, as in production.
* ``restart``: with H tasks of history behind it, kill -9 the worker and start it again:
  how long until a new task is done, how much the recovery read, and the worker's
  resident memory afterwards. With snapshots, neither should grow with H.

``python -m bench.throughput [--tasks N] [--agents A]`` runs one throughput measurement
on a stack of its own; ``bench/__main__.py`` runs them all in one go with the peers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
import psutil
from rich.console import Console
from rich.table import Table

from conclave.bus import ensure_topics
from conclave.children import ChildProcesses
from conclave.client import Client
from conclave.devstack import EmbeddedStack, throwaway_stack
from conclave.settings import Settings
from projections.database import connect

__all__ = ["RestartFigures", "ThroughputFigures", "idle", "restart", "stack", "throughput"]

POOL = "bench"


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputFigures:
    tasks: int
    agents: int
    seconds: float
    per_second: float
    submit_seconds: float
    cpu_seconds: dict[str, float]
    """CPU each process spent during the run (user + system)."""
    peak_rss_mb: dict[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartFigures:
    history_tasks: int
    restart_to_done_s: float
    """kill -9 of the worker, start of a new one, until a new task is completed."""
    recovered_records: int
    worker_rss_mb: float
    broker_file_mb: float
    notes: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def stack() -> AsyncIterator[tuple[Settings, EmbeddedStack]]:
    """A fresh embedded broker and PostgreSQL for one measurement."""
    async with throwaway_stack("conclave-bench-") as (embedded, info):
        settings = Settings.from_env(
            {**info.env(), "CONCLAVE_TOPIC_PREFIX": f"bench{secrets.token_hex(3)}"}
        ).with_(home=embedded.home)
        yield settings, embedded


class _System:
    """Worker, runtime host(s) and projector as child processes."""

    def __init__(
        self,
        settings: Settings,
        agents: int,
        hosts: int,
        *,
        failure_rate: float = 0.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings.with_(pool_capacity=agents)
        self.agents = agents
        self.hosts = hosts
        self.failure_rate = failure_rate
        self.children = ChildProcesses(self.settings)
        self.children.env.update(extra_env or {})

    async def start(self) -> None:
        await ensure_topics(self.settings)
        self.children.spawn(
            "worker", ["worker", "--id", "bench-worker"], ready_marker=b"processors running"
        )
        per_host = self.agents // self.hosts
        for h in range(self.hosts):
            self.children.spawn(
                f"runtime-{h}",
                [
                    "runtime",
                    "--host-id",
                    f"bench-host-{h}",
                    "--pool",
                    POOL,
                    "--agents",
                    str(per_host),
                    "--prefix",
                    f"h{h}-agent",
                    "--latency-ms",
                    "0",
                    "--failure-rate",
                    str(self.failure_rate),
                ],
                ready_marker=b"running",
            )
        self.children.spawn("projector", ["projector"], ready_marker=b"projector running")
        await asyncio.gather(*(self.children.ready(n) for n in list(self.children.children)))

    async def restart_worker(self) -> None:
        self.children.kill("worker")
        self.children.spawn(
            "worker", ["worker", "--id", "bench-worker"], ready_marker=b"processors running"
        )
        await self.children.ready("worker")

    def stop(self) -> None:
        self.children.stop()


async def _completed(db: asyncpg.Pool) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE pool = $1 AND status = 'completed'", POOL
    )
    return count


async def _until_completed(db: asyncpg.Pool, count: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        if await _completed(db) >= count:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {await _completed(db)} of {count} tasks done")
        await asyncio.sleep(0.05)


def _processes(system: _System, embedded: EmbeddedStack) -> dict[str, psutil.Process]:
    found = {name: psutil.Process(c.pid) for name, c in system.children.children.items()}
    status = embedded.status()
    if status.kafka.pid:
        found["broker"] = psutil.Process(status.kafka.pid)
    if status.postgres.pid:
        found["postgres"] = psutil.Process(status.postgres.pid)
    return found


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by nearest rank (the largest for q near 1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of ``process`` (user + system; a PostgreSQL server's with its children's),
    0 once it is gone."""
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        total = times.user + times.system
        if process.name().startswith("postgres"):  # the server's work is in its children
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    total += t.user + t.system
        return total
    return 0.0


async def throughput(
    settings: Settings,
    embedded: EmbeddedStack,
    *,
    tasks: int = 20_000,
    agents: int = 72,
    hosts: int = 1,
    timeout_s: float = 600.0,
    extra_env: dict[str, str] | None = None,
) -> ThroughputFigures:
    """``extra_env``: more variables for the Conclave processes (tracing, say)."""
    system = _System(
        settings.with_(topic_prefix=f"{settings.topic_prefix}t{agents}"),
        agents,
        hosts,
        extra_env=extra_env,
    )
    await system.start()
    db = await connect(system.settings)
    try:
        await asyncio.sleep(1.0)  # registrations folded, fetchers warm
        processes = _processes(system, embedded)
        before = {name: cpu_seconds(p) for name, p in processes.items()}
        peak: dict[str, int] = dict.fromkeys(processes, 0)

        async def sample() -> None:
            while True:
                for name, p in processes.items():
                    with contextlib.suppress(psutil.Error):
                        peak[name] = max(peak[name], p.memory_info().rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        async with Client(system.settings, producer_name="bench") as client:
            await client.submit_many([f"no-op {i}" for i in range(tasks)], pool=POOL)
        submitted = time.monotonic()
        finished = await _until_completed(db, tasks, timeout_s)
        sampler.cancel()
        cpu = {name: round(cpu_seconds(p) - before[name], 1) for name, p in processes.items()}
    finally:
        await db.close()
        system.stop()
    seconds = finished - started
    return ThroughputFigures(
        tasks=tasks,
        agents=agents,
        seconds=round(seconds, 2),
        per_second=round(tasks / seconds),
        submit_seconds=round(submitted - started, 2),
        cpu_seconds=cpu,
        peak_rss_mb={name: round(rss / 2**20, 1) for name, rss in peak.items()},
    )


async def idle(
    settings: Settings, embedded: EmbeddedStack, *, agents: int = 72, seconds: float = 20.0
) -> dict[str, float]:
    """Percent of one core each process uses with nothing to do (after a warm-up)."""
    system = _System(settings.with_(topic_prefix=f"{settings.topic_prefix}idle"), agents, 1)
    await system.start()
    try:
        # Start-up work done, fetchers backed off into their cold tier (10 s without a
        # task's record; see conclave/fetching.py).
        await asyncio.sleep(12.0)
        processes = _processes(system, embedded)
        before = {name: cpu_seconds(p) for name, p in processes.items()}
        await asyncio.sleep(seconds)
        return {
            name: round(100 * (cpu_seconds(p) - before[name]) / seconds, 1)
            for name, p in processes.items()
        }
    finally:
        system.stop()


async def restart(
    settings: Settings,
    embedded: EmbeddedStack,
    *,
    history_tasks: int,
    agents: int = 72,
    timeout_s: float = 1_800.0,
) -> RestartFigures:
    """Run ``history_tasks`` tasks through the system, then kill -9 the worker and start
    it again with the same id; time until one new task is done."""
    system = _System(
        settings.with_(topic_prefix=f"{settings.topic_prefix}r{history_tasks}"), agents, 1
    )
    await system.start()
    db = await connect(system.settings)
    try:
        async with Client(system.settings, producer_name="bench") as client:
            for start in range(0, history_tasks, 10_000):
                n = min(10_000, history_tasks - start)
                await client.submit_many([f"history {i}" for i in range(n)], pool=POOL)
                await _until_completed(db, start + n, timeout_s)
            await asyncio.sleep(2.0)  # the broker has written its file; nothing in flight
            started = time.monotonic()
            await system.restart_worker()
            await client.submit_many(["after the restart"], pool=POOL)
            finished = await _until_completed(db, history_tasks + 1, 120.0)
        worker = psutil.Process(system.children.children["worker"].pid)
        rss = worker.memory_info().rss
        log = "\n".join(system.children.last_lines["worker"])
    finally:
        await db.close()
        system.stop()
    folded = sum(
        int(line.split(", ")[-1].split()[0])
        for line in map(_message, log.splitlines())
        if "recovered in" in line and "records folded" in line
    )
    broker_file = embedded.kafka_dir / "kafka.json"
    return RestartFigures(
        history_tasks=history_tasks,
        restart_to_done_s=round(finished - started, 2),
        recovered_records=folded,
        worker_rss_mb=round(rss / 2**20, 1),
        broker_file_mb=round(broker_file.stat().st_size / 2**20, 1)
        if broker_file.exists()
        else 0.0,
    )


def _message(line: str) -> str:
    """A log line's message: children log JSON lines (their stderr is not a terminal)."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            return str(json.loads(line).get("message", ""))
    return line


def show_throughput(rows: list[ThroughputFigures]) -> None:
    table = Table(
        "agents", "tasks", "seconds", "tasks/s", "submit s", "CPU s by process", "peak RSS MB"
    )
    for r in rows:
        table.add_row(
            str(r.agents),
            str(r.tasks),
            f"{r.seconds:.1f}",
            f"{r.per_second:,}",
            f"{r.submit_seconds:.1f}",
            ", ".join(f"{k} {v}" for k, v in r.cpu_seconds.items()),
            ", ".join(f"{k} {v:.0f}" for k, v in r.peak_rss_mb.items()),
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--hosts", type=int, default=1)
    args = parser.parse_args()

    async def go() -> ThroughputFigures:
        async with stack() as (settings, embedded):
            return await throughput(
                settings, embedded, tasks=args.tasks, agents=args.agents, hosts=args.hosts
            )

    figures = asyncio.run(go())
    show_throughput([figures])
    print(asdict(figures))


def _dict(value: Any) -> dict[str, Any]:
    return asdict(value)


if __name__ == "__main__":
    main()
