"""``GET /dashboard``: a page of HTML, a script and a style sheet that show one tenant's
pools, agents, recent tasks and failures and the witness log's head, live from
``/v1/events``.

The files hold no data and need no token: the page asks for one (or takes it from the
URL fragment ``#token=...``, which browsers never send) and calls the API with it in the
``Authorization`` header, so it sees exactly what the token's tenant may. Kept out of
the OpenAPI document: they are not part of the API. Everything is served from this
origin only (the Content-Security-Policy forbids inline scripts and other hosts), so
that text a tenant put into a task can never run as script on the page.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_TYPES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_ASSETS = frozenset(("dashboard.js", "dashboard.css"))
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("conclave.api").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=_TYPES[name], headers=_HEADERS)


@router.get("/dashboard")
async def dashboard() -> Response:
    """The page."""
    return _file("dashboard.html")


@router.get("/dashboard/{name}")
async def asset(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in _ASSETS:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return _file(name)
