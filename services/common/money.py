"""Money rules of docs/generation.md "Accounting" (pure; ``Decimal`` in FAR, ``int`` base units of 1e-18 FAR).

The authoritative computation at the end of a session is the SQL function ``finalize_session()``
(database/migrations); :func:`split_session` is the same rule in Python, used for running costs shown while a
stream is live and checked against the database by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Hashable, Mapping

DECIMALS = 18
BPS_DENOMINATOR = 10_000


def to_base_units(amount_far: Decimal) -> int:
    """Exact FAR → base units; refuses amounts finer than 1e-18 FAR or negative ones."""
    if not isinstance(amount_far, Decimal) or not amount_far.is_finite():
        raise TypeError(f"amount must be a finite Decimal, got {amount_far!r}")
    scaled = amount_far.scaleb(DECIMALS)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount_far} FAR has more than {DECIMALS} decimals")
    if scaled < 0:
        raise ValueError(f"negative amount {amount_far}")
    return int(scaled)


def parse_far(text: str) -> Decimal:
    """A user-typed positive FAR amount (CLI options), exact: ValueError with the reason otherwise."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal amount of FAR") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"{text!r}: the amount must be positive")
    to_base_units(value)  # refuses more than 18 decimals
    return value


def from_base_units(base: int) -> Decimal:
    return Decimal(base).scaleb(-DECIMALS)


def format_far(amount_far) -> str:
    """Exact decimal string (JSON, CLIs): no exponent, no trailing zeros ("40.5", "0.000000000000000001")."""
    text = format(Decimal(amount_far).normalize(), "f")
    return text if text != "-0" else "0"


def format_far_truncated(amount_far, places: int = 4) -> str:
    """Fixed-width display for one-line status output ("12.0000"): rounded *down*, so a provider is never shown
    more than it earned; "-" for an unreadable value. Not for anything that is added up or paid."""
    try:
        return str(Decimal(str(amount_far)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN))
    except (InvalidOperation, ValueError):
        return "-"


def session_cost(completion_tokens: int, prompt_tokens: int, price_per_token: Decimal,
                 price_per_prompt_token: Decimal) -> Decimal:
    return completion_tokens * price_per_token + prompt_tokens * price_per_prompt_token


@dataclass(frozen=True)
class Split:
    payments: dict  # key -> Decimal FAR (0 for unregistered peers)
    fee: Decimal

    @property
    def total(self) -> Decimal:
        return self.fee + sum(self.payments.values(), Decimal(0))


def split_session(cost_far: Decimal, fee_bps: int, work_units: Mapping[Hashable, int],
                  registered: set | frozenset | None = None) -> Split:
    """Split ``cost_far`` into per-contributor payments (by work units, rounded down to 1e-18 FAR) and the fee.

    The pool is ``cost × (10000 − bps) / 10000``; a contributor's share is taken over the work of *all*
    contributors, registered or not, so work by an unregistered peer earns the platform (its share stays in the
    fee). Every remainder of rounding goes to the fee, so ``fee + Σ payments == cost`` exactly.
    """
    if not 0 <= fee_bps <= BPS_DENOMINATOR:
        raise ValueError(f"fee_bps {fee_bps} outside 0..10000")
    cost_base = to_base_units(cost_far)
    total_units = sum(work_units.values())
    payments: dict = {}
    for key, units in work_units.items():
        if units < 0:
            raise ValueError(f"negative work units for {key!r}")
        earns = registered is None or key in registered
        if total_units == 0 or not earns:
            base = 0
        else:
            base = cost_base * (BPS_DENOMINATOR - fee_bps) * units // (BPS_DENOMINATOR * total_units)
        payments[key] = from_base_units(base)
    fee = cost_far - sum(payments.values(), Decimal(0))
    return Split(payments=payments, fee=fee)
