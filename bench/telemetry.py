"""What observing Conclave costs: throughput with tracing off, at the default sampling and
with every task traced (in one run, as ratios), and the cost of one scrape of each
process's metrics endpoint with many tasks queued.

Traced runs export their spans over OTLP/HTTP, as in production, to a sink in this
process that reads and drops them (the collector's work is not Conclave's). Whether a
task is traced is decided where it is submitted (this process); the processes follow. Whether a
task is traced is decided where it is submitted (this process); the processes follow.

``python -m bench.telemetry [--tasks N]``; also part of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from rich.console import Console
from rich.table import Table

from bench import throughput
from conclave.client import Client
from conclave.devstack import EmbeddedStack
from conclave.processes import alive
from conclave.settings import Settings

__all__ = ["ScrapeFigures", "TracingFigures", "run", "show"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingFigures:
    mode: str
    sample_ratio: float
    per_second: float
    ratio_to_off: float
    exported_kb: float
    """OTLP bytes the processes sent to the sink during the run."""
    cpu_ms_per_task: dict[str, float]
    """CPU each process spent per task (where the cost lands)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScrapeFigures:
    process: str
    queued: int
    """Tasks queued in the scheduler while scraped."""
    median_ms: float
    p99_ms: float
    kb: float


class _Sink:
    """An OTLP/HTTP endpoint that accepts and drops what it is sent (counting bytes)."""

    def __init__(self) -> None:
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", 0))
                self.rfile.read(size)
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def _sink() -> Iterator[_Sink]:
    sink = _Sink()
    try:
        yield sink
    finally:
        sink.close()


MODES = (("off", 0.0), ("default", 0.1), ("every task", 1.0))


class _Ratio(Sampler):
    """The sampler of this process's submissions: whether a task is traced is decided
    where it is submitted (downstream, every process follows the parent), so each mode
    sets its ratio here."""

    def __init__(self) -> None:
        self.ratio = TraceIdRatioBased(0.0)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return self.ratio.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "bench"


async def run(
    tasks: int = 20_000, queued: int = 20_000
) -> tuple[list[TracingFigures], list[ScrapeFigures]]:
    rows: list[TracingFigures] = []
    with _sink() as sink:
        sampler = _Ratio()
        provider = TracerProvider(sampler=ParentBased(sampler))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{sink.endpoint}/v1/traces"))
        )
        trace.set_tracer_provider(provider)  # conclave.tracing keeps an application's own
        for mode, ratio in MODES:
            sampler.ratio = TraceIdRatioBased(ratio)
            async with throughput.stack() as (settings, embedded):
                before = sink.bytes
                env = {
                    "CONCLAVE_TRACE_SAMPLE_RATIO": str(ratio),
                    "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                }
                figures = await throughput.throughput(
                    settings, embedded, tasks=tasks, agents=72, extra_env=env
                )
            off = rows[0].per_second if rows else figures.per_second
            rows.append(
                TracingFigures(
                    mode=mode,
                    sample_ratio=ratio,
                    per_second=figures.per_second,
                    ratio_to_off=round(figures.per_second / off, 2),
                    exported_kb=round((sink.bytes - before) / 1024, 1),
                    cpu_ms_per_task={
                        name: round(1000 * cpu / tasks, 3)
                        for name, cpu in figures.cpu_seconds.items()
                    },
                )
            )
        provider.shutdown()  # this process's last spans, while the sink still listens
    async with throughput.stack() as (settings, embedded):
        scrapes = await scrape_cost(settings, embedded, queued)
    return rows, scrapes


async def scrape_cost(
    settings: Settings, embedded: EmbeddedStack, queued: int
) -> list[ScrapeFigures]:
    """Halt, queue ``queued`` tasks, then time 30 scrapes of every process's endpoint."""
    system = throughput._System(settings, agents=72, hosts=1)
    await system.start()
    try:
        async with Client(system.settings, producer_name="bench") as client:
            await client.halt("measuring scrapes", operator="bench")
            await client.submit_many([f"queued {i}" for i in range(queued)], pool=throughput.POOL)
        ports = {p.kind: p.metrics_port for p in alive(system.settings.home) if p.metrics_port}

        def depth() -> float:
            text = _get(ports["worker"])
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("conclave_queue_depth{")
            )

        deadline = time.monotonic() + 120
        while await asyncio.to_thread(depth) < queued:
            if time.monotonic() > deadline:
                raise TimeoutError("the tasks were not all queued")
            await asyncio.sleep(0.5)
        rows = []
        for kind, port in sorted(ports.items()):
            times, size = [], 0
            for _ in range(30):
                started = time.perf_counter()
                size = len(await asyncio.to_thread(_get, port))
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            rows.append(
                ScrapeFigures(
                    process=kind,
                    queued=queued,
                    median_ms=round(statistics.median(times), 2),
                    p99_ms=round(times[int(len(times) * 0.99) - 1], 2),
                    kb=round(size / 1024, 1),
                )
            )
        return rows
    finally:
        system.stop()


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
        text: str = page.read().decode()
        return text


def show(rows: list[TracingFigures], scrapes: list[ScrapeFigures]) -> None:
    console = Console()
    table = Table(
        "tracing",
        "sampled",
        "tasks/s",
        "vs off",
        "OTLP exported",
        "CPU ms per task",
        title="Tracing cost",
    )
    for r in rows:
        table.add_row(
            r.mode,
            f"{r.sample_ratio:.0%}",
            f"{r.per_second:,.0f}",
            f"{r.ratio_to_off:.2f}x",
            f"{r.exported_kb:,.0f} KB",
            ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_ms_per_task.items()),
        )
    console.print(table)
    table = Table("process", "tasks queued", "scrape median", "p99", "size", title="One scrape")
    for s in scrapes:
        table.add_row(
            s.process, f"{s.queued:,}", f"{s.median_ms} ms", f"{s.p99_ms} ms", f"{s.kb} KB"
        )
    console.print(table)


def run_isolated(tasks: int, queued: int) -> tuple[list[TracingFigures], list[ScrapeFigures]]:
    """:func:`run` in a process of its own: the sampling of submissions is this module's
    to set, and a process that already traced something has its provider for good."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.telemetry",
            "--tasks",
            str(tasks),
            "--queued",
            str(queued),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return (
        [TracingFigures(**r) for r in data["tracing"]],
        [ScrapeFigures(**s) for s in data["scrapes"]],
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--queued", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="one JSON line, no tables")
    args = parser.parse_args()
    rows, scrapes = asyncio.run(run(args.tasks, args.queued))
    figures = {"tracing": [asdict(r) for r in rows], "scrapes": [asdict(s) for s in scrapes]}
    if args.json:
        print(json.dumps(figures))
        return
    show(rows, scrapes)
    print(figures)


if __name__ == "__main__":
    main()
