"""Period close: one invoice per tenant and billing month, assembled from the DailyUsage rollup.

A close first rerates the period's days (so everything rated so far is in), then, per tenant, writes the
invoice and its lines in one transaction under the billing lock. From then on the period is frozen for
that tenant (`closed_at`): usage of its days rated later goes to the period open at that time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import date, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal, localcontext

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from billing import periods, prices, rating, stripe_gateway
from billing.models import BillingSettings, DailyUsage, Invoice, InvoiceLine
from common.queue import enqueue_on_commit
from serving.models import BackendPool
from tenants.models import Tenant
from tenants.services import SYSTEM, Actor, audit_record

log = logging.getLogger(__name__)

def invoice_number(tenant: Tenant, period: date) -> str:
    return f"{tenant.slug.upper()}-{period:%Y%m}"


def _describe(line: rating.RatedLine, pools: dict[int, str]) -> str:
    if line.kind == DailyUsage.Kind.TRAINING:
        return f"Fine-tuning {line.model}: {line.trained_tokens:,} trained tokens"
    what = f"{line.model} · {line.adapter}" if line.adapter and line.adapter != line.model else line.model  # the gateway: model = adapter
    where = f" on {pools.get(line.pool_id, '')}" if line.pool_id else ""
    span = f" ({line.first_day:%d %b}–{line.last_day:%d %b})" if line.price is not None else " (no price set)"
    return f"{what}{where}: {line.input_tokens:,} input + {line.output_tokens:,} output tokens{span}"


@transaction.atomic
def invoice_close(*, tenant: Tenant, period: date, now: datetime | None = None, actor: Actor = SYSTEM,
                  book: prices.PriceBook | None = None) -> Invoice | None:
    """Close `period` for one tenant: write its invoice (lines per model/adapter/price and training), open it.

    Idempotent: an existing invoice is returned unchanged. No usage → no invoice (None). Amounts in cents.
    """
    rating.billing_lock()
    existing = Invoice.objects.for_tenant(tenant).filter(period_start=period).first()
    if existing is not None:
        return existing
    cost = rating.period_cost(tenant=tenant, period=period, book=book)
    if not cost.lines:
        return None
    now = now or timezone.now()
    settings_row = BillingSettings.load()
    invoice = Invoice.objects.for_tenant(tenant).create(
        tenant=tenant, number=invoice_number(tenant, period), period_start=period, period_end=periods.next_period(period),
        billed_to_name=Tenant.objects.filter(pk=tenant.pk).values_list("name", flat=True).get(),  # as it is now, not a stale copy
        currency=settings_row.currency, closed_at=now, total_cents=cost.total_cents,
    )
    pools = dict(BackendPool.objects.values_list("id", "name"))
    InvoiceLine.objects.for_tenant(tenant).bulk_create(
        [
            InvoiceLine(
                tenant=tenant, invoice=invoice, kind=line.kind, model=line.model, adapter=line.adapter,
                pool_name=pools.get(line.pool_id, "") if line.pool_id else "", price=line.price,
                input_tokens=line.input_tokens, output_tokens=line.output_tokens, trained_tokens=line.trained_tokens,
                input_price=line.price.input_price if line.price else 0, output_price=line.price.output_price if line.price else 0,
                training_price=line.price.training_price if line.price else 0, amount_cents=line.amount_cents,
                description=_describe(line, pools)[:300],
            )
            for line in cost.lines
        ]
    )
    invoice.move_to(Invoice.Status.OPEN, at=now)
    if invoice.total_cents <= 0:
        invoice.move_to(Invoice.Status.PAID, at=now)  # nothing to collect, as Stripe does for zero invoices
        invoice.own_row().update(delivery=Invoice.Delivery.NOT_NEEDED)
        invoice.delivery = Invoice.Delivery.NOT_NEEDED
    elif stripe_gateway.is_configured():
        invoice.own_row().update(delivery=Invoice.Delivery.PENDING)
        invoice.delivery = Invoice.Delivery.PENDING
        enqueue_on_commit("billing.tasks.invoice_push", invoice.pk, tenant.pk)
    audit_record(tenant=tenant, actor=actor, action="billing.invoice_closed", target=invoice,
                 data={"number": invoice.number, "total_cents": invoice.total_cents, "period": period.isoformat()})
    return invoice


def period_close(*, period: date, now: datetime | None = None, tenant: Tenant | None = None, rerate: bool = True,
                 actor: Actor = SYSTEM) -> list[Invoice]:
    """Close a billing month that has ended: rerate its days, then one invoice per tenant with usage.

    Safe to rerun (tenants already invoiced are skipped). `tenant` limits it to one tenant (staff, on demand).
    """
    now = now or timezone.now()
    end = periods.next_period(period)
    if end > periods.utc_today(now):
        raise ValidationError(f"The period {period:%B %Y} has not ended yet; it can be closed from {end:%d %B %Y}.")
    if rerate:
        rating.rate_range(period, end - timedelta(days=1), now=now)
    # Batch code over every tenant: the unscoped managers are intended here.
    tenant_ids = set(DailyUsage.all_tenants.filter(period=period).values_list("tenant_id", flat=True).distinct())
    tenant_ids -= set(Invoice.all_tenants.filter(period_start=period).values_list("tenant_id", flat=True))
    if tenant is not None:
        tenant_ids &= {tenant.pk}
    book = prices.PriceBook()
    invoices = []
    for t in Tenant.objects.filter(pk__in=tenant_ids).order_by("pk"):
        invoice = invoice_close(tenant=t, period=period, now=now, actor=actor, book=book)
        if invoice is not None:
            invoices.append(invoice)
    return invoices


# ---- what issued invoices charged --------------------------------------------------------------------


def charged_cents(invoices) -> dict[int, int]:
    """Whole cents each DailyUsage row was charged on its issued invoice: {row id: cents}.

    Read from the invoices, never from the price table as it is now: a row billed in an invoice's period is matched
    to the line that billed it among the lines of the same kind, model and adapter, by the price entries those lines
    used (each line keeps its entry; the entry chosen at close is the latest, most specific one among them, so this
    finds it again even when entries were added later), and priced with the line's stored prices. A line is rounded
    once, so its cents are shared among its rows in proportion to their exact amounts (largest remainder): the rows
    of an invoice add up to its lines, and so to its total, exactly.
    """
    by_period = {(i.tenant_id, i.period_start): i.pk for i in invoices}
    if not by_period:
        return {}
    lines: dict[tuple, list[InvoiceLine]] = defaultdict(list)
    # Staff reads over every tenant: the unscoped managers are intended here.
    for line in InvoiceLine.all_tenants.filter(invoice_id__in=by_period.values()).select_related("price__adapter"):
        lines[(line.invoice_id, line.kind, line.model, line.adapter)].append(line)
    for candidates in lines.values():
        candidates.sort(key=lambda l: (l.price.effective_from, l.price.pk) if l.price_id else (date.min, 0), reverse=True)
    rows = DailyUsage.all_tenants.filter(
        tenant_id__in={t for t, _ in by_period}, period__in={p for _, p in by_period}
    ).order_by("pk").values("pk", "tenant_id", "period", "day", *rating.KEY, "input_tokens", "output_tokens", "trained_tokens")
    shares: dict[InvoiceLine, list[tuple[int, Decimal]]] = defaultdict(list)
    for r in rows:
        invoice_id = by_period.get((r["tenant_id"], r["period"]))
        if invoice_id is None:
            continue
        line = _billing_line(lines.get((invoice_id, r["kind"], r["model"], r["adapter"]), []), r)
        if line is None:
            log.warning("DailyUsage row %s is billed in a closed period but matches no line of its invoice.", r["pk"])
            continue
        exact = prices.line_amount(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"], trained_tokens=r["trained_tokens"], price=line)
        shares[line].append((r["pk"], exact))
    charged: dict[int, int] = {}
    for line, parts in shares.items():
        charged.update(_apportion(line.amount_cents, parts))
    return charged


def _billing_line(candidates: list[InvoiceLine], row: dict) -> InvoiceLine | None:
    """The line (of one invoice, kind, model and adapter; newest entry first) that billed `row`."""
    entry = prices.pick_price([l.price for l in candidates if l.price_id], adapter=row["adapter"], pool_id=row["pool_id"], day=row["day"])
    return next((l for l in candidates if l.price_id == (entry.pk if entry else None)), None)


def _apportion(total: int, parts: list[tuple[int, Decimal]]) -> dict[int, int]:
    """Share `total` whole cents among keys in proportion to their exact amounts (largest remainder; ties: first)."""
    weight = sum(x for _, x in parts)
    if not weight:
        return {key: total if i == 0 else 0 for i, (key, _) in enumerate(parts)}
    with localcontext() as ctx:
        ctx.prec = 60
        quotas = [(key, total * x / weight) for key, x in parts]
    floors = {key: int(q.to_integral_value(rounding=ROUND_FLOOR)) for key, q in quotas}
    left = total - sum(floors.values())
    for key, _ in sorted(quotas, key=lambda kq: -(kq[1] - floors[kq[0]]))[:left]:
        floors[key] += 1
    return floors
