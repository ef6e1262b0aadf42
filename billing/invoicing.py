"""Period close: one invoice per tenant and billing month, assembled from the DailyUsage rollup.

A close first rerates the period's days (so everything rated so far is in), then, per tenant, writes the
invoice and its lines in one transaction under the billing lock. From then on the period is frozen for
that tenant (`closed_at`): usage of its days rated later goes to the period open at that time.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from billing import rating, stripe_gateway
from billing.models import BillingSettings, DailyUsage, Invoice, InvoiceLine
from serving.models import BackendPool
from tenants.models import Tenant
from tenants.services import SYSTEM, Actor, audit_record


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
                  book: rating.PriceBook | None = None) -> Invoice | None:
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
        tenant=tenant, number=invoice_number(tenant, period), period_start=period, period_end=rating.next_period(period),
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
        Invoice.all_tenants.filter(pk=invoice.pk).update(delivery=Invoice.Delivery.NOT_NEEDED)
        invoice.delivery = Invoice.Delivery.NOT_NEEDED
    elif stripe_gateway.is_configured():
        Invoice.all_tenants.filter(pk=invoice.pk).update(delivery=Invoice.Delivery.PENDING)
        invoice.delivery = Invoice.Delivery.PENDING
        from billing.tasks import invoice_push  # the task module imports services; import here to avoid a cycle

        invoice_push.delay_on_commit(invoice.pk, tenant.pk)
    audit_record(tenant=tenant, actor=actor, action="billing.invoice_closed", target=invoice,
                 data={"number": invoice.number, "total_cents": invoice.total_cents, "period": period.isoformat()})
    return invoice


def period_close(*, period: date, now: datetime | None = None, tenant: Tenant | None = None, rerate: bool = True,
                 actor: Actor = SYSTEM) -> list[Invoice]:
    """Close a billing month that has ended: rerate its days, then one invoice per tenant with usage.

    Safe to rerun (tenants already invoiced are skipped). `tenant` limits it to one tenant (staff, on demand).
    """
    now = now or timezone.now()
    end = rating.next_period(period)
    if end > rating.utc_today(now):
        raise ValidationError(f"The period {period:%B %Y} has not ended yet; it can be closed from {end:%d %B %Y}.")
    if rerate:
        rating.rate_range(period, end - timedelta(days=1), now=now)
    # Batch code over every tenant: the unscoped managers are intended here.
    tenant_ids = set(DailyUsage.all_tenants.filter(period=period).values_list("tenant_id", flat=True).distinct())
    tenant_ids -= set(Invoice.all_tenants.filter(period_start=period).values_list("tenant_id", flat=True))
    if tenant is not None:
        tenant_ids &= {tenant.pk}
    book = rating.PriceBook()
    invoices = []
    for t in Tenant.objects.filter(pk__in=tenant_ids).order_by("pk"):
        invoice = invoice_close(tenant=t, period=period, now=now, actor=actor, book=book)
        if invoice is not None:
            invoices.append(invoice)
    return invoices
