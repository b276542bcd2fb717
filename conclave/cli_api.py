"""``conclave api`` and ``conclave tokens create|list|revoke``: the HTTP API and the
bearer tokens that open it, one tenant per token.

A token's secret is printed once, by ``create``; only its SHA-256 is stored, so a lost
token is revoked and replaced, never recovered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from conclave.settings import Settings

__all__ = ["serve_api", "tokens_app"]

T = TypeVar("T")

tokens_app = typer.Typer(
    help="Bearer tokens of the HTTP API: each maps to one tenant.", no_args_is_help=True
)
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _with_db(run: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    from projections.database import connect, migrate

    async def go() -> T:
        db = await connect(Settings.from_env())
        try:
            await migrate(db)  # the tokens table may be the first thing this database gets
            return await run(db)
        finally:
            await db.close()

    return asyncio.run(go())


def _when(us: int | None) -> str:
    if us is None:
        return "-"
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S")


@tokens_app.command("create")
def tokens_create(
    tenant: Annotated[str, typer.Option(help="The tenant whose data the token reads and writes.")],
    name: Annotated[str, typer.Option(help="What the token is for (shown by list).")] = "",
    admin: Annotated[
        bool, typer.Option("--admin", help="May also halt and resume (every tenant's work).")
    ] = False,
) -> None:
    """Create a token; prints its secret once (keep it: only a hash is stored)."""
    from conclave.api.tokens import create_token

    info, token = _with_db(lambda db: create_token(db, tenant, name=name, admin=admin))
    out.print(token)
    err.print(
        f"token {info.token_id} for tenant {info.tenant!r}"
        + (" (admin)" if info.admin else "")
        + ": shown once, send it as 'Authorization: Bearer <token>'"
    )


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every token: id, name, tenant, admin, created, revoked (never a secret)."""
    from conclave.api.tokens import list_tokens

    infos = _with_db(list_tokens)
    if as_json:
        print(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
        return
    if not infos:
        out.print("no tokens")
        return
    table = Table(box=None, header_style="bold")
    for column in ("token", "name", "tenant", "admin", "created", "revoked"):
        table.add_column(column)
    for i in infos:
        table.add_row(
            i.token_id,
            i.name or "-",
            i.tenant,
            "yes" if i.admin else "",
            _when(i.created_at),
            _when(i.revoked_at),
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The token's id (list).")]) -> None:
    """Revoke a token: its next request is a 401."""
    from conclave.api.tokens import revoke_token

    _with_db(lambda db: revoke_token(db, token_id))
    out.print(f"token {token_id} revoked")


def _dashboard_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the dashboard (a wildcard address is not
    one to browse to)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/dashboard"


def serve_api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8080,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs and /openapi.json) until interrupted."""
    import uvicorn

    from conclave import cli
    from conclave.api import create_app
    from conclave.processes import register
    from projections.database import connect, migrate

    settings = cli._settings("api")

    class Server(uvicorn.Server):
        """uvicorn without its own signal handlers: the CLI's (graceful stop, then a
        deadline; ``kill -USR1`` dumps) are in charge, as for every service."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    async def serve(stop: cli.Lifetime) -> None:
        # Reached before uvicorn starts, so that a database that is not there is one line.
        db = await connect(settings)
        try:
            await migrate(db)
        finally:
            await db.close()
        try:
            sock = socket.create_server((host, port))
            # Inherited by every accepted connection. Without it uvicorn's answers, head
            # and body written apart, wait out Nagle and the client's delayed ACK: ~40 ms
            # a request whatever the endpoint (seen in bench/api_latency.py).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            where = f"{host}:{port}"
            raise cli.Fail(f"cannot serve the API on {where}: {exc.strerror or exc}") from None
        bound = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(settings),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = Server(config)

        async def run() -> None:
            # uvicorn exits (SystemExit) when the app does not start; caught here, inside
            # the task, since asyncio would let it through the event loop.
            with contextlib.suppress(SystemExit):
                await server.serve(sockets=[sock])

        with sock, register(settings.home, "api", str(bound)) as registered:
            async with cli._observed(settings, registered):
                running = asyncio.ensure_future(run())
                while not server.started and not running.done():  # noqa: ASYNC110 (no event)
                    await asyncio.sleep(0.05)
                if not server.started:
                    await running
                    raise cli.Fail("the API did not start (see the log above)")
                err.print(f"[green]API serving[/] on http://{host}:{bound} (docs: /docs)")
                err.print(f"dashboard: {_dashboard_url(host, bound)} (asks for a token)")
                stop.started()
                try:
                    # shielded: _first cancels what it waited for, the server must stop itself
                    await cli._first(stop.wait(), asyncio.shield(running))
                finally:
                    server.should_exit = True
                    await running

    cli._run(cli._until_signalled(serve))
