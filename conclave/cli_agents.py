"""``conclave agents`` and ``conclave hosts``: who runs the work, and whether it is alive."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from conclave.cli_tasks import AsJson, PoolOption, _in, _print_json, _query, _when, out
from conclave.settings import Settings
from projections.queries import AGENT_STATES, agent_history, list_agents, list_hosts

__all__ = ["agents_app", "show_agents", "show_hosts"]

V = TypeVar("V", bound=Any)

_STYLE = {
    "lost": "red",
    "failed": "red",
    "unresponsive": "red",
    "circuit_open": "red",
    "probing": "yellow",
    "silent": "yellow",
    "leaving": "yellow",
    "over_limit": "yellow",
    "left": "dim",
    "retired": "dim",
}


agents_app = typer.Typer(
    help="Registered agents: state, pool, host, capabilities, current task, last heartbeat,"
    " why no work; `agents show ID`: one agent's history.",
)


@agents_app.callback(invoke_without_command=True)
def show_agents(
    ctx: typer.Context,
    pool: PoolOption = None,
    host: Annotated[str | None, typer.Option("--host", help="Only this host's agents.")] = None,
    state: Annotated[
        str | None,
        typer.Option(help=f"Only agents in this state: {', '.join(AGENT_STATES)}."),
    ] = None,
    capability: Annotated[
        str | None,
        typer.Option("--capability", help="Only agents that registered this capability."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Registered agents: state, pool, host, capabilities, current task, last heartbeat,
    why no work."""
    if ctx.invoked_subcommand is not None:
        return
    if state is not None and state not in AGENT_STATES:
        raise typer.BadParameter(f"{state!r} is not one of {', '.join(AGENT_STATES)}")
    settings = Settings.from_env()
    now = int(time.time() * 1e6)
    views = _query(
        lambda db: list_agents(
            db,
            now,
            silent_after_us=settings.silent_after_us,
            in_pool=pool,
            host_id=host,
            state=state,
            capability=capability,
        )
    )
    _show(
        views,
        "agents",
        ("agent", "state", "pool", "host", "can", "task", "heartbeat", "restarts", "why no work"),
        lambda v: (
            v.agent_id,
            _styled(v.state),
            v.pool or "-",
            v.host_id,
            " ".join(v.capabilities) + (f" (v{v.version})" if v.version else ""),
            v.current_task_id or "-",
            _in(v.last_heartbeat_at),
            str(v.restarts or 0),
            v.suspended_reason or "",
        ),
        as_json,
    )


@agents_app.command("show")
def show_agent(
    agent_id: Annotated[str, typer.Argument(help="The agent.")],
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="The last N changes.")] = 100,
    as_json: AsJson = False,
) -> None:
    """One agent's history: every change of its state (registered, busy, idle,
    unresponsive, circuit_open, probing, lost, retired, failed), why, and the event that caused
    it (topic:partition@offset), oldest first."""
    views = _query(lambda db: agent_history(db, agent_id, limit=limit))
    _show(
        views,
        "changes",
        ("when", "state", "why", "task", "event"),
        lambda v: (_when(v.occurred_at), _styled(v.state), v.reason, v.task_id or "-", v.source),
        as_json,
    )


def show_hosts(as_json: AsJson = False) -> None:
    """Runtime hosts: alive, over_limit (no new work), leaving, silent (lease ran out),
    lost or left, with their agents, memory and CPU."""
    now = int(time.time() * 1e6)
    views = _query(lambda db: list_hosts(db, now))
    _show(
        views,
        "hosts",
        ("host", "state", "pool", "agents", "memory", "CPU", "last beat", "lease", "why"),
        lambda v: (
            v.host_id,
            _styled(v.state),
            v.pool or "-",
            str(len(v.agent_ids)),
            f"{v.rss_bytes / 2**20:.0f} MB" if v.rss_bytes is not None else "-",
            f"{v.cpu_percent:.0f} %" if v.cpu_percent is not None else "-",
            _in(v.last_beat_at),
            _in(v.lease_expires_at),
            v.failed_reason or v.lost_reason or v.over_limit or "",
        ),
        as_json,
    )


def _styled(state: str) -> str:
    return f"[{_STYLE[state]}]{state}[/]" if state in _STYLE else state


def _show(
    views: Sequence[V],
    what: str,
    columns: Sequence[str],
    row: Callable[[V], Sequence[str]],
    as_json: bool,
) -> None:
    """``views`` as JSON, or as a table with a row each (``no WHAT`` when empty)."""
    if as_json:
        _print_json([dataclasses.asdict(v) for v in views])
        return
    if not views:
        out.print(f"no {what}")
        return
    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column)
    for view in views:
        table.add_row(*row(view))
    out.print(table)
