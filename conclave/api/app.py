"""The HTTP API's application: ``create_app(settings)`` returns the FastAPI app.

Its lifespan opens one asyncpg pool and, per tenant that submits, one
:class:`~conclave.client.Client` (the envelope of every command carries the tenant of
the token that sent it), and closes them. Every request needs a bearer token
(:mod:`conclave.api.tokens`); everything it reads is filtered by the token's tenant and
another tenant's resource is a 404, as if it did not exist.

Errors are answers, never a 500: bad parameters and malformed JSON are a 422 with what
was wrong, a command the scheduler would refuse a 400 in its words, a body over the
limit a 413, a missing or bad token a 401, an outage of Kafka or PostgreSQL a 503. A 500
is left for real bugs, logged with their traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conclave.api.cursor import BadCursor
from conclave.api.tokens import Principal, verify
from conclave.client import Client
from conclave.errors import BrokerUnavailable, DatabaseUnavailable, InvalidCommand, NotFound
from conclave.settings import Settings

__all__ = ["MAX_BODY_BYTES", "ApiState", "Caller", "create_app", "state_of"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
"""A request body over this is refused (413): an input is at most 900,000 bytes."""


class ApiState:
    """What the endpoints share: the settings, the read models' pools, a client per tenant.

    ``db`` holds the live read models and the tokens: commands check against it. The
    read endpoints query ``reads``: the same pool, or with ``settings.read_schema`` set
    (``conclave --schema NAME api``), one built by ``conclave replay --as-of``, read-only.
    """

    def __init__(self, settings: Settings, db: asyncpg.Pool, reads: asyncpg.Pool | None = None):
        self.settings = settings
        self.db = db
        self.reads = db if reads is None else reads
        self._clients: dict[str, Client] = {}
        self._lock = asyncio.Lock()

    async def client(self, tenant: str) -> Client:
        """The client whose commands carry ``tenant`` (started on first use)."""
        async with self._lock:
            client = self._clients.get(tenant)
            if client is None:
                settings = dataclasses.replace(self.settings, tenant=tenant)
                client = await Client(settings, producer_name="api").__aenter__()
                self._clients[tenant] = client
            return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.__aexit__(None, None, None)
        self._clients.clear()


def state_of(request: Request) -> ApiState:
    state: ApiState = request.app.state.conclave
    return state


_bearer = HTTPBearer(auto_error=False, description="A token from `conclave tokens create`")


async def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The token's principal; a 401 without a valid, unrevoked token."""
    if credentials is None:
        raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    principal = await verify(state_of(request).db, credentials.credentials)
    if principal is None:
        raise HTTPException(401, "invalid or revoked token", {"WWW-Authenticate": "Bearer"})
    return principal


Caller = Annotated[Principal, Depends(_caller)]


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413, declared or streamed
    (``Content-Length`` is checked first; a chunked body is counted as it arrives and
    handed on only once it is known to fit)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = AsciiJSON({"detail": f"request body over {self.limit:,} bytes"}, status_code=413)
        await response(scope, receive, send)


class AsciiJSON(JSONResponse):
    """JSON with everything outside ASCII escaped: a lone surrogate a client sent (and a
    422 quotes back) is then ``\\ud800`` in the text instead of a UnicodeEncodeError."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode()


def _error(status: int, detail: str) -> JSONResponse:
    return AsciiJSON({"detail": detail}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    async def not_found(_: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    async def refused(_: Request, exc: Exception) -> JSONResponse:
        return _error(400, str(exc))

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("API request failed: %s unavailable (%s)", type(exc).__name__, exc)
        return _error(503, "Kafka or PostgreSQL is not reachable now; try again")

    async def no_read_models(_: Request, exc: Exception) -> JSONResponse:
        return _error(503, "the read models are not there yet: start `conclave projector`")

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return AsciiJSON({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("API %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error (logged)")

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(InvalidCommand, refused)
    app.add_exception_handler(BadCursor, refused)
    app.add_exception_handler(DatabaseUnavailable, unavailable)
    app.add_exception_handler(BrokerUnavailable, unavailable)
    app.add_exception_handler(asyncpg.UndefinedTableError, no_read_models)
    app.add_exception_handler(Exception, bug)


def create_app(
    settings: Settings, *, max_body_bytes: int = MAX_BODY_BYTES, events_poll_s: float = 0.25
) -> FastAPI:
    """The API for ``settings``' Kafka and PostgreSQL; nothing is opened until the app's
    lifespan starts (uvicorn, or ``app.router.lifespan_context(app)`` in a test)."""
    from conclave.api.dashboard import router as dashboard_router
    from conclave.api.events import router as events_router
    from conclave.api.routes import router
    from projections.database import connect, migrate

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = await connect(settings)
        reads: asyncpg.Pool | None = None
        state = ApiState(settings, db)
        try:
            await migrate(db)  # the tokens table, if no projector created it yet
            if settings.read_schema is not None:
                reads = await connect(settings, reader=True)
                state = ApiState(settings, db, reads)
                log.info("the read endpoints answer from schema %s", settings.read_schema)
            app.state.conclave = state
            yield
        finally:
            await state.close()
            if reads is not None:
                await reads.close()
            await db.close()

    app = FastAPI(
        title="Conclave",
        version="1",
        summary="Tasks, deliberations, agents and the witness log of a Conclave, per tenant.",
        lifespan=lifespan,
        default_response_class=AsciiJSON,
    )
    app.state.events_poll_s = events_poll_s
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(events_router)
    app.include_router(dashboard_router)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
