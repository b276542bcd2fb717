"""Rebuilds without downtime, digests, and read models as of a point in history.

**Shadow rebuild and swap.** ``conclave replay`` folds every history topic from
offset 0 into a shadow schema (``<live>__shadow``) with the ordinary projector,
while readers and the live projector go on with the live schema. Then, in one
transaction:

1. it takes the live schema's *swap lock* exclusive
   (:func:`~projections.database.swap_lock_key`): the live projector takes it
   shared in every batch's transaction, so the batch in flight commits first and
   the next one waits;
2. it folds the shadow up to exactly the live positions (the live schema no
   longer moves), digests both schemas' read models, compares them;
3. it copies what is not a fold of the topics (``api_tokens``), renames the live
   schema to ``<live>__old`` and the shadow to the live name, and commits.

Readers' sessions name the schema in their ``search_path``, so their next query
reads the rebuilt tables; none sees an empty or a half-built table. The waiting
live batch then sees that its schema's OID changed, rolls back, and resumes from
the positions stored in the rebuilt schema, which are the ones it had: nothing is
written into the schema swapped away, nothing is skipped. The old schema is
dropped after the commit.

**As of.** The same fold, bounded by an offset per partition or by a time (each
partition up to its first record at or after it), into a schema of its own that
queries can be pointed at (``conclave --schema NAME tasks``). Such schemas carry a
comment (``conclave:asof ...``) by which they are listed and dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiokafka import TopicPartition

from conclave.connections import postgres_options
from conclave.errors import ConclaveError
from conclave.settings import Settings
from projections import digest as digests
from projections.database import (
    ProjectorActive,
    connect,
    migrate,
    projector_lock_key,
    schema_for,
    swap_lock_key,
    unavailable,
)
from projections.digest import SchemaDigest
from projections.projector import DEFAULT_MAX_BATCH, Projector

__all__ = [
    "AsOfSchema",
    "RebuildResult",
    "build_as_of",
    "drop_as_of",
    "list_as_of",
    "rebuild",
]

Progress = Callable[[int, int], None]
"""(offsets folded, offsets to fold): how far a fold is."""

ALIGN_TIMEOUT_S = 30.0
"""How long a rebuild waits for a lagging live projector to reach the rebuilt positions."""
_MARK = "conclave:asof "


class RebuildError(ConclaveError):
    """A rebuild or an as-of build that cannot go on (one line for the operator)."""


@dataclass(frozen=True, slots=True)
class RebuildResult:
    schema: str
    events: int
    """Records folded into the shadow schema."""
    seconds: float
    live: SchemaDigest
    rebuilt: SchemaDigest
    differ: list[str]
    """Tables whose digests differ (empty: the rebuilt rows equal the live ones)."""
    swapped: bool
    paused_s: float = 0.0
    """How long the live projector waited: the swap lock held (last records folded into
    the shadow, both schemas digested, renamed)."""


@dataclass(frozen=True, slots=True)
class AsOfSchema:
    name: str
    description: str
    """What it was built as of, and when it was built."""


def _positions(stored: dict[tuple[str, int], int]) -> dict[TopicPartition, int]:
    return {TopicPartition(t, p): o for (t, p), o in stored.items() if o > 0}


async def _stored(conn: asyncpg.Connection, schema: str) -> dict[TopicPartition, int]:
    rows = await conn.fetch(
        f'SELECT topic, partition, next_offset FROM "{schema}".projection_offsets'
    )
    return _positions({(r[0], r[1]): r[2] for r in rows})


async def _raw(settings: Settings) -> asyncpg.Connection:
    with unavailable():
        conn: asyncpg.Connection = await asyncpg.connect(
            settings.database_url, timeout=10, **postgres_options(settings)
        )
    return conn


async def rebuild(
    settings: Settings,
    *,
    swap: bool = True,
    progress: Progress | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> RebuildResult:
    """Rebuild the read models into a shadow schema; compare digests with the live ones;
    swap the shadow in (``swap``) or drop it (a check)."""
    live = schema_for(settings)
    shadow, old = f"{live}__shadow"[:63], f"{live}__old"[:63]
    started = time.monotonic()
    admin = await _raw(settings)
    live_pool = await connect(settings, schema=live)
    shadow_pool: asyncpg.Pool | None = None
    projector: Projector | None = None
    try:
        with unavailable():
            await migrate(live_pool)  # the live schema must have every table the shadow has
        shadow_pool = await connect(settings, schema=shadow, max_size=2)
        projector = Projector(settings, shadow_pool, max_batch=max_batch)
        await projector.start()
        # Drops what a crashed rebuild left, under the shadow's lock: one rebuild at a time.
        try:
            events = await projector.rebuild(progress)
        except ProjectorActive:
            raise RebuildError(f"another rebuild of schema {live} is running") from None
        with unavailable():
            shadow_at = await _stored(admin, shadow)
        await _align(settings, admin, live, live_pool, shadow_at)
        with unavailable():
            await admin.execute(f'DROP SCHEMA IF EXISTS "{old}" CASCADE')
            async with admin.transaction():
                await admin.execute("SELECT pg_advisory_xact_lock($1)", swap_lock_key(live))
                locked = time.monotonic()
                # The live schema stands still now: bring the shadow to exactly its positions.
                live_at = await _stored(admin, live)
                projector.bound(limits=_with_zeros(live_at, projector))
                events += await projector.catch_up(progress)
                live_digest = await digests.digest_schema(admin, live)
                rebuilt_digest = await digests.digest_schema(admin, shadow)
                differ = digests.compare(live_digest, rebuilt_digest)
                if live_digest.positions != rebuilt_digest.positions:
                    differ.append("projection_offsets")
                if swap:
                    await admin.execute(
                        # Tokens created meanwhile wait, then go into the rebuilt schema.
                        f'LOCK TABLE "{live}".api_tokens IN SHARE MODE; '
                        f'DELETE FROM "{shadow}".api_tokens; '
                        f'INSERT INTO "{shadow}".api_tokens SELECT * FROM "{live}".api_tokens; '
                        f'ALTER SCHEMA "{live}" RENAME TO "{old}"; '
                        f'ALTER SCHEMA "{shadow}" RENAME TO "{live}"'
                    )
            paused = time.monotonic() - locked
        await projector.stop()
        projector = None
        with unavailable():
            # No session writes the old schema any more (the next batch sees the swap);
            # readers still in it finish first (DROP waits for their locks).
            await admin.execute(f'DROP SCHEMA IF EXISTS "{shadow if not swap else old}" CASCADE')
        rebuilt_digest = _named(rebuilt_digest, live)
        return RebuildResult(
            live,
            events,
            time.monotonic() - started,
            live_digest,
            rebuilt_digest,
            differ,
            swap,
            paused,
        )
    finally:
        if projector is not None:
            await projector.stop()
        if shadow_pool is not None:
            await shadow_pool.close()
        await live_pool.close()
        await admin.close()


def _named(d: SchemaDigest, schema: str) -> SchemaDigest:
    return SchemaDigest(schema, d.tables, d.positions)


def _with_zeros(at: dict[TopicPartition, int], projector: Projector) -> dict[TopicPartition, int]:
    """``at`` for every partition the projector reads (0 where ``at`` has none)."""
    return {tp: at.get(tp, 0) for tp in projector.partitions}


async def _align(
    settings: Settings,
    admin: asyncpg.Connection,
    live: str,
    live_pool: asyncpg.Pool,
    shadow_at: dict[TopicPartition, int],
) -> None:
    """Make the live schema reach at least ``shadow_at`` (the swap folds the shadow up to
    the live positions, never the live one up to the shadow's): wait for the live
    projector, or fold the live schema up to ``shadow_at`` here if none is active."""
    deadline = time.monotonic() + ALIGN_TIMEOUT_S
    while True:
        with unavailable():
            live_at = await _stored(admin, live)
        behind = {tp: o for tp, o in shadow_at.items() if live_at.get(tp, 0) < o}
        if not behind:
            return
        with unavailable():
            active = not await admin.fetchval(
                "SELECT pg_try_advisory_lock($1)", key := projector_lock_key(live)
            )
            if not active:
                await admin.execute("SELECT pg_advisory_unlock($1)", key)
        if not active:
            catch_up = Projector(settings, live_pool)
            await catch_up.start()
            try:
                catch_up.bound(limits=shadow_at)
                await catch_up.catch_up()
            finally:
                await catch_up.stop()
            continue
        if time.monotonic() > deadline:
            lag = sum(o - live_at.get(tp, 0) for tp, o in behind.items())
            raise RebuildError(
                f"the live projector of schema {live} is {lag} record(s) behind the rebuilt "
                f"read models after {ALIGN_TIMEOUT_S:.0f} s; try again when it has caught up"
            )
        await asyncio.sleep(0.2)


async def build_as_of(
    settings: Settings,
    into: str,
    *,
    offsets: dict[tuple[str, int], int] | None = None,
    cutoff: datetime | None = None,
    progress: Progress | None = None,
) -> tuple[int, dict[TopicPartition, int]]:
    """Fold the history into schema ``into`` up to ``offsets`` (partitions not named:
    nothing) or up to ``cutoff`` (record times); returns the records folded and the
    positions the rows cover."""
    live = schema_for(settings)
    if into in (live, f"{live}__shadow", f"{live}__old"):
        raise RebuildError(f"{into} is the live schema or one of its rebuild's; choose another")
    admin = await _raw(settings)
    try:
        with unavailable():
            if await admin.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", into):
                raise RebuildError(
                    f"schema {into} exists already: `conclave replay --drop {into}` first, "
                    "or choose another --into"
                )
        pool = await connect(settings, schema=into, max_size=2)
        try:
            projector = Projector(settings, pool)
            await projector.start()
            try:
                limits: dict[TopicPartition, int] | None = None
                if offsets is not None:
                    known = {(tp.topic, tp.partition) for tp in projector.partitions}
                    if unknown := sorted(set(offsets) - known):
                        named = ", ".join(f"{t}:{p}" for t, p in unknown)
                        raise RebuildError(f"not a history partition: {named}")
                    limits = {
                        tp: offsets.get((tp.topic, tp.partition), 0) for tp in projector.partitions
                    }
                cutoff_ms = None if cutoff is None else int(cutoff.timestamp() * 1000)
                projector.bound(limits=limits, cutoff_ms=cutoff_ms)
                events = await projector.rebuild(progress)
            finally:
                await projector.stop()
            with unavailable():
                covered = await _stored(admin, into)
                what = (
                    f"offsets {','.join(digests.format_positions(_triples(limits or {})))}"
                    if cutoff is None
                    else f"time {cutoff.isoformat()}"
                )
                built = datetime.now().astimezone().isoformat(timespec="seconds")
                mark = _MARK + json.dumps({"as_of": what, "built_at": built})
                await admin.execute(f"COMMENT ON SCHEMA \"{into}\" IS '{_quoted(mark)}'")
        finally:
            await pool.close()
        return events, covered
    finally:
        await admin.close()


def _triples(positions: dict[TopicPartition, int]) -> list[tuple[str, int, int]]:
    return [(tp.topic, tp.partition, o) for tp, o in positions.items()]


def _quoted(text: str) -> str:
    return text.replace("'", "''")


async def list_as_of(settings: Settings) -> list[AsOfSchema]:
    """The schemas built with ``--as-of``, by name."""
    admin = await _raw(settings)
    try:
        with unavailable():
            rows = await admin.fetch(
                """SELECT n.nspname, obj_description(n.oid, 'pg_namespace') AS mark
                   FROM pg_namespace n
                   WHERE obj_description(n.oid, 'pg_namespace') LIKE $1 ORDER BY 1""",
                _MARK + "%",
            )
    finally:
        await admin.close()
    found = []
    for row in rows:
        mark = json.loads(str(row["mark"])[len(_MARK) :])
        described = f"as of {mark['as_of']}, built {mark['built_at']}"
        found.append(AsOfSchema(row["nspname"], described))
    return found


async def drop_as_of(settings: Settings, name: str) -> None:
    """Drop a schema built with ``--as-of`` (refused for any other schema)."""
    admin = await _raw(settings)
    try:
        with unavailable():
            mark = await admin.fetchval(
                "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
                name,
            )
            exists = await admin.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", name)
            if not exists:
                raise RebuildError(f"no schema {name} (`conclave replay --list` lists them)")
            if not str(mark or "").startswith(_MARK):
                raise RebuildError(
                    f"schema {name} was not built by `conclave replay --as-of`: not dropped"
                )
            await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await admin.close()
