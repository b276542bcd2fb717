"""Points in history: ``--as-of`` times, and the names of the schemas built there. Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["SCHEMA_NAME", "asof_schema_name", "check_schema_name", "parse_as_of"]

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
"""A schema Conclave creates: lower case, digits and ``_``, at most 63 bytes (PostgreSQL's
limit), never to be quoted differently by anybody."""

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_as_of(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it names no zone), or a time ago: ``90s``, ``15m``,
    ``2h``, ``1.5d``, ``1w``. :class:`ValueError` with the reason otherwise, or for a
    time after ``now``."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        amount, unit = float(match[1]), _UNITS[match[2]]
        when = now - timedelta(**{unit: amount})
    else:
        try:
            when = datetime.fromisoformat(text.replace(" ", "T", 1))
        except ValueError:
            raise ValueError(
                f"{text!r} is neither an ISO time (2026-12-06T02:30:00Z) "
                "nor a time ago (90s, 15m, 2h, 1d, 1w)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    if when > now:
        raise ValueError(f"{text!r} is in the future ({when.isoformat()})")
    return when.astimezone(UTC)


def asof_schema_name(when: datetime) -> str:
    """``asof_<yyyymmddhhmmss>`` (UTC): the default name of a schema built as of ``when``."""
    return "asof_" + when.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def check_schema_name(name: str) -> str:
    """``name`` if Conclave may create a schema by it; :class:`ValueError` otherwise."""
    if not SCHEMA_NAME.fullmatch(name) or name.startswith("pg_"):
        raise ValueError(
            f"{name!r} is not a schema name Conclave creates: lower-case letters, digits "
            "and _, starting with a letter or _, at most 63 characters, not pg_*"
        )
    return name
