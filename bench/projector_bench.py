"""How fast the projector folds history into PostgreSQL: ``python -m bench.projector_bench``.

Starts its own embedded stack (broker and PostgreSQL in a temporary directory),
produces the events of N synthetic tasks to fresh topics -- per task what a
real run writes: queued, dispatched, the agent's output, its witness entry and
completed, plus a heartbeat every few tasks -- and then times one projector
folding all of it from offset 0 (what ``conclave replay`` and a projector
catching up after downtime do). The producing is not timed.

Printed, before and after, measured in the same run on the same stack (this
machine is shared, so figures from different runs do not compare well): the
projector as it was before batches were coalesced (commit ba7d602, read from git:
``executemany`` per statement, 1,000 records per transaction) and the projector as
it is; each with the projector process's CPU time per event, which depends less
on what else the machine is doing than the rate does.

Goal (issue 6): at least 20,000 events/s on a 2-core machine.

``--rebuild`` measures ``conclave replay`` instead (issue 10): the history is folded
into the live read models first, then timed: the shadow rebuild from offset 0, the
digests of both schemas and the atomic swap (:func:`projections.rebuild.rebuild`), and,
in the same run, a raw binary ``COPY`` of the very rows the rebuild produced into
empty copies of the tables, the floor any rebuild has to pay. Goals: the rebuild of
1,000,000 events under 30 s, at least 50,000 events/s, at least 0.4 of COPY's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from conclave.bus import ensure_topics, topics_for
from conclave.devstack import EmbeddedStack, StackInfo
from conclave.domain import witness
from conclave.domain.events import (
    AgentOutput,
    AgentRegistered,
    Event,
    Heartbeat,
    Priority,
    TaskCompleted,
    TaskDispatched,
    TaskQueued,
    new_envelope,
)
from conclave.settings import Settings
from projections.database import connect, migrate, schema_for
from projections.projector import Projector
from schemas.codec import default_codec

GOAL_EVENTS_PER_S = 20_000
HEARTBEAT_EVERY = 4
"""One heartbeat per this many tasks, as 72 agents beating once a second at ~300 tasks/s do."""


def synthetic_history(settings: Settings, tasks: int, agents: int) -> list[tuple[str, str, bytes]]:
    """(topic, key, value) of every event ``tasks`` tasks leave on the history topics."""
    codec = default_codec()
    topics = topics_for(settings)
    clock = 1_800_000_000_000_000
    out: list[tuple[str, str, bytes]] = []

    def put(topic: str, key: str, event: Event) -> bytes:
        nonlocal clock
        clock += 50
        envelope = new_envelope(event.TYPE, tenant="bench", producer="bench", occurred_at=clock)
        value = codec.encode(envelope, event)
        out.append((topic, key, value))
        return value

    agent_ids = [f"agent-{i:03d}" for i in range(agents)]
    for agent_id in agent_ids:
        put(
            topics.agents,
            agent_id,
            AgentRegistered(agent_id=agent_id, pool="bench", host_id="h1", agent_ref="sim"),
        )
    head = witness.ChainHead()
    for i in range(tasks):
        task_id = f"task-{i:07d}"
        agent_id = agent_ids[i % agents]
        put(
            topics.tasks,
            task_id,
            TaskQueued(
                task_id=task_id,
                pool="bench",
                priority=Priority.NORMAL,
                input=f"summarise document {i}",
                agent_id=None,
                max_attempts=1,
                deliberation_id=None,
                sequence=i,
            ),
        )
        put(
            topics.tasks,
            task_id,
            TaskDispatched(
                task_id=task_id,
                pool="bench",
                agent_id=agent_id,
                host_id="h1",
                attempt=1,
                input=f"summarise document {i}",
                deliberation_id=None,
            ),
        )
        output = AgentOutput(
            task_id=task_id,
            agent_id=agent_id,
            attempt=1,
            content=f"a summary of document {i}, a few dozen words long " * 2,
            latency_us=100_000,
            deliberation_id=None,
        )
        output_envelope = new_envelope(output.TYPE, tenant="bench", producer="bench")
        value = codec.encode(output_envelope, output)
        out.append((topics.outputs, task_id, value))
        entry = witness.next_entry(
            head,
            subject_type=output.TYPE,
            subject_event_id=output_envelope.event_id,
            subject_digest=witness.digest(value),
            recorded_at=clock,
            task_id=task_id,
            agent_id=agent_id,
            attempt=1,
        )
        head = head.advance(entry)
        put(topics.witness, "witness", entry)
        put(
            topics.tasks,
            task_id,
            TaskCompleted(
                task_id=task_id,
                agent_id=agent_id,
                output_event_id=output_envelope.event_id,
                witness_sequence=entry.sequence,
            ),
        )
        if i % HEARTBEAT_EVERY == 0:
            put(
                topics.heartbeats,
                agent_id,
                Heartbeat(agent_id=agent_id, host_id="h1", task_id=None, rss_bytes=50 << 20),
            )
    return out


async def produce(settings: Settings, records: list[tuple[str, str, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        for topic, key, value in records:
            pending.append(await producer.send(topic, value=value, key=key.encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


@dataclass(frozen=True, slots=True)
class Fold:
    events: int
    seconds: float
    cpu_s: float
    """CPU time of this process (the projector) while it folded."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.events * 1e6


BEFORE = "ba7d602"
"""The last commit of the projector that folded statement by statement."""


def projector_before() -> Any:
    """The ``Projector`` class of commit :data:`BEFORE`, or ``None`` without git."""
    try:
        source = subprocess.run(
            ["git", "show", f"{BEFORE}:projections/projector.py"],
            cwd=Path(__file__).parent,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("projector_before")
    exec(compile(source, f"{BEFORE}:projections/projector.py", "exec"), module.__dict__)
    return module.Projector


async def fold(settings: Settings, projector_class: Any) -> Fold:
    """Fold everything on the history topics into fresh read models."""
    pool = await connect(settings)
    try:
        await migrate(pool)
        projector = projector_class(settings, pool)
        await projector.start()
        try:
            cpu, started = time.process_time(), time.perf_counter()
            folded = await projector.catch_up()
            return Fold(folded, time.perf_counter() - started, time.process_time() - cpu)
        finally:
            await projector.stop()
    finally:
        await pool.close()


async def clean_up(settings: Settings) -> None:
    """Delete the run's topics and read models: the embedded broker rewrites all the
    history it holds every ~2 s, so each run left behind would slow the next ones down."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([spec.name for spec in topics_for(settings).specs()])
    finally:
        await admin.close()
    pool = await connect(settings)
    try:
        await pool.execute(f'DROP SCHEMA "{schema_for(settings)}" CASCADE')
    finally:
        await pool.close()


async def measure(info: StackInfo, tasks: int, agents: int, projector_class: Any) -> Fold:
    """Fresh topics with ``tasks`` tasks' history, folded once."""
    settings = Settings.from_env(
        {**info.env(), "CONCLAVE_TOPIC_PREFIX": f"pbench{secrets.token_hex(3)}"}
    )
    await ensure_topics(settings)
    records = synthetic_history(settings, tasks, agents)
    await produce(settings, records)
    try:
        result = await fold(settings, projector_class)
    finally:
        await clean_up(settings)
    if result.events != len(records):
        raise SystemExit(f"folded {result.events} of {len(records)} events")
    print(
        f"{'after' if projector_class is Projector else 'before'}: {result.events} events "
        f"in {result.seconds:.2f} s: {result.rate:,.0f} events/s, "
        f"{result.cpu_us:.0f} us CPU/event (load {os.getloadavg()[0]:.1f})",
        file=sys.stderr,
    )
    return result


async def bench(tasks: int, agents: int, runs: int) -> dict[str, Any]:
    before_class = projector_before()
    home = Path(tempfile.mkdtemp(prefix="conclave-projector-bench-"))
    stack = EmbeddedStack(home)
    info = stack.up(kafka_port=0, pg_port=0)
    before: list[Fold] = []
    after: list[Fold] = []
    try:
        for _ in range(runs):  # alternated, so that both meet the same neighbours
            if before_class is not None:
                before.append(await measure(info, tasks, agents, before_class))
            after.append(await measure(info, tasks, agents, Projector))
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)

    def best(folds: list[Fold]) -> dict[str, float] | None:
        if not folds:
            return None
        fold = max(folds, key=lambda f: f.rate)
        return {"events_per_s": round(fold.rate), "cpu_us_per_event": round(fold.cpu_us, 1)}

    return {
        "tasks": tasks,
        "events": after[0].events,
        "before": best(before),
        "before_commit": BEFORE,
        "after": best(after),
        "goal_events_per_s": GOAL_EVENTS_PER_S,
    }


REBUILD_GOAL_S_PER_MILLION = 30.0
REBUILD_GOAL_EVENTS_PER_S = 50_000
REBUILD_GOAL_OF_COPY = 0.4


async def copy_rows(settings: Settings) -> tuple[int, float, float]:
    """Rows, seconds and CPU seconds of a binary COPY of every read model's rows (as the
    rebuild left them, fetched beforehand) into empty tables of a scratch schema."""
    from projections.digest import DIGESTED_TABLES

    live = schema_for(settings)
    scratch = f"{live}_copy"
    pool = await connect(settings)
    try:
        tables = {t: await pool.fetch(f'SELECT * FROM "{live}"."{t}"') for t in DIGESTED_TABLES}
        tables["projection_offsets"] = await pool.fetch(
            f'SELECT * FROM "{live}".projection_offsets'
        )
        await pool.execute(f'DROP SCHEMA IF EXISTS "{scratch}" CASCADE; CREATE SCHEMA "{scratch}"')
        for table in tables:
            await pool.execute(
                f'CREATE TABLE "{scratch}"."{table}" (LIKE "{live}"."{table}" INCLUDING ALL)'
            )
        async with pool.acquire() as conn:
            cpu, started = time.process_time(), time.perf_counter()
            async with conn.transaction():
                for table, rows in tables.items():
                    await conn.copy_records_to_table(
                        table, records=[tuple(r) for r in rows], schema_name=scratch
                    )
            seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        await pool.execute(f'DROP SCHEMA "{scratch}" CASCADE')
        return sum(len(rows) for rows in tables.values()), seconds, cpu_s
    finally:
        await pool.close()


async def measure_rebuild(
    info: StackInfo, tasks: int, agents: int, max_batch: int
) -> dict[str, Any]:
    """Fresh topics with ``tasks`` tasks' history folded live, then rebuilt and swapped."""
    from projections.rebuild import rebuild

    settings = Settings.from_env(
        {**info.env(), "CONCLAVE_TOPIC_PREFIX": f"rbench{secrets.token_hex(3)}"}
    )
    await ensure_topics(settings)
    records = synthetic_history(settings, tasks, agents)
    await produce(settings, records)
    try:
        live = await fold(settings, Projector)
        cpu, started = time.process_time(), time.perf_counter()
        result = await rebuild(settings, max_batch=max_batch)
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        if result.differ:
            raise SystemExit(f"rebuilt read models differ: {result.differ}")
        rows, copy_s, copy_cpu_s = await copy_rows(settings)
    finally:
        await clean_up(settings)
    events = result.events
    if events != len(records):
        raise SystemExit(f"rebuilt {events} of {len(records)} events")
    figures = {
        "events": events,
        "rows": rows,
        "live_fold_events_per_s": round(live.rate),
        "rebuild_s": round(seconds, 2),
        "rebuild_cpu_s": round(cpu_s, 2),
        "rebuild_events_per_s": round(events / seconds),
        "rebuild_s_per_million": round(seconds / events * 1e6, 1),
        "live_projector_paused_s": round(result.paused_s, 2),
        "max_batch": max_batch,
        "copy_s": round(copy_s, 2),
        "copy_cpu_s": round(copy_cpu_s, 2),
        "of_copy": round(copy_s / seconds, 2),
        "load": round(os.getloadavg()[0], 1),
    }
    print(f"rebuild: {figures}", file=sys.stderr)
    return figures


async def bench_rebuild(tasks: int, agents: int, runs: int, max_batch: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="conclave-rebuild-bench-"))
    stack = EmbeddedStack(home)
    info = stack.up(kafka_port=0, pg_port=0)
    try:
        results = [await measure_rebuild(info, tasks, agents, max_batch) for _ in range(runs)]
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    best = max(results, key=lambda r: r["rebuild_events_per_s"])
    return {"tasks": tasks, **best}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rebuild", action="store_true", help="Time conclave replay (shadow, digests, swap)."
    )
    parser.add_argument("--max-batch", type=int, default=5000, help="With --rebuild.")
    args = parser.parse_args(argv)
    if args.rebuild:
        figures = asyncio.run(bench_rebuild(args.tasks, args.agents, args.runs, args.max_batch))
        if args.json:
            print(json.dumps(figures))
            return
        print(
            f"rebuild of {figures['events']:,} events ({figures['rows']:,} rows), best of "
            f"{args.runs}: {figures['rebuild_s']} s wall, {figures['rebuild_cpu_s']} s CPU "
            f"(this process), {figures['rebuild_events_per_s']:,} events/s "
            f"(goal >= {REBUILD_GOAL_EVENTS_PER_S:,}), {figures['rebuild_s_per_million']} s "
            f"per million (goal < {REBUILD_GOAL_S_PER_MILLION:.0f}); raw COPY of the same rows "
            f"{figures['copy_s']} s: rebuild = {figures['of_copy']} of COPY "
            f"(goal >= {REBUILD_GOAL_OF_COPY}); live projector paused "
            f"{figures['live_projector_paused_s']} s for the swap; load {figures['load']}"
        )
        return
    result = asyncio.run(bench(args.tasks, args.agents, args.runs))
    if args.json:
        print(json.dumps(result))
        return
    after, before = result["after"], result["before"]
    met = "met" if after["events_per_s"] >= GOAL_EVENTS_PER_S else "NOT met"
    line = (
        f"projector fold of {result['events']:,} events ({result['tasks']:,} tasks), best of "
        f"{args.runs}: after {after['events_per_s']:,} events/s, "
        f"{after['cpu_us_per_event']} us CPU/event"
    )
    if before is not None:
        line += (
            f"; before ({BEFORE}) {before['events_per_s']:,} events/s, "
            f"{before['cpu_us_per_event']} us CPU/event "
            f"({after['events_per_s'] / before['events_per_s']:.1f}x)"
        )
    print(f"{line}; goal >= {GOAL_EVENTS_PER_S:,} events/s: {met}")


if __name__ == "__main__":
    main()
