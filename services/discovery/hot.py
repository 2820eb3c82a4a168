"""Redis: the discovery hot path (challenge nonces, node tokens, liveness, heartbeat write-behind).

Keys (prefix ``fm:disc:``; a single Redis, not a cluster: the heartbeat script derives a key from a value):

* ``nonce:<nonce>`` -> peer ID it was issued for, ``EX`` = challenge lifetime; consumed with ``GETDEL``.
* ``rl:challenge:<client address>`` -> challenges issued to that client in the current minute (``EX`` 60 s).
* ``tok:<sha256(token)>`` -> node_id (no expiry; deleted on unregister / re-registration).
* ``badtok:<sha256>`` -> "1" for a few seconds: a token Postgres does not know either (negative cache).
* ``alive`` (sorted set) node_id -> unix time of the last heartbeat. A node is live while that time is within
  ``NODE_HEARTBEAT_TTL_S``; older entries are pruned by the flusher.
* ``hb`` (hash) node_id -> JSON of the latest heartbeat not yet written to Postgres (write-behind).
* ``node:<node_id>`` (hash) ``last_hb``, ``online_since``, ``report`` (last heartbeat JSON), ``ledger``
  (JSON ``{"tokens_served", "earned_far"}`` from the Postgres ledger, refreshed by the flusher).

One heartbeat = one ``EVALSHA`` round trip.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Optional

import redis.asyncio as aioredis

PREFIX = "fm:disc:"
ALIVE = PREFIX + "alive"
PENDING = PREFIX + "hb"
NODE = PREFIX + "node:"

_HEARTBEAT_LUA = """
local node = redis.call('GET', KEYS[1])
if not node then return false end
local now = tonumber(ARGV[1])
local prev = redis.call('ZSCORE', KEYS[2], node)
redis.call('ZADD', KEYS[2], now, node)
redis.call('HSET', KEYS[3], node, ARGV[2])
local nk = ARGV[3] .. node
if (not prev) or (now - tonumber(prev) > tonumber(ARGV[4])) then
  redis.call('HSET', nk, 'online_since', ARGV[1])
end
redis.call('HSET', nk, 'last_hb', ARGV[1], 'report', ARGV[2])
return {node, redis.call('HGET', nk, 'ledger') or ''}
"""

_TAKE_PENDING_LUA = """
local all = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return all
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "fn_" + secrets.token_urlsafe(32)


class HotStore:
    def __init__(self, client: aioredis.Redis, *, heartbeat_ttl_s: float):
        self.redis = client
        self.ttl = heartbeat_ttl_s
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._take_pending = client.register_script(_TAKE_PENDING_LUA)

    @classmethod
    def from_url(cls, url: str, *, heartbeat_ttl_s: float) -> "HotStore":
        client = aioredis.Redis.from_url(url, decode_responses=True, max_connections=64,
                                         socket_connect_timeout=5, socket_timeout=10,
                                         health_check_interval=30)
        return cls(client, heartbeat_ttl_s=heartbeat_ttl_s)

    async def close(self) -> None:
        await self.redis.aclose()

    # --- challenges -------------------------------------------------------------------------------
    async def issue_nonce(self, peer_id: str, lifetime_s: int) -> str:
        nonce = secrets.token_hex(32)
        await self.redis.set(PREFIX + "nonce:" + nonce, peer_id, ex=lifetime_s)
        return nonce

    async def rate_limit(self, key: str, limit: int, window_s: int) -> Optional[int]:
        """Fixed window: count one hit of ``key``; None if within ``limit`` per ``window_s``, else the seconds until
        the window ends (for Retry-After). Key ``rl:<key>`` expires with its window."""
        name = PREFIX + "rl:" + key
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(name, 0, ex=window_s, nx=True)
            pipe.incr(name)
            pipe.ttl(name)
            _, count, ttl = await pipe.execute()
        if count <= limit:
            return None
        return max(1, int(ttl) if ttl and ttl > 0 else window_s)

    async def consume_nonce(self, nonce: str) -> Optional[str]:
        """The peer ID the nonce was issued for (and the nonce is gone), or None."""
        return await self.redis.getdel(PREFIX + "nonce:" + nonce)

    # --- tokens -----------------------------------------------------------------------------------
    async def bind_token(self, token_sha: str, node_id: str, old_sha: Optional[str] = None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            if old_sha and old_sha != token_sha:
                pipe.delete(PREFIX + "tok:" + old_sha)
            pipe.set(PREFIX + "tok:" + token_sha, node_id)
            pipe.delete(PREFIX + "badtok:" + token_sha)
            await pipe.execute()

    async def is_known_bad(self, token_sha: str) -> bool:
        return bool(await self.redis.exists(PREFIX + "badtok:" + token_sha))

    async def mark_bad(self, token_sha: str, seconds: int = 5) -> None:
        await self.redis.set(PREFIX + "badtok:" + token_sha, "1", ex=seconds)

    async def node_for_token(self, token_sha: str) -> Optional[str]:
        return await self.redis.get(PREFIX + "tok:" + token_sha)

    # --- liveness ---------------------------------------------------------------------------------
    async def heartbeat(self, token_sha: str, report: dict, now: Optional[float] = None):
        """(node_id, ledger dict or None), or None when the token is unknown to Redis."""
        now = time.time() if now is None else now
        result = await self._heartbeat(keys=[PREFIX + "tok:" + token_sha, ALIVE, PENDING],
                                       args=[repr(now), json.dumps(report, separators=(",", ":")), NODE, self.ttl])
        if not result:
            return None
        node_id, ledger = result
        return node_id, (json.loads(ledger) if ledger else None)

    async def mark_alive(self, node_id: str, now: Optional[float] = None, ledger: Optional[dict] = None) -> None:
        """Registration counts as a heartbeat (a fresh streak: online_since = now)."""
        now = time.time() if now is None else now
        mapping = {"last_hb": repr(now), "online_since": repr(now)}
        if ledger is not None:
            mapping["ledger"] = json.dumps(ledger)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(ALIVE, {node_id: now})
            pipe.hset(NODE + node_id, mapping=mapping)
            pipe.hdel(NODE + node_id, "report")
            await pipe.execute()

    async def drop(self, node_id: str, token_sha: Optional[str]) -> None:
        """Unregister: no longer live, token revoked, pending heartbeat discarded."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(ALIVE, node_id)
            pipe.hdel(PENDING, node_id)
            if token_sha:
                pipe.delete(PREFIX + "tok:" + token_sha)
            pipe.hdel(NODE + node_id, "online_since", "report")
            await pipe.execute()

    async def live_nodes(self, now: Optional[float] = None) -> dict[str, float]:
        now = time.time() if now is None else now
        entries = await self.redis.zrangebyscore(ALIVE, now - self.ttl, "+inf", withscores=True)
        return {node_id: score for node_id, score in entries}

    async def count_live(self, now: Optional[float] = None) -> int:
        now = time.time() if now is None else now
        return await self.redis.zcount(ALIVE, now - self.ttl, "+inf")

    async def last_heartbeats(self, node_ids: list[str]) -> dict[str, Optional[float]]:
        if not node_ids:
            return {}
        scores = await self.redis.zmscore(ALIVE, node_ids)
        return dict(zip(node_ids, scores))

    async def prune(self, now: Optional[float] = None, keep_s: float = 86400.0) -> int:
        """Forget liveness entries much older than the TTL (their node hashes are kept)."""
        now = time.time() if now is None else now
        return await self.redis.zremrangebyscore(ALIVE, "-inf", now - max(self.ttl, keep_s))

    async def node_details(self, node_ids: list[str]) -> dict[str, dict]:
        if not node_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id in node_ids:
                pipe.hgetall(NODE + node_id)
            rows = await pipe.execute()
        return dict(zip(node_ids, rows))

    # --- write-behind -----------------------------------------------------------------------------
    async def take_pending(self) -> list[str]:
        """Atomically take every pending heartbeat: a flat [node_id, json, node_id, json, ...] list."""
        return await self._take_pending(keys=[PENDING])

    async def restore_pending(self, pending: dict[str, dict]) -> None:
        """Put heartbeats back after a failed flush (a newer heartbeat of the same node wins)."""
        if not pending:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id, report in pending.items():
                pipe.hsetnx(PENDING, node_id, json.dumps(report))
            await pipe.execute()

    async def set_ledgers(self, ledgers: dict[str, dict]) -> None:
        if not ledgers:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id, ledger in ledgers.items():
                pipe.hset(NODE + node_id, "ledger", json.dumps(ledger))
            await pipe.execute()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())
