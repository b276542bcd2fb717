"""``conclave agents`` and ``conclave hosts``: who runs the work, and whether it is alive."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

import typer
from rich.table import Table

from conclave.cli_tasks import AsJson, PoolOption, _in, _print_json, _query, out
from conclave.settings import Settings
from projections.queries import AGENT_STATES, list_agents, list_hosts

__all__ = ["show_agents", "show_hosts"]

_STYLE = {"lost": "red", "unresponsive": "red", "silent": "yellow"}


def show_agents(
    pool: PoolOption = None,
    host: Annotated[str | None, typer.Option("--host", help="Only this host's agents.")] = None,
    state: Annotated[
        str | None,
        typer.Option(help=f"Only agents in this state: {', '.join(AGENT_STATES)}."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Registered agents: state, pool, host, current task, last heartbeat, why no work."""
    if state is not None and state not in AGENT_STATES:
        raise typer.BadParameter(f"{state!r} is not one of {', '.join(AGENT_STATES)}")
    settings = Settings.from_env()
    now = int(time.time() * 1e6)
    silent_after = int(3 * settings.heartbeat_interval_s * 1e6)
    views = _query(
        lambda db: list_agents(
            db, now, silent_after_us=silent_after, in_pool=pool, host_id=host, state=state
        )
    )
    if as_json:
        _print_json([dataclasses.asdict(v) for v in views])
        return
    if not views:
        out.print("no agents")
        return
    table = Table(box=None, header_style="bold")
    for column in ("agent", "state", "pool", "host", "task", "heartbeat", "why no work"):
        table.add_column(column)
    for v in views:
        table.add_row(
            v.agent_id,
            f"[{_STYLE[v.state]}]{v.state}[/]" if v.state in _STYLE else v.state,
            v.pool or "-",
            v.host_id,
            v.current_task_id or "-",
            _in(v.last_heartbeat_at),
            v.suspended_reason or "",
        )
    out.print(table)


def show_hosts(as_json: AsJson = False) -> None:
    """Runtime hosts: alive, silent (lease ran out) or lost, with their agents."""
    now = int(time.time() * 1e6)
    views = _query(lambda db: list_hosts(db, now))
    if as_json:
        _print_json([dataclasses.asdict(v) for v in views])
        return
    if not views:
        out.print("no hosts")
        return
    table = Table(box=None, header_style="bold")
    for column in ("host", "state", "pool", "agents", "last beat", "lease", "lost"):
        table.add_column(column)
    for v in views:
        table.add_row(
            v.host_id,
            f"[{_STYLE[v.state]}]{v.state}[/]" if v.state in _STYLE else v.state,
            v.pool or "-",
            str(len(v.agent_ids)),
            _in(v.last_beat_at),
            _in(v.lease_expires_at),
            v.lost_reason or "",
        )
    out.print(table)
