"""Staff cost allocation: a closed period's revenue is what its invoices charged, whatever the price table says now."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from billing import invoicing, rating, selectors
from billing.models import DailyUsage, Price
from serving.models import Backend, BackendPool
from tests.support.billing import price, random_ledger, usage, utc

JAN, FEB = date(2026, 1, 1), date(2026, 2, 1)


def _revenue(period, now):
    pools, tenants = selectors.cost_allocation(period=period, now=now)
    return ({(p.pool.name, r.tenant.slug): r.revenue_cents for p in pools for r in p.rows},
            {r.tenant.slug: r.revenue_cents for r in tenants})


def _reprice_everything(catalog):
    """A later price change reaching back into closed periods (as a data fix or an old admin would have made it):
    created directly, so Price.clean does not refuse it."""
    Price.objects.create(base_model=catalog.base, effective_from=date(2025, 1, 1), input_price=Decimal(1000), output_price=Decimal(1000))
    Price.objects.create(base_model=catalog.base, effective_from=JAN, input_price=Decimal(1000), output_price=Decimal(1000))
    Price.objects.create(base_model=catalog.base, pool=catalog.dedicated, effective_from=JAN, input_price=Decimal(1000), output_price=Decimal(1000))


def test_closed_period_revenue_is_what_the_invoices_charged(world, catalog):
    second = BackendPool.objects.create(name="shared-tiny-2", base_model=catalog.base, kind="dev", gpu_hourly_cost_cents=200)
    Backend.objects.create(pool=second, url="http://second.test:8000")
    price(catalog.base, effective_from=date(2025, 12, 1), inp="1", out="1")
    price(catalog.base, effective_from=date(2025, 12, 1), inp="3", out="3", pool=catalog.dedicated)
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=500_000)     # 0.5 ¢ ┐ one line (base price):
    usage(world.tenant, at=utc(2026, 1, 6), pool=second, inp=500_000)             # 0.5 ¢ ┘ 1 ¢, rounded once
    usage(world.tenant, at=utc(2026, 1, 7), pool=catalog.dedicated, inp=1_000_000)  # 3 ¢ (the pool's price)
    usage(world.other_tenant, at=utc(2026, 1, 8), pool=catalog.shared, inp=2_400_000)  # 2.4 ¢ → 2 ¢
    invoices = {i.tenant.slug: i for i in invoicing.period_close(period=JAN, now=utc(2026, 2, 2))}
    assert {slug: i.total_cents for slug, i in invoices.items()} == {"acme": 4, "globex": 2}

    per_pool, per_tenant = _revenue(JAN, utc(2026, 3, 1))
    assert per_tenant == {"acme": 4, "globex": 2}  # the invoices' totals, not 0.5 + 0.5 rounded per pool
    assert per_pool[("acme-tiny", "acme")] == 3 and per_pool[("shared-tiny", "acme")] + per_pool[("shared-tiny-2", "acme")] == 1

    _reprice_everything(catalog)
    assert _revenue(JAN, utc(2026, 3, 1)) == (per_pool, per_tenant)  # issued invoices do not change, nor does this page


def test_late_usage_counts_in_its_days_month_at_what_the_later_invoice_charged(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)  # 100 ¢ on January's invoice
    invoicing.period_close(period=JAN, now=utc(2026, 2, 2))
    usage(world.tenant, at=utc(2026, 1, 20), pool=catalog.shared, inp=1_000_000)  # arrives late: billed in February
    rating.rate_day(date(2026, 1, 20), now=utc(2026, 2, 10))
    assert _revenue(JAN, utc(2026, 3, 1))[1] == {"acme": 200}  # February still open: priced as it will be billed
    [feb] = invoicing.period_close(period=FEB, now=utc(2026, 3, 2))
    assert feb.total_cents == 100

    _reprice_everything(catalog)
    assert _revenue(JAN, utc(2026, 3, 1))[1] == {"acme": 200}
    assert _revenue(FEB, utc(2026, 3, 1))[1] == {}  # no usage on February's days


@pytest.mark.parametrize("seed", [1, 2])
def test_rows_add_up_to_each_invoice_exactly_and_stay(world, catalog, prices, seed):  # noqa: F811 (the fixture)
    random_ledger(world, catalog, seed)
    invoices = invoicing.period_close(period=JAN, now=utc(2026, 2, 5))
    charged = invoicing.charged_cents(invoices)
    for invoice in invoices:
        rows = DailyUsage.all_tenants.filter(tenant=invoice.tenant, period=JAN).values_list("pk", flat=True)
        assert set(rows) <= set(charged) and sum(charged[pk] for pk in rows) == invoice.total_cents
    _reprice_everything(catalog)
    assert invoicing.charged_cents(invoices) == charged
