"""Billing's Celery tasks: thin wrappers that load ids and call rating / invoicing / services.

The periodic ones are scheduled in billing/schedule.py (read by portal/settings.py).
"""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from billing import invoicing, periods, rating, services, stripe_gateway
from billing.models import Invoice

RATE_TRAILING_DAYS = rating.RATE_TRAILING_DAYS  # late ledger rows older than this are picked up by `manage.py billing_rate --from`


@shared_task(name="billing.rate_recent")
def rate_recent() -> int:
    """Rerate the last few UTC days (today included)."""
    today = periods.utc_today()
    return rating.rate_range(today - timedelta(days=RATE_TRAILING_DAYS - 1), today)


@shared_task(name="billing.close_previous_period")
def close_previous_period() -> int:
    """Close last month for every tenant not yet invoiced (daily; idempotent, so a missed run catches up)."""
    period = periods.previous_period(periods.period_of(periods.utc_today()))
    return len(invoicing.period_close(period=period))


@shared_task(
    name="billing.invoice_push", bind=True, autoretry_for=(stripe_gateway.GatewayError,),
    retry_backoff=30, retry_backoff_max=3600, max_retries=12,
)
def invoice_push(self, invoice_id: int, tenant_id: int) -> str:
    """Push one of a tenant's invoices to Stripe; retried with backoff (idempotency keys make retries safe)."""
    invoice = Invoice.objects.for_tenant(tenant_id).select_related("tenant").get(pk=invoice_id)
    try:
        services.invoice_push(invoice=invoice)
    except stripe_gateway.GatewayError as exc:
        services.invoice_push_failed(invoice=invoice, error=str(exc))
        raise
    return invoice.delivery


@shared_task(
    name="billing.invoice_status_sync", bind=True, autoretry_for=(stripe_gateway.GatewayError,),
    retry_backoff=30, retry_backoff_max=3600, max_retries=12,
)
def invoice_status_sync(self, invoice_id: int, tenant_id: int) -> str:
    """Carry a staff void / uncollectible to Stripe and record it; retried with backoff (it reads Stripe first,
    and its POSTs carry keys from our ids, so a retry changes nothing twice). Stripe's last error is kept."""
    invoice = Invoice.objects.for_tenant(tenant_id).select_related("tenant").get(pk=invoice_id)
    try:
        return services.invoice_status_sync(invoice=invoice)
    except stripe_gateway.GatewayError as exc:
        services.invoice_push_failed(invoice=invoice, error=str(exc))
        raise


@shared_task(name="billing.stripe_reconcile")
def stripe_reconcile() -> dict:
    """Apply missed Stripe events, and re-enqueue invoices still waiting to be sent, voided or marked at Stripe."""
    counts = services.stripe_reconcile()
    if stripe_gateway.is_configured():
        stale = timezone.now() - timedelta(minutes=30)
        # Batch code over every tenant: the unscoped manager is intended here.
        unsent = Invoice.all_tenants.filter(delivery=Invoice.Delivery.PENDING, status=Invoice.Status.OPEN, pending_status="", closed_at__lt=stale)
        for pk, tenant_id in unsent.values_list("pk", "tenant_id"):
            invoice_push.delay(pk, tenant_id)
            counts["pushed"] += 1
        waiting = Invoice.all_tenants.exclude(pending_status="").filter(status_requested_at__lt=stale)
        for pk, tenant_id in waiting.values_list("pk", "tenant_id"):
            invoice_status_sync.delay(pk, tenant_id)
            counts["synced"] += 1
    return counts


@shared_task(name="billing.dunning_run")
def dunning_run() -> int:
    """Suspend tenants whose failed payment is older than the grace period."""
    return len(services.dunning_run())
