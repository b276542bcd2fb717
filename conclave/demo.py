"""``conclave demo``: 72 agents deliberate one motion; a load report comes back.

The demo runs the real system: the stream processors and an agent runtime host
as their own processes (as in production), the projector in this process, and
the client submitting one deliberation. It waits until every agent's answer is
witnessed and visible, verifies the witness chain from Kafka and PostgreSQL,
and reports latency percentiles, end-to-end time against the slowest agent,
peak memory and failures with attribution.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conclave.bus import ensure_topics
from conclave.children import ChildProcesses, MemoryWatch
from conclave.client import Client
from conclave.errors import ConclaveError, StackError
from conclave.settings import Settings
from conclave.verify import verify_sources
from projections.database import connect, migrate
from projections.projector import Projector

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "DemoReport", "print_report", "run_demo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    agents: int = 72
    latency_ms: float = 100.0
    failure_rate: float = 0.0
    seed: int = 0
    motion: str = "Shall the Conclave adopt the proposal?"
    timeout_s: float = 120.0


@dataclass(slots=True, kw_only=True)
class DemoReport:
    agents: int
    completed: int
    failed: int
    deliberation_id: str
    end_to_end_ms: float
    """From submitting the deliberation to the last answer being visible to readers."""
    slowest_agent_ms: float
    """The longest time any agent spent answering: the floor for end to end."""
    floor_ratio: float
    agent_latency_ms: dict[str, float]
    submit_to_dispatch_ms: dict[str, float]
    output_to_witness_ms: dict[str, float]
    witness_to_completed_ms: dict[str, float]
    output_to_visible_ms: dict[str, float]
    """From the agent's output to a reader seeing it (polled every 5 ms)."""
    peak_rss_mb: dict[str, float]
    failures: list[dict[str, str]] = field(default_factory=list)
    chain_ok: bool = False
    chain_entries: int = 0
    witness_head: str = ""
    chain_problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    if len(ordered) == 1:
        ordered = ordered * 2
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 2),
        "p95": round(cuts[94], 2),
        "p99": round(cuts[98], 2),
        "max": round(ordered[-1], 2),
    }


VERIFY_TIMEOUT_S = 120.0


async def _bounded(what: str, step: Awaitable[object], seconds: float) -> bool:
    """Await a clean-up step for at most ``seconds``; say so and go on if it takes longer."""
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        log.warning("demo: %s took over %.0f s; going on without it", what, seconds)
        return False
    return True


async def run_demo(settings: Settings, config: DemoConfig, *, progress: bool = True) -> DemoReport:
    run = uuid.uuid4().hex[:6]
    pool_name = f"demo-{run}"
    agent_ids = [f"agent.{run}-{i:03d}" for i in range(config.agents)]
    await ensure_topics(settings)
    db = await connect(settings, max_size=4)
    await migrate(db)
    processes = ChildProcesses(
        settings.with_(pool_capacity=max(settings.pool_capacity, config.agents))
    )
    projector = Projector(settings, db)
    stop_projecting = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    try:
        processes.spawn(
            "worker", ["worker", "--id", f"demo-{run}"], ready_marker=b"processors running"
        )
        processes.spawn(
            "runtime",
            [
                "runtime",
                "--agents",
                str(config.agents),
                "--pool",
                pool_name,
                "--prefix",
                f"agent.{run}",
                "--latency-ms",
                str(config.latency_ms),
                "--failure-rate",
                str(config.failure_rate),
                "--seed",
                str(config.seed),
            ],
            ready_marker=b"running",
        )
        memory = MemoryWatch(
            {"demo": os.getpid(), **{n: c.pid for n, c in processes.children.items()}}
        )
        background.append(asyncio.create_task(memory.run()))
        stage = ["starting"]
        try:
            async with asyncio.timeout(2 * config.timeout_s):
                report = await _conduct(
                    settings,
                    config,
                    db,
                    processes,
                    projector,
                    stop_projecting,
                    background,
                    run=run,
                    agent_ids=agent_ids,
                    progress=progress,
                    stage=stage,
                )
        except TimeoutError:
            raise StackError(
                f"demo did not finish within {2 * config.timeout_s:.0f} s (stuck {stage[0]})"
            ) from None
    except BaseException:
        processes.print_last_lines()  # what the worker and the runtime said before it failed
        raise
    finally:
        stop_projecting.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Bounded: a clean-up that waits on a broker or a connection that went quiet
        # must not turn a demo that finished into one that hangs (seen, rarely, in CI).
        await _bounded("stopping the projector", projector.stop(), 20)
        processes.stop()
        if not await _bounded("closing the database pool", db.close(), 10):
            db.terminate()
    memory.sample()
    report.peak_rss_mb = {name: round(rss / 2**20, 1) for name, rss in memory.peak.items()}
    report.peak_rss_mb["total"] = round(memory.peak_total / 2**20, 1)
    async with asyncio.timeout(VERIFY_TIMEOUT_S):
        results = await verify_sources(settings)
    for result in results:
        report.chain_entries = max(report.chain_entries, result.entries)
        report.witness_head = result.head_hex
        if result.violation is not None:
            report.chain_problems.append(
                f"{result.source}: sequence {result.violation.sequence}: {result.violation.reason}"
            )
    report.chain_ok = not report.chain_problems
    return report


async def _conduct(
    settings: Settings,
    config: DemoConfig,
    db: asyncpg.Pool,
    processes: ChildProcesses,
    projector: Projector,
    stop_projecting: asyncio.Event,
    background: list[asyncio.Task[None]],
    *,
    run: str,
    agent_ids: list[str],
    progress: bool,
    stage: list[str],
) -> DemoReport:
    """The demo's steps once its processes are spawned; ``stage[0]`` says which one is
    under way (for the message when the whole does not finish in time)."""
    stage[0] = "starting the worker and the runtime host"
    await asyncio.gather(processes.ready("worker"), processes.ready("runtime"))
    stage[0] = "starting the projector"
    await projector.start()
    background.append(asyncio.create_task(projector.run(stop_projecting)))
    stage[0] = "waiting for the agents to register"
    await _wait_for_agents(db, agent_ids, config.timeout_s)
    stage[0] = "deliberating"
    async with Client(settings, producer_name="demo") as client:
        started = time.time()
        deliberation_id = await client.deliberate(
            config.motion, agent_ids=agent_ids, pool=f"demo-{run}", deliberation_id=f"demo-{run}"
        )
        visible_at: dict[str, float] = {}
        finished = await _wait_until_done(
            db, projector, deliberation_id, config, progress, visible_at
        )
    end_to_end_ms = (finished - started) * 1000
    stop_projecting.set()
    async with asyncio.timeout(10):
        await background.pop()
    stage[0] = "folding the last records"
    await projector.catch_up()  # the report reads statuses too, not only outputs
    return await _report(db, deliberation_id, config, started, end_to_end_ms, visible_at)


async def _wait_for_agents(db: asyncpg.Pool, agent_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = await db.fetchval(
            "SELECT count(*) FROM agents WHERE agent_id = ANY($1::text[])", agent_ids
        )
        if count == len(agent_ids):
            return
        await asyncio.sleep(0.02)
    raise StackError(f"only some of {len(agent_ids)} agents registered within {timeout_s:.0f} s")


async def _wait_until_done(
    db: asyncpg.Pool,
    projector: Projector,
    deliberation_id: str,
    config: DemoConfig,
    progress: bool,
    seen: dict[str, float],
) -> float:
    """Poll until every task is done; ``seen`` gets the time each was first visible."""
    # Done means what a reader can see: a terminal status and, for an answer, the
    # output joined to its witness entry (a "completed" status alone is not enough).
    query = """SELECT t.task_id FROM tasks t
                WHERE t.deliberation_id = $1
                  AND (t.status = 'dead_lettered'
                       OR (t.status = 'completed' AND EXISTS (
                           SELECT 1 FROM outputs o
                             JOIN witness_entries w ON w.subject_event_id = o.event_id
                            WHERE o.task_id = t.task_id)))"""
    deadline = time.monotonic() + config.timeout_s
    with Progress(
        TextColumn("[bold]deliberating[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("answers witnessed"),
        TimeElapsedColumn(),
        transient=True,
        disable=not progress,
    ) as bar:
        task = bar.add_task("agents", total=config.agents)
        while time.monotonic() < deadline:
            # Look again only when the projector has committed something new.
            projector.batches.clear()
            now = time.time()
            for row in await db.fetch(query, deliberation_id):
                seen.setdefault(row["task_id"], now)
            bar.update(task, completed=len(seen))
            if len(seen) >= config.agents:
                return now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await projector.batches.wait()
    raise ConclaveError(
        f"deliberation {deliberation_id} did not finish in {config.timeout_s:.0f} s"
    )


async def _report(
    db: asyncpg.Pool,
    deliberation_id: str,
    config: DemoConfig,
    started: float,
    e2e_ms: float,
    visible_at: dict[str, float],
) -> DemoReport:
    rows = await db.fetch(
        """SELECT t.task_id, t.agent_id, t.status, t.dispatched_at, t.finished_at, t.error,
                  o.latency_us, o.produced_at, w.recorded_at
             FROM tasks t
             LEFT JOIN outputs o ON o.task_id = t.task_id
             LEFT JOIN witness_entries w ON w.subject_event_id = o.event_id
            WHERE t.deliberation_id = $1""",
        deliberation_id,
    )
    failures = await db.fetch(
        """SELECT f.agent_id, f.error_type, f.error_message FROM task_failures f
             JOIN tasks t ON t.task_id = f.task_id WHERE t.deliberation_id = $1
            ORDER BY f.agent_id""",
        deliberation_id,
    )
    done = [r for r in rows if r["status"] == "completed"]
    latencies = [r["latency_us"] / 1000 for r in done if r["latency_us"] is not None]
    slowest = max(latencies, default=0.0)
    started_us = started * 1_000_000
    return DemoReport(
        agents=config.agents,
        completed=len(done),
        failed=sum(1 for r in rows if r["status"] == "dead_lettered"),
        deliberation_id=deliberation_id,
        end_to_end_ms=round(e2e_ms, 1),
        slowest_agent_ms=round(slowest, 2),
        floor_ratio=round(e2e_ms / config.latency_ms, 2) if config.latency_ms else 0.0,
        agent_latency_ms=percentiles(latencies),
        submit_to_dispatch_ms=percentiles(
            [(r["dispatched_at"] - started_us) / 1000 for r in rows if r["dispatched_at"]]
        ),
        output_to_witness_ms=percentiles(
            [(r["recorded_at"] - r["produced_at"]) / 1000 for r in done if r["recorded_at"]]
        ),
        witness_to_completed_ms=percentiles(
            [(r["finished_at"] - r["recorded_at"]) / 1000 for r in done if r["recorded_at"]]
        ),
        output_to_visible_ms=percentiles(
            [
                visible_at[r["task_id"]] * 1000 - r["produced_at"] / 1000
                for r in done
                if r["produced_at"] and r["task_id"] in visible_at
            ]
        ),
        peak_rss_mb={},
        failures=[
            {"agent": f["agent_id"], "error": f["error_type"], "message": f["error_message"]}
            for f in failures
        ],
    )


def print_report(console: Console, report: DemoReport) -> None:
    ok = report.completed + report.failed == report.agents and report.chain_ok
    console.print(
        f"[bold]{report.completed}/{report.agents}[/] agents answered "
        f"({report.failed} failed) in [bold]{report.end_to_end_ms:.0f} ms[/] end to end; "
        f"slowest agent {report.slowest_agent_ms:.0f} ms, "
        f"{report.floor_ratio:.2f}x the latency floor"
    )
    table = Table("latency (ms)", "p50", "p95", "p99", "max", title="Per-agent and per-hop latency")
    for name, values in (
        ("agent answering", report.agent_latency_ms),
        ("submit -> dispatched", report.submit_to_dispatch_ms),
        ("output -> witnessed", report.output_to_witness_ms),
        ("witnessed -> completed", report.witness_to_completed_ms),
        ("output -> visible to readers", report.output_to_visible_ms),
    ):
        table.add_row(name, *(f"{values[k]:.1f}" for k in ("p50", "p95", "p99", "max")))
    console.print(table)
    memory = Table("process", "peak RSS (MB)", title="Memory")
    for name, mb in report.peak_rss_mb.items():
        memory.add_row(name, f"{mb:.1f}")
    console.print(memory)
    if report.failures:
        failed = Table("agent", "error", "message", title="Failures (attributed)")
        for f in report.failures:
            failed.add_row(f["agent"], f["error"], f["message"])
        console.print(failed)
    chain = (
        "[green]intact[/]"
        if report.chain_ok
        else "[red]BROKEN[/] " + "; ".join(report.chain_problems)
    )
    console.print(
        f"witness chain: {chain}, {report.chain_entries} entries, head {report.witness_head}"
    )
    console.print("[green]demo passed[/]" if ok else "[red]demo failed[/]")
