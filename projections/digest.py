"""A digest per read-model table: equal digests, equal rows.

The rule (docs/witness.md, "Projection digests", states it for other languages):

- every row of the table is rendered by PostgreSQL as its row literal
  (``ROW(...)::text``: ``(a,b,"c d",)``) in a session with ``TimeZone=UTC``,
  ``DateStyle=ISO`` and ``extra_float_digits=3``, so that the text does not
  depend on the server's or the client's settings;
- the rows are ordered by that text, bytewise (``COLLATE "C"``);
- ``digest = SHA-256( for each row: u32be(len(text)) || text (UTF-8) )``.

The columns of :data:`EXCLUDED` are left out of the row (none today: no read-model
column holds the time a row was projected, migration 001 forbids ``now()``
defaults, so a rebuild gives the same bytes in every column). ``projection_offsets``
is not digested as a table: the positions are stated next to the digests instead,
as what they cover. Tables that are not folds of the topics (``api_tokens``,
``schema_migrations``) are not read models and are not digested.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from projections.database import READ_MODEL_TABLES

__all__ = [
    "DIGESTED_TABLES",
    "EXCLUDED",
    "SchemaDigest",
    "TableDigest",
    "combined",
    "compare",
    "digest_rows",
    "digest_schema",
    "format_positions",
    "parse_positions",
]

DIGESTED_TABLES = tuple(t for t in READ_MODEL_TABLES if t != "projection_offsets")
"""Every read model except the positions (stated apart), in the order they are shown."""

EXCLUDED: Mapping[str, frozenset[str]] = {}
"""Columns that may legitimately differ between two folds of the same records, per table.
Empty: every column is a function of the records alone."""

_U32 = struct.Struct(">I")
_SESSION = (
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; SET LOCAL extra_float_digits = 3"
)
_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class TableDigest:
    table: str
    rows: int
    sha256: str
    """Hex."""

    def text(self) -> str:
        """``table:rows:sha256``, how a ``projection.digest`` event carries it."""
        return f"{self.table}:{self.rows}:{self.sha256}"


@dataclass(frozen=True, slots=True)
class SchemaDigest:
    schema: str
    tables: tuple[TableDigest, ...]
    positions: tuple[tuple[str, int, int], ...]
    """``(topic, partition, next offset)`` the rows cover, sorted."""

    def by_table(self) -> dict[str, TableDigest]:
        return {t.table: t for t in self.tables}


def digest_rows(rows: Iterable[str]) -> tuple[int, str]:
    """How many rows, and the SHA-256 (hex) of ``rows`` (row texts, already in order)."""
    sha = hashlib.sha256()
    count = 0
    for row in rows:
        data = row.encode()
        sha.update(_U32.pack(len(data)))
        sha.update(data)
        count += 1
    return count, sha.hexdigest()


def combined(tables: Iterable[TableDigest]) -> str:
    """One SHA-256 over every table's ``table:rows:sha256`` line (sorted by table)."""
    lines = sorted(t.text() for t in tables)
    return digest_rows(lines)[1]


def compare(live: SchemaDigest, rebuilt: SchemaDigest) -> list[str]:
    """The tables whose digests differ (in :data:`DIGESTED_TABLES` order)."""
    a, b = live.by_table(), rebuilt.by_table()
    return [name for name in DIGESTED_TABLES if a.get(name) != b.get(name)]


def format_positions(positions: Iterable[tuple[str, int, int]]) -> list[str]:
    """``topic:partition:offset``, sorted: how positions are printed and witnessed."""
    return [f"{t}:{p}:{o}" for t, p, o in sorted(positions)]


def parse_positions(text: str) -> dict[tuple[str, int], int]:
    """``topic:partition:offset,...`` (the form :func:`format_positions` prints) as a
    dict; :class:`ValueError` naming the part that is not one."""
    found: dict[tuple[str, int], int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pieces = part.rsplit(":", 2)
        if len(pieces) != 3 or not pieces[0]:
            raise ValueError(f"{part!r} is not topic:partition:offset")
        topic, partition, offset = pieces
        try:
            p, o = int(partition), int(offset)
        except ValueError:
            raise ValueError(f"{part!r}: partition and offset must be integers") from None
        if p < 0 or o < 0:
            raise ValueError(f"{part!r}: partition and offset must not be negative")
        if (topic, p) in found:
            raise ValueError(f"{topic}:{p} is given twice")
        found[topic, p] = o
    if not found:
        raise ValueError("no topic:partition:offset given")
    return found


async def _columns(conn: asyncpg.Connection, schema: str, table: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT column_name FROM information_schema.columns
           WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position""",
        schema,
        table,
    )
    excluded = EXCLUDED.get(table, frozenset())
    return [r["column_name"] for r in rows if r["column_name"] not in excluded]


async def digest_table(conn: asyncpg.Connection, schema: str, table: str) -> TableDigest:
    """The digest of ``schema.table`` (an empty digest for a table the schema lacks).
    Runs in the caller's transaction (see :func:`digest_schema`)."""
    columns = await _columns(conn, schema, table)
    if not columns:
        return TableDigest(table, *digest_rows(()))
    listed = ", ".join(f'"{c}"' for c in columns)
    query = (
        f'SELECT t::text AS r FROM (SELECT {listed} FROM "{schema}"."{table}") AS t '
        'ORDER BY t::text COLLATE "C"'
    )
    sha = hashlib.sha256()
    count = 0
    async for record in conn.cursor(query, prefetch=_CHUNK):
        data = str(record[0]).encode()
        sha.update(_U32.pack(len(data)))
        sha.update(data)
        count += 1
    return TableDigest(table, count, sha.hexdigest())


async def digest_schema(conn: asyncpg.Connection, schema: str) -> SchemaDigest:
    """Every read model's digest, and the positions the rows cover. Runs in the caller's
    transaction (a cursor needs one): repeatable read for one snapshot, or one that holds
    the schema's swap lock so that nobody writes it meanwhile."""
    await conn.execute(_SESSION)
    tables = [await digest_table(conn, schema, table) for table in DIGESTED_TABLES]
    rows: Sequence[asyncpg.Record] = await conn.fetch(
        f'SELECT topic, partition, next_offset FROM "{schema}".projection_offsets'
    )
    positions = tuple(sorted((r[0], int(r[1]), int(r[2])) for r in rows))
    return SchemaDigest(schema, tuple(tables), positions)
