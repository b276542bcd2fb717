"""``conclave locks``, ``conclave lock acquire|release``, ``conclave state get|history|put``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from conclave.cli_tasks import AsJson, _in, _print_json, _query, _when, out
from conclave.coordination import Coordinator
from conclave.errors import NotFound
from conclave.settings import Settings
from projections import coordination as queries

__all__ = ["list_locks", "lock_app", "state_app"]

T = TypeVar("T")

lock_app = typer.Typer(help="Take and give up resource locks.", no_args_is_help=True)
state_app = typer.Typer(help="Versioned state with optimistic concurrency.", no_args_is_help=True)


def list_locks(
    held: Annotated[bool, typer.Option("--held", help="Only locks held now.")] = False,
    as_json: AsJson = False,
) -> None:
    """Resource locks: holder, fencing token, when the lease ends, who waits in line."""
    views = _query(lambda db: queries.list_locks(db, held_only=held))
    if as_json:
        _print_json([dataclasses.asdict(v) for v in views])
        return
    if not views:
        out.print("no locks")
        return
    table = Table(box=None, header_style="bold")
    for column in ("lock", "state", "holder", "token", "expires", "waiters"):
        table.add_column(column)
    for v in views:
        table.add_row(
            v.name,
            v.state,
            v.holder or "-",
            str(v.fencing_token),
            _in(v.expires_at) if v.state == "held" else "-",
            ", ".join(v.waiters) if v.waiters else "-",
        )
    out.print(table)


def _with_coordinator(run: Callable[[Coordinator], Awaitable[T]], *, db: bool = False) -> T:
    from projections.database import connect

    async def go() -> T:
        settings = Settings.from_env()
        pool = await connect(settings) if db else None
        try:
            async with Coordinator(settings, producer_name="cli", db=pool) as coordinator:
                return await run(coordinator)
        finally:
            if pool is not None:
                await pool.close()

    return asyncio.run(go())


@lock_app.command("acquire")
def lock_acquire(
    name: str,
    holder: Annotated[str, typer.Option(help="Who takes it (shown to others).")] = "cli",
    ttl: Annotated[float, typer.Option(min=0.001, help="Lease, seconds.")] = 60.0,
    wait: Annotated[float, typer.Option(min=0, help="Wait in line up to S seconds.")] = 0.0,
) -> None:
    """Take a lock; prints its fencing token (release it with that token)."""
    lease = _with_coordinator(lambda c: c.acquire_lock(name, holder, ttl, wait=wait))
    out.print(f"{lease.token}")


@lock_app.command("release")
def lock_release(
    name: str,
    token: Annotated[int, typer.Option(help="The fencing token the grant printed.")],
    holder: Annotated[str, typer.Option(help="Who holds it.")] = "cli",
) -> None:
    """Give a lock up (refused if the token is no longer the holder's)."""
    _with_coordinator(lambda c: c.release_lock(name, holder, token))


@state_app.command("get")
def state_get(
    key: str,
    version: Annotated[
        int | None, typer.Option(min=1, help="This version (default: newest).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """A key's value (JSON) at its newest or at any past version."""
    found = _query(lambda db: queries.state_version(db, key, version))
    if found is None:
        at = f" at version {version}" if version is not None else ""
        raise NotFound(f"no state {key!r}{at}")
    if as_json:
        _print_json(dataclasses.asdict(found))
        return
    print(json.dumps(found.value))


@state_app.command("history")
def state_history(key: str, as_json: AsJson = False) -> None:
    """Every version of a key, with checkpoints and restores."""

    async def both(db: Any) -> tuple[list[queries.StateVersion], dict[int, list[str]]]:
        return await queries.state_history(db, key), await queries.checkpoints(db, key)

    versions, labels = _query(both)
    if as_json:
        _print_json(
            [dataclasses.asdict(v) | {"checkpoints": labels.get(v.version, [])} for v in versions]
        )
        return
    if not versions:
        raise NotFound(f"no state {key!r}")
    table = Table(box=None, header_style="bold")
    for column in ("version", "updated", "checkpoints", "note", "value"):
        table.add_column(column, overflow="fold")
    for v in versions:
        note = f"restored {v.label!r} (version {v.restored_from})" if v.restored_from else ""
        value = json.dumps(v.value)
        table.add_row(
            str(v.version),
            _when(v.updated_at),
            ", ".join(labels.get(v.version, [])),
            note,
            value if len(value) <= 80 else value[:77] + "...",
        )
    out.print(table)


@state_app.command("put")
def state_put(
    key: str,
    value: Annotated[str, typer.Argument(help="The new value, JSON.")],
    expect: Annotated[
        int, typer.Option("--expect", min=0, help="The version you read (0: a new key).")
    ],
) -> None:
    """Write a key's next version if it is still at --expect; prints the new version. A
    stale one is refused (one line, exit 1) with the current version."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"VALUE is not JSON: {exc}") from None
    version = _with_coordinator(lambda c: c.update_state(key, expect, parsed))
    out.print(str(version))


@state_app.command("checkpoint")
def state_checkpoint(key: str, label: str) -> None:
    """Label a key's current version; prints it."""
    out.print(str(_with_coordinator(lambda c: c.checkpoint_state(key, label))))


@state_app.command("restore")
def state_restore(
    key: str,
    label: str,
    expect: Annotated[int | None, typer.Option("--expect", min=0)] = None,
) -> None:
    """Write checkpoint LABEL's value as the key's next version (history kept)."""
    version = _with_coordinator(lambda c: c.restore_state(key, label, expected_version=expect))
    out.print(str(version))
