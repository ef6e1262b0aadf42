"""Prices: the staff-maintained price list resolved for a usage day (adapter, then pool, then base model), and the
one money rule: a line's exact cents from its tokens and prices, rounded half up to a cent once per line."""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, localcontext

from billing.models import Price
from serving.models import Adapter

MILLION = Decimal(1_000_000)


class PriceBook:
    """All price entries, loaded once (a small staff-maintained table), resolved per usage day."""

    def __init__(self):
        self._by_model: dict[str, list[Price]] = defaultdict(list)
        for price in Price.objects.select_related("base_model", "adapter").order_by("-effective_from", "-id"):
            self._by_model[price.base_model.name].append(price)
        # The gateway records a fine-tuned model's requests under the name the tenant called (the adapter's, `ft:…`);
        # its prices are entries of its base model. all_tenants: adapter names are unique across tenants.
        self._base_of_adapter = dict(Adapter.all_tenants.values_list("name", "base_model__name"))

    def resolve(self, *, model: str, adapter: str, pool_id: int | None, day: date) -> Price | None:
        """The most specific entry in force on `day`: adapter, then pool, then the base model's."""
        base = self._base_of_adapter.get(model, model)
        return pick_price(self._by_model.get(base, ()), adapter=adapter, pool_id=pool_id, day=day)


def pick_price(entries, *, adapter: str, pool_id: int | None, day: date) -> Price | None:
    """Among one base model's `entries` (newest first: effective_from, then id, descending), the one pricing a usage
    day: the latest in force, most specific scope first (adapter, then pool, then the base model's)."""
    in_force = [p for p in entries if p.effective_from <= day]
    for match in (
        lambda p: adapter and p.adapter_id and p.adapter.name == adapter,
        lambda p: pool_id and p.pool_id == pool_id and not p.adapter_id,
        lambda p: not p.adapter_id and not p.pool_id,
    ):
        for p in in_force:
            if match(p):
                return p
    return None


def round_cents(amount: Decimal) -> int:
    """Round a cent amount to whole cents, half up (the one rounding rule; applied once per line)."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def line_amount(*, input_tokens: int, output_tokens: int, trained_tokens: int, price: Price | None) -> Decimal:
    """Unrounded cents: (T_in·p_in + T_out·p_out + T_train·p_train) / 10⁶, prices in cents per million tokens."""
    if price is None:
        return Decimal(0)
    with localcontext() as ctx:
        ctx.prec = 60
        return (input_tokens * price.input_price + output_tokens * price.output_price + trained_tokens * price.training_price) / MILLION
