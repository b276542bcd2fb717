"""Cursors of the API's listings: opaque to clients, checked before any query.

A cursor wraps the query layer's keyset position (``<queued_at>:<task_id>``, see
:func:`projections.queries.list_tasks`) in URL-safe base64, so a client passes it back
as it got it and does not build one. Anything that is not a cursor this API gave out is
a :class:`BadCursor` (a 400), never a database error: a position past what a PostgreSQL
``bigint`` holds, or text PostgreSQL cannot store, is refused here.
"""

from __future__ import annotations

import base64
import binascii

from conclave.domain.validation import MAX_ID_LENGTH

__all__ = ["BadCursor", "decode_cursor", "encode_cursor"]

_BIGINT_MAX = 2**63 - 1
_MAX_CURSOR = 4 * MAX_ID_LENGTH + 64
"""Longer than any cursor this API gives out (a deliberation's task id is two ids)."""


class BadCursor(ValueError):
    """Not a cursor of this listing."""


def encode_cursor(position: str) -> str:
    """The cursor a client gets for the query layer's ``position``."""
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The query layer's position of ``cursor``; :class:`BadCursor` if it is not one."""
    if len(cursor) > _MAX_CURSOR:
        raise BadCursor("cursor too long: pass back the next_cursor of a previous page")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a cursor: pass back the next_cursor of a previous page") from None
    queued_at, sep, task_id = text.partition(":")
    if (
        not sep
        or not queued_at.isascii()
        or not queued_at.isdigit()
        or int(queued_at) > _BIGINT_MAX
        or not task_id
        or "\x00" in task_id
    ):
        raise BadCursor("not a cursor: pass back the next_cursor of a previous page")
    return text
