"""Spot checks against a real dishonest server: three servers hold the toy model's blocks, one of them
(tests/dishonest_server.py) adds noise to every inference step it returns. With every step checked, the cheater
is caught, the stream it served leaves it, it is quarantined (the coordinator routes around it), its contributions
are disputed and the payout plan pays the honest wallets exactly what they earned and the cheater nothing; no
honest server is ever flagged (the false-positive count over all checks is printed and must be 0)."""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest

from infra.processes import wait_until
from tests.fixtures.swarm import NUM_BLOCKS, create_api_key, start_coordinator
from tests.payouts_support import ensure_node, now, wallet

pytestmark = pytest.mark.swarm
CHEATER = Path(__file__).with_name("dishonest_server.py")


def _pending_checks(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("farmesh_spot_checks_pending"))


def _quarantined_gauge(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("farmesh_quarantined_peers"))


async def _query(url: str, sql: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def test_dishonest_server_is_caught_quarantined_and_not_paid(fresh_swarm, tiny_model_dir, make_database, redis_url,
                                                           tmp_path):
    swarm = fresh_swarm
    swarm.start_node("honest-1", "0:4")
    swarm.start_node("honest-2", "0:4")
    # it announces itself as the fastest (tests/dishonest_server.py), so the router sends it sessions
    swarm.start_node("cheater", "0:4", extra_args=(
        "--server-command", f"{sys.executable} {CHEATER} --mode noise --fraction 1"))
    swarm.wait_online(["honest-1", "honest-2", "cheater"], NUM_BLOCKS)
    wallets = {name: wallet(200 + i) for i, name in enumerate(("honest-1", "honest-2", "cheater"))}
    peers = {name: swarm.nodes[name].peer_id for name in wallets}
    cheater = peers["cheater"]
    db = make_database()

    async def register():
        conn = await asyncpg.connect(db)
        try:
            for name, address in wallets.items():
                await ensure_node(conn, address, peers[name])
        finally:
            await conn.close()

    asyncio.run(register())
    _, key = asyncio.run(create_api_key(db))
    coordinator = start_coordinator(
        workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=swarm.initial_peers,
        postgres_url=db, redis_url=redis_url, api_key=key,
        env_extra={"SPOT_CHECK_RATE": "1", "SPOT_CHECK_QUEUE": "10000", "SPOT_CHECK_QUARANTINE_AFTER": "2",
                   "SPOT_CHECK_QUARANTINE_SYNC_S": "1"})
    try:
        finals = []
        quarantined_after = None
        for i in range(5):
            events = coordinator.generate_stream({"prompt": f"def f{i}(x):", "max_tokens": 16, "temperature": 0})
            finals.append(events[-1]["data"])
            wait_until(lambda: _pending_checks(coordinator.url) == 0, timeout=60, interval=0.2,
                       what="spot checks drained")
            if quarantined_after is None and asyncio.run(_query(db, "SELECT 1 FROM far_quarantine")):
                quarantined_after = i
        checks = asyncio.run(_query(db, "SELECT * FROM far_spot_checks"))
        honest = {peers["honest-1"], peers["honest-2"]}
        false_positives = [c for c in checks if c["suspect_peer_id"] in honest]
        outcomes = {}
        for c in checks:
            outcomes[c["outcome"]] = outcomes.get(c["outcome"], 0) + 1
        passed_errors = [c["error"] for c in checks if c["outcome"] == "passed"]
        print(f"\nspot checks: {len(checks)} {outcomes}; false positives: {len(false_positives)}; "
              f"max honest error {max(passed_errors, default=0):.2e} (tolerance {checks[0]['tolerance']:g}); "
              f"quarantined after generation {quarantined_after}")
        assert not false_positives
        assert all(c["suspect_peer_id"] == cheater for c in checks if c["outcome"] == "failed")
        # it lies in the checks it is asked to verify too (they look like traffic): then it is the suspect
        assert all(c["suspect_peer_id"] == cheater for c in checks if c["outcome"] == "verifier_failed")
        assert outcomes.get("failed", 0) >= 2 and not outcomes.get("inconclusive")
        assert all(c["outcome"] == "failed" for c in checks if c["checked_peer_id"] == cheater)  # caught every time
        # quarantined with its reason, and no session routes through it any more
        quarantine = asyncio.run(_query(db, "SELECT * FROM far_quarantine"))
        assert [q["peer_id"] for q in quarantine] == [cheater] and "failed spot checks" in quarantine[0]["reason"]
        assert quarantined_after is not None and quarantined_after < 4
        for final in finals[quarantined_after + 1:]:
            assert cheater not in {c["peer_id"] for c in final["contributions"]}
        # a stream during which its check failed left it for an honest server
        distrusted = [r for f in finals for r in f.get("replaced_servers", []) if r["cause"] == "distrusted"]
        print(f"streams that left the suspect mid-generation: {len(distrusted)}")
        assert distrusted and all(r["peer_id"] == cheater and r["replaced_by"] in honest for r in distrusted)
        # money: every contribution of the cheater disputed and withheld; the honest ones untouched
        rows = asyncio.run(_query(db, "SELECT * FROM far_session_contributions"))
        assert any(r["peer_id"] == cheater for r in rows)
        for r in rows:
            if r["peer_id"] == cheater:
                assert r["disputed_at"] is not None and r["payment_far"] == 0 and r["withheld_far"] > 0, dict(r)
            else:
                assert r["disputed_at"] is None and r["withheld_far"] == 0
        # what each honest wallet earned, recomputed here from the sessions' work units (the withheld share of the
        # cheater goes to the platform, never to the other providers)
        sessions = {s["session_id"]: s for s in asyncio.run(_query(db, "SELECT * FROM far_mesh_sessions"))}
        units = {}
        for r in rows:
            units[r["session_id"]] = units.get(r["session_id"], 0) + r["work_units"]
        earned = {}
        for r in rows:
            if r["peer_id"] in honest and r["work_units"]:
                s = sessions[r["session_id"]]
                pool_base = int(s["cost_far"] * 10**18) * (10000 - s["platform_fee_bps"])
                share = Decimal(pool_base * r["work_units"] // (10000 * units[r["session_id"]])).scaleb(-18)
                assert r["payment_far"] == share
                earned[r["wallet_address"]] = earned.get(r["wallet_address"], Decimal(0)) + share

        async def audit_and_plan():
            from services.payouts.audit import check_conservation
            from services.payouts.planner import load_dues

            conn = await asyncpg.connect(db)
            try:
                return await check_conservation(conn), await load_dues(conn, now())
            finally:
                await conn.close()

        conservation, dues = asyncio.run(audit_and_plan())
        assert conservation.ok, conservation.problems
        assert {d.wallet: d.amount_far for d in dues} == {w: a for w, a in earned.items() if a > 0}
        assert wallets["cheater"] not in {d.wallet for d in dues}
        charged = sum((Decimal(f["cost_far"]) for f in finals), Decimal(0))
        assert charged == sum((s["cost_far"] for s in sessions.values()), Decimal(0)) > 0  # charges unchanged
        # ... and every session a check proved wrong is refunded to the user, exactly its charge, once
        refunds = asyncio.run(_query(db, "SELECT session_id, amount_far FROM far_account_ledger WHERE kind = 'refund'"))
        proven = {c["session_id"] for c in checks if c["outcome"] == "failed"}
        assert proven and {r["session_id"] for r in refunds} == proven
        assert all(r["amount_far"] == sessions[r["session_id"]]["cost_far"] for r in refunds)
        # the weekly payout, on a local chain: the honest wallets get exactly what they earned, the cheater nothing
        from services.payouts.audit import run_audit
        from services.payouts.chain import new_local_chain
        from services.payouts.executor import PayoutExecutor
        from tests.payouts_support import onchain_balances

        chain = new_local_chain()
        report = asyncio.run(PayoutExecutor(db, chain, network="local", min_payout_far=Decimal("1e-18"),
                                            max_recipients=200, confirmations=2, receipt_timeout_s=10).run_once())
        assert report.ok
        assert onchain_balances(chain, list(wallets.values())) == {
            address: earned.get(address, Decimal(0)) for address in wallets.values()}
        assert onchain_balances(chain, [wallets["cheater"]])[wallets["cheater"]] == 0
        audit = asyncio.run(run_audit(db, chain, accounts=True))
        assert audit.ok, [(c.name, c.problems) for c in audit.checks if not c.ok]

        # the operator lifts the quarantine (far-mesh nodes unquarantine): recorded, and the running coordinator
        # learns it at its next sync (SPOT_CHECK_QUARANTINE_SYNC_S) and routes through the peer again
        async def lift():
            from services.coordinator.checks import CheckStore

            pool = await asyncpg.create_pool(db, min_size=1, max_size=1)
            try:
                return await CheckStore(pool).lift(cheater, lifted_by="test", reason="lifted by the test")
            finally:
                await pool.close()

        assert asyncio.run(lift())["lift_reason"] == "lifted by the test"
        wait_until(lambda: _quarantined_gauge(coordinator.url) == 0, timeout=30, interval=0.2,
                   what="the coordinator learns of the lift")
        after_lift = coordinator.generate_stream({"prompt": "def g(x):", "max_tokens": 8, "temperature": 0})[-1]["data"]
        assert cheater in {c["peer_id"] for c in after_lift["contributions"]}, after_lift  # routed through again
    finally:
        coordinator.process.stop()


def _register(db: str, wallets: dict, peers: dict) -> None:
    async def register():
        conn = await asyncpg.connect(db)
        try:
            for name, address in wallets.items():
                await ensure_node(conn, address, peers[name])
        finally:
            await conn.close()

    asyncio.run(register())


def test_two_colluders_cannot_frame_an_honest_server(fresh_swarm, tiny_model_dir, make_database, redis_url,
                                                     tmp_path):
    """Two colluders announce a tiny throughput (users are routed to the honest server), and return one agreed
    wrong answer to every inference step, so to every check they are asked to verify. Registered, on their own
    wallets, and taken as clean (SPOT_CHECK_CLEAN_RECORD=0: the worst case, they earned a record), they verify the
    honest server and referee each other: the trusted verifier (the coordinator recomputing the span) contradicts
    them. The honest server is neither disputed nor held nor quarantined; the colluders are quarantined."""
    swarm = fresh_swarm
    swarm.start_node("honest", "0:4")
    for name in ("colluder-1", "colluder-2"):
        swarm.start_node(name, "0:4", extra_args=(
            "--server-command", f"{sys.executable} {CHEATER} --mode agreed --fraction 1 --advertise-rps 0.001"))
    swarm.wait_online(["honest", "colluder-1", "colluder-2"], NUM_BLOCKS)
    wallets = {name: wallet(230 + i) for i, name in enumerate(("honest", "colluder-1", "colluder-2"))}
    peers = {name: swarm.nodes[name].peer_id for name in wallets}
    db = make_database()
    _register(db, wallets, peers)
    _, key = asyncio.run(create_api_key(db))
    coordinator = start_coordinator(
        workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=swarm.initial_peers,
        postgres_url=db, redis_url=redis_url, api_key=key,
        env_extra={"SPOT_CHECK_RATE": "1", "SPOT_CHECK_QUEUE": "10000", "SPOT_CHECK_CLEAN_RECORD": "0",
                   "SPOT_CHECK_QUARANTINE_AFTER": "2", "SPOT_CHECK_QUARANTINE_SYNC_S": "1"})
    try:
        finals = []
        for i in range(3):
            finals.append(coordinator.generate_stream(
                {"prompt": f"def h{i}(x):", "max_tokens": 8, "temperature": 0})[-1]["data"])
            wait_until(lambda: _pending_checks(coordinator.url) == 0, timeout=60, interval=0.2,
                       what="spot checks drained")
        checks = asyncio.run(_query(db, "SELECT * FROM far_spot_checks ORDER BY created_at"))
        honest, colluders = peers["honest"], {peers["colluder-1"], peers["colluder-2"]}
        outcomes = {}
        for c in checks:
            outcomes[c["outcome"]] = outcomes.get(c["outcome"], 0) + 1
        print(f"\ncolluders: {len(checks)} checks {outcomes}")
        assert all(c["checked_peer_id"] == honest for c in checks)  # users were served by the honest server only
        assert not [c for c in checks if c["suspect_peer_id"] == honest]  # never framed
        assert {c["suspect_peer_id"] for c in checks if c["outcome"] == "verifier_failed"} == colluders
        assert not outcomes.get("failed") and not outcomes.get("inconclusive")
        assert all(c["referee_peer_id"] == "trusted:coordinator" for c in checks if c["outcome"] == "verifier_failed")
        # once both are quarantined, the trusted verifier checks the span nobody else may verify: passed
        assert checks[-1]["verifier_peer_id"] == "trusted:coordinator" and checks[-1]["outcome"] == "passed"
        quarantine = asyncio.run(_query(db, "SELECT * FROM far_quarantine"))
        assert {q["peer_id"] for q in quarantine} == colluders
        rows = asyncio.run(_query(db, "SELECT * FROM far_session_contributions"))
        assert rows and all(r["peer_id"] == honest and r["disputed_at"] is None and r["held_at"] is None
                            and r["payment_far"] > 0 for r in rows)
        assert not asyncio.run(_query(db, "SELECT 1 FROM far_account_ledger WHERE kind = 'refund'"))
        assert all(Decimal(f["cost_far"]) > 0 for f in finals)  # the honest work is charged and stays charged
    finally:
        coordinator.process.stop()


def test_one_server_per_span_is_checked_by_the_trusted_verifier(fresh_swarm, tiny_model_dir, make_database,
                                                                redis_url, tmp_path):
    """The mesh of `far-mesh up`: one server per span, no second server to verify either. The coordinator
    recomputes the spans itself: every node gets passed checks."""
    swarm = fresh_swarm
    swarm.start_node("first", "0:2")
    swarm.start_node("second", "2:4")
    swarm.wait_online(["first", "second"], NUM_BLOCKS)
    wallets = {"first": wallet(240), "second": wallet(241)}
    peers = {name: swarm.nodes[name].peer_id for name in wallets}
    db = make_database()
    _register(db, wallets, peers)
    _, key = asyncio.run(create_api_key(db))
    coordinator = start_coordinator(
        workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=swarm.initial_peers,
        postgres_url=db, redis_url=redis_url, api_key=key, env_extra={"SPOT_CHECK_RATE": "1"})
    try:
        coordinator.generate_stream({"prompt": "def k(x):", "max_tokens": 6, "temperature": 0})
        wait_until(lambda: _pending_checks(coordinator.url) == 0, timeout=60, interval=0.2, what="checks drained")
        checks = asyncio.run(_query(db, "SELECT * FROM far_spot_checks"))
        passed = {c["checked_peer_id"] for c in checks if c["outcome"] == "passed"}
        print(f"\none server per span: {len(checks)} checks, max error {max(c['error'] for c in checks):.1e}")
        assert passed == set(peers.values())
        assert all(c["outcome"] == "passed" and c["verifier_peer_id"] == "trusted:coordinator" for c in checks)
    finally:
        coordinator.process.stop()
