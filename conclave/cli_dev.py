"""``conclave dev up|down|status``: the embedded development stack from the shell.

``up`` prints only ``export`` lines on stdout (so ``eval "$(conclave dev up)"``
works) and its status line on stderr.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from conclave import processes
from conclave.devstack import DEFAULT_HOME, EmbeddedStack, StackStatus
from conclave.errors import StackError

__all__ = ["dev_app"]

dev_app = typer.Typer(
    name="dev",
    help="Run the embedded development stack (Kafka-protocol broker and PostgreSQL).",
    no_args_is_help=True,
    add_completion=False,
)

Home = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="CONCLAVE_HOME",
        help="Directory holding the stack's data, logs and connection settings.",
    ),
]
Port = Annotated[
    int | None,
    typer.Option(
        help="Port for a service that is started (0: any free port). "
        "Default: the port used last time, else the standard one, else any free port.",
        show_default=False,
    ),
]


def _fail(exc: StackError) -> typer.Exit:
    Console(stderr=True).print(Text(f"error: {exc}", style="red"), soft_wrap=True)
    return typer.Exit(1)


@dev_app.command()
def up(home: Home = DEFAULT_HOME, kafka_port: Port = None, pg_port: Port = None) -> None:
    """Start the broker and PostgreSQL (if not running) and print their settings."""
    started = time.perf_counter()
    try:
        info = EmbeddedStack(home).up(kafka_port=kafka_port, pg_port=pg_port)
    except StackError as exc:
        raise _fail(exc) from None
    elapsed = time.perf_counter() - started
    typer.echo(f"export CONCLAVE_KAFKA_BOOTSTRAP={info.kafka_bootstrap}")
    typer.echo(f"export CONCLAVE_DATABASE_URL={info.database_url}")
    verb = "up" if info.started else "already up"
    Console(stderr=True).print(
        Text.assemble(
            ("✔ ", "green"),
            f"stack {verb} in {elapsed:.2f} s · kafka {info.kafka_bootstrap} · "
            f"postgres 127.0.0.1:{info.pg_port} · data {home}",
        ),
        soft_wrap=True,
    )


@dev_app.command()
def down(home: Home = DEFAULT_HOME) -> None:
    """Stop the broker and PostgreSQL; their data is kept for the next up."""
    started = time.perf_counter()
    try:
        stopped = EmbeddedStack(home).down()
    except StackError as exc:
        raise _fail(exc) from None
    first = f"stopped {', '.join(stopped)}; " if stopped else ""
    Console(stderr=True).print(
        f"{first}stack stopped in {time.perf_counter() - started:.2f} s · data kept in {home}",
        markup=False,
        soft_wrap=True,
    )


@dev_app.command()
def status(home: Home = DEFAULT_HOME) -> None:
    """Show what is running; exit status 1 unless both services are."""
    try:
        current = EmbeddedStack(home).status()
    except StackError as exc:
        raise _fail(exc) from None
    Console().print(_table(current))
    running = processes.alive(current.home)
    if running:
        table = Table("process", "name", "pid", title="Conclave processes using it")
        for process in running:
            table.add_row(process.kind, process.name, str(process.pid))
        Console().print(table)
    if not current.running:
        raise typer.Exit(1)


def _table(current: StackStatus) -> Table:
    table = Table("service", "address", "pid", "state", title=f"stack in {current.home}")
    for service in current.services:
        state = Text("running", "green") if service.running else Text("stopped", "red")
        pid = str(service.pid) if service.pid is not None else "-"
        table.add_row(service.name, service.address or "-", pid, state)
    return table
