"""CLI, service endpoints and network/key configuration of the payment tracker."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from eth_account import Account
from fastapi.testclient import TestClient
from rich.console import Console
from typer.testing import CliRunner

from services.common.config import Settings, get_settings
from services.payouts import chain as chain_module
from services.payouts.chain import ChainConfigError, connect, load_account, new_local_chain
from services.payouts.cli import app, audit_app, chain_app
from services.payouts.server import PayoutService, create_app
from tests.payouts_support import seed_session, snapshot, wallet

runner = CliRunner()


@pytest.fixture
def cli_env(monkeypatch, postgres_url, tmp_path):
    monkeypatch.setenv("POSTGRES_URL", postgres_url)
    monkeypatch.setenv("BSC_NETWORK", "local")
    monkeypatch.setenv("PAYOUT_CONFIRMATIONS", "1")
    monkeypatch.setenv("FAR_MESH_STATE_DIR", str(tmp_path))
    for name in ("BSC_RPC_URL", "FAR_TOKEN_ADDRESS", "PAYOUT_CONTRACT_ADDRESS", "PAYOUT_PRIVATE_KEY",
                 "PAYOUT_KEYSTORE", "PAYOUT_KEYSTORE_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr("services.payouts.cli.console", Console(width=250))
    # The CLI configures logging to the runner's (later closed) stderr; keep the test process's logging.
    monkeypatch.setattr("services.common.logs.configure_logging", lambda *args, **kwargs: None)
    # A fresh in-process chain for this test (the CLI reuses the process's chain).
    chain = new_local_chain()
    monkeypatch.setitem(chain_module._in_process, chain.address, chain)
    yield chain
    get_settings.cache_clear()


def _db(postgres_url, work):
    """Run ``await work(conn)`` on a fresh connection in a private event loop (the CLI runs its own loop)."""
    import asyncpg

    async def main():
        conn = await asyncpg.connect(postgres_url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def test_run_once_dry_run_then_for_real(cli_env, make_database, monkeypatch):
    # A database of its own: the audit's account books are global, and other tests' accounts (kept by clean_db)
    # were charged for sessions that clean_db has since emptied.
    postgres_url = make_database()
    monkeypatch.setenv("POSTGRES_URL", postgres_url)
    get_settings.cache_clear()
    chain = cli_env
    wallets = [wallet(800 + i) for i in range(3)]

    async def seed(conn):
        for w in wallets:
            await seed_session(conn, [(w, 1)], completion_tokens=1500)
        await seed_session(conn, [(wallet(899), 1)], completion_tokens=10)  # below the minimum
        return await snapshot(conn)

    before = _db(postgres_url, seed)
    block = chain.w3.eth.block_number

    result = runner.invoke(app, ["run-once", "--dry-run", "--network", "local"])
    assert result.exit_code == 0, result.output
    out = re.sub(r"\s+", " ", result.output)
    assert "payout plan (dry run, local)" in out and "13.5" in out
    for w in wallets:
        assert w[:12] in out  # wallet column (rich may shorten long cells)
    assert "1 wallets below" in out
    assert _db(postgres_url, snapshot) == before
    assert chain.w3.eth.block_number == block

    result = runner.invoke(app, ["run-once"])
    assert result.exit_code == 0, result.output
    assert "confirmed" in result.output and "paid 40.5 FAR" in re.sub(r"\s+", " ", result.output)
    assert all(chain.far_balance(w) == 135 * 10**17 for w in wallets)

    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0 and "confirmed" in result.output

    result = runner.invoke(audit_app, ["--no-chain"])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output


def test_chain_deploy_local_prints_addresses(cli_env):
    result = runner.invoke(chain_app, ["deploy", "--network", "local"])
    assert result.exit_code == 0, result.output
    assert re.search(r"FAR_TOKEN_ADDRESS=0x[0-9a-fA-F]{40}", result.output)
    assert re.search(r"PAYOUT_CONTRACT_ADDRESS=0x[0-9a-fA-F]{40}", result.output)


def test_mainnet_refuses_plaintext_key():
    settings = Settings(PAYOUT_PRIVATE_KEY="0x" + "11" * 32, BSC_RPC_URL="http://127.0.0.1:9")
    with pytest.raises(ChainConfigError, match="refused on mainnet"):
        connect(settings, "mainnet")
    # testnet accepts it (then fails only because nothing listens on port 9)
    assert load_account(settings, "testnet").address == Account.from_key("0x" + "11" * 32).address
    with pytest.raises(ChainConfigError, match="BSC_RPC_URL"):
        connect(settings, "testnet")


def test_keystore_loading(tmp_path):
    key = "0x" + "22" * 32
    keystore = tmp_path / "payer.json"
    keystore.write_text(json.dumps(Account.encrypt(key, "s3cret", iterations=2)))
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    settings = Settings(PAYOUT_KEYSTORE=str(keystore), PAYOUT_KEYSTORE_PASSWORD_FILE=str(password))
    assert load_account(settings, "mainnet").address == Account.from_key(key).address
    password.chmod(0o644)
    with pytest.raises(ChainConfigError, match="readable by group"):
        load_account(settings, "mainnet")
    password.write_text("wrong")
    with pytest.raises(ChainConfigError, match="wrong password"):
        load_account(settings, "testnet")
    with pytest.raises(ChainConfigError, match="PAYOUT_KEYSTORE"):
        load_account(Settings(), "mainnet")


def test_service_endpoints(cli_env, postgres_url):
    service = PayoutService(Settings(POSTGRES_URL=postgres_url), "local")
    with TestClient(create_app(service, start_scheduler=True)) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["next_run"].startswith(("20", "21"))  # a Monday 00:00 UTC
        assert "00:00:00+00:00" in ready.json()["next_run"]
        metrics = client.get("/metrics").text
        for name in ("farmesh_payouts_last_run_timestamp_seconds", "farmesh_payouts_paid_far_total",
                     "farmesh_payouts_failures_total", "farmesh_payouts_batches_total"):
            assert name in metrics


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readyz_never_shows_the_rpc_api_key(cli_env, postgres_url):
    """Providers put API keys in the RPC URL (path, query, user info): /readyz shows scheme and host only, also in the
    error of an unreachable node and in last_error."""
    port = _closed_port()
    url = f"http://user:pw-SECRET0@127.0.0.1:{port}/v3/SECRET1KEY?apikey=SECRET2"
    service = PayoutService(Settings(POSTGRES_URL=postgres_url, BSC_RPC_URL=url), "local")
    service.run_job()  # fails to connect: last_error is shown on /readyz too
    with TestClient(create_app(service, start_scheduler=False)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert "SECRET" not in ready.text and "pw-" not in ready.text, ready.text
    assert body["rpc"] == f"http://127.0.0.1:{port}"
    assert body["status"] == "not_ready" and any(p.startswith("chain: error") for p in body["problems"]), body
    assert body["checks"]["chain"].startswith("error: ChainConfigError: BSC_RPC_URL: cannot reach "
                                              f"http://127.0.0.1:{port}")
    assert body["last_error"] and "SECRET" not in body["last_error"]

    # The node answered once, then fails: requests quotes the path ("url: /v3/...") in its error.
    class Broken:
        class w3:
            class eth:
                @property
                def block_number(self):
                    raise ConnectionError(f"HTTPConnectionPool(host='127.0.0.1', port={port}): Max retries exceeded "
                                          "with url: /v3/SECRET1KEY?apikey=SECRET2")
            eth = eth()

    service._chain = Broken()
    with TestClient(create_app(service, start_scheduler=False)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "SECRET" not in ready.text, ready.text
    assert "/<redacted>" in ready.json()["checks"]["chain"]


def test_redact_url():
    from services.payouts.chain import redact_url, scrub_url

    assert redact_url("https://bsc-mainnet.example.com/v1/abc123") == "https://bsc-mainnet.example.com"
    assert redact_url("https://u:k@[::1]:8545/x?key=1") == "https://[::1]:8545"
    assert redact_url("not a url") == "<redacted URL>"
    url = "https://rpc.example/key/abc123?token=zz9"
    assert scrub_url(f"cannot reach {url}: url: /key/abc123?token=zz9", url) == (
        "cannot reach https://rpc.example: url: /<redacted>")
