"""Bearer tokens of the HTTP API: each maps to one tenant.

A token reads ``ccl_<token id>_<secret>``. The id finds the row; the secret is checked
against the SHA-256 kept in ``api_tokens`` with a constant-time comparison, so neither a
database dump nor the time a refusal takes gives a usable token away. The secret is
shown once, when the token is created, and never logged. A high-entropy random secret
needs no slow hash (there is nothing to guess from its digest), so lookups stay cheap
enough for every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg

from conclave.domain.events import now_us
from conclave.domain.validation import invalid_tenant
from conclave.errors import ConclaveError, NotFound

__all__ = [
    "Principal",
    "TokenInfo",
    "create_token",
    "hash_secret",
    "list_tokens",
    "parse_token",
    "revoke_token",
    "verify",
]

PREFIX = "ccl"
_ID_BYTES = 6
_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: a token's tenant, and whether it may halt and resume."""

    token_id: str
    tenant: str
    admin: bool


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as ``conclave tokens list`` shows it: never its secret."""

    token_id: str
    name: str
    tenant: str
    admin: bool
    created_at: int
    revoked_at: int | None


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token() -> tuple[str, str, str]:
    """A fresh ``(token id, secret, token)``."""
    token_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return token_id, secret, f"{PREFIX}_{token_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """``(token id, secret)`` of a well-formed token, else ``None``."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or len(token_id) != 2 * _ID_BYTES or not secret:
        return None
    if any(c not in "0123456789abcdef" for c in token_id):
        return None
    return token_id, secret


async def create_token(
    db: asyncpg.Pool, tenant: str, *, name: str = "", admin: bool = False
) -> tuple[TokenInfo, str]:
    """Create a token for ``tenant``; returns it with its full text (shown once)."""
    if (reason := invalid_tenant(tenant)) is not None:
        raise ConclaveError(reason)
    if "\x00" in name:
        raise ConclaveError("a token's name must not contain NUL characters")
    token_id, secret, token = new_token()
    created = now_us()
    await db.execute(
        "INSERT INTO api_tokens (token_id, name, tenant, admin, secret_hash, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        token_id,
        name,
        tenant,
        admin,
        hash_secret(secret),
        created,
    )
    return TokenInfo(token_id, name, tenant, admin, created, None), token


async def list_tokens(db: asyncpg.Pool) -> list[TokenInfo]:
    rows = await db.fetch(
        "SELECT token_id, name, tenant, admin, created_at, revoked_at FROM api_tokens"
        " ORDER BY created_at, token_id"
    )
    return [TokenInfo(*r) for r in rows]


async def revoke_token(db: asyncpg.Pool, token_id: str) -> None:
    """Revoke a token from now on; revoking it again does nothing."""
    found = await db.fetchval(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, $2) WHERE token_id = $1"
        " RETURNING token_id",
        token_id,
        now_us(),
    )
    if found is None:
        raise NotFound(f"no token {token_id!r}")


async def verify(db: asyncpg.Pool, token: str) -> Principal | None:
    """The principal of a valid, unrevoked token; ``None`` for anything else."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    token_id, secret = parsed
    row = await db.fetchrow(
        "SELECT tenant, admin, secret_hash FROM api_tokens"
        " WHERE token_id = $1 AND revoked_at IS NULL",
        token_id,
    )
    if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), hash_secret(secret)):
        return None
    return Principal(token_id=token_id, tenant=row["tenant"], admin=row["admin"])
