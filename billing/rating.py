"""Rating: the usage ledger rolled up per day by the database, and priced per line (prices: billing.prices; periods:
billing.periods).

`rate_day` recomputes one UTC day for every tenant in one transaction (delete + insert of the day's
open rows), so it is exact and safe to rerun. The ledger is aggregated with GROUP BY; no ledger row is
loaded into Python. Rows of a period already closed for a tenant are frozen: usage of such a day that
is rated later (late arrival) is stored as the difference, attributed to the period open at rating time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db import transaction
from django.db.models import Count, Q, Sum

from billing.models import BillingSettings, DailyUsage, Invoice, Price, format_cents
from billing.periods import day_bounds, next_period, period_of, utc_today
from billing.prices import PriceBook, line_amount, round_cents
from serving.models import UsageRecord

log = logging.getLogger(__name__)

# Backend errors are our failure: their tokens are not billed. Cancelled / interrupted requests are.
UNBILLED_STATUSES = (UsageRecord.Status.ERROR,)
KEY = ("kind", "model", "adapter", "pool_id")
SUMS = ("requests", "input_tokens", "output_tokens", "trained_tokens", "duration_ms")
RATE_TRAILING_DAYS = 3  # billing.rate_recent rerates this many UTC days (today included) every 15 minutes


# ---- training usage (owned by finetune; read only here) ------------------------------------------


def training_usage_model():
    """`finetune.models.TrainingUsage`, through the app registry: billing sits below finetune in the layers and
    never imports it (the one place billing reads fine-tuning)."""
    from django.apps import apps

    return apps.get_model("finetune", "TrainingUsage")


def _training_groups(start: datetime, end: datetime, tenant=None):
    model = training_usage_model()
    # Batch code over every tenant (or one tenant's rows, for its live cost): the unscoped manager is intended here.
    records = model.objects.for_tenant(tenant) if tenant is not None else model.all_tenants
    rows = (
        records.filter(created_at__gte=start, created_at__lt=end)
        .order_by()
        .values("tenant_id", "base_model")
        .annotate(trained_tokens=Sum("trained_tokens"), requests=Count("id"))
    )
    return [
        {"tenant_id": r["tenant_id"], "kind": DailyUsage.Kind.TRAINING, "model": r["base_model"], "adapter": "", "pool_id": None,
         "requests": r["requests"], "input_tokens": 0, "output_tokens": 0, "trained_tokens": r["trained_tokens"] or 0, "duration_ms": 0}
        for r in rows
    ]


def _ledger_groups(start: datetime, end: datetime, tenant=None):
    # Batch code over every tenant (or one tenant's rows, for its live cost): the unscoped manager is intended
    # here. order_by() drops the default ordering, which would otherwise be added to the GROUP BY.
    records = UsageRecord.objects.for_tenant(tenant) if tenant is not None else UsageRecord.all_tenants
    rows = (
        records.filter(created_at__gte=start, created_at__lt=end)
        .exclude(status__in=UNBILLED_STATUSES)
        .order_by()
        .values("tenant_id", "model", "adapter", "pool_id")
        .annotate(requests=Count("id"), input_tokens=Sum("input_tokens"), output_tokens=Sum("output_tokens"), duration_ms=Sum("duration_ms"))
    )
    for r in rows:
        yield {**r, "kind": DailyUsage.Kind.INFERENCE, "trained_tokens": 0}


def billing_lock() -> None:
    """Serialise rating and closing (call inside a transaction): a close never races a rerate."""
    BillingSettings.load()
    BillingSettings.objects.select_for_update().get(pk=1)


def _closed_periods(since: date) -> dict[int, set[date]]:
    closed: dict[int, set[date]] = defaultdict(set)
    for tenant_id, period in Invoice.all_tenants.filter(period_start__gte=since).values_list("tenant_id", "period_start"):
        closed[tenant_id].add(period)
    return closed


def _target_period(day: date, closed: set[date], today: date) -> date:
    period = period_of(day)
    if period not in closed:
        return period
    period = max(period_of(today), next_period(period))
    while period in closed:
        period = next_period(period)
    return period


@transaction.atomic
def rate_day(day: date, *, now: datetime | None = None) -> int:
    """Recompute the DailyUsage rows of one UTC day, all tenants. Returns the number of rows written.

    Exact and idempotent: the day's open rows are deleted and re-inserted from the ledger's GROUP BY,
    minus what closed periods already billed for that day.
    """
    billing_lock()
    today = utc_today(now)
    closed = _closed_periods(period_of(day))
    frozen_q = Q()
    by_period: dict[date, list[int]] = defaultdict(list)
    for tenant_id, periods in closed.items():
        for p in periods:
            by_period[p].append(tenant_id)
    for p, tenant_ids in by_period.items():
        frozen_q |= Q(period=p, tenant_id__in=tenant_ids)

    day_rows = DailyUsage.all_tenants.filter(day=day)
    frozen: dict[tuple, dict] = {}
    if by_period:
        day_rows.exclude(frozen_q).delete()
        for r in day_rows.filter(frozen_q).order_by().values("tenant_id", *KEY).annotate(**{s: Sum(s) for s in SUMS}):
            frozen[(r["tenant_id"], *(r[k] for k in KEY))] = r
    else:
        day_rows.delete()

    start, end = day_bounds(day)
    new_rows = []
    for g in [*_ledger_groups(start, end), *_training_groups(start, end)]:
        key = (g["tenant_id"], *(g[k] for k in KEY))
        done = frozen.get(key)
        values = {s: (g[s] or 0) - (done[s] or 0 if done else 0) for s in SUMS}
        if not any(values[s] for s in ("input_tokens", "output_tokens", "trained_tokens", "requests")):
            continue
        if any(v < 0 for v in values.values()):
            log.warning("Ledger shrank below what was billed for %s on %s; not rating the difference.", key, day)
            continue
        new_rows.append(
            DailyUsage(
                tenant_id=g["tenant_id"], day=day, period=_target_period(day, closed.get(g["tenant_id"], set()), today),
                kind=g["kind"], model=g["model"], adapter=g["adapter"] or "", pool_id=g["pool_id"], **values,
            )
        )
    DailyUsage.all_tenants.bulk_create(new_rows, batch_size=2000)
    return len(new_rows)


def rate_range(first_day: date, last_day: date, *, now: datetime | None = None) -> int:
    """Rate every day from `first_day` to `last_day` inclusive (one transaction per day)."""
    written, day = 0, first_day
    while day <= last_day:
        written += rate_day(day, now=now)
        day += timedelta(days=1)
    return written


# ---- priced lines -------------------------------------------------------------------------------


@dataclass
class RatedLine:
    kind: str
    model: str
    adapter: str
    pool_id: int | None
    price: Price | None
    input_tokens: int = 0
    output_tokens: int = 0
    trained_tokens: int = 0
    requests: int = 0
    first_day: date | None = None
    last_day: date | None = None

    @property
    def exact_cents(self) -> Decimal:
        return line_amount(input_tokens=self.input_tokens, output_tokens=self.output_tokens, trained_tokens=self.trained_tokens, price=self.price)

    @property
    def amount_cents(self) -> int:
        return round_cents(self.exact_cents)

    @property
    def amount(self) -> str:
        return format_cents(self.amount_cents)


@dataclass
class PeriodCost:
    period: date
    lines: list[RatedLine]
    daily_cents: dict[date, Decimal] = field(default_factory=dict)  # unrounded, for the chart
    # The same, split by model (its name; fine-tuning as "<base model> · fine-tuning"): {day: {model: cents}}.
    daily_model_cents: dict[date, dict[str, Decimal]] = field(default_factory=dict)

    @property
    def total_cents(self) -> int:
        return sum(line.amount_cents for line in self.lines)

    @property
    def total(self) -> str:
        return format_cents(self.total_cents)


def period_cost(*, tenant, period: date, book: PriceBook | None = None) -> PeriodCost:
    """A tenant's rated usage billed in `period`: one line per (kind, model, adapter, pool, price entry).

    C = T_in·p_in + T_out·p_out per line (plus T_train·p_train for training), each line rounded half up
    to a cent. Reads the DailyUsage rollup only (days × models rows).
    """
    rows = (
        DailyUsage.objects.for_tenant(tenant).filter(period=period).order_by()
        .values("day", *KEY).annotate(**{s: Sum(s) for s in SUMS})
    )
    return _priced(period, rows, book or PriceBook())


def live_days(period: date, today: date) -> list[date]:
    """The days of `period` whose rated rows may lag the ledger: the ones `billing.rate_recent` still rerates
    (the last RATE_TRAILING_DAYS UTC days, today included) that lie in `period` and are not in the future."""
    first = max(period, today - timedelta(days=RATE_TRAILING_DAYS - 1))
    last = min(today, next_period(period) - timedelta(days=1))
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def period_cost_live(*, tenant, period: date, now: datetime | None = None, book: PriceBook | None = None) -> PeriodCost:
    """`period_cost` without waiting for the next rating run: the rated rows of the period's settled days plus the
    tenant's ledger of its live days (`live_days`), grouped exactly as `rate_day` would rate them now.

    For an open period this is what the period's invoice would say if it were closed now (same lines, same
    per-line half-up rounding: `_priced`). A period already invoiced for the tenant is frozen: its rated rows only.
    """
    if Invoice.objects.for_tenant(tenant).filter(period_start=period).exists():
        return period_cost(tenant=tenant, period=period, book=book)
    days = live_days(period, utc_today(now))
    rated = DailyUsage.objects.for_tenant(tenant).filter(period=period)
    if days:
        rated = rated.exclude(day__gte=days[0], day__lte=days[-1])
    rows = list(rated.order_by().values("day", *KEY).annotate(**{s: Sum(s) for s in SUMS}))
    for day in days:
        start, end = day_bounds(day)
        for g in [*_ledger_groups(start, end, tenant), *_training_groups(start, end, tenant)]:
            values = {s: g[s] or 0 for s in SUMS}
            if any(values[s] for s in ("input_tokens", "output_tokens", "trained_tokens", "requests")):
                rows.append({"day": day, **{k: g[k] for k in KEY}, "adapter": g["adapter"] or "", **values})
    return _priced(period, rows, book or PriceBook())


def _priced(period: date, rows, book: PriceBook) -> PeriodCost:
    """Rollup rows ({day, kind, model, adapter, pool_id, sums}) priced into invoice lines and cents per day."""
    lines: dict[tuple, RatedLine] = {}
    daily: dict[date, Decimal] = defaultdict(Decimal)
    by_model: dict[date, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for r in sorted(rows, key=lambda r: (r["day"], r["kind"], r["model"], r["adapter"], r["pool_id"] or 0)):
        price = book.resolve(model=r["model"], adapter=r["adapter"], pool_id=r["pool_id"], day=r["day"])
        # Pool-specific prices keep their pool on the line; otherwise lines are per model/adapter.
        pool_id = r["pool_id"] if price is not None and price.pool_id else None
        key = (r["kind"], r["model"], r["adapter"], pool_id, price.pk if price else None)
        line = lines.get(key)
        if line is None:
            line = lines[key] = RatedLine(kind=r["kind"], model=r["model"], adapter=r["adapter"], pool_id=pool_id, price=price, first_day=r["day"])
        line.input_tokens += r["input_tokens"]
        line.output_tokens += r["output_tokens"]
        line.trained_tokens += r["trained_tokens"]
        line.requests += r["requests"]
        line.last_day = r["day"]
        amount = line_amount(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"], trained_tokens=r["trained_tokens"], price=price)
        daily[r["day"]] += amount
        by_model[r["day"]][r["model"] + (" · fine-tuning" if r["kind"] == DailyUsage.Kind.TRAINING else "")] += amount
    ordered = sorted(lines.values(), key=lambda l: (l.kind, l.model, l.adapter, l.first_day))
    return PeriodCost(period=period, lines=ordered, daily_cents=dict(sorted(daily.items())),
                      daily_model_cents={day: dict(models) for day, models in sorted(by_model.items())})
