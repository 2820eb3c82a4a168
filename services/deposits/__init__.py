"""Deposits: users fund their prepaid accounts with FAR on chain (docs/accounts.md)."""
