"""PostgreSQL connection, migrations and teardown for the read models.

asyncpg's connection errors are translated to :class:`DatabaseUnavailable` here.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

from conclave.errors import DatabaseUnavailable
from conclave.settings import Settings

__all__ = ["READ_MODEL_TABLES", "connect", "drop_read_models", "migrate", "schema_for"]

MIGRATIONS = Path(__file__).parent / "migrations"
READ_MODEL_TABLES = (
    "tasks",
    "outputs",
    "task_failures",
    "witness_entries",
    "agents",
    "system_events",
    "dead_letters",
    "projection_offsets",
)


def schema_for(settings: Settings) -> str:
    """The PostgreSQL schema holding the read models of one topic prefix.

    Each prefix is its own history (its own witness chain, its own offsets), so
    its read models live apart: two installations can share one database.
    """
    name = re.sub(r"[^a-z0-9_]", "_", settings.topic_prefix.lower())
    return name if name[:1].isalpha() else f"p_{name}"


async def connect(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    schema = schema_for(settings)
    try:
        bootstrap = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            await bootstrap.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        except asyncpg.UniqueViolationError:
            pass  # created concurrently by another process
        finally:
            await bootstrap.close()
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=10,
            server_settings={"search_path": schema},
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"PostgreSQL is not reachable: {exc}") from exc
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply every migration not yet applied, in name order; returns those applied."""
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        # One migrator at a time, even with several processes starting together.
        await conn.execute("SELECT pg_advisory_xact_lock(7251)")
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY)")
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for path in sorted(MIGRATIONS.glob("*.sql")):
            if path.name in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            applied.append(path.name)
    return applied


async def drop_read_models(pool: asyncpg.Pool) -> None:
    """Drop every read model (and the migration record) so that replay starts empty."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7251)")
        for table in (*READ_MODEL_TABLES, "schema_migrations"):
            await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
