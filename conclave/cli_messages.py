"""``conclave message send AGENT PAYLOAD [--ask]`` and ``conclave messages``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from conclave.cli_tasks import AsJson, Limit, _print_json, _query, _when, out
from conclave.messaging import Messenger
from conclave.settings import Settings
from projections import messages as queries

__all__ = ["list_messages", "message_app"]

message_app = typer.Typer(help="Messages to agents.", no_args_is_help=True)


@message_app.command("send")
def message_send(
    recipient: Annotated[
        str, typer.Argument(help="An agent id, pool:NAME (any one agent) or broadcast:NAME.")
    ],
    payload: Annotated[str, typer.Argument(help="The message (text or JSON).")],
    ask: Annotated[bool, typer.Option("--ask", help="Wait for the answer and print it.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="With --ask: give up after S seconds.")
    ] = 10.0,
    ttl: Annotated[
        float | None,
        typer.Option("--ttl", min=0.001, help="Without --ask: not delivered after S seconds."),
    ] = None,
    sender: Annotated[str, typer.Option(help="Who the message is from.")] = "cli",
) -> None:
    """Send a message; with --ask print the answer (exit 1 with one line on a timeout, an
    unknown recipient or an error answer), else print the message id."""

    async def go() -> str:
        async with Messenger(Settings.from_env(), name=sender) as messenger:
            if ask:
                return await messenger.ask(recipient, payload, timeout=timeout)
            return await messenger.tell(recipient, payload, ttl=ttl)

    out.print(asyncio.run(go()), markup=False, highlight=False)


def list_messages(
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only messages from or to this agent.")
    ] = None,
    limit: Limit = 50,
    as_json: AsJson = False,
) -> None:
    """Recent agent-to-agent messages and their answers, newest first."""
    views = _query(lambda db: queries.recent_messages(db, agent=agent, limit=limit))
    if as_json:
        _print_json([dataclasses.asdict(v) for v in views])
        return
    if not views:
        out.print("no messages")
        return
    table = Table(box=None, header_style="bold")
    for column in ("sent", "kind", "from", "to", "agent", "answers", "payload"):
        table.add_column(column, overflow="fold")
    for v in views:
        payload = v.payload if len(v.payload) <= 60 else v.payload[:57] + "..."
        table.add_row(  # names and payloads are anybody's text: no markup in them
            _when(v.sent_at),
            v.kind,
            escape(v.sender),
            escape(v.recipient),
            escape(v.agent_id or "-"),
            (v.correlation_id or "-")[:12],
            escape(payload),
            style=None if v.kind != "error" else "red",
        )
    out.print(table)
