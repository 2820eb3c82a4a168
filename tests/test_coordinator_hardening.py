"""Hardening of the coordinator (issue 12), without a swarm: the API runs in process over a fake model whose
tokenizer is the tiny model's, against the test PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from services.common.config import ConfigError, Settings
from services.coordinator.accounts import AccountStore, AuthError, check_jwt_secret, issue_jwt

STRONG_SECRET = "s" * 32


# ------------------------------------------------------------------------------------------ JWT secret (2)
@pytest.mark.parametrize("secret", ["dev-only-change-me", "x" * 31, "é" * 15])
def test_coordinator_refuses_to_start_with_a_weak_jwt_secret(secret, capsys):
    from services.coordinator.app import create_app

    with pytest.raises(ConfigError):
        create_app(Settings(JWT_SECRET=secret))
    assert "JWT_SECRET" in capsys.readouterr().err


def test_jwt_secret_default_is_off_and_strong_secrets_start():
    assert Settings().JWT_SECRET == ""
    check_jwt_secret("")  # JWT authentication off
    check_jwt_secret(STRONG_SECRET)
    check_jwt_secret("é" * 16)  # 32 bytes


async def test_a_token_signed_with_the_old_default_spends_nothing(db_pool):
    store = AccountStore(db_pool)
    account_id = await store.create_account(f"jwt-{uuid.uuid4().hex[:8]}")
    forged = issue_jwt(account_id, "dev-only-change-me")
    for secret in ("", "dev-only-change-me"):  # off, and (defensively) a weak secret that skipped the check
        with pytest.raises(AuthError):
            await store.authenticate(f"Bearer {forged}", secret)
    principal = await store.authenticate(f"Bearer {issue_jwt(account_id, STRONG_SECRET)}", STRONG_SECRET)
    assert principal.account_id == account_id
