"""The HTTP API (``conclave api``): read models as JSON, commands, a live event stream;
per tenant, by bearer token. See :func:`conclave.api.app.create_app`."""

from conclave.api.app import create_app

__all__ = ["create_app"]
