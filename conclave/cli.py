"""The ``conclave`` command line.

Every command reads :class:`~conclave.settings.Settings` once; a
:class:`~conclave.errors.ConclaveError` becomes one red line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from conclave import logs, metrics, tracing
from conclave.cli_agents import agents_app, show_hosts
from conclave.cli_api import serve_api, tokens_app
from conclave.cli_coordination import list_locks, lock_app, state_app
from conclave.cli_dev import dev_app
from conclave.cli_messages import list_messages, message_app
from conclave.cli_replay import replay
from conclave.cli_status import show_status
from conclave.cli_tasks import (
    deliberation_app,
    dlq_app,
    finished,
    list_pools,
    list_tasks,
    parse_priority,
    show_deliberation,
    task_app,
)
from conclave.cli_witness import witness_app
from conclave.cli_workflows import list_workflows, submit_batch, workflow_app
from conclave.errors import ConclaveError
from conclave.settings import LogSettings, Settings

if TYPE_CHECKING:
    from conclave.processes import Registered

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    help="Conclave: an event-sourced orchestrator for fleets of AI agents, on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
db_app = typer.Typer(help="PostgreSQL read models.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(topics_app, name="topics")
app.add_typer(db_app, name="db")
app.add_typer(task_app, name="task")
app.add_typer(dlq_app, name="dlq")
app.add_typer(deliberation_app, name="deliberation")
app.command("tasks")(list_tasks)
app.command("pools")(list_pools)
app.add_typer(agents_app, name="agents")
app.command("hosts")(show_hosts)
app.command("status")(show_status)
app.add_typer(witness_app, name="witness")
app.add_typer(tokens_app, name="tokens")
app.command("api")(serve_api)
app.command("locks")(list_locks)
app.add_typer(lock_app, name="lock")
app.add_typer(state_app, name="state")
app.add_typer(message_app, name="message")
app.command("messages")(list_messages)
app.command("replay")(replay)
app.add_typer(workflow_app, name="workflow")
app.command("workflows")(list_workflows)
app.command("submit-batch")(submit_batch)


@app.callback()
def _options(
    schema: str | None = typer.Option(
        None,
        "--schema",
        help="Read commands query this schema (one built by `conclave replay --as-of`); "
        "also CONCLAVE_SCHEMA.",
    ),
) -> None:
    """Conclave: an event-sourced orchestrator for fleets of AI agents, on Kafka."""
    if schema is not None:
        from projections.asof import check_schema_name

        try:
            check_schema_name(schema)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        os.environ["CONCLAVE_SCHEMA"] = schema


out = Console()
err = Console(stderr=True)


class Fail(ConclaveError):
    """A user-facing failure with its own exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _settings(service: str = "cli") -> Settings:
    """This process's settings; its traces are service ``conclave-<service>``'s."""
    settings = Settings.from_env()
    tracing.configure(settings, service=f"conclave-{service}")
    return settings


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; ``kill -USR1 PID`` prints where each of its coroutines
    waits (what a test or an operator asks of a command that seems stuck)."""

    async def main() -> T:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
        return await coro

    return asyncio.run(main())


STOP_GRACE_S = 15.0
"""How long a service may take to stop gracefully after the first signal."""


class Lifetime(asyncio.Event):
    """A long-lived service's stop signal. Set by the first SIGINT/SIGTERM once the service
    has called :meth:`started`; before that, the signal cancels its start-up at once, so
    a process that is still connecting (or retrying) never ignores Ctrl-C."""

    up = False

    def started(self) -> None:
        self.up = True


async def _until_signalled(serve: Callable[[Lifetime], Awaitable[None]]) -> None:
    """Run a long-lived service until SIGINT/SIGTERM, then let it stop gracefully."""
    stop = Lifetime()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(serve(stop))

    def on_signal() -> None:
        if stop.up and not stop.is_set():
            stop.set()
            # A graceful stop talks to the broker (hand-over beats, the last commit); with
            # the broker gone it could wait for ever, so it gets a deadline.
            loop.call_later(STOP_GRACE_S, task.cancel)
        else:
            task.cancel()  # still starting, or a second signal: do not wait any longer

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        await task
    except asyncio.CancelledError:
        raise Fail("stopped", code=130) from None


def _dump_tasks() -> None:
    """``kill -USR1 PID``: where every coroutine of the process is waiting, on stderr
    (what to look at when a process seems stuck)."""
    for running in asyncio.all_tasks():
        print(f"--- {running.get_name()}", file=sys.stderr)
        running.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def _first(*waits: Awaitable[object]) -> None:
    """Return when the first of ``waits`` is done (the others are cancelled)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# --- topics and database ----------------------------------------------------------------------


@topics_app.command("create")
def topics_create() -> None:
    """Create every Conclave topic that is missing (idempotent)."""
    from conclave.bus import ensure_topics

    created = _run(ensure_topics(_settings()))
    out.print(f"created {len(created)} topic(s)" + (": " + ", ".join(created) if created else ""))


@topics_app.command("list")
def topics_list() -> None:
    """Show the topics Conclave declares."""
    from conclave.bus import topics_for

    table = Table("topic", "partitions", "retention.ms", "purpose")
    for spec in topics_for(_settings()).specs():
        table.add_row(spec.name, str(spec.partitions), spec.config["retention.ms"], spec.purpose)
    out.print(table)


@db_app.command("migrate")
def db_migrate() -> None:
    """Create or update the read-model tables (idempotent)."""
    from projections.database import connect, migrate

    async def go() -> list[str]:
        pool = await connect(_settings())
        try:
            return await migrate(pool)
        finally:
            await pool.close()

    applied = _run(go())
    out.print(
        f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
    )


# --- long-running processes -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _observed(settings: Settings, registered: Registered) -> AsyncIterator[None]:
    """A service's metrics endpoint for the block, its port in the service's run file
    (``conclave status`` reads it). Spans still buffered are exported at exit by the
    OpenTelemetry SDK itself."""
    server = None
    if settings.metrics:
        try:
            server = await metrics.serve(settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            raise Fail(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        registered.announce(server.port)
    try:
        yield
    finally:
        if server is not None:
            await server.stop()


@app.command()
def worker(
    worker_id: str = typer.Option(
        "", "--id", help="This worker's name (default: worker-HOSTNAME); unique per worker."
    ),
) -> None:
    """Run stream-processor shards (scheduler, witness) until interrupted.

    Start as many as you like, on any machines: they share the shards, and take over
    those of a worker that stops beating (kill -9 included) within a few seconds.
    """
    from conclave.processes import register
    from streams.worker import Worker

    settings = _settings("worker")
    name = worker_id or f"worker-{socket.gethostname()}"

    async def serve(stop: Lifetime) -> None:
        with register(settings.home, "worker", name) as registered:
            running = Worker(settings, name)
            try:
                async with _observed(settings, registered):
                    await running.start()
                    await _first(running.ready(), running.failed.wait())
                    if running.failure is None:
                        owned = ", ".join(sorted(running.running)) or "no shard yet"
                        err.print(f"[green]processors running[/] as {name} ({owned}); Ctrl-C stops")
                        stop.started()
                        await _first(stop.wait(), running.failed.wait())
            finally:
                await running.stop()
            if running.failure is not None:
                raise Fail(f"worker {name}: {running.failure}")

    _run(_until_signalled(serve))


@app.command()
def runtime(
    agents: int = typer.Option(72, min=0, help="How many agents this host runs (at least)."),
    max_agents: int | None = typer.Option(
        None,
        min=1,
        help="Grow up to this many agents while the pool's tasks wait for agents "
        "(autoscaling); the ones beyond --agents retire after --idle-retire-s idle.",
    ),
    idle_retire_s: float = typer.Option(
        60.0, min=0.1, help="With --max-agents: idle seconds after which an agent retires."
    ),
    pool: str = typer.Option("default", help="The pool the agents serve."),
    agent: str = typer.Option(
        "simulated", help="'simulated' or module:function of an async callable."
    ),
    prefix: str = typer.Option("agent", help="Agent ids are PREFIX-000, PREFIX-001, ..."),
    host_id: str | None = typer.Option(None, help="Stable host id (default: random)."),
    latency_ms: float = typer.Option(100.0, help="Simulated agent: median latency."),
    failure_rate: float = typer.Option(0.0, help="Simulated agent: failure probability."),
    seed: int = typer.Option(0, help="Simulated agent: seed."),
    max_memory_mb: float | None = typer.Option(
        None, min=1, help="Over this resident memory the host's agents take no new work."
    ),
    max_cpu_percent: float | None = typer.Option(
        None, min=1, help="Over this CPU use (% of one core) its agents take no new work."
    ),
    spawn_max_memory_percent: float | None = typer.Option(
        None, min=1, max=100, help="Do not start while the machine's memory is used over this %."
    ),
    capability: list[str] = typer.Option(  # noqa: B008 (typer declares options so)
        [], "--capability", help="What its agents can do (repeatable): found with it."
    ),
    agent_version: str | None = typer.Option(None, help="The version of the agents' code."),
) -> None:
    """Run an agent runtime host until interrupted."""
    from conclave.processes import register
    from conclave.runtime.agents import load_agent, load_handler
    from conclave.runtime.host import HostConfig, RuntimeHost

    options: dict[str, Any] = (
        {"latency_ms": latency_ms, "failure_rate": failure_rate, "seed": seed}
        if agent == "simulated"
        else {}
    )
    fn = load_agent(agent, **options)
    on_message = load_handler(agent, fn)
    from conclave.runtime.limits import HostLimits

    if max_agents is not None and max_agents < agents:
        raise Fail(f"--max-agents {max_agents} is below --agents {agents}")
    names = [f"{prefix}-{i:03d}" for i in range(max(agents, max_agents or 0))]
    config = HostConfig(
        pool=pool,
        agent_ids=names[:agents],
        spare_agent_ids=names[agents:],
        idle_retire_s=idle_retire_s,
        agent_ref=agent,
        capabilities=capability,
        version=agent_version,
        limits=HostLimits(
            max_rss_mb=max_memory_mb,
            max_cpu_percent=max_cpu_percent,
            spawn_max_memory_percent=spawn_max_memory_percent,
        ),
    )
    if host_id:
        config = dataclasses.replace(config, host_id=host_id)

    settings = _settings("runtime")

    async def serve(stop: Lifetime) -> None:
        with register(settings.home, "runtime", config.host_id) as registered:
            async with _observed(settings, registered):
                host = RuntimeHost(settings, config, fn, on_message)
                await host.start()
                err.print(
                    f"[green]runtime {config.host_id}[/] running {agents} agent(s) in pool {pool!r}"
                )
                stop.started()
                try:
                    await _first(stop.wait(), host.failed.wait())
                finally:
                    await host.stop()
            if host.failure is not None:
                raise Fail(f"runtime {config.host_id}: {host.failure}")

    _run(_until_signalled(serve))


@app.command()
def projector() -> None:
    """Fold the history topics into the PostgreSQL read models until interrupted."""
    from conclave.processes import register
    from projections.database import connect, migrate
    from projections.projector import Projector

    settings = _settings("projector")

    async def serve(stop: Lifetime) -> None:
        # Several may run (one folds, the others stand by): registered, not exclusive.
        with register(settings.home, "projector", str(os.getpid())) as registered:
            async with _observed(settings, registered):
                pool = await connect(settings)
                await migrate(pool)
                proj = Projector(settings, pool)
                await proj.start()
                err.print("[green]projector running[/]")
                stop.started()  # from now on a signal stops it gracefully (and frees the schema)
                try:
                    await proj.run(stop)
                finally:
                    await proj.stop()
                    await pool.close()

    _run(_until_signalled(serve))


# --- commands ---------------------------------------------------------------------------------


@app.command()
def submit(
    input: str | None = typer.Argument(None, help="The task's input; - reads it from stdin."),
    input_file: Path | None = typer.Option(  # noqa: B008 (typer declares options so)
        None, "--file", exists=True, dir_okay=False, help="Read the input from this file."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="Wait until the task is finished; print its answer or failure."
    ),
    wait_timeout: float = typer.Option(
        600.0, "--timeout", min=0.1, help="With --wait: give up after S."
    ),
    priority: str = typer.Option("normal", help="critical, high, normal or low."),
    pool: str = typer.Option("default"),
    task_id: str | None = typer.Option(None, "--id", help="Idempotency: the same id runs once."),
    agent_id: str | None = typer.Option(None, "--agent", help="Run on this agent only."),
    max_attempts: int = typer.Option(1, min=1, help="Attempts before it is dead-lettered."),
    retry_backoff: float = typer.Option(1.0, help="Seconds before the first retry (0: at once)."),
    retry_multiplier: float = typer.Option(2.0, help="Each further retry waits this much longer."),
    retry_backoff_max: float = typer.Option(60.0, help="No retry waits longer (seconds)."),
    retry_jitter: float = typer.Option(0.2, help="Spread of each wait, 0 to 1."),
    depends_on: list[str] = typer.Option(  # noqa: B008 (typer's way of declaring options)
        [], "--depends-on", help="A task that must complete first (repeatable)."
    ),
    start_within: float | None = typer.Option(
        None, min=0.001, help="Expire unless dispatched within this many seconds."
    ),
    finish_within: float | None = typer.Option(
        None, min=0.001, help="Expire unless finished within this many seconds from now."
    ),
    key: str | None = typer.Option(
        None, "--key", help="Fairness key: equal-priority tasks take turns between keys."
    ),
    key_limit: int | None = typer.Option(
        None, "--key-limit", min=1, help="At most N tasks of this tenant's key in flight."
    ),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Instead of --id: the same key runs once per tenant."
    ),
) -> None:
    """Submit a task; prints its id (with --wait, its answer once it has one)."""
    from conclave.client import Client
    from conclave.domain.retry import RetryPolicy

    prio = parse_priority(priority)
    if (input is None) == (input_file is None):
        raise typer.BadParameter("give the input as an argument (- for stdin) or --file")
    if input_file is not None:
        input = input_file.read_text()
    elif input == "-":
        input = sys.stdin.read()
    assert input is not None
    retry = RetryPolicy(
        backoff_ms=round(retry_backoff * 1000),
        multiplier=retry_multiplier,
        max_backoff_ms=round(retry_backoff_max * 1000),
        jitter=retry_jitter,
    )
    if (reason := retry.invalid()) is not None:
        raise typer.BadParameter(reason.replace("_ms", "").replace("_", "-"))

    async def go() -> str:
        async with Client(_settings()) as client:
            return await client.submit(
                input,
                task_id=task_id,
                pool=pool,
                priority=prio,
                agent_id=agent_id,
                max_attempts=max_attempts,
                retry=retry,
                depends_on=depends_on,
                start_within_ms=round(start_within * 1000) if start_within else None,
                finish_by=_from_now(finish_within),
                fairness_key=key,
                key_limit=key_limit,
                idempotency_key=idempotency_key,
            )

    submitted = _run(go())
    if not wait:
        out.print(submitted)
        return
    err.print(f"submitted {submitted}")
    view = finished(submitted, wait_timeout, follow=True)
    if view.output is None:
        raise Fail(f"task {submitted} {view.status}: {view.error or 'no answer'}")
    out.print(view.output.content)


def _from_now(seconds: float | None) -> int | None:
    """``seconds`` from now as µs since the epoch (a deadline option), if given."""
    from conclave.domain.events import now_us

    return now_us() + round(seconds * 1e6) if seconds else None


@app.command()
def deliberate(
    motion: str = typer.Argument(..., help="The motion; - reads it from stdin."),
    agents: list[str] = typer.Option(  # noqa: B008 (typer declares options so)
        [], "--agent", help="An agent that must answer (repeatable); none: every agent."
    ),
    pool: str = typer.Option("default"),
    priority: str = typer.Option("high", help="critical, high, normal or low."),
    deliberation_id: str | None = typer.Option(None, "--id", help="The same id runs once."),
    finish_within: float | None = typer.Option(
        None, min=0.001, help="Agents not done within S seconds expire; the rest is revealed."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="Wait until every agent is done; print the answers together."
    ),
    wait_timeout: float = typer.Option(
        600.0, "--timeout", min=0.1, help="With --wait: give up after S."
    ),
) -> None:
    """Put one motion to many agents; each answers in its own context."""
    from conclave.client import Client

    prio = parse_priority(priority)
    text = sys.stdin.read() if motion == "-" else motion

    async def go() -> str:
        async with Client(_settings()) as client:
            return await client.deliberate(
                text,
                agent_ids=agents,
                deliberation_id=deliberation_id,
                pool=pool,
                priority=prio,
                finish_by=_from_now(finish_within),
            )

    submitted = _run(go())
    if not wait:
        out.print(submitted)
        return
    err.print(f"deliberation {submitted}")
    show_deliberation(submitted, as_json=False, wait_s=wait_timeout)


@app.command()
def cancel(
    task_id: str = typer.Argument(..., help="The task, or with --deliberation the deliberation."),
    deliberation: bool = typer.Option(
        False, "--deliberation", help="Cancel every unfinished task of this deliberation."
    ),
    reason: str = typer.Option("", help="Why: kept with the cancelled task."),
    pool: str | None = typer.Option(
        None, help="Its pool, if the read model does not know it yet (default: 'default')."
    ),
) -> None:
    """Cancel a task (waiting, queued, retrying or running) or a whole deliberation."""
    from conclave.client import Client

    async def go() -> None:
        target = pool or await _pool_of(task_id, deliberation) or "default"
        async with Client(_settings()) as client:
            if deliberation:
                await client.cancel(deliberation_id=task_id, pool=target, reason=reason)
            else:
                await client.cancel(task_id, pool=target, reason=reason)

    _run(go())
    out.print(f"cancellation of {'deliberation' if deliberation else 'task'} {task_id} sent")


async def _pool_of(subject: str, deliberation: bool) -> str | None:
    """The pool the read model has for a task or a deliberation (its scheduler shard's)."""
    from projections.database import connect

    db = await connect(_settings())
    try:
        column = "deliberation_id" if deliberation else "task_id"
        pool: str | None = await db.fetchval(
            f"SELECT pool FROM tasks WHERE {column} = $1 LIMIT 1", subject
        )
        return pool
    finally:
        await db.close()


@app.command()
def capacity(
    pool: str = typer.Argument(..., help="The pool."),
    tasks: int = typer.Argument(..., min=0, help="Tasks in flight at most (0 stops dispatching)."),
    reason: str = typer.Option("", help="Why: witnessed with the change."),
    operator: str = typer.Option("operator"),
    aging: int | None = typer.Option(
        None, "--aging", min=1, help="A task gains a priority level per N turns served."
    ),
    weight: list[str] = typer.Option(  # noqa: B008 (typer declares options so)
        [],
        "--weight",
        help="KEY=W: the fairness key (a tenant, or tenant/key) is served W tasks for each "
        "of a key of weight 1 (repeat for more keys; keys not named weigh 1).",
    ),
) -> None:
    """Set a pool's capacity (and aging: strict priority without --aging; and weights:
    every key 1 without --weight) from now on (witnessed); other pools keep theirs."""
    from conclave.client import Client

    weights = _weights(weight)

    async def go() -> None:
        async with Client(_settings()) as client:
            await client.configure_pool(
                pool,
                capacity=tasks,
                reason=reason,
                operator=operator,
                aging_turns=aging,
                weights=weights,
            )

    _run(go())
    aged = f", aging {aging} turn(s) per level" if aging else ", strict priority"
    weighed = "".join(f", {key} weighs {w}" for key, w in sorted(weights.items()))
    out.print(f"capacity of {pool} set to {tasks}{aged}{weighed}")


def _weights(options: list[str]) -> dict[str, int]:
    """``KEY=W`` options as a mapping; a malformed one is a usage error."""
    weights: dict[str, int] = {}
    for option in options:
        key, _, value = option.rpartition("=")
        if not key or not value.isdigit():
            raise typer.BadParameter(f"{option!r} is not KEY=WEIGHT", param_hint="--weight")
        weights[key] = int(value)
    return weights


@app.command()
def halt(
    reason: str = typer.Argument(...),
    operator: str = typer.Option("operator"),
    cancel_running: bool = typer.Option(
        False, "--cancel-running", help="Cancel the tasks in flight too (default: they finish)."
    ),
) -> None:
    """Stop all dispatching until `conclave resume` (witnessed)."""
    from conclave.client import Client

    async def go() -> None:
        async with Client(_settings()) as client:
            await client.halt(reason, operator=operator, cancel_running=cancel_running)

    _run(go())
    out.print("halt sent")


@app.command()
def resume(reason: str = typer.Argument(...), operator: str = typer.Option("operator")) -> None:
    """Lift a halt (witnessed)."""
    from conclave.client import Client

    async def go() -> None:
        async with Client(_settings()) as client:
            await client.resume(reason, operator=operator)

    _run(go())
    out.print("resume sent")


@witness_app.command("verify")
def witness_verify(
    source: str = typer.Option("both", help="topic, db or both: the chain only."),
    from_: str | None = typer.Option(
        None,
        "--from",
        help="topic or postgres: the chain, the tree and every published checkpoint.",
    ),
    export: Annotated[
        Path | None,
        typer.Option(help="Check an export file (`conclave witness export`; - is stdin)."),
    ] = None,
    vkeys: Annotated[
        list[str] | None,
        typer.Option("--vkey", help="A trusted public key, or a .vkey file; repeat for several."),
    ] = None,
    origin: str | None = typer.Option(None, help="The log's origin (default: the key's name)."),
    jobs: int = typer.Option(
        1, help="With --export FILE: check it in this many processes (0: one per core)."
    ),
) -> None:
    """Recompute the witness log; exits 1 naming the first bad sequence number (or line).

    With --from or --export, also the Merkle root at each published checkpoint and its
    signature; progress on stderr, a summary at the end."""
    if export is not None or from_ is not None:
        _verify_log(from_, export, vkeys or [], origin, jobs)
        return
    from conclave.verify import verify_sources

    if source not in ("topic", "db", "both"):
        raise typer.BadParameter("source must be topic, db or both")
    results = _run(verify_sources(_settings(), source))
    bad = False
    for result in results:
        for finding in result.findings:
            err.print(f"[yellow]{result.source}: not an entry:[/] {finding}", soft_wrap=True)
        if result.violation is None:
            out.print(
                f"{result.source}: {result.entries} entries, chain intact, head {result.head_hex}"
            )
        else:
            bad = True
            err.print(
                f"[red]{result.source}: first bad sequence {result.violation.sequence}: "
                f"{result.violation.reason}[/]",
                soft_wrap=True,
            )
    if bad:
        raise typer.Exit(1)


def _refuse(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _verify_log(
    from_: str | None, export: Path | None, vkeys: list[str], origin: str | None, jobs: int
) -> None:
    from conclave.exporting import known_keys, verify_export_file, verify_log
    from conclave.transparency.export import LogBroken
    from conclave.transparency.keyfiles import read_verifier

    if from_ is not None and export is not None:
        raise _refuse("give --from or --export, not both")
    if jobs < 0:
        raise _refuse("--jobs must be 0 (one per core) or more")
    if from_ not in (None, "topic", "postgres"):
        raise _refuse(f"--from must be topic or postgres, not {from_!r}")
    try:
        trusted = [read_verifier(value) for value in vkeys]
    except ConclaveError as exc:
        raise _refuse(str(exc)) from None
    label = f"export {export}" if export is not None else str(from_)
    try:
        if export is not None:
            try:
                if jobs != 1 and str(export) != "-":
                    from conclave.transparency.parallel import verify_export_parallel

                    checked = verify_export_parallel(export, trusted, origin=origin, jobs=jobs)
                else:
                    checked = verify_export_file(export, trusted, origin=origin, console=err)
            except OSError as exc:
                raise _refuse(f"cannot read {export}: {exc.strerror or exc}") from None
            checker = checked.checker
            if checked.keys_from_export and checker.checkpoints:
                err.print(
                    "[yellow]signatures checked against the keys the export carries; "
                    "--vkey checks them against a key you trust[/]",
                    soft_wrap=True,
                )
        else:
            settings = _settings()
            source: Literal["topic", "postgres"] = "topic" if from_ == "topic" else "postgres"
            verified = _run(
                verify_log(
                    settings, source, known_keys(settings, trusted), origin=origin, console=err
                )
            )
            for finding in verified.findings:
                err.print(f"[yellow]{label}: not an entry:[/] {finding}", soft_wrap=True)
            checker = verified.checker
    except LogBroken as exc:
        err.print(f"[red]{label}: broken at {exc.where}: {exc.reason}[/]", soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"{label}: chain intact, {checker.summary()}", soft_wrap=True)


@app.command()
def demo(
    agents: int = typer.Option(72, help="How many agents deliberate at once."),
    latency_ms: float = typer.Option(100.0, help="Simulated agent median latency."),
    failure_rate: float = typer.Option(0.0, help="Simulated agent failure probability."),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    motion: str = typer.Option("Shall the Conclave adopt the proposal?", help="The motion."),
) -> None:
    """72 agents deliberate one motion on the embedded stack; prints a load report."""
    from conclave.demo import DemoConfig, print_report, run_demo

    config = DemoConfig(
        agents=agents,
        latency_ms=latency_ms,
        failure_rate=failure_rate,
        seed=seed,
        motion=motion,
    )
    report = _run(run_demo(_settings(), config, progress=not as_json))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(out, report)
    if not report.chain_ok or report.completed + report.failed != report.agents:
        raise typer.Exit(1)


_SERVICES = {"worker", "runtime", "projector", "api"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        log_settings = LogSettings.from_env()
    except ConclaveError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    logs.configure(logging.WARNING, log_settings.format)
    if _SERVICES & set(args[:1]):
        # A service says what it does (recoveries, take-overs, outages and their end);
        # the client libraries only their warnings.
        for ours in ("conclave", "streams", "projections"):
            logging.getLogger(ours).setLevel(log_settings.level)
        if log_settings.level != "DEBUG":
            # Outages are reported once, by Conclave; aiokafka logs an error per retry.
            logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    else:
        # A short command reports a failure in one line of its own; the client
        # libraries' connection chatter stays for the long-running services' logs.
        for library in ("aiokafka", "kafka", "asyncpg"):
            logging.getLogger(library).setLevel(logging.CRITICAL)
    try:
        app(args=argv)
    except ConclaveError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "code", 1))
    except asyncpg.UndefinedTableError as exc:
        err.print(
            f"[red]error:[/] the read models are not there yet ({exc}): start "
            "`conclave projector` (it creates and fills them)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
