"""``conclave witness export`` and the full ``conclave witness verify``: the witness log
read from the topic or from PostgreSQL, streamed (constant memory) into an export or
through :class:`~conclave.transparency.export.LogChecker`; an export file checked line by
line. The rules live in ``conclave.transparency.export``; this module only reads and
writes, and shows progress on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from conclave.bus import read_history, topics_for
from conclave.domain.events import WitnessEntry
from conclave.domain.witness import leaf_bytes
from conclave.errors import ConclaveError, SchemaError
from conclave.settings import Settings
from conclave.transparency.export import (
    ExportChecked,
    LogBroken,
    LogChecker,
    checkpoint_line,
    end_line,
    entry_line,
    header_line,
    verify_export,
)
from conclave.transparency.keyfiles import read_signer
from conclave.transparency.keys import VerifierKey
from projections.database import connect
from schemas.codec import default_codec

__all__ = ["LogSource", "Verified", "export_log", "verify_export_file", "verify_log"]

LogSource = Literal["topic", "postgres"]
_EVERY = 4096
"""Entries between two progress updates (a refresh per entry would cost more than the
entry)."""


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        entries = task.fields.get("entries", 0)
        rate = f"{entries / elapsed:,.0f} entries/s" if elapsed > 0 else ""
        return Text(f"{entries:,} entries  {rate}")


@contextlib.contextmanager
def _progress(
    console: Console | None, what: str, total: float | None
) -> Iterator[Callable[[int, float | None], None]]:
    """``update(entries, completed)``; a no-op without a console (or not a terminal)."""
    if console is None or not console.is_terminal:
        yield lambda entries, completed: None
        return
    with Progress(
        TextColumn(what),
        BarColumn(bar_width=20),
        _Rate(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=total, entries=0)

        def update(entries: int, completed: float | None) -> None:
            bar.update(
                task, completed=completed if completed is not None else entries, entries=entries
            )

        yield update


def known_keys(settings: Settings, extra: Sequence[VerifierKey] = ()) -> list[VerifierKey]:
    """The public key of the log's signing key (``CONCLAVE_WITNESS_KEY``), if any, and
    ``extra``."""
    keys = list(extra)
    if settings.witness_key is not None:
        with contextlib.suppress(ConclaveError):
            mine = read_signer(settings.witness_key).verifier
            if mine not in keys:
                keys.append(mine)
    return keys


@dataclass(frozen=True, slots=True)
class _Item:
    where: str
    entry: WitnessEntry | None
    finding: str | None = None


async def _topic_items(settings: Settings) -> AsyncIterator[_Item]:
    codec = default_codec()
    async for record in read_history(settings, [topics_for(settings).witness]):
        where = f"offset {record.offset}"
        try:
            _, event = codec.decode(record.value)
        except SchemaError as exc:
            yield _Item(where, None, str(exc))
            continue
        if isinstance(event, WitnessEntry):
            yield _Item(f"sequence {event.sequence} ({where})", event)
        else:
            yield _Item(where, None, f"{event.TYPE} is not a witness entry")


async def _postgres_items(settings: Settings) -> AsyncIterator[_Item]:
    pool = await connect(settings)
    try:
        async with pool.acquire() as conn, conn.transaction(readonly=True):
            async for r in conn.cursor(
                "SELECT * FROM witness_entries ORDER BY sequence", prefetch=2000
            ):
                entry = WitnessEntry(
                    sequence=r["sequence"],
                    previous_hash=bytes(r["previous_hash"]),
                    entry_hash=bytes(r["entry_hash"]),
                    subject_type=r["subject_type"],
                    subject_event_id=r["subject_event_id"],
                    subject_digest=bytes(r["subject_digest"]),
                    recorded_at=r["recorded_at"],
                    task_id=r["task_id"],
                    agent_id=r["agent_id"],
                    detail=r["detail"],
                    attempt=r["attempt"],
                )
                yield _Item(f"sequence {entry.sequence} (row)", entry)
    finally:
        await pool.close()


def _items(settings: Settings, source: LogSource) -> AsyncIterator[_Item]:
    return _topic_items(settings) if source == "topic" else _postgres_items(settings)


async def _checkpoints(settings: Settings, source: LogSource) -> list[tuple[int, str]]:
    """(tree size, signed note) of every published checkpoint, smallest first."""
    if source == "topic":
        from conclave.verify import published_checkpoints

        found = [(c.tree_size, c.note) for c in await published_checkpoints(settings)]
    else:
        pool = await connect(settings)
        try:
            rows = await pool.fetch("SELECT tree_size, note FROM checkpoints")
        finally:
            await pool.close()
        found = [(r["tree_size"], r["note"]) for r in rows]
    return sorted(found)


async def _count(settings: Settings, source: LogSource) -> int | None:
    if source != "postgres":
        return None
    pool = await connect(settings)
    try:
        return int(await pool.fetchval("SELECT count(*) FROM witness_entries"))
    finally:
        await pool.close()


def _bytes_of(entry: WitnessEntry, where: str) -> bytes:
    try:
        return leaf_bytes(entry)
    except ValueError as exc:  # a hash field that is not 32 bytes
        raise LogBroken(where, str(exc)) from None


@dataclass(frozen=True, slots=True)
class Verified:
    checker: LogChecker
    findings: tuple[str, ...]
    """Records on the witness topic that are not entries (listed, never part of the log)."""


async def verify_log(
    settings: Settings,
    source: LogSource,
    keys: Sequence[VerifierKey],
    *,
    origin: str | None = None,
    console: Console | None = None,
) -> Verified:
    """Check the log at ``source``: the chain, the tree, and each published checkpoint at
    its size. Raises :class:`LogBroken` at the first bad place."""
    checker = LogChecker(keys, origin)
    pending = await _checkpoints(settings, source)
    findings: list[str] = []

    def due() -> None:
        while pending and pending[0][0] <= checker.size:
            size, note = pending.pop(0)
            checker.checkpoint(note, f"checkpoint of tree size {size}")

    due()
    with _progress(console, f"verifying {source}", await _count(settings, source)) as update:
        async for item in _items(settings, source):
            if item.entry is None:
                findings.append(f"{item.where}: {item.finding}")
                continue
            checker.entry(_bytes_of(item.entry, item.where), item.entry.entry_hash, item.where)
            due()
            if checker.size % _EVERY == 0:
                update(checker.size, None)
    if pending:
        size, _ = pending[0]
        raise LogBroken(
            f"checkpoint of tree size {size}",
            f"the log has only {checker.size} entries: entries it signed are missing",
        )
    return Verified(checker, tuple(findings))


async def export_log(
    settings: Settings,
    source: LogSource,
    keys: Sequence[VerifierKey],
    out: IO[str],
    *,
    console: Console | None = None,
) -> tuple[LogChecker, tuple[str, ...]]:
    """Write the export of the log at ``source`` to ``out``, checking it on the way (an
    export of a broken log is refused at the first bad place, not written in full)."""
    pending = await _checkpoints(settings, source)
    origin = _origin(pending)
    schemas = default_codec().registry.canonical_forms()
    checker = LogChecker(keys, origin)
    out.write(header_line(origin, keys, schemas) + "\n")
    findings: list[str] = []

    def due() -> None:
        while pending and pending[0][0] <= checker.size:
            size, note = pending.pop(0)
            checker.checkpoint(note, f"checkpoint of tree size {size}")
            out.write(checkpoint_line(note) + "\n")

    due()
    with _progress(console, f"exporting {source}", await _count(settings, source)) as update:
        async for item in _items(settings, source):
            if item.entry is None:
                findings.append(f"{item.where}: {item.finding}")
                continue
            data = _bytes_of(item.entry, item.where)
            checker.entry(data, item.entry.entry_hash, item.where)
            out.write(entry_line(item.entry, data) + "\n")
            due()
            if checker.size % _EVERY == 0:
                update(checker.size, None)
    if pending:
        size, _ = pending[0]
        raise LogBroken(
            f"checkpoint of tree size {size}",
            f"the log has only {checker.size} entries: entries it signed are missing",
        )
    out.write(end_line(checker.size, checker.checkpoints, checker.head, checker.root) + "\n")
    return checker, tuple(findings)


def _origin(checkpoints: Sequence[tuple[int, str]]) -> str | None:
    """The origin line of the published checkpoints (the first line of a note)."""
    for _, note in checkpoints:
        return note.split("\n", 1)[0]
    return None


def _lines(file: IO[bytes], update: Callable[[int, float | None], None]) -> Iterator[bytes]:
    done = 0
    for number, line in enumerate(file, start=1):
        done += len(line)
        if number % _EVERY == 0:
            update(number, done)
        yield line


def verify_export_file(
    path: Path,
    trusted: Sequence[VerifierKey] = (),
    *,
    origin: str | None = None,
    console: Console | None = None,
) -> ExportChecked:
    """Check an export file (``-``: stdin); :class:`LogBroken` names its first bad line,
    ``OSError`` if it cannot be read."""
    import sys

    total = None if str(path) == "-" else path.stat().st_size
    with contextlib.ExitStack() as stack:
        file = sys.stdin.buffer if str(path) == "-" else stack.enter_context(path.open("rb"))
        update = stack.enter_context(_progress(console, "verifying export", total))
        return verify_export(_lines(file, update), trusted, origin=origin)
