"""Conclave benchmarks, one command: ``python -m bench [--runs N] [--json]``.

Measured in one run, each part on a fresh embedded stack (its own broker and PostgreSQL):

* throughput: 20,000 no-op tasks end to end (submitted -> completed and projected)
  with 72 and with 1,000 agents, against the peers measured in the same run on the
  same machine: Dramatiq and Celery on the machine's Redis, raw aiokafka
  consume-transform-produce (with and without transactions) and faust on the same
  embedded broker (:mod:`bench.peers`, :mod:`bench.throughput`);
* restart: kill -9 of the worker with 10k (and more, ``--history``) tasks of history
  behind it: time until a new task is done, records folded, the worker's memory;

* the demo: 72 agents at 100 ms simulated latency, end to end, against two
  baselines measured in the same run: the 100 ms floor, and the same 72 simulated
  agents awaited with ``asyncio.gather`` in one process (no Kafka, no witness);
* orchestration overhead per task, p50/p99: submit -> dispatched and
  output -> witnessed -> visible to readers;
* peak resident memory of the Conclave processes (worker, runtime host, demo
  process with the projector);
* the codec and the witness chain per event (CPU cost, no I/O);
* scheduling workloads (:mod:`bench.workloads`): 20,000 tasks as chains of 10 and
  with 10 % transient failures against the same number of independent tasks, and
  400 sequential steps;
* telemetry (:mod:`bench.telemetry`): throughput with tracing off, at the default
  sampling and with every task traced, as ratios; one scrape of each process's
  metrics endpoint with 20,000 tasks queued;
* locks and versioned state (:mod:`bench.coordination`): lock acquisition p50/p99
  uncontended and with 10 clients on one lock, state update -> new version p50/p99.
* agents talking to agents (:mod:`bench.messaging`): ask -> answer round trip p50/p99,
  one at a time and 20 in flight, and one-way messages per second.
* agent lifecycle at scale (:mod:`bench.lifecycle`): 1,000 and 10,000 simulated agents
  beating: worker and projector CPU per beat and per agent-second, the delay from a
  silent host's lease end to ``host.lost`` p50/p99, and a new host's start time.
* the HTTP API (:mod:`bench.api_latency`): query latency p50/p99 of the main endpoints
  under 50 concurrent clients, 20,000 tasks in the read models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import (
    api_latency,
    coordination,
    lifecycle,
    messaging,
    peers,
    telemetry,
    throughput,
    workloads,
)
from conclave.demo import DemoConfig, DemoReport, percentiles, run_demo
from conclave.devstack import EmbeddedStack
from conclave.domain import witness
from conclave.domain.events import Priority, TaskSubmitted, new_envelope
from conclave.runtime.agents import AgentContext, SimulatedAgent
from conclave.settings import Settings
from schemas.codec import default_codec

GOALS = {
    "floor_ratio": 1.5,
    "overhead_p99_ms": 20.0,
    "peak_rss_mb": 300.0,
    "tasks_per_s": 2_500.0,
    "idle_cpu_percent": 2.0,
}


async def gather_baseline(agents: int, latency_ms: float) -> float:
    """The same simulated agents, awaited together in one process: the achievable floor."""
    agent = SimulatedAgent(latency_ms=latency_ms)
    contexts = [
        AgentContext(
            agent_id=f"agent-{i:03d}",
            task_id=f"t{i}",
            attempt=1,
            input="motion",
            deliberation_id=None,
        )
        for i in range(agents)
    ]
    started = time.perf_counter()
    await asyncio.gather(*(agent(ctx) for ctx in contexts))
    return (time.perf_counter() - started) * 1000


def micro() -> dict[str, float]:
    codec = default_codec()
    envelope = new_envelope("task.submitted", tenant="bench", producer="bench")
    event = TaskSubmitted(
        task_id="task-0001",
        pool="default",
        priority=Priority.HIGH,
        input="summarise the minutes of the last session",
    )
    data = codec.encode(envelope, event)
    n = 20_000
    encode = timeit.timeit(lambda: codec.encode(envelope, event), number=n) / n * 1e6
    decode = timeit.timeit(lambda: codec.decode(data), number=n) / n * 1e6
    head = witness.ChainHead()
    entries = []
    started = time.perf_counter()
    for i in range(n):
        entry = witness.next_entry(
            head,
            subject_type="agent.output",
            subject_event_id=f"e{i}",
            subject_digest=witness.digest(data),
            recorded_at=i,
        )
        head = head.advance(entry)
        entries.append(entry)
    append = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    assert witness.first_violation(entries) is None
    verify = (time.perf_counter() - started) / n * 1e6
    return {
        "encode_us": encode,
        "decode_us": decode,
        "chain_append_us": append,
        "chain_verify_us": verify,
    }


async def run(runs: int, agents: int, latency_ms: float) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="conclave-bench-"))
    stack = EmbeddedStack(home)
    info = stack.up(kafka_port=0, pg_port=0)
    reports: list[DemoReport] = []
    baselines: list[float] = []
    try:
        settings = Settings.from_env(
            {**info.env(), "CONCLAVE_TOPIC_PREFIX": f"bench{secrets.token_hex(3)}"}
        )
        config = DemoConfig(agents=agents, latency_ms=latency_ms)
        for i in range(runs + 1):  # run 0 warms up topics, schemas and the consumer group
            report = await run_demo(settings, config, progress=False)
            baselines.append(await gather_baseline(agents, latency_ms))
            if i > 0:
                reports.append(report)
            print(
                f"run {i}{' (warm-up)' if i == 0 else ''}: {report.end_to_end_ms:.0f} ms "
                f"end to end, {report.completed}/{report.agents}",
                file=sys.stderr,
            )
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)

    def pooled(attr: str) -> dict[str, float]:
        # Per-run percentiles, then the median across runs: robust to one noisy run.
        per_run = [getattr(r, attr) for r in reports]
        return {k: round(statistics.median(p[k] for p in per_run), 2) for k in per_run[0]}

    e2e = [r.end_to_end_ms for r in reports]
    gather_ms = statistics.median(baselines[1:])
    return {
        "agents": agents,
        "latency_ms": latency_ms,
        "runs": runs,
        "end_to_end_ms": percentiles(e2e) | {"median": round(statistics.median(e2e), 1)},
        "floor_ratio": round(statistics.median(e2e) / latency_ms, 2),
        "gather_baseline_ms": round(gather_ms, 1),
        "gather_ratio": round(statistics.median(e2e) / gather_ms, 2),
        "submit_to_dispatch_ms": pooled("submit_to_dispatch_ms"),
        "output_to_witness_ms": pooled("output_to_witness_ms"),
        "witness_to_completed_ms": pooled("witness_to_completed_ms"),
        "output_to_visible_ms": pooled("output_to_visible_ms"),
        "peak_rss_mb": {k: max(r.peak_rss_mb[k] for r in reports) for k in reports[0].peak_rss_mb},
        "all_answered": all(r.completed == r.agents for r in reports),
        "chains_ok": all(r.chain_ok for r in reports),
        "micro": {k: round(v, 2) for k, v in micro().items()},
    }


def show(result: dict[str, Any]) -> None:
    console = Console()
    ratio = result["floor_ratio"]
    rows = [
        (
            "end to end, 72 agents @ 100 ms (median)",
            f"{result['end_to_end_ms']['median']:.0f} ms",
            f"{ratio:.2f}x floor, {result['gather_ratio']:.2f}x gather "
            f"({result['gather_baseline_ms']:.0f} ms)",
            f"<= {GOALS['floor_ratio']}x floor",
            ratio <= GOALS["floor_ratio"],
        ),
    ]
    for name, key in (
        ("submit -> dispatched", "submit_to_dispatch_ms"),
        ("output -> witnessed", "output_to_witness_ms"),
        ("witnessed -> completed", "witness_to_completed_ms"),
        ("output -> visible", "output_to_visible_ms"),
    ):
        v = result[key]
        rows.append(
            (
                f"overhead {name}",
                f"p50 {v['p50']:.1f} ms",
                f"p99 {v['p99']:.1f} ms",
                f"p99 < {GOALS['overhead_p99_ms']:.0f} ms",
                v["p99"] < GOALS["overhead_p99_ms"],
            )
        )
    total = result["peak_rss_mb"]["total"]
    parts = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mb"].items() if k != "total")
    rows.append(
        (
            "peak memory, Conclave processes",
            f"{total:.0f} MB",
            parts,
            f"< {GOALS['peak_rss_mb']:.0f} MB",
            total < GOALS["peak_rss_mb"],
        )
    )
    table = Table(
        "measure", "value", "detail", "goal", "met", title=f"Conclave bench ({result['runs']} runs)"
    )
    for name, value, detail, goal, met in rows:
        table.add_row(name, value, detail, goal, "[green]yes[/]" if met else "[red]no[/]")
    console.print(table)
    m = result["micro"]
    console.print(
        f"codec: encode {m['encode_us']:.1f} µs, decode {m['decode_us']:.1f} µs per event; "
        f"witness chain: append {m['chain_append_us']:.1f} µs, "
        f"verify {m['chain_verify_us']:.1f} µs per entry"
    )
    console.print(
        f"every run answered 72/72: {result['all_answered']}; "
        f"chains verified: {result['chains_ok']}"
    )


async def scale(tasks: int, agent_counts: list[int], histories: list[int]) -> dict[str, Any]:
    """Conclave's throughput and restart rows, each on a stack of its own."""
    rows: list[throughput.ThroughputFigures] = []
    restarts: list[throughput.RestartFigures] = []
    for agents in agent_counts:
        async with throughput.stack() as (settings, embedded):
            rows.append(await throughput.throughput(settings, embedded, tasks=tasks, agents=agents))
        print(f"throughput, {agents} agents: {rows[-1].per_second:,} tasks/s", file=sys.stderr)
    for history in histories:
        async with throughput.stack() as (settings, embedded):
            restarts.append(await throughput.restart(settings, embedded, history_tasks=history))
        print(f"restart after {history:,} tasks: {restarts[-1]}", file=sys.stderr)
    async with throughput.stack() as (settings, embedded):
        idle = await throughput.idle(settings, embedded)
    print(f"idle, % of a core: {idle}", file=sys.stderr)
    return {
        "idle_cpu_percent": idle,
        "throughput": [asdict(r) for r in rows],
        "restart": [asdict(r) for r in restarts],
    }


def show_scale(result: dict[str, Any], peer_rows: list[peers.PeerFigures]) -> None:
    console = Console()
    throughput.show_throughput([throughput.ThroughputFigures(**r) for r in result["throughput"]])
    by_peer = {p.peer: p for p in peer_rows if not p.skipped}
    table = Table("Conclave", "tasks/s", *[f"vs {name}" for name in by_peer], title="ratios")
    for r in result["throughput"]:
        table.add_row(
            f"{r['agents']} agents",
            f"{r['per_second']:,}",
            *[f"{r['per_second'] / p.per_second:.2f}x" for p in by_peer.values() if p.per_second],
        )
    console.print(table)
    peers.show(peer_rows)
    restart = Table(
        "history tasks",
        "kill -9 -> new task done",
        "records folded",
        "worker RSS MB",
        "broker file MB",
        title="restart",
    )
    for r in result["restart"]:
        restart.add_row(
            f"{r['history_tasks']:,}",
            f"{r['restart_to_done_s']:.1f} s",
            f"{r['recovered_records']:,}",
            f"{r['worker_rss_mb']:.0f}",
            f"{r['broker_file_mb']:.0f}",
        )
    console.print(restart)
    console.print(
        "idle, % of one core: "
        + ", ".join(f"{name} {pct:.1f}" for name, pct in result["idle_cpu_percent"].items())
        + f" (goal < {GOALS['idle_cpu_percent']:.0f} % per Conclave process)"
    )
    goal = GOALS["tasks_per_s"]
    met = all(r["per_second"] >= goal for r in result["throughput"])
    console.print(f"goal >= {goal:,.0f} tasks/s (Dramatiq's rate): {'met' if met else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput row")
    parser.add_argument(
        "--scale-agents", default="72,1000", help="agent counts of the throughput rows"
    )
    parser.add_argument(
        "--history",
        default="10000,50000",
        help="tasks of history before each restart (200000 works, but the embedded "
        "broker rewrites its whole file every ~2 s; see docs/processing.md)",
    )
    parser.add_argument(
        "--only",
        choices=[
            "demo",
            "scale",
            "workloads",
            "telemetry",
            "coordination",
            "messaging",
            "lifecycle",
            "api",
        ],
        default=None,
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if args.only in (None, "demo"):
        result["demo"] = asyncio.run(run(args.runs, args.agents, args.latency_ms))
    peer_rows: list[peers.PeerFigures] = []
    if args.only in (None, "scale"):
        result["scale"] = asyncio.run(
            scale(args.tasks, _ints(args.scale_agents), _ints(args.history))
        )
        # Blocking (they start workers of their own): outside any event loop.
        peer_rows = peers.run_all(None, args.tasks)
        result["peers"] = [asdict(p) for p in peer_rows]
    if args.only in (None, "workloads"):
        rows, steady = asyncio.run(workloads.run_all(args.tasks))
        result["workloads"] = {"rows": [asdict(w) for w in rows], "steady": asdict(steady)}
    if args.only in (None, "telemetry"):
        tracing_rows, scrapes = telemetry.run_isolated(args.tasks, queued=args.tasks)
        result["telemetry"] = {
            "tracing": [asdict(r) for r in tracing_rows],
            "scrapes": [asdict(s) for s in scrapes],
        }
    if args.only in (None, "coordination"):
        result["coordination"] = [asdict(r) for r in asyncio.run(coordination.run(500))]
    if args.only in (None, "messaging"):
        result["messaging"] = [asdict(r) for r in asyncio.run(messaging.run(500))]
    if args.only in (None, "lifecycle"):
        result["lifecycle"] = [asdict(r) for r in asyncio.run(lifecycle.run([1000, 10000]))]
    if args.only in (None, "api"):
        result["api"] = [asdict(r) for r in api_latency.bench(tasks=args.tasks)]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    show_all(result, peer_rows, args.tasks)


def show_all(result: dict[str, Any], peer_rows: list[peers.PeerFigures], tasks: int) -> None:
    """Every part measured, as tables."""
    if "demo" in result:
        show(result["demo"])
    if "scale" in result:
        show_scale(result["scale"], peer_rows)
    if "workloads" in result:
        workloads.show(
            [workloads.WorkloadFigures(**w) for w in result["workloads"]["rows"]],
            workloads.SteadyFigures(**result["workloads"]["steady"]),
        )
    if "telemetry" in result:
        telemetry.show(
            [telemetry.TracingFigures(**r) for r in result["telemetry"]["tracing"]],
            [telemetry.ScrapeFigures(**s) for s in result["telemetry"]["scrapes"]],
        )
    if "coordination" in result:
        coordination.show([coordination.Latency(**r) for r in result["coordination"]])
    if "messaging" in result:
        messaging.show([messaging.Figures(**r) for r in result["messaging"]])
    if "lifecycle" in result:
        lifecycle.show([lifecycle.Figures(**r) for r in result["lifecycle"]])
    if "api" in result:
        rows = [api_latency.Row(**r) for r in result["api"]]
        Console().print(api_latency.table(rows, clients=50, tasks=tasks))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()
