"""Queries of the coordination read models: locks, their history, versioned state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from projections.database import Database

__all__ = [
    "LockEventView",
    "LockView",
    "list_locks",
    "lock_history",
    "state_history",
    "state_version",
]


@dataclass(frozen=True, slots=True)
class StateVersion:
    """One version of a key's state."""

    key: str
    version: int
    value: Any
    updated_at: int
    restored_from: int | None = None
    """A restore: the version whose value this is (checkpoint ``label``)."""
    label: str | None = None


@dataclass(frozen=True, slots=True)
class LockView:
    name: str
    holder: str | None
    fencing_token: int
    expires_at: int | None
    state: str
    """``held``, ``released`` or ``expired`` (held past ``expires_at``: its expiry is on
    the way)."""
    waiters: list[str]
    updated_at: int


@dataclass(frozen=True, slots=True)
class LockEventView:
    name: str
    kind: str
    holder: str
    fencing_token: int | None
    expires_at: int | None
    reason: str | None
    occurred_at: int


async def list_locks(db: Database, *, held_only: bool = False) -> list[LockView]:
    where = "WHERE state = 'held'" if held_only else ""
    rows = await db.fetch(
        f"SELECT name, holder, fencing_token, expires_at, state, waiters, updated_at "
        f"FROM locks {where} ORDER BY name"
    )
    return [LockView(**dict(r)) for r in rows]


async def lock_history(db: Database, name: str, *, limit: int = 1000) -> list[LockEventView]:
    rows = await db.fetch(
        "SELECT name, kind, holder, fencing_token, expires_at, reason, occurred_at "
        "FROM lock_events WHERE name = $1 ORDER BY occurred_at, event_id LIMIT $2",
        name,
        limit,
    )
    return [LockEventView(**dict(r)) for r in rows]


async def state_version(db: Database, key: str, version: int | None = None) -> StateVersion | None:
    """``key`` at ``version`` (default: the newest), or ``None``."""
    if version is None:
        row = await db.fetchrow(f"{_VERSIONS} WHERE key = $1 ORDER BY version DESC LIMIT 1", key)
    else:
        row = await db.fetchrow(f"{_VERSIONS} WHERE key = $1 AND version = $2", key, version)
    return None if row is None else _version(row)


async def state_history(db: Database, key: str) -> list[StateVersion]:
    """Every version of ``key``, oldest first, each with the checkpoints that label it
    (``label``: the checkpoint a restore came from)."""
    rows = await db.fetch(f"{_VERSIONS} WHERE key = $1 ORDER BY version", key)
    return [_version(r) for r in rows]


async def checkpoints(db: Database, key: str) -> dict[int, list[str]]:
    """Version -> checkpoint labels of ``key``."""
    rows = await db.fetch(
        "SELECT version, label FROM state_checkpoints WHERE key = $1 ORDER BY version, label", key
    )
    found: dict[int, list[str]] = {}
    for r in rows:
        found.setdefault(r["version"], []).append(r["label"])
    return found


_VERSIONS = "SELECT key, version, value_json, updated_at, restored_from, label FROM state_versions"


def _version(row: asyncpg.Record) -> StateVersion:
    return StateVersion(
        key=row["key"],
        version=row["version"],
        value=json.loads(row["value_json"]),
        updated_at=row["updated_at"],
        restored_from=row["restored_from"],
        label=row["label"],
    )
