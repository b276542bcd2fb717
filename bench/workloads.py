"""Scheduling workloads end to end: dependencies and retries, against plain tasks.

``python -m bench.workloads [--tasks N] [--steps S]``. One embedded stack; each workload
gets a fresh worker, runtime host (72 no-op agents) and projector on topics of its own,
and the clock stops when its last task is finished *and visible in the read models*:

* independent: N tasks, no dependencies (the baseline, measured in the same run);
* chains of 10: N tasks as N/10 chains, each task depending on the one before it;
* retries: N independent tasks whose agents fail 10 % of attempts transiently (up to 5
  attempts, 100 ms back-off doubling, +-20 % jitter);
* sequential: S steps, each depending on the previous one: one at a time by design,
  so the figure is the latency of one step through the whole system (dispatch, agent,
  output, witness, completion and the next dispatch in one scheduler decision);
* steady: tasks submitted at a steady 1,000/s for 10 s; dispatch latency p50/p99, from
  the moment the client sends a task to its ``task.dispatched`` (the scheduler's time).

A published comparison of workflow engines ran 400 sequential lightweight steps in
19.7 s (Windmill), 35.8 s (Hatchet) and 39.0 s (Temporal); those figures are quoted,
not measured here (none of them can run on this machine), and come from different
hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass

import asyncpg
from rich.console import Console
from rich.table import Table

from bench.throughput import POOL, _System, stack
from conclave.bus import read_history, topics_for
from conclave.client import Client
from conclave.demo import percentiles
from conclave.devstack import EmbeddedStack
from conclave.domain.events import TaskDispatched, now_us
from conclave.domain.retry import RetryPolicy
from conclave.settings import Settings
from projections.database import connect
from schemas.codec import default_codec

__all__ = ["SteadyFigures", "WorkloadFigures", "main", "run_all", "steady"]

PUBLISHED_400_STEPS_S = {"Windmill": 19.7, "Hatchet": 35.8, "Temporal": 39.0}
"""The published comparison's figures for 400 sequential steps (quoted, not measured)."""
RETRIES = RetryPolicy(backoff_ms=100, multiplier=2.0, max_backoff_ms=2_000, jitter=0.2)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadFigures:
    name: str
    tasks: int
    seconds: float
    per_second: float
    completed: int
    dead_lettered: int
    attempts: int
    """Attempts dispatched in all (more than ``tasks`` when some were retried)."""


async def _finished(db: asyncpg.Pool) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE pool = $1 AND status IN "
        "('completed', 'dead_lettered', 'cancelled', 'dependency_failed')",
        POOL,
    )
    return count


async def _until_finished(db: asyncpg.Pool, count: int, name: str, deadline: float) -> None:
    while (done := await _finished(db)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: only {done} of {count} tasks finished")
        await asyncio.sleep(0.02)


async def _workload(
    settings: Settings,
    embedded: EmbeddedStack,
    name: str,
    depends_on: list[list[str]] | None,
    count: int,
    *,
    failure_rate: float = 0.0,
    max_attempts: int = 1,
    timeout_s: float = 600.0,
) -> WorkloadFigures:
    prefix = f"{settings.topic_prefix}{name[:3]}"
    system = _System(settings.with_(topic_prefix=prefix), 72, 1, failure_rate=failure_rate)
    await system.start()
    db = await connect(system.settings)
    try:
        await asyncio.sleep(1.0)  # registrations folded, fetchers warm
        ids = [f"{name}-{i}" for i in range(count)]
        started = time.monotonic()
        async with Client(system.settings, producer_name="bench") as client:
            await client.submit_many(
                [f"step {i}" for i in range(count)],
                task_ids=ids,
                pool=POOL,
                max_attempts=max_attempts,
                retry=RETRIES,
                depends_on=depends_on,
            )
        await _until_finished(db, count, name, started + timeout_s)
        seconds = time.monotonic() - started
        rows = await db.fetch(
            "SELECT status, count(*) AS n, sum(attempt) AS attempts FROM tasks"
            " WHERE pool = $1 GROUP BY status",
            POOL,
        )
    finally:
        await db.close()
        system.stop()
    by_status = {r["status"]: r["n"] for r in rows}
    return WorkloadFigures(
        name=name,
        tasks=count,
        seconds=round(seconds, 2),
        per_second=round(count / seconds, 1),
        completed=by_status.get("completed", 0),
        dead_lettered=by_status.get("dead_lettered", 0),
        attempts=sum(int(r["attempts"] or 0) for r in rows),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SteadyFigures:
    rate: int
    """Tasks submitted per second, evenly."""
    seconds: float
    dispatch_ms: dict[str, float]
    """Submit -> dispatched, percentiles (p50, p95, p99, max) in milliseconds."""


async def steady(
    settings: Settings, embedded: EmbeddedStack, *, rate: int = 1000, seconds: float = 10.0
) -> SteadyFigures:
    """Submit ``rate`` tasks a second for ``seconds`` in ticks of 10 ms; how long each
    waited for its dispatch."""
    system = _System(settings.with_(topic_prefix=f"{settings.topic_prefix}std"), 72, 1)
    await system.start()
    db = await connect(system.settings)
    sent_at: dict[str, int] = {}
    total = int(rate * seconds)
    per_tick = max(1, rate // 100)
    try:
        await asyncio.sleep(1.0)
        async with Client(system.settings, producer_name="bench") as client:
            started = time.monotonic()
            for first in range(0, total, per_tick):
                await asyncio.sleep(max(0.0, started + first / rate - time.monotonic()))
                ids = [f"steady-{i}" for i in range(first, min(first + per_tick, total))]
                now = now_us()
                sent_at.update(dict.fromkeys(ids, now))
                await client.submit_many(ids, task_ids=ids, pool=POOL)
        await _until_finished(db, total, "steady", time.monotonic() + 600)
        dispatched: dict[str, int] = {}
        codec = default_codec()
        async for record in read_history(system.settings, [topics_for(system.settings).tasks]):
            envelope, event = codec.decode(record.value)
            if isinstance(event, TaskDispatched):
                dispatched.setdefault(event.task_id, envelope.occurred_at)
    finally:
        await db.close()
        system.stop()
    waits = [(dispatched[t] - sent) / 1000 for t, sent in sent_at.items() if t in dispatched]
    return SteadyFigures(rate=rate, seconds=seconds, dispatch_ms=percentiles(waits))


def _chains(count: int, length: int, name: str) -> list[list[str]]:
    """Task ``i`` depends on task ``i - 1`` unless it starts a chain."""
    return [[] if i % length == 0 else [f"{name}-{i - 1}"] for i in range(count)]


async def run_all(
    tasks: int = 20_000, steps: int = 400
) -> tuple[list[WorkloadFigures], SteadyFigures]:
    async with stack() as (settings, embedded):
        rows = [
            await _workload(settings, embedded, "independent", None, tasks),
            await _workload(settings, embedded, "chains", _chains(tasks, 10, "chains"), tasks),
            await _workload(
                settings, embedded, "retries", None, tasks, failure_rate=0.1, max_attempts=5
            ),
            await _workload(
                settings, embedded, "sequential", _chains(steps, steps, "sequential"), steps
            ),
        ]
        return rows, await steady(settings, embedded)


def show(rows: list[WorkloadFigures], steady_figures: SteadyFigures | None = None) -> None:
    baseline = next((r for r in rows if r.name == "independent"), None)
    table = Table(
        "workload", "tasks", "attempts", "seconds", "tasks/s", "vs indep.", "outcome",
        title="Scheduling workloads (72 no-op agents, to completed and visible)",
    )  # fmt: skip
    for r in rows:
        ratio = f"{r.per_second / baseline.per_second:.2f}x" if baseline else "-"
        outcome = f"{r.completed} completed" + (
            f", {r.dead_lettered} dead-lettered" if r.dead_lettered else ""
        )
        table.add_row(
            r.name,
            f"{r.tasks:,}",
            f"{r.attempts:,}",
            f"{r.seconds:.1f}",
            f"{r.per_second:,.0f}",
            ratio if r.name != "sequential" else "-",
            outcome,
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    sequential = next((r for r in rows if r.name == "sequential"), None)
    if sequential is not None:
        per_step_ms = 1000 * sequential.seconds / sequential.tasks
        quoted = ", ".join(f"{k} {v} s" for k, v in PUBLISHED_400_STEPS_S.items())
        console.print(
            f"sequential: {sequential.tasks} steps in {sequential.seconds:.1f} s, "
            f"{per_step_ms:.1f} ms per step (goal: 400 steps < 8 s, i.e. < 20 ms per step; "
            f"published for 400 steps, other hardware: {quoted})"
        )
    if steady_figures is not None:
        d = steady_figures.dispatch_ms
        console.print(
            f"steady {steady_figures.rate:,} tasks/s for {steady_figures.seconds:g} s: "
            f"submit -> dispatched p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms, "
            f"max {d['max']:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workloads")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    rows, steady_figures = asyncio.run(run_all(args.tasks, args.steps))
    show(rows, steady_figures)
    print([asdict(r) for r in rows], asdict(steady_figures))


if __name__ == "__main__":
    main()
