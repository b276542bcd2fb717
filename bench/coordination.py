"""Locks and versioned state end to end: ``python -m bench.coordination``.

A fresh embedded stack and one ``conclave worker`` child process (it runs the
coordination shard); the clients run here, each a :class:`~conclave.coordination.Coordinator`
of its own (its own producer and reader of decisions). Measured, each as p50/p99 of the
time from the call to the decision it awaited:

* **uncontended**: one client acquires and releases a lock, N times;
* **contention**: 10 clients loop acquire (waiting in line) -> release on ONE lock;
  an acquisition's latency then includes its wait behind the others, so the hand-over
  time (release requested -> next holder granted, the processor's own share) is shown
  too, with grants per second;
* **state update**: one client updates one key N times, request -> acknowledged version.

CPU: process time of the worker and of this process (the clients), per operation.
The machine is shared: figures are as loaded as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import psutil

from bench import throughput
from conclave.bus import ensure_topics
from conclave.children import ChildProcesses
from conclave.coordination import Coordinator
from conclave.settings import Settings

CONTENDERS = 10


@dataclass(frozen=True, slots=True)
class Latency:
    what: str
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    per_second: float
    worker_cpu_ms_per_op: float
    client_cpu_ms_per_op: float


class _Cpu:
    def __init__(self, worker: psutil.Process) -> None:
        self.worker = worker
        self.me = psutil.Process()

    def now(self) -> tuple[float, float]:
        w, m = self.worker.cpu_times(), self.me.cpu_times()
        return w.user + w.system, m.user + m.system


def _figures(
    what: str, samples: list[float], elapsed: float, cpu: tuple[float, float], ops: int
) -> Latency:
    ms = [s * 1000 for s in samples]
    return Latency(
        what=what,
        n=len(ms),
        p50_ms=round(statistics.median(ms), 2),
        p99_ms=round(throughput.percentile(ms, 0.99), 2),
        max_ms=round(max(ms), 2),
        per_second=round(ops / elapsed, 1),
        worker_cpu_ms_per_op=round(1000 * cpu[0] / ops, 3),
        client_cpu_ms_per_op=round(1000 * cpu[1] / ops, 3),
    )


async def _measure(settings: Settings, cpu: _Cpu, n: int) -> list[Latency]:
    rows: list[Latency] = []
    async with Coordinator(settings, producer_name="bench") as one:
        for i in range(20):  # warm-up: connections, metadata, the shard's first batches
            await (await one.acquire_lock(f"warm-{i}", "bench", ttl=30)).release()

        samples: list[float] = []
        started, before = time.perf_counter(), cpu.now()
        for _ in range(n):
            t0 = time.perf_counter()
            lease = await one.acquire_lock("uncontended", "bench", ttl=30)
            samples.append(time.perf_counter() - t0)
            await lease.release()
        after = cpu.now()
        rows.append(
            _figures(
                "acquire, uncontended (then release)",
                samples,
                time.perf_counter() - started,
                (after[0] - before[0], after[1] - before[1]),
                2 * n,  # two requests per cycle
            )
        )

        samples = []
        started, before = time.perf_counter(), cpu.now()
        version = 0
        for _ in range(n):
            t0 = time.perf_counter()
            version = await one.update_state("bench-state", version, {"v": version})
            samples.append(time.perf_counter() - t0)
        after = cpu.now()
        rows.append(
            _figures(
                "state update -> new version",
                samples,
                time.perf_counter() - started,
                (after[0] - before[0], after[1] - before[1]),
                n,
            )
        )

    clients = [Coordinator(settings, producer_name=f"bench-{i}") for i in range(CONTENDERS)]
    await asyncio.gather(*(c.start() for c in clients))
    try:
        waits: list[float] = []
        handovers: list[float] = []
        released_at: list[float] = []
        per_client = max(1, n // CONTENDERS)

        async def contend(client: Coordinator, holder: str) -> None:
            for _ in range(per_client):
                t0 = time.perf_counter()
                lease = await client.acquire_lock("contended", holder, ttl=30, wait=600)
                granted = time.perf_counter()
                waits.append(granted - t0)
                if released_at:
                    handovers.append(granted - released_at[-1])
                released_at.append(time.perf_counter())  # requested now; decided with the grant
                await lease.release()

        started, before = time.perf_counter(), cpu.now()
        await asyncio.gather(*(contend(c, f"holder-{i}") for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - started
        after = cpu.now()
        used = (after[0] - before[0], after[1] - before[1])
        grants = per_client * CONTENDERS
        rows.append(
            _figures(
                f"acquire, {CONTENDERS} clients on one lock (wait in line included)",
                waits,
                elapsed,
                used,
                2 * grants,
            )
        )
        rows.append(
            _figures(
                "hand-over under contention: release requested -> next holder granted",
                handovers,
                elapsed,
                used,
                2 * grants,
            )
        )
    finally:
        await asyncio.gather(*(c.stop() for c in clients))
    return rows


async def run(n: int) -> list[Latency]:
    async with throughput.stack() as (settings, _embedded):
        await ensure_topics(settings)
        children = ChildProcesses(settings)
        children.spawn(
            "worker", ["worker", "--id", "bench-worker"], ready_marker=b"processors running"
        )
        try:
            await children.ready("worker")
            cpu = _Cpu(psutil.Process(children.children["worker"].pid))
            return await _measure(settings, cpu, n)
        finally:
            children.stop()


def show(rows: list[Latency]) -> None:
    width = max(len(r.what) for r in rows)
    print(
        f"{'':{width}}  {'n':>5}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  {'ops/s':>7}"
        f"  {'worker CPU ms/op':>16}  {'client CPU ms/op':>16}"
    )
    for r in rows:
        print(
            f"{r.what:{width}}  {r.n:>5}  {r.p50_ms:>7}  {r.p99_ms:>7}  {r.max_ms:>7}"
            f"  {r.per_second:>7}  {r.worker_cpu_ms_per_op:>16}  {r.client_cpu_ms_per_op:>16}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.coordination")
    parser.add_argument("-n", type=int, default=500, help="operations per measurement")
    parser.add_argument("--json", action="store_true", help="one JSON line, no table")
    args = parser.parse_args()
    rows = asyncio.run(run(args.n))
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return
    show(rows)


if __name__ == "__main__":
    main()
