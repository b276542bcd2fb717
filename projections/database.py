"""PostgreSQL connection, migrations and teardown for the read models.

asyncpg's errors that mean "not now" (connection lost, server restarting or
shutting down, too many connections, a deadlock or serialisation failure) are
translated to :class:`DatabaseUnavailable` here, by :func:`connect` and
:func:`unavailable`; whatever else asyncpg raises is a bug or a bad record.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeAlias

import asyncpg

from conclave.connections import postgres_options
from conclave.errors import ConclaveError, ConfigError, DatabaseUnavailable
from conclave.settings import Settings, redacted_url

__all__ = [
    "READ_MODEL_TABLES",
    "REFUSED",
    "NewerDatabase",
    "ProjectorActive",
    "connect",
    "drop_read_models",
    "migrate",
    "projector_lock_key",
    "schema_for",
    "swap_lock_key",
    "unavailable",
]

Database: TypeAlias = "asyncpg.Pool | asyncpg.Connection"
"""A pool, or one connection (for work that must happen in one session)."""

_TRANSIENT = (
    OSError,  # refused, reset: the server is down or restarting
    TimeoutError,
    asyncpg.InterfaceError,  # the connection closed under us
    # A session left mid-protocol by an error the server sent as it went down ("another
    # operation is in progress"): closed and replaced like a lost one.
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.TransactionRollbackError,  # class 40: deadlock, serialisation failure
    asyncpg.InvalidCachedStatementError,  # tables recreated (a rebuild) under a cached plan
    asyncpg.exceptions.OutdatedSchemaCacheError,
)

REFUSED: tuple[type[Exception], ...] = (
    asyncpg.DataError,  # class 22, from the server: a NUL in text, a bad date
    # asyncpg's own refusal to encode a value (an int beyond the column's type), raised
    # before it is sent: as an argument, its DataError (an InterfaceError too, but not an
    # outage); in a COPY, the codec's OverflowError as it is.
    asyncpg.exceptions._base.DataError,
    OverflowError,
)
"""What a record's values can make PostgreSQL (or asyncpg) refuse: that record is bad,
the connection is fine."""


class ProjectorActive(ConclaveError):
    """Another projector holds the read models of this schema (see :func:`projector_lock_key`)."""

    retriable = True
    permanent = False


MIGRATIONS = Path(__file__).parent / "migrations"
READ_MODEL_TABLES = (
    "tasks",
    "outputs",
    "task_failures",
    "witness_entries",
    "checkpoints",
    "agents",
    "hosts",
    "system_events",
    "pool_settings",
    "dead_letters",
    "rejections",
    "locks",
    "lock_events",
    "state_versions",
    "state_checkpoints",
    "state_rejections",
    "workflows",
    "workflow_steps",
    "messages",
    "projection_digests",
    "agent_events",
    "projection_offsets",
)


class NewerDatabase(ConfigError):
    """The read models' schema is newer than this Conclave: it refuses to touch them."""


def schema_for(settings: Settings) -> str:
    """The PostgreSQL schema holding the read models of one topic prefix.

    Each prefix is its own history (its own witness chain, its own offsets), so
    its read models live apart: two installations can share one database.
    """
    name = re.sub(r"[^a-z0-9_]", "_", settings.topic_prefix.lower())
    return name if name[:1].isalpha() else f"p_{name}"


def projector_lock_key(schema: str) -> int:
    """The advisory-lock key that one schema's only active projector (or rebuild) holds.

    A stable 64-bit hash of the schema name: every process, whatever its version or
    language, computes the same key, and two schemas do not share one.
    """
    digest = hashlib.blake2b(f"conclave.projector:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def swap_lock_key(schema: str) -> int:
    """The advisory-lock key of swapping ``schema`` for a rebuilt one.

    A projector takes it *shared* in every batch's transaction (and checks there that its
    schema is still the one it positioned itself in); a swap takes it *exclusive* in the
    transaction that renames the schemas, so that no batch commits into a schema being
    swapped away, and the next batch notices the swap and resumes from the positions the
    rebuilt schema holds (see :mod:`projections.rebuild`)."""
    digest = hashlib.blake2b(f"conclave.swap:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.contextmanager
def unavailable(what: str = "PostgreSQL") -> Iterator[None]:
    """asyncpg's "not now" errors raised in the block, as :class:`DatabaseUnavailable`."""
    try:
        yield
    except _TRANSIENT as exc:
        if isinstance(exc, (asyncpg.ClientConfigurationError, *REFUSED)):
            raise  # a bad setting or a value refused: not an outage
        detail = " ".join(str(exc).split()) or "connection lost"
        raise DatabaseUnavailable(f"{what}: {type(exc).__name__}: {detail}") from exc


async def connect(
    settings: Settings,
    *,
    min_size: int = 0,
    max_size: int = 4,
    schema: str | None = None,
    reader: bool = False,
) -> asyncpg.Pool:
    """A pool whose sessions read and write the read models of ``schema`` (by default
    the one of the settings' topic prefix, see :func:`schema_for`).

    The one place where sessions get their schema. A ``reader`` (a query command) with
    ``settings.read_schema`` set (``conclave --schema NAME``, ``CONCLAVE_SCHEMA``) reads
    that schema instead -- one built by ``conclave replay --as-of`` -- in read-only
    sessions; it must exist (it is never created here).

    ``min_size`` is 0 by default: with a floor, asyncpg reconnects in the background
    while PostgreSQL is down and logs a WARNING with a traceback for every attempt.
    Idle connections are kept all the same (for ``max_inactive_connection_lifetime``).
    """
    elsewhere = reader and schema is None and settings.read_schema is not None
    schema = schema or (settings.read_schema if elsewhere else None) or schema_for(settings)
    options = postgres_options(settings)  # ConfigError on a TLS file that is missing
    server_settings = {"search_path": schema}
    if elsewhere:
        server_settings["default_transaction_read_only"] = "on"
    with _connection_errors(settings):
        bootstrap = await asyncpg.connect(settings.database_url, timeout=10, **options)
        try:
            if elsewhere:
                if not await bootstrap.fetchval(
                    "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema
                ):
                    raise ConfigError(
                        f"schema {schema} does not exist (CONCLAVE_SCHEMA / --schema): "
                        "`conclave replay --list` lists those built with --as-of"
                    )
            else:
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
            server_settings=server_settings,
            **options,
        )
    assert pool is not None
    return pool


@contextlib.contextmanager
def _connection_errors(settings: Settings) -> Iterator[None]:
    """Connecting failed: :class:`ConfigError` when a setting must change (credentials,
    TLS, the URL), :class:`DatabaseUnavailable` when waiting may help. Messages show
    the URL redacted, and are not chained to asyncpg's errors, which may quote it."""
    where = f"PostgreSQL at {redacted_url(settings.database_url)}"
    try:
        yield
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        # A wrong password, an unknown user, or pg_hba refusing a connection without TLS.
        raise ConfigError(
            f"{where} refused the connection: {exc} "
            "(check CONCLAVE_DATABASE_PASSWORD and the URL's user and sslmode)"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        # The server answered; its certificate is not one we trust (or not for this host).
        raise ConfigError(
            f"{where}: its certificate is not trusted ({exc.verify_message}): "
            "check the URL's sslrootcert and host name"
        ) from None
    except (ValueError, asyncpg.ClientConfigurationError) as exc:  # asyncpg's DSN errors
        raise ConfigError(f"{where}: the URL is refused: {exc}") from None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"PostgreSQL is not reachable: {exc}") from exc


@contextlib.asynccontextmanager
async def _session(db: Database) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


async def migrate(db: Database) -> list[str]:
    """Apply every migration not yet applied, in name order; returns those applied.

    A database that a newer Conclave migrated (it names migrations this one does not
    have) is refused with :class:`NewerDatabase`: this version would fold rows that
    miss what the newer one expects."""
    applied: list[str] = []
    paths = sorted(MIGRATIONS.glob("*.sql"))
    async with _session(db) as conn, conn.transaction():
        # One migrator at a time, even with several processes starting together.
        await conn.execute("SELECT pg_advisory_xact_lock(7251)")
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY)")
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        if unknown := done - {p.name for p in paths}:
            raise NewerDatabase(
                f"the read models were migrated by a newer Conclave ({', '.join(sorted(unknown))}"
                " unknown here): upgrade this one, or point it at another database"
            )
        for path in paths:
            if path.name in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            applied.append(path.name)
    return applied


async def drop_read_models(db: Database) -> None:
    """Drop every read model (and the migration record) so that replay starts empty.

    Refused with :class:`ProjectorActive` while a projector of this schema is active:
    it would go on folding into the new, empty tables from where it was, and the
    replay would miss everything before. Run it on the connection that holds the
    projector lock (as :meth:`Projector.rebuild` does) to keep projectors out until
    the replay is done.
    """
    async with _session(db) as conn, conn.transaction():
        schema = await conn.fetchval("SELECT current_schema()")
        # Granted to the session that holds the projector lock, refused to any other.
        if not await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock($1)", projector_lock_key(schema)
        ):
            raise ProjectorActive(
                f"a projector is active for schema {schema}; stop it before rebuilding"
            )
        await conn.execute("SELECT pg_advisory_xact_lock(7251)")
        for table in (*READ_MODEL_TABLES, "schema_migrations"):
            await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
