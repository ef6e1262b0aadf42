"""Spend: what usage costs, in the budgets' unit, from the usage ledger and the price list.

Budgets count money in micro-cents (µ¢, a millionth of a cent), an exact integer per request: a price is cents per
million tokens, so one token at price p costs p µ¢, and a request costs ⌈T_in·p_in + T_out·p_out⌉ µ¢ — exact for
prices in whole cents per million tokens, rounded up by less than 1 µ¢ (10⁻⁸ dollars) per request otherwise. The
gateway's admission reserves and settles in the same unit with the same function (`request_cost_microcents`), so a
budget counter equals this module's sum over the ledger. Backend errors are not billed (billing.rating), so they
cost nothing here either. Invoices round once per line to a cent; a month's spend here differs from its invoice only
by that rounding.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone as dt_timezone
from decimal import ROUND_CEILING, Decimal

from django.db import connection, transaction
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from billing.models import format_cents
from billing.prices import PriceBook
from billing.rating import UNBILLED_STATUSES
from serving.admission import window_bounds, window_id
from serving.models import UsageRecord
from tenants.models import ApiKey, BudgetMode, Policy, SpendBudget, Tenant, budget_hard_limit_cents

MICROCENTS_PER_CENT = 1_000_000


def request_cost_microcents(*, input_tokens: int, output_tokens: int, input_price: Decimal, output_price: Decimal) -> int:
    """µ¢ one request costs: ⌈T_in·p_in + T_out·p_out⌉, prices in cents per million tokens (= µ¢ per token)."""
    exact = Decimal(input_tokens) * Decimal(input_price) + Decimal(output_tokens) * Decimal(output_price)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def cents_from_microcents(microcents: int) -> int:
    """Whole cents, rounded up (what a budget compares against is never understated)."""
    return -(-microcents // MICROCENTS_PER_CENT)


@dataclass
class Usage:
    """One scope's usage in a period: requests, tokens (every status) and spend (µ¢, billed statuses)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    microcents: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cents(self) -> int:
        return cents_from_microcents(self.microcents)

    @property
    def spent(self) -> str:
        """Spend as money for people (whole cents, rounded up): "1,234.56"."""
        return format_cents(self.cents)


def month_bounds(now: datetime | None = None) -> tuple[datetime, datetime]:
    return window_bounds("month", now)


def ledger_usage_by_key(*, tenant: Tenant, start: datetime, end: datetime, book: PriceBook | None = None) -> dict[int | None, Usage]:
    """Usage and spend of the tenant's ledger rows in [start, end), per API key id (None: the console playground).

    Grouped by the database per (key, model, adapter, pool, day, status); priced per day by the price list. A price in
    fractions of a cent per million tokens is rounded up per request, so its groups are summed row by row."""
    book = book or PriceBook()
    rows = (
        UsageRecord.objects.for_tenant(tenant).filter(created_at__gte=start, created_at__lt=end).order_by()
        .annotate(day=TruncDate("created_at", tzinfo=dt_timezone.utc))
        .values("api_key_id", "model", "adapter", "pool_id", "day", "status")
        .annotate(n=Count("id"), i=Sum("input_tokens"), o=Sum("output_tokens"))
    )
    out: dict[int | None, Usage] = defaultdict(Usage)
    for r in rows:
        usage = out[r["api_key_id"]]
        usage.requests += r["n"]
        usage.input_tokens += r["i"] or 0
        usage.output_tokens += r["o"] or 0
        if r["status"] in UNBILLED_STATUSES:
            continue
        price = book.resolve(model=r["model"], adapter=r["adapter"], pool_id=r["pool_id"], day=r["day"])
        if price is None:
            continue
        if price.input_price == price.input_price.to_integral_value() and price.output_price == price.output_price.to_integral_value():
            usage.microcents += request_cost_microcents(input_tokens=r["i"] or 0, output_tokens=r["o"] or 0,
                                                        input_price=price.input_price, output_price=price.output_price)
            continue
        day_start = datetime.combine(r["day"], time.min, tzinfo=dt_timezone.utc)
        group = UsageRecord.objects.for_tenant(tenant).filter(
            created_at__gte=max(start, day_start), created_at__lt=min(end, day_start + timedelta(days=1)),
            api_key_id=r["api_key_id"], model=r["model"], adapter=r["adapter"], pool_id=r["pool_id"], status=r["status"])
        for i, o in group.values_list("input_tokens", "output_tokens").iterator():
            usage.microcents += request_cost_microcents(input_tokens=i, output_tokens=o, input_price=price.input_price,
                                                        output_price=price.output_price)
    return dict(out)


def tenant_month_usage(*, tenant: Tenant, now: datetime | None = None) -> Usage:
    """The tenant's usage and spend this calendar month (UTC), every key and the playground together."""
    start, end = month_bounds(now)
    total = Usage()
    for usage in ledger_usage_by_key(tenant=tenant, start=start, end=end).values():
        total.requests += usage.requests
        total.input_tokens += usage.input_tokens
        total.output_tokens += usage.output_tokens
        total.microcents += usage.microcents
    return total


def quota_window_tokens(*, tenant: Tenant, window: str, now: datetime | None = None) -> int:
    """Tokens in the ledger in the tenant's current quota window (day or month), every status: what the quota counts."""
    start, end = window_bounds(window, now)
    agg = UsageRecord.objects.for_tenant(tenant).filter(created_at__gte=start, created_at__lt=end).aggregate(
        i=Sum("input_tokens"), o=Sum("output_tokens"))
    return (agg["i"] or 0) + (agg["o"] or 0)


@dataclass(frozen=True)
class BudgetInForce:
    """A tenant's monthly money limits, in cents (0 = none). `hard_cents`: requests past it are refused (the staff
    ceiling, or the tenant's own hard budget if lower); `alert_cents`: what alerts' percentages are of (the tenant's
    budget, else the ceiling)."""

    budget_cents: int
    mode: str
    ceiling_cents: int

    @property
    def hard_cents(self) -> int:
        return budget_hard_limit_cents(budget_cents=self.budget_cents, mode=self.mode, ceiling_cents=self.ceiling_cents)

    @property
    def alert_cents(self) -> int:
        return self.budget_cents or self.ceiling_cents


def budget_in_force(*, tenant: Tenant) -> BudgetInForce:
    budget = SpendBudget.objects.for_tenant(tenant).first()
    ceiling = Policy.objects.for_tenant(tenant).values_list("budget_ceiling_cents", flat=True).first() or 0
    return BudgetInForce(budget.monthly_cents if budget else 0, budget.mode if budget else BudgetMode.SOFT, ceiling)


@dataclass
class KeyRow:
    key: ApiKey
    usage: Usage

    def share(self, used: int, limit: int) -> int | None:
        return min(999, used * 100 // limit) if limit else None

    @property
    def tokens_percent(self) -> int | None:
        return self.share(self.usage.tokens, self.key.monthly_token_budget)

    @property
    def budget_percent(self) -> int | None:
        return self.share(self.usage.microcents, self.key.monthly_budget_cents * MICROCENTS_PER_CENT)


def keys_with_usage(*, tenant: Tenant, keys, now: datetime | None = None) -> list[KeyRow]:
    """Each key with its usage and spend this month (for the keys page)."""
    start, end = month_bounds(now)
    by_key = ledger_usage_by_key(tenant=tenant, start=start, end=end)
    return [KeyRow(k, by_key.get(k.pk, Usage())) for k in keys]


def current_month(now: datetime | None = None) -> str:
    return window_id("month", now)


# ---- for the gateway (serving.budgets and serving.config name these by their dotted paths) ----------------------


def budget_seed_usage(tenant_id: int, month: str, key_ids, *, pending=None) -> tuple[int, dict[int, tuple[int, int]], set[str]]:
    """A month's (YYYYMM) spend in µ¢ of the tenant, and (µ¢, tokens) of each of `key_ids`, from the ledger: the seed of
    the gateway's budget counters (serving.budgets, docs/limits.md "Seeding from the ledger").

    One consistent read (a transaction; REPEATABLE READ on PostgreSQL, SQLite's reads are one snapshot): after the sums,
    `pending()` lists the request ids the gateway counts as settled but perhaps not yet recorded, and the third figure is
    those of them the same read holds — a record committed after the read began is in neither."""
    tenant = Tenant.objects.get(pk=tenant_id)
    start = datetime(int(month[:4]), int(month[4:6]), 1, tzinfo=dt_timezone.utc)
    _, end = month_bounds(start)
    wanted = set(key_ids)
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if connection.vendor == "postgresql" and outermost:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        by_key = ledger_usage_by_key(tenant=tenant, start=start, end=end)
        listed = list(pending()) if pending is not None else []
        held = set()
        for i in range(0, len(listed), 1000):
            held.update(UsageRecord.objects.for_tenant(tenant).filter(
                created_at__gte=start, created_at__lt=end, request_id__in=listed[i:i + 1000]).values_list("request_id", flat=True))
    return (sum(u.microcents for u in by_key.values()),
            {k: (u.microcents, u.tokens) for k, u in by_key.items() if k in wanted}, held)


def gateway_price_book() -> PriceBook:
    """Every price entry, for the gateway's snapshot: `resolve(model=, adapter=, pool_id=, day=)` as rating does."""
    return PriceBook()

