"""One active projector per read-model schema: a session advisory lock.

Two projectors folding the same schema at once deadlock in PostgreSQL and fold
every record twice. The active one holds ``pg_try_advisory_lock`` on the
schema's key (:func:`~projections.database.projector_lock_key`) on the very
connection that it folds on: if that session ends -- the process died, it was
stopped, PostgreSQL restarted -- the lock and any open transaction end together,
so no write can happen without the lock. Any other projector of the schema
stands by and tries again every second or so.

The connection comes from the caller's pool and goes back to it on release;
asyncpg's reset of a released connection runs ``pg_advisory_unlock_all()``.
"""

from __future__ import annotations

import contextlib

import asyncpg

from projections.database import projector_lock_key, unavailable

__all__ = ["SchemaLock"]

# The server drops a silent client (a host that vanished without closing its socket)
# after about idle + interval * count seconds, so that a standby can take over.
_KEEPALIVE = (
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
)


class SchemaLock:
    """The right to write one schema's read models, held on one pooled connection."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None
        self.schema: str | None = None
        """The schema the pool's sessions write to, once :meth:`resolve` has asked."""

    async def resolve(self) -> str:
        """The schema whose lock this is (the first of the pool's ``search_path``)."""
        if self.schema is None:
            with unavailable():
                self.schema = str(await self._pool.fetchval("SELECT current_schema()"))
        return self.schema

    @property
    def held(self) -> bool:
        return self._conn is not None

    @property
    def lost(self) -> bool:
        """Whether the held session has ended under us (asyncpg's pool takes a connection
        the server closed back by itself; the lock ended with it)."""
        try:
            return self._conn is None or bool(self._conn.is_closed())
        except asyncpg.InterfaceError:  # released back to the pool
            return True

    @property
    def connection(self) -> asyncpg.Connection:
        """The session holding the lock: every write of the holder goes through it."""
        assert self._conn is not None, "not held"
        return self._conn

    async def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; ``False`` if another session does.

        Raises :class:`~conclave.errors.DatabaseUnavailable` when PostgreSQL does not answer.
        """
        if self._conn is not None:
            return True
        key = projector_lock_key(await self.resolve())
        with unavailable():
            conn = await self._pool.acquire()
        try:
            with unavailable():
                got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
                if got:
                    await conn.execute(_KEEPALIVE)
        except BaseException:
            await self._give_back(conn, broken=True)
            raise
        if not got:
            await self._give_back(conn, broken=False)
            return False
        self._conn = conn
        return True

    async def release(self, *, broken: bool = False) -> None:
        """Give the lock up. ``broken``: the session failed; close it rather than reuse it
        (it may be mid-transaction or dead), which ends the lock just the same."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._give_back(conn, broken=broken)

    async def _give_back(self, conn: asyncpg.Connection, *, broken: bool) -> None:
        # Nothing here may fail: the connection may be dead, or already back in the pool.
        with contextlib.suppress(Exception):
            if broken:
                conn.terminate()
        with contextlib.suppress(Exception):
            # A failing reset terminates the connection, which also ends the lock.
            await self._pool.release(conn)
