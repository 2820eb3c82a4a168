"""The one rule for a payout wallet address (discovery's registration, the node's config and wizard, the
dashboard's links): 0x + 40 hex digits, not the zero address, and a mixed-case address must match its EIP-55
checksum (one mistyped character would otherwise be paid to an address nobody controls; all-lowercase or
all-uppercase hex carries no checksum and is accepted)."""

from __future__ import annotations

import re
from typing import Optional

WALLET_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
WALLET_PATTERN = WALLET_RE.pattern  # for pydantic Field(pattern=...)
# The schema's statement of wallet_problem() (OpenAPI): the format and "not the zero address"; the EIP-55 checksum
# of a mixed-case address cannot be said in a pattern (it is in the description).
WALLET_SCHEMA = {"type": "string", "pattern": r"^0x(?!0{40}$)[0-9a-fA-F]{40}$",
                 "description": "0x + 40 hex digits, not the zero address; mixed case must match its EIP-55 checksum"}
WALLET_RULE = "must be 0x followed by 40 hex digits"
ZERO_RULE = "is the zero address, which cannot receive payouts"
CHECKSUM_RULE = ("fails its EIP-55 checksum (mixed case that does not match): probably a typo; "
                 "use the address exactly as your wallet shows it, or all lowercase")


def checksum_address(text: str) -> str:
    from eth_utils import to_checksum_address  # imported late: the node's CLI starts without web3 loaded

    return to_checksum_address(text)


def wallet_problem(value: str) -> Optional[str]:
    """Why ``value`` is not a payable wallet (a phrase to follow the value or the field name), or None."""
    if not WALLET_RE.fullmatch(value):  # fullmatch: "$" alone would let a trailing newline through
        if not value.startswith("0x"):
            return WALLET_RULE + " (it must start with 0x)"
        return WALLET_RULE + f" (got {len(value) - 2} characters after 0x)"
    if int(value, 16) == 0:
        return ZERO_RULE
    digits = value[2:]
    if digits != digits.lower() and digits != digits.upper() and checksum_address(value) != value:
        return CHECKSUM_RULE
    return None
