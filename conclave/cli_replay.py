"""``conclave replay``: rebuild the read models without downtime, compare them with the
live ones by digest, commit the digest to the witness log; build them as of a point in
history into a schema of their own; list and drop those."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from aiokafka import TopicPartition
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from conclave.errors import BrokerUnavailable, ConclaveError, SchemaError
from conclave.settings import Settings

if TYPE_CHECKING:
    from projections.rebuild import RebuildResult

__all__ = ["replay"]

out = Console()
err = Console(stderr=True)

WITNESS_WAIT_S = 15.0


class ReplayFailed(ConclaveError):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def replay(
    yes: bool = typer.Option(
        False, "--yes", help="Accepted for scripts; nothing is dropped before the swap now."
    ),
    check: bool = typer.Option(
        False, "--check", help="Rebuild and compare digests with the live read models; no swap."
    ),
    as_of: str | None = typer.Option(
        None, "--as-of", help="Build the read models as of a time: ISO (UTC) or ago: 15m, 2h, 1d."
    ),
    as_of_offsets: str | None = typer.Option(
        None,
        "--as-of-offsets",
        help="...or as of offsets: topic:partition:offset,... (unnamed partitions: none).",
    ),
    into: str | None = typer.Option(
        None, "--into", help="The schema to build --as-of into (default asof_<yyyymmddhhmmss>)."
    ),
    list_: bool = typer.Option(False, "--list", help="List the schemas built with --as-of."),
    drop: str | None = typer.Option(None, "--drop", help="Drop a schema built with --as-of."),
    witness_wait: float = typer.Option(
        WITNESS_WAIT_S, "--witness-wait", min=0.0, help="How long to wait for the digest's entry."
    ),
) -> None:
    """Rebuild every read model from offset 0 into a shadow schema and swap it in
    atomically (queries keep answering); digests show the rebuilt rows equal the live
    ones, and are committed to the witness log."""
    del yes
    from projections import asof

    modes = [check, as_of is not None or as_of_offsets is not None, list_, drop is not None]
    if sum(modes) > 1:
        raise typer.BadParameter(
            "--check, --as-of/--as-of-offsets, --list and --drop exclude each other"
        )
    if as_of is not None and as_of_offsets is not None:
        raise typer.BadParameter("give --as-of or --as-of-offsets, not both")
    if into is not None and not modes[1]:
        raise typer.BadParameter("--into names the schema of --as-of or --as-of-offsets")
    cutoff: datetime | None = None
    offsets: dict[tuple[str, int], int] | None = None
    name = ""
    if modes[1]:
        from projections.digest import parse_positions

        try:
            if as_of is not None:
                cutoff = asof.parse_as_of(as_of, datetime.now(UTC))
                name = into or asof.asof_schema_name(cutoff)
            else:
                offsets = parse_positions(as_of_offsets or "")
                name = into or asof.asof_schema_name(datetime.now(UTC))
            asof.check_schema_name(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    settings = Settings.from_env()
    if list_:
        _list(settings)
    elif drop is not None:
        _drop(settings, drop)
    elif modes[1]:
        _as_of(settings, name, cutoff, offsets)
    else:
        _rebuild(settings, swap=not check, witness_wait=witness_wait)


@contextmanager
def _bar(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over offsets: records/s and the time left (from the end offsets)."""
    started = time.monotonic()
    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None, rate="")

        def progress(done: int, total: int) -> None:
            rate = done / max(time.monotonic() - started, 1e-3)
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} events/s")

        yield progress


def _rebuild(settings: Settings, *, swap: bool, witness_wait: float) -> None:
    from projections.rebuild import rebuild

    with _bar("rebuilding" if swap else "rebuilding (check)") as progress:
        result = asyncio.run(rebuild(settings, swap=swap, progress=progress))
    live, rebuilt = result.live.by_table(), result.rebuilt.by_table()
    table = Table(title=f"read-model digests, schema {result.schema}")
    for column in ("table", "live rows", "rebuilt rows", "rebuilt sha256", "equal"):
        table.add_column(column, justify="right" if "rows" in column else "left")
    for name, rebuilt_one in rebuilt.items():
        live_one = live.get(name)
        same = name not in result.differ
        table.add_row(
            name,
            str(live_one.rows if live_one else "-"),
            str(rebuilt_one.rows),
            rebuilt_one.sha256[:16],
            "[green]yes[/]" if same else "[red]NO[/]",
        )
    out.print(table)
    from projections.digest import combined, format_positions

    positions = format_positions(result.rebuilt.positions)
    out.print(f"positions covered: {', '.join(positions) or 'none'}", soft_wrap=True)
    out.print(f"schema digest: {combined(result.rebuilt.tables)}")
    rate = result.events / max(result.seconds, 1e-3)
    out.print(f"replayed {result.events} event(s) in {result.seconds:.1f} s ({rate:,.0f}/s)")
    if result.differ:
        err.print(f"[red]differ:[/] {', '.join(result.differ)}", highlight=False)
    if not swap:
        out.print("check only: the live read models were left as they are")
        if result.differ:
            raise ReplayFailed("the rebuilt read models differ from the live ones", code=2)
        return
    out.print(
        f"swapped in: schema {result.schema} holds the rebuilt read models "
        f"(the live projector waited {result.paused_s:.2f} s for the swap)"
    )
    if result.differ:
        err.print("[yellow]the live rows that differed were replaced by the rebuilt ones[/]")
    sequence = asyncio.run(_commit_digest(settings, result, witness_wait))
    if sequence is None:
        err.print(
            f"[yellow]digest sent; no witness entry for it within {witness_wait:.0f} s "
            "(is `conclave worker` running?)[/]"
        )
    else:
        out.print(f"digest witnessed at sequence {sequence}")


async def _commit_digest(settings: Settings, result: RebuildResult, wait_s: float) -> int | None:
    """Send the rebuilt schema's digest to the witness log; its entry's sequence number
    once the witness processor has appended it (``None`` if not within ``wait_s``)."""
    from conclave.bus import new_consumer, read_history, topics_for
    from conclave.client import Client
    from conclave.domain.events import ProjectionDigest, WitnessEntry
    from projections.digest import combined, format_positions
    from schemas.codec import default_codec

    witness = TopicPartition(topics_for(settings).witness, 0)
    consumer = new_consumer(settings)
    try:
        await consumer.start()
        start = (await consumer.end_offsets([witness]))[witness]
    except Exception as exc:
        raise BrokerUnavailable(f"Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        await consumer.stop()
    event = ProjectionDigest(
        schema=result.schema,
        tables=sorted(t.text() for t in result.rebuilt.tables),
        positions=format_positions(result.rebuilt.positions),
        digest=combined(result.rebuilt.tables),
        reason="replay",
    )
    async with Client(settings, producer_name="replay") as client:
        envelope = await client.record_digest(event)
    codec = default_codec()
    deadline = time.monotonic() + wait_s
    position = start
    while True:
        async for record in read_history(settings, [witness], start={witness: position}):
            position = record.offset + 1
            try:
                _, entry = codec.decode(record.value)
            except SchemaError:
                continue
            if isinstance(entry, WitnessEntry) and entry.subject_event_id == envelope.event_id:
                return entry.sequence
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.25)


def _as_of(
    settings: Settings,
    name: str,
    cutoff: datetime | None,
    offsets: dict[tuple[str, int], int] | None,
) -> None:
    from projections.digest import format_positions
    from projections.rebuild import build_as_of

    with _bar(f"building {name}") as progress:
        events, covered = asyncio.run(
            build_as_of(settings, name, offsets=offsets, cutoff=cutoff, progress=progress)
        )
    triples = [(tp.topic, tp.partition, o) for tp, o in covered.items()]
    what = f"time {cutoff.isoformat()}" if cutoff is not None else "the offsets given"
    out.print(f"built schema {name} as of {what}: {events} event(s) folded")
    listed = ", ".join(format_positions(triples)) or "none"
    out.print(f"positions covered: {listed}", soft_wrap=True)
    out.print(f"query it: conclave --schema {name} tasks   (or CONCLAVE_SCHEMA={name})")


def _list(settings: Settings) -> None:
    from projections.rebuild import list_as_of

    found = asyncio.run(list_as_of(settings))
    table = Table(title="schemas built with --as-of")
    table.add_column("schema")
    table.add_column("what")
    for schema in found:
        table.add_row(schema.name, schema.description)
    out.print(table)


def _drop(settings: Settings, name: str) -> None:
    from projections.rebuild import drop_as_of

    asyncio.run(drop_as_of(settings, name))
    out.print(f"dropped schema {name}")
