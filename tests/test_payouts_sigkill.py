"""Real crashes: the tracker runs as a subprocess (`far-mesh payouts run-once`) against a chain that outlives it
(anvil from npm @foundry-rs/anvil-linux-amd64, over HTTP JSON-RPC) and is SIGKILLed at every state transition, including
after the broadcast and before the database knows. The re-run must pay every wallet exactly once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal

import pytest

from infra.embedded import free_port
from services.common.config import PROJECT_ROOT, Settings
from services.payouts.audit import run_audit
from services.payouts.chain import LOCAL_DEV_PRIVATE_KEY, connect, deploy_contracts
from services.payouts.executor import CHECKPOINTS, CRASH_ENV
from tests.payouts_support import earned_by_wallet, onchain_balances, seed_session, wallet

CONTRACTS = PROJECT_ROOT / "contracts"
ANVIL = CONTRACTS / "node_modules" / ".bin" / "anvil"


@pytest.fixture(scope="module")
def anvil_url():
    if not ANVIL.exists():
        if subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CONTRACTS,
                          capture_output=True).returncode != 0 or not ANVIL.exists():
            pytest.skip("anvil (npm @foundry-rs/anvil-linux-amd64) not installable on this platform")
    port = free_port()
    process = subprocess.Popen([str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--silent"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("anvil did not start")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.payouts.cli", "payouts", "run-once", "--network", "local"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("checkpoint", [cp for cp in CHECKPOINTS if cp != "failed"])
async def test_sigkill_at_every_transition(clean_db, postgres_url, anvil_url, tmp_path, checkpoint):
    settings = Settings(PAYOUT_PRIVATE_KEY=LOCAL_DEV_PRIVATE_KEY, BSC_RPC_URL=anvil_url)
    chain = connect(settings, "local", require_contracts=False)
    addresses = deploy_contracts(chain)
    wallets = [wallet(700 + i) for i in range(5)]
    async with clean_db.acquire() as conn:
        for i, w in enumerate(wallets):
            await seed_session(conn, [(w, 1)], completion_tokens=1200 + i)
    env = {**os.environ, "POSTGRES_URL": postgres_url, "BSC_RPC_URL": anvil_url, "BSC_NETWORK": "local",
           "FAR_TOKEN_ADDRESS": addresses["FAR_TOKEN_ADDRESS"],
           "PAYOUT_CONTRACT_ADDRESS": addresses["PAYOUT_CONTRACT_ADDRESS"],
           "PAYOUT_CONFIRMATIONS": "1", "MAX_RECIPIENTS_PER_TX": "2", "MIN_PAYOUT_FAR": "10",
           "FAR_MESH_STATE_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"}
    crashed = _run({**env, CRASH_ENV: f"{checkpoint}:2"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]

    rerun = _run(env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "confirmed" in rerun.stdout
    async with clean_db.acquire() as conn:
        earned = await earned_by_wallet(conn)
        assert await conn.fetchval("SELECT count(*) FROM far_payment_batches WHERE state <> 'confirmed'") == 0
        assert await conn.fetchval("SELECT count(*) FROM far_session_contributions c JOIN far_payment_batches b "
                                   "ON b.batch_id = c.payment_batch_id WHERE b.state = 'confirmed'") == 5
    assert onchain_balances(chain, wallets) == {w: earned[w] for w in wallets}
    assert sum(earned.values()) > Decimal(0)
    audit = await run_audit(postgres_url, chain)
    assert audit.ok, [check.problems for check in audit.checks]
