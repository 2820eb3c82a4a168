"""Settings that would let money move wrongly are refused at start: placeholder secrets copied from
deploy/env.example, and too few confirmations on a public chain. And a confirmed payout is re-read until final."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from services.common.config import CommonSettings, PayoutSettings, placeholder_problem
from services.coordinator.accounts import jwt_secret_problem
from services.payouts.chain import ChainConfigError, connect, new_local_chain
from services.payouts.executor import PayoutExecutor
from tests.payouts_support import seed_session, wallet

STRONG = "kT3v9QpZ2mXw8RbN4sLc7HjD1fGy6AeU5oPi0WqEr"


@pytest.mark.parametrize("secret", ["replace-me-with-48-random-url-safe-characters-from-secrets",
                                    "CHANGE-ME-please-this-is-long-enough-32-bytes", "<your secret of 32+ bytes here>",
                                    "a" * 64, "abababababababababababababababab"])
def test_placeholder_jwt_secrets_are_refused(secret):
    assert jwt_secret_problem(secret)


def test_generated_secrets_are_accepted():
    assert jwt_secret_problem(STRONG) is None and jwt_secret_problem("") is None
    assert placeholder_problem("X", STRONG) is None


def test_placeholder_database_password_is_refused():
    with pytest.raises(ValidationError, match="placeholder"):
        CommonSettings(POSTGRES_URL="postgresql://farmesh:change-me-letters-and-digits-only@db:5432/farmesh")
    assert CommonSettings(POSTGRES_URL=f"postgresql://farmesh:{STRONG}@db:5432/farmesh").POSTGRES_URL


@pytest.mark.parametrize("network,confirmations,ok", [("mainnet", 0, False), ("mainnet", 2, False),
                                                      ("testnet", 0, False), ("mainnet", 3, True),
                                                      ("testnet", 12, True), ("local", 0, True)])
def test_public_chains_need_confirmations(network, confirmations, ok):
    if ok:
        assert PayoutSettings(BSC_NETWORK=network, PAYOUT_CONFIRMATIONS=confirmations).PAYOUT_CONFIRMATIONS == \
            confirmations
    else:
        with pytest.raises(ValidationError, match="PAYOUT_CONFIRMATIONS"):
            PayoutSettings(BSC_NETWORK=network, PAYOUT_CONFIRMATIONS=confirmations)


def test_network_given_on_the_command_line_is_checked_too():
    """`--network mainnet` with settings made for local (0 confirmations) is refused before anything connects."""
    settings = PayoutSettings(BSC_NETWORK="local", PAYOUT_CONFIRMATIONS=0, BSC_RPC_URL="http://127.0.0.1:1")
    with pytest.raises(ChainConfigError, match="PAYOUT_CONFIRMATIONS: 0 is too few on mainnet"):
        connect(settings, "mainnet")


async def test_confirmed_payout_is_reread_until_final(clean_db, postgres_url):
    chain = new_local_chain()
    async with clean_db.acquire() as conn:
        await seed_session(conn, [(wallet(950), 1)], completion_tokens=2500)

    def executor() -> PayoutExecutor:
        return PayoutExecutor(postgres_url, chain, network="local", min_payout_far=Decimal(10), confirmations=2,
                              finality_blocks=6, receipt_timeout_s=5)

    assert (await executor().run_once()).ok
    async with clean_db.acquire() as conn:
        assert await conn.fetchval("SELECT finalized_at FROM far_payment_batches") is None
        chain.advance(6)
        assert (await executor().run_once()).ok
        row = await conn.fetchrow("SELECT finalized_at, paid_tx_hash, tx_hash FROM far_payment_batches")
        assert row["finalized_at"] is not None and row["paid_tx_hash"] == row["tx_hash"]
