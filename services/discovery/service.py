"""The discovery service's logic: registration, heartbeats, liveness, coverage and provider views.

Postgres (``far_nodes`` and the ledger) is the record; Redis carries the hot path (see
:mod:`services.discovery.hot`): a heartbeat is one Redis script call, and a background flusher writes the
latest heartbeat of every node to Postgres with ``update_node_last_seen()`` every DISCOVERY_FLUSH_INTERVAL_S
and refreshes the nodes' ledger figures (tokens served, FAR earned) in Redis. HTTP lives in
services/discovery/api/routes.py and app.py. See docs/discovery.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Optional

import asyncpg

from services.common.config import DiscoverySettings
from services.common.coverage import RegisteredNode, compute_coverage
from services.common.identity import public_key_problem, registration_message, verify_signature
from services.common.logs import get_logger
from services.common.money import format_far
from services.common.proxies import TrustedProxies
from services.common.states import NodeState
from services.discovery.hot import HotStore, new_token, token_hash
from services.discovery.metrics import DiscoveryMetrics
from services.discovery.protocol import (ApiError, HeartbeatRequest, RegisterRequest, check_node_id, check_peer_id,
                                         check_wallet)
from services.discovery.store import NodeStore
from services.discovery.watcher import DhtWatcher, Snapshot

log = get_logger(__name__)

HEARTBEAT_INTERVAL_S = 30
CHALLENGE_TTL_S = 120
CHALLENGE_WINDOW_S = 60
LEDGER_REFRESH_S = 10.0
FLUSH_CHUNK = 500
LEDGER_SCAN_MARGIN = timedelta(seconds=120)
EARNINGS_DAYS = 30


def _iso(ts) -> Optional[str]:
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        ts = datetime.fromtimestamp(ts, timezone.utc)
    return ts.astimezone(timezone.utc).isoformat()


def _far(value) -> str:
    return format_far(value if isinstance(value, Decimal) else Decimal(str(value)))


class Discovery:
    def __init__(self, settings: DiscoverySettings, pool: asyncpg.Pool, hot: HotStore, models: dict[str, int]):
        self.settings = settings
        self.store = NodeStore(pool)
        self.hot = hot
        self.proxies = TrustedProxies(settings.DISCOVERY_TRUSTED_PROXIES)
        self.models = models
        self.metrics = DiscoveryMetrics()
        self._heartbeats_ok = self.metrics.heartbeats.labels("ok")
        self.ttl = settings.NODE_HEARTBEAT_TTL_S
        self.watcher = DhtWatcher(settings.initial_peers, models, settings.DISCOVERY_DHT_REFRESH_S,
                                  on_refresh=self._on_dht_refresh,
                                  reachability_interval_s=settings.DISCOVERY_REACHABILITY_INTERVAL_S)
        self._peer_of_node: dict[str, str] = {}  # node_id → peer_id, for the reachability in heartbeat answers
        self._ledger_scan_at = 0.0  # monotonic time of the last ledger scan
        self._ledger_since = None  # database time the next scan starts from
        self._flusher: Optional[asyncio.Task] = None
        self.last_flush_error: Optional[str] = None
        for model_id, num_blocks in models.items():
            self.metrics.expected_blocks.labels(model_id).set(num_blocks)
            self.metrics.swarm_ready.labels(model_id).set(0)

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.watcher.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="heartbeat-flusher")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        try:
            await self.flush(pace=False)  # write what is pending before exiting
        except Exception as error:  # noqa: BLE001
            log.warning("final heartbeat flush failed", error=str(error))
        await self.watcher.stop()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.DISCOVERY_FLUSH_INTERVAL_S)
            try:
                await self.flush()
                self.last_flush_error = None
            except Exception as error:  # noqa: BLE001 - keep flushing; heartbeats stay in Redis meanwhile
                self.last_flush_error = str(error)
                log.warning("heartbeat flush failed", error=str(error))

    async def flush(self, pace: bool = True) -> int:
        """Write pending heartbeats to Postgres (update_node_last_seen), refresh changed ledgers, update gauges."""
        started = time.perf_counter()
        flat = await self.hot.take_pending()
        written = 0
        # In chunks, pausing between them as long as the chunk took (Postgres busy at most half the time): a
        # flush of thousands of nodes neither stalls heartbeats nor starves them of CPU on a small machine.
        done = 0  # entries of `flat` written
        try:
            while done < len(flat):
                part = flat[done:done + 2 * FLUSH_CHUNK]
                pending = {part[i]: json.loads(part[i + 1]) for i in range(0, len(part), 2)}
                chunk_started = time.perf_counter()
                written += await self.store.flush_heartbeats(pending)
                done += len(part)
                if done < len(flat) and pace:
                    await asyncio.sleep(min(time.perf_counter() - chunk_started, 1.0))
        except BaseException:  # failed or cancelled: put back what was not written, retried next flush
            rest = flat[done:]
            await asyncio.shield(self.hot.restore_pending(
                {rest[i]: json.loads(rest[i + 1]) for i in range(0, len(rest), 2)}))
            raise
        if flat:
            self.metrics.flushes.inc()
            self.metrics.flushed_rows.inc(written)
        if time.monotonic() - self._ledger_scan_at >= LEDGER_REFRESH_S:
            await self.refresh_ledgers()
            self.metrics.nodes_registered.set(await self.store.count_registered())
        await self.hot.prune()
        self.metrics.nodes_online.set(await self.hot.count_live())
        self.metrics.flush_seconds.observe(time.perf_counter() - started)
        return written

    async def heartbeat(self, authorization: Optional[str], body: Optional[HeartbeatRequest]) -> dict:
        sha = token_hash(_bearer(authorization))
        report = body.model_dump(exclude_none=True) if body is not None else {}
        result = await self.hot.heartbeat(sha, report)
        if result is None:  # not in Redis: maybe Redis lost it; the record decides
            await self._token_from_postgres(sha)
            result = await self.hot.heartbeat(sha, report)
            if result is None:
                self.metrics.heartbeats.labels("refused").inc()
                raise ApiError(401, "invalid_token", "unknown or revoked node token: register again")
        node_id, ledger = result
        if ledger is None:  # nothing cached (e.g. Redis was flushed): read the record once
            ledger = (await self.store.ledgers([node_id]))[node_id]
            await self.hot.set_ledgers({node_id: ledger})
        self._heartbeats_ok.inc()
        answer = {"ok": True, "node_id": node_id, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                  "tokens_served": ledger["tokens_served"], "earned_far": _far(ledger["earned_far"]),
                  "state": NodeState.ONLINE}
        if self.watcher.prober is not None:
            # the node learns here whether the swarm can reach it (it logs and shows it; docs/multihost.md)
            answer["reachability"] = self.watcher.reachability(await self._peer_id_of(node_id))
        return answer

    async def _peer_id_of(self, node_id: str) -> str:
        peer_id = self._peer_of_node.get(node_id)
        if peer_id is None:
            rows = await self.store.nodes(node_ids=[node_id], include_unregistered=True)
            peer_id = rows[0]["peer_id"] if rows else ""
            self._peer_of_node[node_id] = peer_id
        return peer_id

    async def refresh_ledgers(self) -> int:
        """Re-read the ledger figures (tokens served, FAR earned) of the nodes whose contributions changed since
        the last scan (with a margin for transactions that committed late) into Redis, where heartbeats read
        them. A node with nothing cached (e.g. after a Redis flush) is read on its next heartbeat."""
        self._ledger_scan_at = time.monotonic()
        db_now = await self.store.db_now()
        since = self._ledger_since if self._ledger_since is not None else db_now
        changed = await self.store.nodes_with_ledger_changes(since - LEDGER_SCAN_MARGIN)
        self._ledger_since = db_now
        if changed:
            await self.hot.set_ledgers(await self.store.ledgers(changed))
        return len(changed)

    def _on_dht_refresh(self, model_id: str, snapshot: Snapshot) -> None:
        if snapshot.error:
            self.metrics.dht_errors.labels(model_id).inc()
        if snapshot.block_servers is None:
            return
        coverage = compute_coverage(model_id, self.models[model_id], snapshot.block_servers)
        if self.watcher.prober is not None:
            announced = {server.peer_id for servers in snapshot.block_servers for server in servers
                         if server.state in ("JOINING", "ONLINE")}
            self.metrics.unreachable_peers.labels(model_id).set(sum(
                1 for peer in announced if (self.watcher.reachability(peer) or {}).get("reachable") is False))
        self.metrics.discovered_blocks.labels(model_id).set(coverage.discovered_blocks)
        self.metrics.loaded_blocks.labels(model_id).set(coverage.loaded_blocks)
        self.metrics.swarm_ready.labels(model_id).set(1 if coverage.swarm_ready else 0)
        self.metrics.dht_age.labels(model_id).set(snapshot.observed_at or 0)

    # --- helpers ---------------------------------------------------------------------------------------
    def num_blocks(self, model_id: str) -> int:
        if model_id not in self.models:
            known = ", ".join(sorted(self.models)) or "none configured"
            raise ApiError(404, "model_not_found", f"unknown model {model_id[:200]!r} (known: {known})")
        return self.models[model_id]

    async def node_from_token(self, authorization: Optional[str]) -> str:
        token = _bearer(authorization)
        sha = token_hash(token)
        node_id = await self.hot.node_for_token(sha)
        if node_id is None:
            node_id = await self._token_from_postgres(sha)
        return node_id

    async def _token_from_postgres(self, sha: str) -> str:
        """Redis does not know the token (e.g. Redis was flushed): ask the record, re-warm Redis."""
        if await self.hot.is_known_bad(sha):
            raise ApiError(401, "invalid_token", "unknown or revoked node token: register again")
        node_id = await self.store.node_for_token(sha)
        if node_id is None:
            await self.hot.mark_bad(sha)
            raise ApiError(401, "invalid_token", "unknown or revoked node token: register again")
        await self.hot.bind_token(sha, node_id)
        return node_id

    async def describe_nodes(self, rows, *, with_money: bool = False) -> list[dict]:
        ids = [r["node_id"] for r in rows]
        last = await self.hot.last_heartbeats(ids)
        details = await self.hot.node_details(ids)
        now = time.time()
        result = []
        for r in rows:
            node_id = r["node_id"]
            hb = last.get(node_id)
            detail = details.get(node_id) or {}
            active = r["state"] == NodeState.ONLINE and hb is not None and now - hb <= self.ttl
            ledger = json.loads(detail["ledger"]) if detail.get("ledger") else None
            report = json.loads(detail["report"]) if detail.get("report") else {}
            since = float(detail["online_since"]) if active and detail.get("online_since") else None
            last_seen = hb if hb is not None else r["last_seen"].timestamp()
            item = {
                "node_id": node_id, "peer_id": r["peer_id"], "wallet_address": r["wallet_address"],
                "model_id": r["model_id"], "start_block": r["start_block"], "end_block": r["end_block"],
                "blocks": f"{r['start_block']}:{r['end_block']}", "public_name": r["public_name"],
                "hardware": json.loads(r["hardware"]) if r["hardware"] else {},
                "state": r["state"], "active": active,
                "reported_state": report.get("state") if active else None,
                "last_seen": _iso(last_seen), "seconds_since_heartbeat": round(now - last_seen, 1),
                "registered_at": _iso(r["registered_at"]),
                "online_since": _iso(since), "uptime_s": round(now - since, 1) if since else 0,
                "vram_used_gb": report.get("vram_used_gb", _num(r["vram_used_gb"])),
                "gpu_temp_c": report.get("gpu_temp_c", _num(r["gpu_temp_c"])),
                "reported_tokens_served": report.get("tokens_served", r["reported_tokens_served"]),
                # can a client open a session with it? (discovery dials it; None = not probed (yet))
                "reachability": self.watcher.reachability(r["peer_id"]),
            }
            if ledger is None or with_money:
                ledger = (await self.store.ledgers([node_id]))[node_id]
            item["tokens_served"] = ledger["tokens_served"]
            item["earned_far"] = _far(ledger["earned_far"])
            item["quarantined"] = r["quarantine_reason"] is not None
            item["quarantine_reason"] = r["quarantine_reason"]
            item["quarantined_at"] = _iso(r["quarantined_at"])
            if with_money:
                record = (await self.store.check_records([r["peer_id"]]))[r["peer_id"]]
                item["spot_checks"] = _check_counts(record)
                item["disputed_far"] = _far(record["disputed_far"])
                money = await self.store.node_money(node_id)
                item.update(paid_far=_far(money["paid_far"]), pending_far=_far(money["pending_far"]),
                            last_payout=money["last_payout"] and {**money["last_payout"],
                                                                  "amount_far": _far(money["last_payout"]["amount_far"])})
            result.append(item)
        return result

    async def coverage(self, model_id: str) -> dict:
        num_blocks = self.num_blocks(model_id)
        snapshot = self.watcher.snapshots.get(model_id) or Snapshot()
        rows = await self.store.nodes(model_id=model_id)
        last = await self.hot.last_heartbeats([r["node_id"] for r in rows])
        now = time.time()
        registered = [
            RegisteredNode(peer_id=r["peer_id"], node_id=r["node_id"], start_block=r["start_block"],
                           end_block=r["end_block"], state=NodeState(r["state"]),
                           live=last.get(r["node_id"]) is not None and now - last[r["node_id"]] <= self.ttl,
                           last_seen=last.get(r["node_id"]) or r["last_seen"].timestamp(),
                           public_name=r["public_name"])
            for r in rows
        ]
        dht_error = snapshot.error
        if snapshot.block_servers is None:
            dht_error = self.watcher.connect_error or dht_error or "the DHT has not been read yet (starting)"
        result = compute_coverage(
            model_id, num_blocks, snapshot.block_servers, registered, snapshot.joining_since, now,
            joining_too_long_s=self.settings.JOINING_TOO_LONG_S, heartbeat_ttl_s=self.ttl,
            observed_at=snapshot.observed_at, dht_error=dht_error,
        ).to_dict()
        result["observed_age_s"] = round(now - snapshot.observed_at, 1) if snapshot.observed_at else None
        names = {r["peer_id"]: r["public_name"] for r in rows}
        if snapshot.block_servers:
            for servers in snapshot.block_servers:
                for s in servers:
                    names.setdefault(s.peer_id, s.public_name)
        result["peer_names"] = {p: n for p, n in names.items() if n}
        # announced servers no client can dial: they look ONLINE but serve nobody (docs/multihost.md)
        result["unreachable"] = [
            {"peer_id": peer, "public_name": names.get(peer), "error": reach["error"]}
            for peer in sorted({s.peer_id for servers in snapshot.block_servers or () for s in servers
                                if s.state in ("JOINING", "ONLINE")})
            if (reach := self.watcher.reachability(peer)) and reach["reachable"] is False]
        return result


    # --- registration --------------------------------------------------------------------------------------
    async def challenge(self, peer_id: str, client: str = "unknown") -> dict:
        """A single-use nonce; at most DISCOVERY_CHALLENGES_PER_MINUTE per client address (the real client behind a
        trusted proxy: ``client_of``) and DISCOVERY_CHALLENGES_PER_PEER_PER_MINUTE per peer ID (each is a Redis key
        for CHALLENGE_TTL_S), else 429 with Retry-After."""
        check_peer_id(peer_id)
        settings = self.settings
        for key, limit, whom in ((f"challenge:{client}", settings.DISCOVERY_CHALLENGES_PER_MINUTE, f"from {client}"),
                                 (f"challenge-peer:{peer_id}", settings.DISCOVERY_CHALLENGES_PER_PEER_PER_MINUTE,
                                  "for this peer ID")):
            retry_after = await self.hot.rate_limit(key, limit, CHALLENGE_WINDOW_S)
            if retry_after is not None:
                self.metrics.registrations.labels("rate_limited").inc()
                raise ApiError(429, "rate_limited", f"too many challenges {whom} (at most {limit} per minute); "
                                                    f"retry in {retry_after} s", headers={"Retry-After": str(retry_after)})
        nonce = await self.hot.issue_nonce(peer_id, CHALLENGE_TTL_S)
        return {"nonce": nonce, "expires_in_s": CHALLENGE_TTL_S}

    async def register(self, body: RegisterRequest) -> dict:
        """Register (or re-register) a node that proves control of its peer ID; returns a fresh node token."""
        num_blocks = self.num_blocks(body.model_id)
        if body.end_block <= body.start_block:
            raise ApiError(422, "invalid_span", f"end_block ({body.end_block}) must be greater than start_block "
                                                f"({body.start_block})")
        if body.end_block > num_blocks:
            raise ApiError(422, "invalid_span", f"blocks {body.start_block}:{body.end_block} go past the "
                                                f"{num_blocks} blocks of {body.model_id}")
        issued_for = await self.hot.consume_nonce(body.nonce)
        refused = None
        if issued_for is None:
            refused = "nonce unknown, expired or already used: get a new one from GET /nodes/challenge"
        elif issued_for != body.peer_id:
            refused = "nonce was issued for another peer_id"
        elif (problem := public_key_problem(body.public_key)) is not None:
            refused = f"unacceptable identity key: {problem}"
        else:
            message = registration_message(nonce=body.nonce, peer_id=body.peer_id,
                                           wallet_address=body.wallet_address, model_id=body.model_id,
                                           start_block=body.start_block, end_block=body.end_block,
                                           public_name=body.public_name,
                                           hardware=body.hardware.model_dump(exclude_none=True))
            # An RSA verify is CPU work: off the event loop, so registrations never stall heartbeats.
            if not await asyncio.to_thread(verify_signature, peer_id=body.peer_id, public_key_b64=body.public_key,
                                           message=message, signature_b64=body.signature):
                refused = "signature does not prove control of peer_id (wrong key or message)"
        if refused:
            self.metrics.registrations.labels("refused").inc()
            log.warning("registration refused", peer_id=body.peer_id, reason=refused)
            raise ApiError(401, "invalid_signature", refused)
        try:
            public_key = base64.b64decode(body.public_key, validate=True)
        except binascii.Error:  # pragma: no cover - verify_signature already decoded it
            raise ApiError(422, "invalid_request", "public_key is not base64") from None
        token = new_token()
        sha = token_hash(token)
        node_id, old_sha, created = await self.store.upsert_node(
            peer_id=body.peer_id, wallet_address=body.wallet_address, model_id=body.model_id,
            start_block=body.start_block, end_block=body.end_block, public_name=body.public_name,
            hardware=body.hardware.model_dump(exclude_none=True), public_key=public_key, token_sha=sha)
        ledger = (await self.store.ledgers([node_id]))[node_id]
        await self.hot.bind_token(sha, node_id, old_sha)
        await self.hot.mark_alive(node_id, ledger=ledger)
        self.metrics.registrations.labels("created" if created else "updated").inc()
        self._peer_of_node[node_id] = body.peer_id
        log.info("node registered", node_id=node_id, peer_id=body.peer_id, model_id=body.model_id,
                 blocks=f"{body.start_block}:{body.end_block}", created=created)
        return {"node_id": node_id, "node_token": token, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S}

    async def unregister(self, authorization: Optional[str]) -> dict:
        node_id = await self.node_from_token(authorization)
        old_sha = await self.store.unregister(node_id)
        await self.hot.drop(node_id, old_sha or token_hash(_bearer(authorization)))
        log.info("node unregistered", node_id=node_id)
        return {"ok": True, "node_id": node_id, "state": NodeState.OFFLINE}

    # --- nodes and models ----------------------------------------------------------------------------------
    async def active_nodes(self, model_id: Optional[str]) -> dict:
        if model_id is not None:
            self.num_blocks(model_id)
        live = await self.hot.live_nodes()
        rows = [r for r in await self.store.nodes(node_ids=list(live), model_id=model_id) if r["state"] == NodeState.ONLINE]
        nodes = await self.describe_nodes(rows)
        return {"nodes": nodes, "count": len(nodes), "heartbeat_ttl_s": self.ttl}

    def dht_states(self, model_id: str) -> dict[str, Optional[str]]:
        """peer ID → the best state the DHT announces for it (ONLINE > JOINING > OFFLINE)."""
        snapshot = self.watcher.snapshots.get(model_id)
        seen: dict[str, set] = {}
        if snapshot is not None and snapshot.block_servers:
            for servers in snapshot.block_servers:
                for server in servers:
                    seen.setdefault(server.peer_id, set()).add(server.state)
        return {peer: next((s for s in ("ONLINE", "JOINING", "OFFLINE") if s in states), None)
                for peer, states in seen.items()}

    async def node_view(self, row) -> dict:
        item = (await self.describe_nodes([row], with_money=True))[0]
        item["dht_state"] = self.dht_states(row["model_id"]).get(row["peer_id"])
        return item

    async def node_by_peer(self, peer_id: str) -> dict:
        check_peer_id(peer_id)
        rows = await self.store.nodes(peer_id=peer_id, include_unregistered=True)
        if not rows:
            raise ApiError(404, "node_not_found", f"no node registered with peer_id {peer_id}")
        return await self.node_view(rows[0])

    async def node_by_id(self, node_id: str) -> dict:
        node_id = check_node_id(node_id)
        rows = await self.store.nodes(node_ids=[node_id], include_unregistered=True)
        if not rows:
            raise ApiError(404, "node_not_found", f"no node {node_id}")
        return await self.node_view(rows[0])

    def list_models(self) -> dict:
        return {"models": [{"model_id": m, "num_blocks": n} for m, n in sorted(self.models.items())]}

    async def model_nodes(self, model_id: str) -> dict:
        num_blocks = self.num_blocks(model_id)
        nodes = await self.describe_nodes(await self.store.nodes(model_id=model_id))
        states = self.dht_states(model_id)
        for item in nodes:
            item["dht_state"] = states.get(item["peer_id"])
        return {"model_id": model_id, "num_blocks": num_blocks, "nodes": nodes, "count": len(nodes)}

    # --- providers -----------------------------------------------------------------------------------------
    async def provider_stats(self, wallet: str) -> dict:
        check_wallet(wallet)
        totals = await self.store.wallet_totals(wallet)
        rows = await self.store.nodes(wallet=wallet)
        live = await self.hot.last_heartbeats([r["node_id"] for r in rows])
        now = time.time()
        online = sum(1 for r in rows if r["state"] == NodeState.ONLINE and live.get(r["node_id"]) is not None
                     and now - live[r["node_id"]] <= self.ttl)
        return {"wallet_address": wallet.lower(), "tokens_served": totals["tokens_served"],
                "sessions": totals["sessions"], "earned_far": _far(totals["earned"]),
                "paid_far": _far(totals["paid"]), "pending_far": _far(totals["pending"]),
                "nodes_online": online, "nodes_total": len(rows)}

    async def provider_earnings(self, wallet: str) -> dict:
        check_wallet(wallet)
        days = await self.store.wallet_earnings(wallet, EARNINGS_DAYS)
        total = sum((d["earned"] for d in days), Decimal(0))
        return {"wallet_address": wallet.lower(), "days": EARNINGS_DAYS, "total_far": _far(total),
                "earnings": [{"date": d["date"], "earned_far": _far(d["earned"]), "tokens_served": d["tokens_served"],
                              "sessions": d["sessions"]} for d in days]}

    async def provider_payments(self, wallet: str) -> dict:
        check_wallet(wallet)
        rows = await self.store.wallet_payments(wallet)
        return {"wallet_address": wallet.lower(), "payments": [
            {"batch_id": r["batch_id"], "batch_number": r["batch_number"],
             "date": _iso(r["confirmed_at"] or r["created_at"]), "amount_far": _far(r["amount_far"]),
             "tx_hash": r["tx_hash"], "state": r["state"], "network": r["network"],
             "block_number": r["block_number"], "session_count": r["session_count"]} for r in rows]}

    async def provider_nodes(self, wallet: str) -> dict:
        check_wallet(wallet)
        nodes = await self.describe_nodes(await self.store.nodes(wallet=wallet))
        return {"wallet_address": wallet.lower(), "nodes": nodes, "count": len(nodes)}

    async def provider_checks(self, wallet: str) -> dict:
        """Spot checks per node of this wallet: passed / failed, disputed (withheld) FAR, quarantine, and the most
        recent disputes with their reasons (docs/verification.md)."""
        check_wallet(wallet)
        rows = await self.store.nodes(wallet=wallet, include_unregistered=True)
        peers = [r["peer_id"] for r in rows]
        records = await self.store.check_records(peers)
        nodes = [{"node_id": r["node_id"], "peer_id": r["peer_id"], "public_name": r["public_name"],
                  "blocks": f"{r['start_block']}:{r['end_block']}", **_check_counts(records[r["peer_id"]]),
                  "disputed_far": _far(records[r["peer_id"]]["disputed_far"]),
                  "disputed_sessions": records[r["peer_id"]]["disputed_sessions"],
                  "quarantined": r["quarantine_reason"] is not None, "quarantine_reason": r["quarantine_reason"],
                  "quarantined_at": _iso(r["quarantined_at"])} for r in rows]
        disputes = [{"session_id": d["session_id"], "peer_id": d["peer_id"], "blocks": d["blocks"],
                     "withheld_far": _far(d["withheld_far"]), "disputed_at": _iso(d["disputed_at"]),
                     "reason": d["dispute_reason"]} for d in await self.store.disputes(peers)]
        total = sum((records[p]["disputed_far"] for p in peers), Decimal(0))
        return {"wallet_address": wallet.lower(), "nodes": nodes, "disputed_far": _far(total),
                "recent_disputes": disputes}

    # --- operations ----------------------------------------------------------------------------------------
    async def readiness_problems(self) -> list[str]:
        problems = []
        try:
            await self.store.ping()
        except Exception as error:  # noqa: BLE001
            problems.append(f"postgres: {error}")
        try:
            await self.hot.ping()
        except Exception as error:  # noqa: BLE001
            problems.append(f"redis: {error}")
        if not self.models:
            problems.append("no model configured (FAR_MESH_MODEL_PATH or DISCOVERY_MODELS)")
        if self.watcher.enabled and not self.watcher.ready:
            problems.append(f"DHT: {self.watcher.connect_error or 'not read yet'}")
        return problems


def _check_counts(record: dict) -> dict:
    return {"checks_passed": int(record["passed"]), "checks_failed": int(record["failed"]),
            "checks_inconclusive": int(record["inconclusive"])}


def _num(value):
    return None if value is None else float(value)


def _bearer(authorization: Optional[str]) -> str:
    if not authorization:
        raise ApiError(401, "missing_token", "Authorization: Bearer <node_token> is required",
                       headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        raise ApiError(401, "invalid_token", "Authorization must be 'Bearer <node_token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return token
