"""What a fine-tune will take before it runs: OpenAI's "auto" epochs and the billed cost, in exact integers."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal


def auto_n_epochs(n_examples: int) -> int:
    """OpenAI's "auto" rule: 3 epochs, raised so tiny files see ≥ 100 example passes (at most 25 epochs),
    lowered so huge files see ≤ 25,000 (at least 1)."""
    if n_examples <= 0:
        raise ValueError("n_examples must be positive")
    if n_examples * 3 < 100:
        return min(25, -(-100 // n_examples))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def estimate_cost_cents(tokens_per_epoch: int, n_epochs: int, price_cents_per_million: int | Decimal) -> int:
    """Billed cost in integer cents: tokens in the training file × epochs × price, rounded up to a cent.

    Exact decimal arithmetic (no float drift in money; prices may carry sub-cent decimals); validation
    tokens are free, as at OpenAI.
    """
    if min(tokens_per_epoch, n_epochs, price_cents_per_million) < 0:
        raise ValueError("tokens, epochs and price must be >= 0")
    cents = Decimal(tokens_per_epoch * n_epochs) * Decimal(price_cents_per_million) / 1_000_000
    return int(cents.to_integral_value(rounding=ROUND_CEILING))
