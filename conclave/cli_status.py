"""``conclave status``: the whole system on one screen, once or refreshed (``--watch``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from conclave.cli_tasks import AsJson, _in, _print_json, out
from conclave.domain.events import Priority
from conclave.settings import Settings
from conclave.status import Status, gather

__all__ = ["show_status"]

Watch = Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")]
Interval = Annotated[
    float, typer.Option("--interval", min=0.2, help="With --watch: seconds between refreshes.")
]


def show_status(as_json: AsJson = False, watch: Watch = False, interval: Interval = 2.0) -> None:
    """The system at a glance: processes and their lag, pools and queues, agents and
    hosts by state, halt, witness head, dead letters of the last hour."""
    if as_json and watch:
        raise typer.BadParameter("--watch refreshes a screen; --json prints once")
    settings = Settings.from_env()
    with contextlib.suppress(KeyboardInterrupt):  # how --watch ends
        asyncio.run(_show(settings, as_json=as_json, watch=watch, interval=interval))


async def _show(settings: Settings, *, as_json: bool, watch: bool, interval: float) -> None:
    from projections.database import connect

    db = await connect(settings, reader=True)
    try:
        status = await gather(settings, db)
        if as_json:
            _print_json(status.as_dict())
            return
        if not watch:
            out.print(render(status, settings))
            return
        with Live(render(status, settings), console=out, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await gather(settings, db), settings), refresh=True)
    finally:
        await db.close()


def render(status: Status, settings: Settings) -> RenderableType:
    state = (
        Text(f"HALTED: {status.halt_reason}", style="bold red")
        if status.halted
        else Text("running", style="bold green")
    )
    title = Text.assemble(
        "Conclave · ", settings.kafka_bootstrap, " · prefix ", settings.topic_prefix, " · ", state
    )
    parts: list[RenderableType] = [title, ""]
    parts += [_processors(status), "", _pools(status, settings), ""]
    parts.append(_counts("agents", status.agents))
    parts.append(_counts("hosts", status.hosts))
    head = f"#{status.witness_head}" if status.witness_head else "empty"
    checkpoint = (
        f"{status.checkpoint_origin} at size {status.checkpoint_size} ({_in(status.checkpoint_at)})"
        if status.checkpoint_size is not None
        else "none published yet (no CONCLAVE_WITNESS_KEY?)"
    )
    parts.append(
        Text.assemble(
            ("witness  ", "bold"),
            f"head {head} ({_in(status.witness_head_at)}) · last checkpoint: {checkpoint}",
        )
    )
    dead = status.dead_letters_last_hour + status.bad_records_last_hour
    parts.append(
        Text.assemble(
            ("last hour  ", "bold"),
            (
                f"{status.dead_letters_last_hour} task(s) dead-lettered, "
                f"{status.bad_records_last_hour} malformed record(s)",
                "red" if dead else "",
            ),
        )
    )
    parts += [Text(f"! {problem}", style="yellow") for problem in status.problems]
    return Group(*parts)


def _processors(status: Status) -> Table:
    table = Table(box=None, header_style="bold", title_justify="left")
    for column in ("processor", "behind", "partitions behind"):
        table.add_column(column, justify="left" if column == "processor" else "right")
    for lag in status.lag:
        style = "yellow" if lag.records else ""
        table.add_row(lag.processor, str(lag.records), str(lag.partitions), style=style)
    here = ", ".join(
        f"{p.kind} {p.name} (pid {p.pid}"
        + (f", metrics :{p.metrics_port})" if p.metrics_port else ")")
        for p in status.processes
    )
    table.caption = f"running here: {here}" if here else "no Conclave process runs here"
    table.caption_justify = "left"
    return table


def _pools(status: Status, settings: Settings) -> Table:
    table = Table(box=None, header_style="bold")
    columns = ["pool", "agents", "in flight / capacity", *(p.label for p in Priority)]
    for column in [*columns, "waiting", "retrying"]:
        table.add_column(column, justify="left" if column == "pool" else "right")
    for view in status.pools:
        capacity = view.capacity if view.capacity is not None else settings.pool_capacity
        table.add_row(
            view.pool,
            str(view.agents),
            f"{view.in_flight} / {capacity}",
            *(str(view.queued.get(p.label, 0)) for p in Priority),
            str(view.waiting),
            str(view.retrying),
        )
    if not status.pools:
        table.caption = "no pool has agents or tasks yet"
    return table


def _counts(what: str, counts: dict[str, int]) -> Text:
    bad = {"lost", "failed", "unresponsive", "circuit_open", "silent"}
    text = Text.assemble((f"{what}  ", "bold"))
    if not counts:
        text.append("none")
    for i, (state, n) in enumerate(sorted(counts.items())):
        text.append(" · " if i else "")
        text.append(f"{state} {n}", style="red" if state in bad and n else "")
    return text
