"""Spend so far without waiting for the rating run (rated rows + the live days' ledger), and the month-end forecast."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from billing import invoicing, rating, selectors
from billing.models import format_price_per_million
from tests.support.billing import price, usage, utc

JAN = date(2026, 1, 1)


def test_live_cost_counts_ledger_rows_not_rated_yet(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="200")
    usage(world.tenant, at=utc(2026, 1, 20, 9), pool=catalog.shared, inp=1_000_000)  # 100 ¢, never rated
    now = utc(2026, 1, 20, 10)
    assert rating.period_cost(tenant=world.tenant, period=JAN).total_cents == 0  # what the rollup knows
    live = rating.period_cost_live(tenant=world.tenant, period=JAN, now=now)
    assert live.total_cents == 100 and live.daily_cents == {date(2026, 1, 20): Decimal(100)}


def test_live_cost_is_what_the_rating_run_and_the_invoice_then_say(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="200")
    usage(world.tenant, at=utc(2026, 1, 10), pool=catalog.shared, inp=1_000_000)
    rating.rate_day(date(2026, 1, 10))
    usage(world.tenant, at=utc(2026, 1, 31, 8), pool=catalog.shared, inp=3_000, out=1_000)
    usage(world.tenant, at=utc(2026, 1, 31, 9), model=catalog.adapter.name, adapter=catalog.adapter.name, pool=catalog.shared, out=2_500)
    usage(world.tenant, at=utc(2026, 1, 31, 9), pool=catalog.shared, inp=9_000_000, status="error")  # our failure: not billed
    live = rating.period_cost_live(tenant=world.tenant, period=JAN, now=utc(2026, 1, 31, 12))
    rating.rate_day(date(2026, 1, 31))
    rated = rating.period_cost(tenant=world.tenant, period=JAN)
    key = lambda c: [(l.kind, l.model, l.adapter, l.price, l.input_tokens, l.output_tokens, l.requests, l.amount_cents) for l in c.lines]
    assert key(live) == key(rated) and live.daily_cents == rated.daily_cents
    [invoice] = invoicing.period_close(period=JAN, now=utc(2026, 2, 2), tenant=world.tenant)
    # tiny-chat: 100 ¢ + (0.3 + 0.2) ¢ = 100.5 → 101 ¢; the adapter: 0.5 → 1 ¢ (each line rounded once, half up)
    assert [(l.model, l.amount_cents) for l in live.lines] == [(catalog.adapter.name, 1), ("tiny-chat", 101)]
    assert invoice.total_cents == live.total_cents == 102


def test_live_cost_rounds_once_per_line_as_invoices_do(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="1", out="1")
    for hour in (8, 9):  # 0.5 ¢ each: one line of 1 ¢, not two lines of 1 ¢
        usage(world.tenant, at=utc(2026, 1, 20, hour), pool=catalog.shared, inp=500_000)
    live = rating.period_cost_live(tenant=world.tenant, period=JAN, now=utc(2026, 1, 20, 12))
    assert [l.amount_cents for l in live.lines] == [1]  # 2 if each request were rounded


def test_settled_days_come_from_the_rollup_only(world, catalog):
    """Days older than the rating run's trailing window are read from DailyUsage (what the invoice will bill)."""
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)
    rating.rate_day(date(2026, 1, 5))
    usage(world.tenant, at=utc(2026, 1, 5, 1), pool=catalog.shared, inp=5_000_000)  # late: `billing_rate --from` picks it up
    now = utc(2026, 1, 20)
    assert rating.live_days(JAN, date(2026, 1, 20)) == [date(2026, 1, 18), date(2026, 1, 19), date(2026, 1, 20)]
    assert rating.period_cost_live(tenant=world.tenant, period=JAN, now=now).total_cents == 100


def test_live_days_stay_inside_the_period():
    assert rating.live_days(JAN, date(2026, 1, 1)) == [date(2026, 1, 1)]  # not 30 and 31 Dec
    assert rating.live_days(date(2025, 12, 1), date(2026, 1, 1)) == [date(2025, 12, 30), date(2025, 12, 31)]


def test_live_cost_is_the_tenants_own(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.other_tenant, at=utc(2026, 1, 20, 9), pool=catalog.shared, inp=1_000_000)
    assert rating.period_cost_live(tenant=world.tenant, period=JAN, now=utc(2026, 1, 20, 10)).lines == []


def test_an_invoiced_period_is_frozen(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 31), pool=catalog.shared, inp=1_000_000)
    invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2), tenant=world.tenant)
    usage(world.tenant, at=utc(2026, 1, 31, 23), pool=catalog.shared, inp=1_000_000)  # late: billed in February
    assert rating.period_cost_live(tenant=world.tenant, period=JAN, now=utc(2026, 2, 1, 3)).total_cents == 100


def test_forecast_is_the_pace_so_far_over_the_whole_period(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 3), pool=catalog.shared, inp=1_000_000)  # 100 ¢
    rating.rate_day(date(2026, 1, 3))
    spend = selectors.spend_so_far(tenant=world.tenant, now=utc(2026, 1, 11))  # 10 days elapsed of 31
    assert (spend.spent_cents, spend.forecast_cents, spend.period_days) == (100, 310, 31)
    assert spend.spent == "1.00" and spend.forecast == "3.10" and spend.currency == "USD" and spend.period_last_day == date(2026, 1, 31)


def test_forecast_in_the_first_hours_counts_one_day(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 1, 1), pool=catalog.shared, inp=1_000_000)
    spend = selectors.spend_so_far(tenant=world.tenant, now=utc(2026, 1, 1, 2))
    assert (spend.spent_cents, spend.forecast_cents) == (100, 3100)  # not 100 × 372 hours


def test_forecast_rounds_once_from_the_exact_cost(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="1", out="0")
    usage(world.tenant, at=utc(2026, 1, 2), pool=catalog.shared, inp=400_000)  # 0.4 ¢: billed 0 ¢ so far
    spend = selectors.spend_so_far(tenant=world.tenant, now=utc(2026, 1, 3))  # 2 days: 0.4 × 31 / 2 = 6.2 ¢
    assert (spend.spent_cents, spend.forecast_cents) == (0, 6)


def test_prices_read_as_currency_per_million():
    assert [format_price_per_million(Decimal(v)) for v in ("50", "150", "7.5", "1234", "150000", "0")] == [
        "0.50", "1.50", "0.075", "12.34", "1,500.00", "0.00"]
