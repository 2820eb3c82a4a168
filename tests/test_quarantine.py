"""Lifting a quarantine (issue 17, docs/verification.md "Lifting a quarantine"): ``far-mesh nodes quarantined`` and
``far-mesh nodes unquarantine`` on the real schema; every lift is recorded (who, when, why, what the quarantine
was); failed checks before a lift do not count towards a new quarantine; a coordinator's quarantine follows the
database (``sync_quarantine``: lifts and other coordinators' quarantines). The coordinator routing through a lifted
peer again on a real swarm is in tests/test_verification_swarm.py."""

from __future__ import annotations

import asyncio
import types

import asyncpg
import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.coordinator.checks import CheckStore, sync_quarantine
from tests.payouts_support import ensure_node, wallet

runner = CliRunner()


async def _failed_check(conn, peer_id: str) -> None:
    await conn.execute(
        """INSERT INTO far_spot_checks (model_id, checked_peer_id, blocks, positions, prefix_length, verifier_peer_id,
               referee_peer_id, outcome, suspect_peer_id, error, tolerance, dtype)
           VALUES ('m', $1, '0:4', 1, 5, 'QmVerifier', 'QmReferee', 'failed', $1, 0.5, 1e-4, 'float32')""", peer_id)


async def test_lift_is_recorded_and_bare_deletes_too(clean_db):
    store = CheckStore(clean_db)
    await store.quarantine("QmCheater", "2 failed spot checks; last: blocks 0:4 off by 0.5", 2)
    lift = await store.lift("QmCheater", lifted_by="ops@host", reason="GPU replaced, re-tested by hand")
    assert (lift["peer_id"], lift["failed_checks"], lift["lifted_by"], lift["lift_reason"]) == (
        "QmCheater", 2, "ops@host", "GPU replaced, re-tested by hand")
    assert lift["reason"].startswith("2 failed spot checks") and lift["lifted_at"] >= lift["quarantined_at"]
    assert await store.quarantined() == {}
    with pytest.raises(LookupError, match="not quarantined"):
        await store.lift("QmCheater", lifted_by="ops@host", reason="again")
    await store.quarantine("QmOther", "2 failed spot checks", 2)
    with pytest.raises(ValueError, match="reason"):
        await store.lift("QmOther", lifted_by="ops@host", reason="  ")
    async with clean_db.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):  # the SQL function itself refuses an anonymous lift
            await conn.execute("SELECT lift_quarantine('QmOther', '', 'because')")
        # a DELETE by hand is recorded too (who: the database user), in a transaction after a named lift: the
        # named lift's operator and reason do not leak onto it
        await store.quarantine("QmThird", "3 failed spot checks", 3)
        async with conn.transaction():
            await conn.execute("SELECT lift_quarantine('QmThird', 'alice', 'false alarm')")
            await conn.execute("DELETE FROM far_quarantine WHERE peer_id = 'QmOther'")
        lifts = {r["peer_id"]: r for r in await conn.fetch("SELECT * FROM far_quarantine_lifts")}
    assert set(lifts) == {"QmCheater", "QmThird", "QmOther"}
    assert (lifts["QmThird"]["lifted_by"], lifts["QmThird"]["lift_reason"]) == ("alice", "false alarm")
    assert lifts["QmOther"]["lifted_by"] == "postgres" and "directly" in lifts["QmOther"]["lift_reason"]


async def test_failed_checks_before_a_lift_do_not_count(clean_db):
    store = CheckStore(clean_db)
    async with clean_db.acquire() as conn:
        await _failed_check(conn, "QmCheater")
        await _failed_check(conn, "QmCheater")
        assert await store.failed_checks("QmCheater") == 2
        await store.quarantine("QmCheater", "2 failed spot checks", 2)
        await store.lift("QmCheater", lifted_by="ops", reason="fixed")
        assert await store.failed_checks("QmCheater") == 0  # a fresh start: one more failure does not re-quarantine
        await _failed_check(conn, "QmCheater")
        assert await store.failed_checks("QmCheater") == 1
        # the record is kept: all three failures are still in far_spot_checks (discovery's record shows them)
        assert await conn.fetchval("SELECT count(*) FROM far_spot_checks WHERE suspect_peer_id = 'QmCheater'") == 3


@pytest.fixture
def nodes_cli(monkeypatch, postgres_url):
    from services.cli import app
    from services.common.config import get_settings

    monkeypatch.setenv("POSTGRES_URL", postgres_url)
    monkeypatch.setattr("services.coordinator.nodes_cli.console", Console(width=300))
    get_settings.cache_clear()
    yield app
    get_settings.cache_clear()


def _with_store(url: str, fn):
    async def run():
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            return await fn(CheckStore(pool))
        finally:
            await pool.close()

    return asyncio.run(run())


def test_cli_lists_and_lifts(clean_db, nodes_cli, postgres_url):
    async def seed(store):
        async with store.pool.acquire() as conn:
            await ensure_node(conn, wallet(31), "QmRegistered")
            node_id = await conn.fetchval("SELECT node_id::text FROM far_nodes WHERE peer_id = 'QmRegistered'")
        await store.quarantine("QmRegistered", "2 failed spot checks; last: blocks 0:4 off by 0.5", 2)
        await store.quarantine("QmStranger", "4 failed spot checks", 4)
        return node_id

    node_id = _with_store(postgres_url, seed)
    listed = runner.invoke(nodes_cli, ["nodes", "quarantined"])
    assert listed.exit_code == 0, listed.output
    assert "QmRegistered" in listed.output and "QmStranger" in listed.output and "(not registered)" in listed.output
    assert "blocks 0:4 off by 0.5" in listed.output

    refused = runner.invoke(nodes_cli, ["nodes", "unquarantine", "QmRegistered"])  # --reason is required
    assert refused.exit_code == 2 and "--reason" in refused.output
    lifted = runner.invoke(nodes_cli, ["nodes", "unquarantine", node_id, "--reason", "operator fixed the GPU",
                                       "--by", "bob"])  # a node id names its peer
    assert lifted.exit_code == 0, lifted.output
    assert "quarantine of QmRegistered lifted by bob" in lifted.output and "operator fixed the GPU" in lifted.output
    assert set(_with_store(postgres_url, lambda store: store.quarantined())) == {"QmStranger"}

    again = runner.invoke(nodes_cli, ["nodes", "unquarantine", "QmRegistered", "--reason", "x"])
    assert again.exit_code == 1 and "QmRegistered is not quarantined" in again.output
    unknown = runner.invoke(nodes_cli, ["nodes", "unquarantine", "QmNobody", "--reason", "x"])
    assert unknown.exit_code == 1 and "not quarantined" in unknown.output

    now_listed = runner.invoke(nodes_cli, ["nodes", "quarantined"])
    assert "QmRegistered" not in now_listed.output and "QmStranger" in now_listed.output
    history = runner.invoke(nodes_cli, ["nodes", "quarantined", "--history"])
    assert history.exit_code == 0, history.output
    assert "QmRegistered" in history.output and "bob" in history.output and "operator fixed the GPU" in history.output
    lifted_by_default = runner.invoke(nodes_cli, ["nodes", "unquarantine", "QmStranger", "--reason", "false alarm"])
    assert lifted_by_default.exit_code == 0 and "@" in lifted_by_default.output.split("lifted by ")[1].split()[0]
    assert runner.invoke(nodes_cli, ["nodes", "quarantined"]).output.strip() == "no quarantined peers"


class RecordingSwarm:
    """Stands in for SwarmModel's quarantine surface (``quarantined``, ``quarantine``, ``unquarantine``); the real
    one, on a Petals swarm, is exercised in tests/test_verification_swarm.py."""

    def __init__(self, quarantined=()):
        self.quarantined = set(quarantined)
        self.calls = []

    def quarantine(self, peer_id):
        self.calls.append(("quarantine", peer_id))
        self.quarantined.add(peer_id)

    def unquarantine(self, peer_id):
        self.calls.append(("unquarantine", peer_id))
        self.quarantined.discard(peer_id)


async def test_coordinator_quarantine_follows_the_database(clean_db):
    store = CheckStore(clean_db)
    swarm = RecordingSwarm(quarantined={"QmLifted", "QmKept"})
    await store.quarantine("QmKept", "2 failed spot checks", 2)
    await store.quarantine("QmFromAnotherCoordinator", "2 failed spot checks", 2)
    added, lifted = await sync_quarantine(store, swarm)
    assert (added, lifted) == ({"QmFromAnotherCoordinator"}, {"QmLifted"})
    assert swarm.quarantined == {"QmKept", "QmFromAnotherCoordinator"}
    assert await sync_quarantine(store, swarm) == (set(), set())  # nothing changed: nothing done
    await store.lift("QmKept", lifted_by="ops", reason="fixed")
    assert await sync_quarantine(store, swarm) == (set(), {"QmKept"})
    assert swarm.calls[-1] == ("unquarantine", "QmKept")


def test_spot_checks_and_the_quarantine_sync_run_only_for_a_quarantinable_model():
    """The coordinator's lifespan asks ``isinstance(model, Quarantinable)``: the swarm model's members, all of them."""
    from services.coordinator.engine import SwarmModel
    from services.coordinator.engine_protocol import Quarantinable
    from tests.scripted_engine import ScriptedModel

    swarm = object.__new__(SwarmModel)  # its members without a swarm: set as SwarmModel.__init__ sets them
    swarm.model_id, swarm.quarantined, swarm.spot_checker = "m", set(), None
    swarm.model = types.SimpleNamespace(transformer=types.SimpleNamespace(h=types.SimpleNamespace(
        sequence_manager=object())))  # the Petals client
    assert isinstance(swarm, Quarantinable)
    assert not isinstance(ScriptedModel("m", tokenizer=None), Quarantinable)
    assert not isinstance(RecordingSwarm(), Quarantinable)  # a stand-in of the quarantine surface only
