"""Billing reads: cost so far, invoices, and the staff cost allocation."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q
from django.utils import timezone

from billing import invoicing, periods, prices, rating
from billing.models import BillingSettings, DailyUsage, Invoice, format_cents, format_price_per_million
from serving.models import BackendPool
from tenants.models import Tenant

# Allocation weight of a token: output tokens cost a decode step each, input tokens share a prefill,
# so an output token counts twice. f_i = (input_i + 2·output_i) / Σ_j (input_j + 2·output_j) on a pool.
OUTPUT_TOKEN_WEIGHT = 2


def current_period(now: datetime | None = None) -> date:
    return periods.period_of(periods.utc_today(now))


def first_usage_period() -> date | None:
    """The first month with rated usage of any tenant (staff pages: where browsing back ends)."""
    first = DailyUsage.all_tenants.order_by("day").values_list("day", flat=True).first()  # staff read over every tenant
    return periods.period_of(first) if first else None


def period_cost_so_far(*, tenant: Tenant, now: datetime | None = None) -> rating.PeriodCost:
    """What the tenant's usage billed in the current period costs so far, up to the last ledger row (rated rows plus
    the ledger of the days still being rated: `rating.period_cost_live`; cents, rounded as the invoice will be)."""
    return rating.period_cost_live(tenant=tenant, period=current_period(now), now=now)


@dataclass(frozen=True)
class Spend:
    """The current period's spend so far and its month-end forecast, in integer cents of `currency`."""

    cost: rating.PeriodCost
    currency: str
    period_last_day: date
    spent_cents: int
    forecast_cents: int
    elapsed_days: Decimal  # since 00:00 UTC of the period's first day, at least 1
    period_days: int

    @property
    def period(self) -> date:
        return self.cost.period

    @property
    def spent(self) -> str:
        return format_cents(self.spent_cents)

    @property
    def forecast(self) -> str:
        return format_cents(self.forecast_cents)


def spend_so_far(*, tenant: Tenant, now: datetime | None = None) -> Spend:
    """The one reading of "spend so far / forecast" (dashboard, Billing page): the period's cost so far
    (`period_cost_so_far`) and the forecast for the period's end.

    Forecast: a straight line from what the period cost so far — the exact (unrounded) cost per elapsed day times the
    period's days, rounded once, half up, like an invoice line (`prices.round_cents`). Elapsed time counts from 00:00
    UTC of the 1st and at least one day, so the first hours of a month do not multiply a few requests by 700.
    """
    now = now or timezone.now()
    cost = period_cost_so_far(tenant=tenant, now=now)
    start, _ = periods.day_bounds(cost.period)
    period_end = periods.next_period(cost.period)
    period_days = (period_end - cost.period).days
    elapsed = max(Decimal(1), Decimal((now - start).total_seconds()) / Decimal(86400))
    elapsed = min(elapsed, Decimal(period_days))
    exact = sum((line.exact_cents for line in cost.lines), Decimal(0))
    forecast = max(cost.total_cents, prices.round_cents(exact * period_days / elapsed))
    return Spend(cost=cost, currency=BillingSettings.load().currency.upper(), period_last_day=period_end - timedelta(days=1),
                 spent_cents=cost.total_cents, forecast_cents=forecast, elapsed_days=elapsed, period_days=period_days)


@dataclass(frozen=True)
class ModelPrice:
    """What one model the tenant may call costs today, per million tokens, in the currency's units ("0.075"); the
    prices are None when no price entry is in force for it."""

    model: str
    adapter: bool  # a fine-tuned model (the tenant's adapter)
    input_price: str | None
    output_price: str | None


def price_list(*, tenant: Tenant, day: date | None = None) -> tuple[list[ModelPrice], str]:
    """Every model the tenant may call (what the gateway routes for it: serving.routing.tenant_routes, base models
    first, then adapters) with the price that would rate a request on `day` (today, UTC): the same lookup as rating
    and the gateway's budget gate (PriceBook.resolve: adapter, then pool, then base model). Returns (rows, currency)."""
    from serving.routing import tenant_routes

    day = day or timezone.now().date()
    book = prices.PriceBook()
    routes = sorted(tenant_routes(tenant).values(), key=lambda r: (r.adapter is not None, r.name))
    rows = []
    for route in routes:
        price = book.resolve(model=route.name, adapter=route.adapter or "", pool_id=route.pool_id, day=day)
        rows.append(ModelPrice(model=route.name, adapter=route.adapter is not None,
                               input_price=format_price_per_million(price.input_price) if price else None,
                               output_price=format_price_per_million(price.output_price) if price else None))
    return rows, BillingSettings.load().currency.upper()


def unpaid_invoices(*, tenant: Tenant):
    """Invoices the tenant still owes: open or uncollectible, not being voided; oldest first."""
    return (Invoice.objects.for_tenant(tenant).filter(status__in=[Invoice.Status.OPEN, Invoice.Status.UNCOLLECTIBLE])
            .exclude(pending_status=Invoice.Status.VOID).order_by("period_start"))


def invoices_for(*, tenant: Tenant):
    return Invoice.objects.for_tenant(tenant).order_by("-period_start")


def invoice_get(*, tenant: Tenant, invoice_id: int) -> Invoice | None:
    return Invoice.objects.for_tenant(tenant).filter(pk=invoice_id).first()


@dataclass
class AllocationRow:
    tenant: Tenant
    pool: BackendPool | None
    weighted_tokens: int = 0
    share: Decimal = Decimal(0)
    cost_cents: int = 0
    revenue_cents: int = 0

    @property
    def margin_cents(self) -> int:
        return self.revenue_cents - self.cost_cents


@dataclass
class PoolAllocation:
    pool: BackendPool
    backends: int
    hours: Decimal
    cost_cents: int
    rows: list[AllocationRow] = field(default_factory=list)

    @property
    def revenue_cents(self) -> int:
        return sum(r.revenue_cents for r in self.rows)

    @property
    def margin_cents(self) -> int:
        return self.revenue_cents - self.cost_cents


def cost_allocation(*, period: date, now: datetime | None = None) -> tuple[list[PoolAllocation], list[AllocationRow]]:
    """Per pool: C_total = backends × hours × gpu_hourly_cost_cents; per tenant C_i = C_total · f_i.

    f_i is the tenant's share of the pool's weighted tokens (input + 2·output) used on days of `period`;
    revenue is that usage as invoices charge it: what the issued invoice charged for rows billed in a closed period
    (`invoicing.charged_cents`, so later price changes never move it), priced as it will be billed otherwise. Backends = the pool's enabled backends now (the
    platform keeps no history of pool sizes); hours = the period's hours, up to `now` for the current one.
    Staff-only: reads every tenant's rows through the unscoped managers.
    """
    now = now or timezone.now()
    start, _ = periods.day_bounds(period)
    end = min(periods.day_bounds(periods.next_period(period))[0], max(now, start))
    hours = Decimal((end - start).total_seconds()) / Decimal(3600)
    book = prices.PriceBook()
    rows = list(
        DailyUsage.all_tenants.filter(day__gte=period, day__lt=periods.next_period(period), kind=DailyUsage.Kind.INFERENCE, pool__isnull=False)
        .order_by().values("pk", "tenant_id", "pool_id", "day", "period", "model", "adapter", "input_tokens", "output_tokens")
    )
    # Rows billed in a period already invoiced count what the invoice charged; the others as they will be priced.
    invoices = list(Invoice.all_tenants.filter(tenant_id__in={r["tenant_id"] for r in rows}, period_start__in={r["period"] for r in rows})
                    .only("pk", "tenant_id", "period_start"))
    invoiced = {(i.tenant_id, i.period_start) for i in invoices}
    charged = invoicing.charged_cents(invoices)
    weighted: dict[tuple[int, int], int] = defaultdict(int)
    revenue: dict[tuple[int, int], Decimal] = defaultdict(Decimal)
    for r in rows:
        key = (r["pool_id"], r["tenant_id"])
        weighted[key] += r["input_tokens"] + OUTPUT_TOKEN_WEIGHT * r["output_tokens"]
        if (r["tenant_id"], r["period"]) in invoiced:
            revenue[key] += charged.get(r["pk"], 0)
            continue
        price = book.resolve(model=r["model"], adapter=r["adapter"], pool_id=r["pool_id"], day=r["day"])
        revenue[key] += prices.line_amount(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"], trained_tokens=0, price=price)
    tenants = Tenant.objects.in_bulk({t for _, t in weighted})
    pools = []
    for pool in BackendPool.objects.annotate(n=Count("backends", filter=Q(backends__enabled=True))).order_by("name"):
        cost = prices.round_cents(pool.n * hours * pool.gpu_hourly_cost_cents)
        total_w = sum(w for (p, _), w in weighted.items() if p == pool.pk)
        alloc = PoolAllocation(pool=pool, backends=pool.n, hours=hours, cost_cents=cost)
        for (p, t), w in sorted(weighted.items(), key=lambda kv: -kv[1]):
            if p != pool.pk:
                continue
            share = Decimal(w) / Decimal(total_w) if total_w else Decimal(0)
            alloc.rows.append(
                AllocationRow(tenant=tenants[t], pool=pool, weighted_tokens=w, share=share,
                              cost_cents=prices.round_cents(cost * share), revenue_cents=prices.round_cents(revenue[(p, t)]))
            )
        if alloc.cost_cents or alloc.rows:
            pools.append(alloc)
    per_tenant: dict[int, AllocationRow] = {}
    for alloc in pools:
        for row in alloc.rows:
            total = per_tenant.setdefault(row.tenant.pk, AllocationRow(tenant=row.tenant, pool=None))
            total.weighted_tokens += row.weighted_tokens
            total.cost_cents += row.cost_cents
            total.revenue_cents += row.revenue_cents
    return pools, sorted(per_tenant.values(), key=lambda r: r.margin_cents)
