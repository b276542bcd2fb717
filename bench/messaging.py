"""Agents talking to agents end to end: ``python -m bench.messaging``.

A fresh embedded stack; no stream processor is involved (messages go from the sender's
producer to the recipient host's inbox and back). Host B is a ``conclave runtime`` child
process with simulated agents, whose ``on_message`` answers an ask at once. Host A runs
here, as a :class:`~conclave.runtime.host.RuntimeHost`; its agent asks with the same call
an agent's ``ctx.ask`` makes. Measured:

* **round trip, one at a time**: A's agent asks B's agent, N times in sequence: the time
  from the call to the answer (write, B's fetch, B's handler, the answer's write, A's
  fetch), p50/p99;
* **round trip, 20 in flight**: 20 of A's asks outstanding at once (4 agents of B);
* **one way**: A tells N messages (sent in groups of 200, each group awaited once) to
  host C (here too, a counting handler): messages/s from the first send to the last
  delivery, and each message's send -> delivery latency.

CPU is process time of host B (the child) and of this process (host A, and host C in the
one-way run), per message. The machine is shared: figures are as loaded as it was.
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
from conclave.domain.events import AgentMessage
from conclave.runtime.agents import AgentContext, SimulatedAgent
from conclave.runtime.host import HostConfig, RuntimeHost
from conclave.settings import Settings

IN_FLIGHT = 20
GROUP = 200


@dataclass(frozen=True, slots=True)
class Figures:
    what: str
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    per_second: float
    host_b_cpu_ms_per_msg: float
    here_cpu_ms_per_msg: float


class _Cpu:
    def __init__(self, child: psutil.Process) -> None:
        self.child = child
        self.me = psutil.Process()

    def now(self) -> tuple[float, float]:
        c, m = self.child.cpu_times(), self.me.cpu_times()
        return c.user + c.system, m.user + m.system


def _figures(
    what: str, samples: list[float], elapsed: float, cpu: tuple[float, float], n: int
) -> Figures:
    ms = [s * 1000 for s in samples]
    return Figures(
        what=what,
        n=len(ms),
        p50_ms=round(statistics.median(ms), 2),
        p99_ms=round(throughput.percentile(ms, 0.99), 2),
        max_ms=round(max(ms), 2),
        per_second=round(n / elapsed, 1),
        host_b_cpu_ms_per_msg=round(1000 * cpu[0] / n, 3),
        here_cpu_ms_per_msg=round(1000 * cpu[1] / n, 3),
    )


class _Counter:
    """Host C's handler: when each message arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.all_in = asyncio.Event()
        self.expected = 0

    async def __call__(self, ctx: AgentContext) -> str:
        return "unused"

    async def on_message(self, ctx: AgentContext, message: AgentMessage) -> str | None:
        self.arrived[message.payload] = time.perf_counter()
        if len(self.arrived) >= self.expected:
            self.all_in.set()
        return None


async def _measure(settings: Settings, cpu: _Cpu, n: int) -> list[Figures]:
    rows: list[Figures] = []
    a = RuntimeHost(settings, HostConfig(pool="bench-a", agent_ids=["a-000"]), SimulatedAgent())
    counter = _Counter()
    c = RuntimeHost(settings, HostConfig(pool="bench-c", agent_ids=["c-000"]), counter)
    await a.start()
    await c.start()
    try:
        messenger = a.messenger
        for i in range(50):  # warm-up: connections, metadata, the directory
            await messenger.ask(f"b-{i % 4:03d}", "warm-up", timeout=10, sender="a-000")

        samples: list[float] = []
        started, before = time.perf_counter(), cpu.now()
        for i in range(n):
            t0 = time.perf_counter()
            await messenger.ask(f"b-{i % 4:03d}", f"q{i}", timeout=10, sender="a-000")
            samples.append(time.perf_counter() - t0)
        elapsed, after = time.perf_counter() - started, cpu.now()
        used = (after[0] - before[0], after[1] - before[1])
        rows.append(_figures("ask -> answer, one at a time", samples, elapsed, used, n))

        samples = []
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            async with gate:
                t0 = time.perf_counter()
                await messenger.ask(f"b-{i % 4:03d}", f"p{i}", timeout=10, sender="a-000")
                samples.append(time.perf_counter() - t0)

        started, before = time.perf_counter(), cpu.now()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed, after = time.perf_counter() - started, cpu.now()
        used = (after[0] - before[0], after[1] - before[1])
        rows.append(_figures(f"ask -> answer, {IN_FLIGHT} in flight", samples, elapsed, used, n))

        one_way = 10 * n
        counter.expected = one_way
        sent: dict[str, float] = {}
        started, before = time.perf_counter(), cpu.now()
        for first in range(0, one_way, GROUP):
            group = [str(i) for i in range(first, min(one_way, first + GROUP))]
            for key in group:
                sent[key] = time.perf_counter()
            await asyncio.gather(*(messenger.tell("c-000", k, sender="a-000") for k in group))
        async with asyncio.timeout(120):
            await counter.all_in.wait()
        elapsed, after = time.perf_counter() - started, cpu.now()
        used = (after[0] - before[0], after[1] - before[1])
        latencies = [counter.arrived[k] - t for k, t in sent.items()]
        rows.append(
            _figures("tell, one way (send -> delivered)", latencies, elapsed, used, one_way)
        )
    finally:
        await a.stop()
        await c.stop()
    return rows


async def run(n: int) -> list[Figures]:
    async with throughput.stack() as (settings, _embedded):
        await ensure_topics(settings)
        children = ChildProcesses(settings)
        children.spawn(
            "runtime-b",
            [
                "runtime",
                "--host-id",
                "bench-host-b",
                "--pool",
                "bench-b",
                "--agents",
                "4",
                "--prefix",
                "b",
                "--latency-ms",
                "0",
            ],
            ready_marker=b"running",
        )
        try:
            await children.ready("runtime-b")
            cpu = _Cpu(psutil.Process(children.children["runtime-b"].pid))
            return await _measure(settings, cpu, n)
        finally:
            children.stop()


def show(rows: list[Figures]) -> None:
    width = max(len(r.what) for r in rows)
    print(
        f"{'':{width}}  {'n':>5}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  {'msg/s':>7}"
        f"  {'host B CPU ms/msg':>17}  {'here CPU ms/msg':>15}"
    )
    for r in rows:
        print(
            f"{r.what:{width}}  {r.n:>5}  {r.p50_ms:>7}  {r.p99_ms:>7}  {r.max_ms:>7}"
            f"  {r.per_second:>7}  {r.host_b_cpu_ms_per_msg:>17}  {r.here_cpu_ms_per_msg:>15}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.messaging")
    parser.add_argument("-n", type=int, default=500, help="asks per measurement (tells: 10x)")
    parser.add_argument("--json", action="store_true", help="one JSON line, no table")
    args = parser.parse_args()
    rows = asyncio.run(run(args.n))
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return
    show(rows)


if __name__ == "__main__":
    main()
