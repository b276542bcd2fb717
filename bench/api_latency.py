"""Query latency of the HTTP API under concurrent readers: ``python -m bench.api_latency``.

Starts its own embedded stack (broker and PostgreSQL in a temporary directory), fills
the read models directly (``COPY``: what the projector would have written) with
``--tasks`` tasks of the benchmark's tenant in 8 pools, every status and priority, a
quarter as many of another tenant's, 72 agents and a witness log, and serves the API
from ``conclave api`` in a process of its own. Then, per endpoint, ``--clients``
concurrent clients (httpx, one connection each) send ``--requests`` requests in all and
each answer's time is taken from request to last byte:

* ``GET /v1/tasks`` with a status and pool filter, 50 a page; and its second page (the
  ``cursor`` of the first);
* ``GET /v1/tasks/{id}`` of random tasks;
* ``GET /v1/pools``, ``GET /v1/agents``, ``GET /v1/status``.

Printed: p50 and p99 per endpoint, requests/s, and the CPU time per request of the API
process, of PostgreSQL and of the clients themselves (which depends less on the
machine's other load than the times do; on 2 cores, the three share them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from rich.console import Console
from rich.table import Table

from conclave.api.tokens import create_token
from conclave.devstack import EmbeddedStack, StackInfo
from conclave.domain.events import now_us
from conclave.settings import Settings
from projections.database import connect, migrate

TENANT = "bench"
OTHER = "bench-other"
POOLS = 8
AGENTS = 72
STATUSES = ["completed"] * 14 + ["queued", "dispatched", "retrying", "dead_lettered"]
PRIORITIES = ["critical", "high", "normal", "normal", "low"]

err = Console(stderr=True, highlight=False)


@dataclass(frozen=True)
class Row:
    endpoint: str
    requests: int
    p50_ms: float
    p99_ms: float
    per_s: float
    server_cpu_ms: float
    """The API process's CPU time per request."""
    client_cpu_ms: float
    """This (the clients') process's CPU time per request: httpx is not free either."""
    db_cpu_ms: float
    """PostgreSQL's processes' CPU time per request."""


def _task_rows(tenant: str, count: int, start_us: int) -> list[tuple[Any, ...]]:
    rng = random.Random(tenant)
    rows = []
    for i in range(count):
        status = rng.choice(STATUSES)
        queued = start_us + i * 1_000
        finished = queued + 50_000 if status in ("completed", "dead_lettered") else None
        agent = f"agent-{rng.randrange(AGENTS):03d}" if status != "queued" else None
        rows.append(
            (
                f"{tenant}-task-{i:06d}",
                tenant,
                f"corr-{i}",
                f"pool-{i % POOLS}",
                rng.choice(PRIORITIES),
                status,
                f"question {i}",
                agent,
                1 if agent else 0,
                3,
                "boom" if status in ("retrying", "dead_lettered") else None,
                queued,
                queued + 1_000 if agent else None,
                finished,
            )
        )
    return rows


TASK_COLUMNS = [
    "task_id",
    "tenant",
    "correlation_id",
    "pool",
    "priority",
    "status",
    "input",
    "agent_id",
    "attempt",
    "max_attempts",
    "error",
    "queued_at",
    "dispatched_at",
    "finished_at",
]


async def fill(db: asyncpg.Pool, tasks: int) -> list[str]:
    """The read models: ``tasks`` of the tenant's, a quarter as many of another's, the
    agents and a witness log. Returns the tenant's task ids."""
    start = now_us() - 3_600_000_000
    mine = _task_rows(TENANT, tasks, start)
    async with db.acquire() as conn:
        await conn.copy_records_to_table("tasks", records=mine, columns=TASK_COLUMNS)
        await conn.copy_records_to_table(
            "tasks", records=_task_rows(OTHER, tasks // 4, start), columns=TASK_COLUMNS
        )
        now = now_us()
        await conn.copy_records_to_table(
            "agents",
            records=[
                (f"agent-{i:03d}", f"pool-{i % POOLS}", "host-0", now - 3_600_000_000, now)
                for i in range(AGENTS)
            ],
            columns=["agent_id", "pool", "host_id", "registered_at", "last_heartbeat_at"],
        )
        await conn.copy_records_to_table(
            "witness_entries",
            records=[
                (s, b"\0" * 32, secrets.token_bytes(32), "output", f"e{s}", b"\0" * 32, now, "")
                for s in range(1, tasks + 1)
            ],
            columns=[
                "sequence",
                "previous_hash",
                "entry_hash",
                "subject_type",
                "subject_event_id",
                "subject_digest",
                "recorded_at",
                "detail",
            ],
        )
        await conn.execute("ANALYZE")
    return [r[0] for r in mine]


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    api = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "api", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert api.stderr is not None
    lines: list[str] = []
    while len(lines) < 50:
        lines.append(api.stderr.readline())
        match = re.search(r"API serving on (http://\S+)", lines[-1])
        if match:
            return api, match[1]
        if api.poll() is not None:
            break
    api.kill()
    raise SystemExit("the API did not start:\n" + "".join(lines))


def _postgres(home: Path) -> list[psutil.Process]:
    """The stack's PostgreSQL server and its backends now (the API's pool keeps its
    connections open, so its backends stay the same during a measurement)."""
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline and "postgres" in cmdline[0] and any(str(home) in c for c in cmdline):
            return [p, *p.children(recursive=True)]
    return []


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def measure(
    http: httpx.AsyncClient,
    api: psutil.Process,
    home: Path,
    endpoint: str,
    path: Callable[[random.Random], str],
    clients: int,
    requests: int,
) -> Row:
    """``requests`` GETs of ``path()`` from ``clients`` concurrent clients."""
    times: list[float] = []
    per_client = max(1, requests // clients)

    async def client(n: int) -> None:
        rng = random.Random(n)
        for _ in range(per_client):
            started = time.perf_counter()
            answer = await http.get(path(rng))
            times.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise SystemExit(f"{endpoint}: HTTP {answer.status_code}: {answer.text[:200]}")

    postgres = _postgres(home)
    db_cpu = _cpu(postgres)
    cpu = api.cpu_times()
    own = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    after = api.cpu_times()
    own = time.process_time() - own
    db_cpu = _cpu(postgres) - db_cpu
    used = (after.user + after.system) - (cpu.user + cpu.system)
    times.sort()
    return Row(
        endpoint=endpoint,
        requests=len(times),
        p50_ms=statistics.median(times) * 1000,
        p99_ms=times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
        per_s=len(times) / elapsed,
        server_cpu_ms=used / len(times) * 1000,
        client_cpu_ms=own / len(times) * 1000,
        db_cpu_ms=db_cpu / len(times) * 1000,
    )


async def run(info: StackInfo, tasks: int, clients: int, requests: int) -> list[Row]:
    prefix = f"apibench{secrets.token_hex(3)}"
    env = {**os.environ, **info.env(), "CONCLAVE_TOPIC_PREFIX": prefix}
    settings = Settings.from_env(env)
    db = await connect(settings)
    try:
        await migrate(db)
        err.print(f"filling the read models: {tasks:,} tasks ...")
        ids = await fill(db, tasks)
        _, token = await create_token(db, TENANT, name="bench")
    finally:
        await db.close()
    server, base = _serve(env)
    try:
        api = psutil.Process(server.pid)
        # Idle connections are dropped before uvicorn's keep-alive (5 s) would close them
        # under a request on its way (a ReadError that is the benchmark's, not the API's).
        limits = httpx.Limits(
            max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0
        )
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=base, headers=headers, limits=limits, timeout=60
        ) as http:
            filters = "status=completed&pool=pool-3&limit=50"
            first = (await http.get(f"/v1/tasks?{filters}")).json()
            cursor = first["next_cursor"]
            assert len(first["tasks"]) == 50
            assert cursor is not None
            endpoints: list[tuple[str, Callable[[random.Random], str]]] = [
                ("/v1/tasks status+pool", lambda _: f"/v1/tasks?{filters}"),
                (
                    "/v1/tasks page 2 (cursor)",
                    lambda _: f"/v1/tasks?{filters}&cursor={cursor}",
                ),
                ("/v1/tasks/{id}", lambda rng: f"/v1/tasks/{rng.choice(ids)}"),
                ("/v1/pools", lambda _: "/v1/pools"),
                ("/v1/agents", lambda _: "/v1/agents"),
                ("/v1/status", lambda _: "/v1/status"),
            ]
            # warm up: connections opened, PostgreSQL's caches filled
            await measure(
                http, api, info.home, "warm-up", lambda _: "/v1/status", clients, clients * 2
            )
            rows = []
            for endpoint, path in endpoints:
                err.print(f"  {endpoint} ...")
                rows.append(await measure(http, api, info.home, endpoint, path, clients, requests))
            return rows
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()


def table(rows: list[Row], clients: int, tasks: int) -> Table:
    t = Table(
        title=f"HTTP API latency, {clients} concurrent clients, {tasks:,} tasks (CPU: per request)",
        header_style="bold",
    )
    for column in (
        "endpoint",
        "requests",
        "p50 ms",
        "p99 ms",
        "req/s",
        "API CPU ms",
        "PG CPU ms",
        "client CPU ms",
    ):
        if column == "endpoint":
            t.add_column(column, no_wrap=True)
        else:
            t.add_column(column, justify="right")
    for r in rows:
        t.add_row(
            r.endpoint,
            f"{r.requests:,}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.per_s:,.0f}",
            f"{r.server_cpu_ms:.2f}",
            f"{r.db_cpu_ms:.2f}",
            f"{r.client_cpu_ms:.2f}",
        )
    return t


def bench(tasks: int = 20_000, clients: int = 50, requests: int = 2_000) -> list[Row]:
    """The whole measurement on a fresh embedded stack (removed afterwards)."""
    home = Path(tempfile.mkdtemp(prefix="conclave-api-bench-"))
    stack = EmbeddedStack(home)
    info = stack.up(kafka_port=0, pg_port=0)
    try:
        return asyncio.run(run(info, tasks, clients, requests))
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api_latency", description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2_000, help="per endpoint")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = bench(args.tasks, args.clients, args.requests)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        Console().print(table(rows, args.clients, args.tasks))
    err.print(
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a shared machine)"
    )


if __name__ == "__main__":
    main()
