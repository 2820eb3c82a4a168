"""Accounts, API keys (``fl_…``, stored as sha256) and JWTs (HS256 with ``JWT_SECRET``; empty = JWTs refused).

A request is authenticated to a ``Principal`` (account + key). Its prepaid balance is reserved when a session
starts (max possible cost) and settled to the actual cost when the session is finalized (services/coordinator/
store.py does both in the same transactions as the session rows).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Optional

import asyncpg
import jwt

from services.common.config import placeholder_problem

KEY_PREFIX = "fl_"
DEFAULT_JWT_RATE_LIMIT_PER_MINUTE = 600
MIN_JWT_SECRET_BYTES = 32
# Secrets that were published (defaults of earlier versions): anyone could sign a token with them.
PUBLISHED_JWT_SECRETS = frozenset({"dev-only-change-me"})


def jwt_secret_problem(secret: str) -> Optional[str]:
    """Why ``secret`` must not sign user JWTs, or None. An empty secret is fine: JWT authentication is off."""
    if not secret:
        return None
    if secret in PUBLISHED_JWT_SECRETS:
        return "JWT_SECRET is a published development default; anyone could sign tokens with it"
    placeholder = placeholder_problem("JWT_SECRET", secret)
    if placeholder:
        return f"{placeholder}; anyone who read the example could sign tokens with it"
    size = len(secret.encode())
    if size < MIN_JWT_SECRET_BYTES:
        return f"JWT_SECRET has {size} bytes; at least {MIN_JWT_SECRET_BYTES} are required"
    return None


def check_jwt_secret(secret: str) -> None:
    """At start: refuse a weak JWT_SECRET with one line (exit status 2), like any bad setting."""
    import sys

    from services.common.config import ConfigError

    problem = jwt_secret_problem(secret)
    if problem:
        print(f"far-mesh: configuration error: {problem} (generate one with: python -c 'import secrets; "
              f"print(secrets.token_urlsafe(32))', or leave JWT_SECRET empty to turn JWT authentication off)",
              file=sys.stderr)
        raise ConfigError(2)


@dataclass(frozen=True)
class Principal:
    account_id: str
    key_id: str  # an API key's id, or "jwt:<account_id>"
    rate_limit_per_minute: int


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:10]


def issue_jwt(account_id: str, secret: str, *, ttl_s: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": account_id, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


class AuthError(Exception):
    pass


class AccountStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def create_account(self, name: str, balance_far: Decimal = Decimal(0)) -> str:
        """A new account; an initial balance is an operator grant, recorded in the ledger like any credit."""
        async with self.pool.acquire() as conn, conn.transaction():
            account_id = await conn.fetchval("INSERT INTO far_accounts (name) VALUES ($1) RETURNING account_id", name)
            if balance_far:
                await conn.execute("SELECT far_credit_account($1, $2, 'grant', NULL, 'initial balance')",
                                   account_id, balance_far)
        return str(account_id)

    async def credit(self, account_id: str, amount_far: Decimal, *, note: Optional[str] = None) -> Decimal:
        """An operator grant (``far-mesh accounts credit``): balance and ledger row in one transaction."""
        if amount_far <= 0:
            raise ValueError("credit amount must be positive")
        try:
            entry = await self.pool.fetchrow("SELECT * FROM far_credit_account($1, $2, 'grant', NULL, $3)",
                                             uuid.UUID(account_id), amount_far, note or "operator credit")
        except asyncpg.NoDataFoundError:
            raise LookupError(f"no account {account_id}") from None
        return entry["balance_after_far"]

    async def create_key(self, account_id: str, *, name: Optional[str] = None,
                         rate_limit_per_minute: int = 600) -> tuple[str, str]:
        """Returns (key_id, plaintext key). The plaintext is shown once and never stored."""
        key = new_api_key()
        key_id = await self.pool.fetchval(
            """INSERT INTO far_api_keys (account_id, name, key_prefix, key_hash, rate_limit_per_minute)
               VALUES ($1, $2, $3, $4, $5) RETURNING key_id""",
            uuid.UUID(account_id), name, display_prefix(key), hash_api_key(key), rate_limit_per_minute)
        return str(key_id), key

    async def list_keys(self, account_id: Optional[str] = None) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT k.key_id, k.account_id, a.name AS account, k.name, k.key_prefix, k.rate_limit_per_minute,
                      k.created_at, k.revoked_at, a.balance_far, a.reserved_far
                 FROM far_api_keys k JOIN far_accounts a USING (account_id)
                WHERE $1::uuid IS NULL OR k.account_id = $1 ORDER BY k.created_at""",
            uuid.UUID(account_id) if account_id else None)

    async def revoke_key(self, key_id: str) -> bool:
        status = await self.pool.execute(
            "UPDATE far_api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL", uuid.UUID(key_id))
        return status.endswith(" 1")

    async def account(self, account_id: str) -> Optional[asyncpg.Record]:
        return await self.pool.fetchrow("SELECT * FROM far_accounts WHERE account_id = $1", uuid.UUID(account_id))

    async def authenticate(self, authorization: Optional[str], jwt_secret: str) -> Principal:
        """``Authorization: Bearer <fl_… key | JWT>`` → Principal; raises AuthError with a reason."""
        if not authorization:
            raise AuthError("missing Authorization header (Bearer <API key or JWT>)")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("Authorization must be 'Bearer <API key or JWT>'")
        if credential.startswith(KEY_PREFIX):
            row = await self.pool.fetchrow(
                "SELECT key_id, account_id, rate_limit_per_minute, revoked_at FROM far_api_keys WHERE key_hash = $1",
                hash_api_key(credential))
            if row is None:
                raise AuthError("invalid API key")
            if row["revoked_at"] is not None:
                raise AuthError("this API key was revoked")
            return Principal(str(row["account_id"]), str(row["key_id"]), row["rate_limit_per_minute"])
        if not jwt_secret:
            raise AuthError("JWT authentication is off on this coordinator (JWT_SECRET is empty); use an API key")
        if jwt_secret_problem(jwt_secret):  # never trust a weak secret, even if a caller skipped the start check
            raise AuthError("JWT authentication is misconfigured on this coordinator; use an API key")
        try:
            claims = jwt.decode(credential, jwt_secret, algorithms=["HS256"], options={"require": ["sub", "exp"]})
            account_id = str(uuid.UUID(str(claims["sub"])))
        except (jwt.PyJWTError, ValueError) as error:
            raise AuthError(f"invalid token: {error}") from None
        if await self.account(account_id) is None:
            raise AuthError("the token's account does not exist")
        return Principal(account_id, f"jwt:{account_id}", DEFAULT_JWT_RATE_LIMIT_PER_MINUTE)


async def provision_api_key(postgres_url: str, *, name: str, balance_far: Decimal = Decimal(0),
                            rate_limit_per_minute: int = 600) -> tuple[str, str]:
    """A new prepaid account holding ``balance_far`` and one API key for it: (account_id, plaintext key)."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    try:
        store = AccountStore(pool)
        account_id = await store.create_account(name, balance_far)
        _, key = await store.create_key(account_id, name=name, rate_limit_per_minute=rate_limit_per_minute)
        return account_id, key
    finally:
        await pool.close()
