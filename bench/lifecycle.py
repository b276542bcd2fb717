"""Agent lifecycle at scale: ``python -m bench.lifecycle [--agents 1000 10000]``.

For each fleet size, a fresh embedded stack with ``conclave worker`` (the scheduler, which
judges hosts' leases) and ``conclave projector`` as child processes. The agents are
simulated here, 100 to a host: each host registers its agents, then beats every second
exactly as a runtime host does (one ``host.beat`` naming its agents and what they run, on
its pool's partition of the agents topic), with the default lease
(``CONCLAVE_HOST_LEASE_S``, 5 s). Measured:

* **steady state**, 15 s: CPU of the worker and of the projector per host beat and per
  agent-second (what one agent's liveness costs each second), above what each uses with
  nothing to do (measured first, 10 s, and shown);
* **detection**: 10 hosts stop beating, one every 100 ms (as if killed with -9): the delay
  from the end of each one's lease (its last beat's promise) to the scheduler's
  ``host.lost`` (the event's time), p50/p99/max; the goal is p99 < 2 s;
* **agent start**: a ``conclave runtime`` child process with 100 agents, from spawn to
  running (its agents registered), then to its first answer (a task aimed at one of its
  agents, completed in the read models); the goal is < 2 s;
* **autoscaling**: a ``conclave runtime`` of 1 agent, up to 20 (``--max-agents 20
  --idle-retire-s 3``, 500 ms per task), gets a burst of 200 tasks: the time from the
  first submission until its 20 agents are registered, until the burst is done (one
  agent alone would take 100 s), and from then until it is back to 1 agent;
* **kill -9 of a host**: two runtime hosts of 4 agents each take 40 tasks; one (a minute
  per task) is killed with -9 while its 4 agents are busy: the time until those 4 tasks
  are completed on the other (100 ms per task): its lease, 5 s, then a retry there.

The machine is shared: figures are as loaded as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

import psutil

from bench import throughput
from conclave.bus import EventProducer, ensure_topics, read_history, topics_for
from conclave.children import ChildProcesses
from conclave.client import Client
from conclave.domain.events import AgentRegistered, HostBeat, HostLost, now_us
from conclave.settings import Settings
from conclave.topics import pool_partition
from projections.database import connect
from schemas.codec import default_codec

POOL = "bench"
PER_HOST = 100
STEADY_S = 15.0
IDLE_S = 10.0
COLD_AFTER_S = 12.0
KILLED = 10


@dataclass(frozen=True, slots=True)
class Figures:
    agents: int
    hosts: int
    beats_per_s: float
    worker_idle_percent: float
    projector_idle_percent: float
    worker_cpu_us_per_beat: float
    worker_cpu_us_per_agent_s: float
    projector_cpu_us_per_beat: float
    projector_cpu_us_per_agent_s: float
    lease_s: float
    detected_p50_ms: float
    detected_p99_ms: float
    detected_max_ms: float
    start_to_running_s: float
    start_to_first_answer_s: float
    kill_to_done_s: float
    """From ``kill -9`` of a runtime host to the last of its running tasks completed on
    another host."""
    scale_grown_s: float
    """From a burst's first submission to a 1-agent host grown to its 20."""
    scale_burst_s: float
    """From the first submission to the burst's last task completed."""
    scale_shrunk_s: float
    """From the burst done to the host back to 1 agent (idle timeout 3 s)."""


class _Fleet:
    """Simulated hosts: registrations and one beat per host per second."""

    def __init__(self, settings: Settings, agents: int) -> None:
        self.settings = settings
        self.topics = topics_for(settings)
        self.producer = EventProducer(settings, producer="bench-lifecycle")
        self.hosts = {
            f"h{h:04d}": [f"h{h:04d}-a{a:03d}" for a in range(PER_HOST)]
            for h in range(max(1, agents // PER_HOST))
        }
        self.silent: set[str] = set()
        self.last_promise: dict[str, int] = {}
        self.beats = 0
        self.partition = 0

    async def start(self) -> None:
        await self.producer.start()
        self.partition = pool_partition(POOL, await self.producer.partitions(self.topics.agents))
        for host_id, agent_ids in self.hosts.items():
            await self.producer.send_all(
                self.producer.encode(
                    self.topics.agents,
                    self.partition,
                    agent_id,
                    AgentRegistered(
                        agent_id=agent_id, pool=POOL, host_id=host_id, agent_ref="simulated"
                    ),
                )[1]
                for agent_id in agent_ids
            )

    async def beat(self) -> None:
        lease_us = int(self.settings.host_lease_s * 1_000_000)
        records = []
        for host_id, agent_ids in self.hosts.items():
            if host_id in self.silent:
                continue
            promise = now_us() + lease_us
            self.last_promise[host_id] = promise
            beat = HostBeat(
                host_id=host_id,
                pool=POOL,
                agent_ids=agent_ids,
                expires_at=promise,
                rss_bytes=100 << 20,
                cpu_percent=1.0,
            )
            records.append(
                self.producer.encode(self.topics.agents, self.partition, host_id, beat)[1]
            )
        await self.producer.send_all(records)
        self.beats += len(records)

    async def beat_forever(self) -> None:
        while True:
            started = time.monotonic()
            await self.beat()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def _lost_hosts(settings: Settings, hosts: set[str]) -> dict[str, int]:
    """``host.lost`` of each of ``hosts``, with its time (µs), from the tasks topic."""
    codec = default_codec()
    found: dict[str, int] = {}
    async for message in read_history(settings, [topics_for(settings).tasks]):
        if message.key is None or message.key.decode() not in hosts or message.value is None:
            continue
        envelope, event = codec.decode(message.value)
        if isinstance(event, HostLost) and event.host_id not in found:
            found[event.host_id] = envelope.occurred_at
    return found


async def _agent_start(settings: Settings, children: ChildProcesses) -> tuple[float, float]:
    """Seconds from spawning a 100-agent runtime to running, and to its first answer."""
    started = time.perf_counter()
    children.spawn(
        "runtime-start",
        [
            "runtime",
            "--host-id",
            "bench-start",
            "--pool",
            "bench-start",
            "--agents",
            str(PER_HOST),
            "--prefix",
            "start",
            "--latency-ms",
            "0",
        ],
        ready_marker=b"running",
    )
    async with Client(settings, producer_name="bench-start") as client:
        await children.ready("runtime-start")
        running = time.perf_counter() - started
        task_id = await client.submit("hello", pool="bench-start", agent_id="start-000")
    db = await connect(settings)
    try:
        query = "SELECT status FROM tasks WHERE task_id = $1"
        for _ in range(6000):  # a minute at most
            if await db.fetchval(query, task_id) == "completed":
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError(f"the new host did not answer {task_id} within a minute")
    finally:
        await db.close()
    return running, time.perf_counter() - started


async def _runtime(children: ChildProcesses, name: str, prefix: str, latency_ms: int) -> None:
    children.spawn(
        name,
        ["runtime", "--host-id", name, "--pool", "bench-kill", "--agents", "4",
         "--prefix", prefix, "--latency-ms", str(latency_ms)],
        ready_marker=b"running",
    )  # fmt: skip
    await children.ready(name)


async def _kill_to_done(settings: Settings, children: ChildProcesses) -> float:
    """Seconds from ``kill -9`` of one of two runtime hosts of 4 agents, whose agents take
    a minute per task (so that they surely run when it dies), to the last task it was
    running completed on the other (100 ms per task)."""
    await _runtime(children, "bench-kill-a", "ka", 60_000)
    await _runtime(children, "bench-kill-b", "kb", 100)
    db = await connect(settings)
    try:
        async with Client(settings, producer_name="bench-kill") as client:
            for i in range(40):
                await client.submit(f"work {i}", pool="bench-kill", max_attempts=3)
        query = """SELECT task_id FROM tasks WHERE pool = 'bench-kill'
                   AND status = 'dispatched' AND agent_id LIKE 'ka-%'"""
        for _ in range(3000):
            if len(running := [r["task_id"] for r in await db.fetch(query)]) == 4:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("host a never ran 4 tasks at once")
        killed = time.perf_counter()
        children.kill("bench-kill-a")
        done = "SELECT count(*) FROM tasks WHERE task_id = ANY($1) AND status = 'completed'"
        for _ in range(6000):
            if await db.fetchval(done, running) == len(running):
                return time.perf_counter() - killed
            await asyncio.sleep(0.01)
        raise RuntimeError("the killed host's tasks were not done elsewhere within a minute")
    finally:
        await db.close()


SCALE_MAX, SCALE_BURST, SCALE_IDLE_S = 20, 200, 3


async def _autoscale(settings: Settings, children: ChildProcesses) -> tuple[float, float, float]:
    """Seconds from a burst's first submission to the host grown to its maximum, to the
    burst done, and from then to the host back to its one agent."""
    children.spawn(
        "runtime-scale",
        ["runtime", "--host-id", "bench-scale", "--pool", "bench-scale", "--agents", "1",
         "--max-agents", str(SCALE_MAX), "--idle-retire-s", str(SCALE_IDLE_S),
         "--prefix", "scale", "--latency-ms", "500"],
        ready_marker=b"running",
    )  # fmt: skip
    await children.ready("runtime-scale")
    await asyncio.sleep(2.0)  # its first beat folded: the pool has a live host
    running = """SELECT count(*) FROM agents WHERE pool = 'bench-scale'
                 AND registered_at IS NOT NULL AND retired_reason IS NULL"""
    done = "SELECT count(*) FROM tasks WHERE pool = 'bench-scale' AND status = 'completed'"
    db = await connect(settings)
    try:
        started = time.perf_counter()
        async with Client(settings, producer_name="bench-scale") as client:
            for i in range(SCALE_BURST):
                await client.submit(f"burst {i}", pool="bench-scale")
        grown = burst = None
        for _ in range(12000):  # two minutes at most
            if grown is None and await db.fetchval(running) >= SCALE_MAX:
                grown = time.perf_counter() - started
            if await db.fetchval(done) == SCALE_BURST:
                burst = time.perf_counter() - started
                break
            await asyncio.sleep(0.01)
        if grown is None or burst is None:
            raise RuntimeError(f"the burst was not done (grown after {grown} s)")
        for _ in range(6000):
            if await db.fetchval(running) == 1:
                return grown, burst, time.perf_counter() - started - burst
            await asyncio.sleep(0.01)
        raise RuntimeError("the host did not shrink back to 1 agent within a minute")
    finally:
        await db.close()


async def measure(agents: int) -> Figures:
    async with throughput.stack() as (settings, _embedded):
        await ensure_topics(settings)
        children = ChildProcesses(settings)
        children.spawn(
            "worker", ["worker", "--id", "bench-worker"], ready_marker=b"processors running"
        )
        children.spawn("projector", ["projector"], ready_marker=b"projector running")
        fleet = _Fleet(settings, agents)
        try:
            await children.ready("worker")
            await children.ready("projector")
            worker = psutil.Process(children.children["worker"].pid)
            projector = psutil.Process(children.children["projector"].pid)
            # What each costs with nothing to do: subtracted, to leave the beats' share.
            # Measured once the fetchers are in their cold tier (10 s without a task's
            # record, conclave/fetching.py), as they are while only beats arrive.
            await asyncio.sleep(COLD_AFTER_S)
            idle_w, idle_p, started = (
                throughput.cpu_seconds(worker),
                throughput.cpu_seconds(projector),
                time.monotonic(),
            )
            await asyncio.sleep(IDLE_S)
            idle_s = time.monotonic() - started
            idle_w, idle_p = (
                (throughput.cpu_seconds(worker) - idle_w) / idle_s,
                (throughput.cpu_seconds(projector) - idle_p) / idle_s,
            )
            await fleet.start()
            beating = asyncio.create_task(fleet.beat_forever())
            await asyncio.sleep(8.0)  # registrations folded, leases established
            beats, cpu_w, cpu_p = (
                fleet.beats,
                throughput.cpu_seconds(worker),
                throughput.cpu_seconds(projector),
            )
            started = time.monotonic()
            await asyncio.sleep(STEADY_S)
            elapsed = time.monotonic() - started
            beats = fleet.beats - beats
            cpu_w = throughput.cpu_seconds(worker) - cpu_w - idle_w * elapsed
            cpu_p = throughput.cpu_seconds(projector) - cpu_p - idle_p * elapsed
            agent_s = agents * elapsed

            killed = sorted(fleet.hosts)[:KILLED]
            for host_id in killed:
                fleet.silent.add(host_id)
                await asyncio.sleep(0.1)
            await asyncio.sleep(settings.host_lease_s + 6.0)
            lost = await _lost_hosts(settings, set(killed))
            delays = [
                (lost[h] - fleet.last_promise[h]) / 1000 if h in lost else float("inf")
                for h in killed
            ]
            running_s, answer_s = await _agent_start(settings, children)
            kill_s = await _kill_to_done(settings, children)  # the others beating on
            grown_s, burst_s, shrunk_s = await _autoscale(settings, children)
            beating.cancel()
        finally:
            await fleet.producer.stop()
            children.stop()
    return Figures(
        agents=agents,
        hosts=len(fleet.hosts),
        beats_per_s=round(beats / elapsed, 1),
        worker_idle_percent=round(idle_w * 100, 1),
        projector_idle_percent=round(idle_p * 100, 1),
        worker_cpu_us_per_beat=round(cpu_w / beats * 1e6, 1),
        worker_cpu_us_per_agent_s=round(cpu_w / agent_s * 1e6, 2),
        projector_cpu_us_per_beat=round(cpu_p / beats * 1e6, 1),
        projector_cpu_us_per_agent_s=round(cpu_p / agent_s * 1e6, 2),
        lease_s=settings.host_lease_s,
        detected_p50_ms=round(throughput.percentile(delays, 0.5), 1),
        detected_p99_ms=round(throughput.percentile(delays, 0.99), 1),
        detected_max_ms=round(max(delays), 1),
        start_to_running_s=round(running_s, 2),
        start_to_first_answer_s=round(answer_s, 2),
        kill_to_done_s=round(kill_s, 2),
        scale_grown_s=round(grown_s, 2),
        scale_burst_s=round(burst_s, 2),
        scale_shrunk_s=round(shrunk_s, 2),
    )


def show(rows: list[Figures]) -> None:
    print(
        f"{'agents':>6} {'hosts':>5} {'beats/s':>7}  {'idle % w/p':>10}"
        f"  {'worker µs/beat':>14} {'µs/agent·s':>10}"
        f"  {'projector µs/beat':>17} {'µs/agent·s':>10}  {'lost after lease p50/p99/max ms':>31}"
        f"  {'start: running / answered s':>27}  {'kill -9 -> done elsewhere s':>27}"
        f"  {'autoscale 1->20: grown / burst done / back to 1 s':>49}"
    )
    for r in rows:
        detected = f"{r.detected_p50_ms:g} / {r.detected_p99_ms:g} / {r.detected_max_ms:g}"
        start = f"{r.start_to_running_s:g} / {r.start_to_first_answer_s:g}"
        print(
            f"{r.agents:>6} {r.hosts:>5} {r.beats_per_s:>7}"
            f"  {f'{r.worker_idle_percent:g}/{r.projector_idle_percent:g}':>10}"
            f"  {r.worker_cpu_us_per_beat:>14}"
            f" {r.worker_cpu_us_per_agent_s:>10}  {r.projector_cpu_us_per_beat:>17}"
            f" {r.projector_cpu_us_per_agent_s:>10}  {detected:>31}  {start:>27}"
            f"  {r.kill_to_done_s:>27}"
            f"  {f'{r.scale_grown_s:g} / {r.scale_burst_s:g} / {r.scale_shrunk_s:g}':>49}"
        )
    print(
        f"(lease {rows[0].lease_s:g} s; goals: detection p99 < 2,000 ms, start < 2 s; "
        f"autoscale: {SCALE_BURST} tasks of 500 ms, idle timeout {SCALE_IDLE_S} s, "
        f"one agent alone: {SCALE_BURST * 0.5:g} s)"
    )


async def run(sizes: list[int]) -> list[Figures]:
    return [await measure(n) for n in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle")
    parser.add_argument(
        "--agents", type=int, nargs="+", default=[1000, 10000], help="fleet sizes (100 per host)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line, no table")
    args = parser.parse_args()
    rows = asyncio.run(run(args.agents))
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return
    show(rows)


if __name__ == "__main__":
    main()
