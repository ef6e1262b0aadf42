"""Billing writes: Stripe customers and invoice pushes, Stripe events (webhooks and reconciliation), dunning.

Webhooks and reconciliation are system input about any tenant, so they look invoices up with
`Invoice.all_tenants` by our own uuid (in the Stripe metadata) or by the stored Stripe id.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone as dt_timezone

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from billing import stripe_gateway
from billing.models import BillingAccount, BillingSettings, Invoice, InvoiceLine, StripeEvent
from tenants.models import Membership, Role, Tenant
from tenants.services import SYSTEM, audit_record, tenant_set_status

log = logging.getLogger(__name__)

SUSPENSION_PREFIX = "Payment overdue"
PAID_EVENTS = ("invoice.paid", "invoice.payment_succeeded")


def billing_account_get(*, tenant: Tenant) -> BillingAccount:
    account, _ = BillingAccount.all_tenants.get_or_create(tenant=tenant)
    return account


def stripe_customer_ensure(*, tenant: Tenant, client=None) -> str:
    """The tenant's Stripe customer id, created once (stored on its BillingAccount)."""
    account = billing_account_get(tenant=tenant)
    if account.stripe_customer_id:
        return account.stripe_customer_id
    owner = Membership.objects.for_tenant(tenant).filter(role=Role.OWNER).select_related("user").order_by("created_at").first()
    customer_id = stripe_gateway.customer_create(
        tenant_id=tenant.pk, slug=tenant.slug, name=tenant.name, email=owner.user.email if owner else "", client=client
    )
    BillingAccount.objects.for_tenant(tenant).filter(pk=account.pk, stripe_customer_id="").update(stripe_customer_id=customer_id)
    account.refresh_from_db()
    return account.stripe_customer_id


def invoice_push(*, invoice: Invoice, client=None) -> Invoice:
    """Send an open invoice to Stripe: invoice items → invoice → finalize. Safe to repeat.

    Each step is skipped when its Stripe id is already stored, and carries an idempotency key derived
    from our ids, so a retry after a crash between a call and its save creates nothing new either.
    """
    if invoice.status != Invoice.Status.OPEN or invoice.total_cents <= 0 or invoice.hosted_invoice_url:
        return invoice
    tenant = invoice.tenant
    customer_id = stripe_customer_ensure(tenant=tenant, client=client)
    for line in InvoiceLine.objects.for_tenant(tenant).filter(invoice=invoice, stripe_invoice_item_id="").exclude(amount_cents=0):
        item_id = stripe_gateway.invoice_item_create(
            invoice_uuid=invoice.uuid, line_id=line.pk, customer_id=customer_id, amount_cents=line.amount_cents,
            currency=invoice.currency, description=line.description, client=client,
        )
        InvoiceLine.objects.for_tenant(tenant).filter(pk=line.pk).update(stripe_invoice_item_id=item_id)
    if not invoice.stripe_invoice_id:
        invoice.stripe_invoice_id = stripe_gateway.invoice_create(
            invoice_uuid=invoice.uuid, number=invoice.number, customer_id=customer_id,
            days_until_due=BillingSettings.load().days_until_due, client=client,
        )
        Invoice.objects.for_tenant(tenant).filter(pk=invoice.pk).update(stripe_invoice_id=invoice.stripe_invoice_id)
    pushed = stripe_gateway.invoice_finalize(invoice_uuid=invoice.uuid, stripe_invoice_id=invoice.stripe_invoice_id, client=client)
    invoice.hosted_invoice_url = pushed.hosted_invoice_url
    invoice.delivery = Invoice.Delivery.SENT
    invoice.delivery_error = ""
    Invoice.objects.for_tenant(tenant).filter(pk=invoice.pk).update(
        hosted_invoice_url=invoice.hosted_invoice_url, delivery=invoice.delivery, delivery_error=""
    )
    return invoice


def invoice_push_failed(*, invoice: Invoice, error: str) -> None:
    Invoice.objects.for_tenant(invoice.tenant).filter(pk=invoice.pk).update(delivery_error=error[:300])


def portal_url(*, tenant: Tenant, return_url: str, client=None) -> str | None:
    """A Stripe Customer Portal URL for the tenant (None when Stripe or its portal is unavailable)."""
    if client is None and not stripe_gateway.is_configured():
        return None
    customer_id = stripe_customer_ensure(tenant=tenant, client=client)
    return stripe_gateway.portal_session_url(customer_id=customer_id, return_url=return_url, client=client)


# ---- Stripe events -------------------------------------------------------------------------------


def _invoice_for(obj: dict) -> Invoice | None:
    uuid = (obj.get("metadata") or {}).get("invoice_uuid")
    qs = Invoice.all_tenants.select_related("tenant")
    if uuid:
        found = qs.filter(uuid=uuid).first()
        if found:
            return found
    return qs.filter(stripe_invoice_id=obj.get("id") or "-").first() if obj.get("id") else None


def stripe_event_apply(*, event: dict, source: str = "webhook", client=None) -> str:
    """Apply one Stripe event exactly once. The event id is stored in the same transaction as its effect.

    States only move forward (paid and void are final), so duplicates and out-of-order events are harmless.
    Returns a short outcome ("duplicate", "paid", "ignored: …").
    """
    created = datetime.fromtimestamp(int(event.get("created") or 0), tz=dt_timezone.utc)
    with transaction.atomic():
        try:
            with transaction.atomic():
                record = StripeEvent.objects.create(event_id=event["id"], type=event.get("type", ""), created=created, source=source)
        except IntegrityError:
            return "duplicate"
        obj = (event.get("data") or {}).get("object") or {}
        invoice = _invoice_for(obj) if str(event.get("type", "")).startswith("invoice.") else None
        if invoice is None:
            outcome = "ignored: not one of our invoices" if str(event.get("type", "")).startswith("invoice.") else "ignored"
        else:
            invoice = Invoice.all_tenants.select_for_update().select_related("tenant").get(pk=invoice.pk)
            outcome = _apply_invoice_event(event["type"], obj, invoice, client=client)
        record.invoice = invoice
        record.outcome = outcome[:200]
        record.save(update_fields=["invoice", "outcome"])
    return outcome


def _apply_invoice_event(kind: str, obj: dict, invoice: Invoice, *, client=None) -> str:
    if obj.get("id") and not invoice.stripe_invoice_id:
        invoice.stripe_invoice_id = obj["id"]
        Invoice.all_tenants.filter(pk=invoice.pk).update(stripe_invoice_id=obj["id"])
    if obj.get("hosted_invoice_url") and not invoice.hosted_invoice_url:
        Invoice.all_tenants.filter(pk=invoice.pk).update(hosted_invoice_url=obj["hosted_invoice_url"], delivery=Invoice.Delivery.SENT)
    if kind in PAID_EVENTS:
        return invoice_mark_paid(invoice=invoice)
    if kind == "invoice.payment_failed":
        if invoice.status in (Invoice.Status.PAID, Invoice.Status.VOID):
            return f"kept {invoice.status}"
        # Order matters here (a payment may have succeeded since): ask Stripe for the invoice as it is now.
        current = _refetch_status(invoice, client=client)
        if current == "paid":
            return invoice_mark_paid(invoice=invoice)
        return invoice_payment_failed(invoice=invoice)
    if kind == "invoice.voided":
        return _forward(invoice, Invoice.Status.VOID)
    if kind == "invoice.marked_uncollectible":
        return _forward(invoice, Invoice.Status.UNCOLLECTIBLE)
    if kind == "invoice.finalized":
        return _forward(invoice, Invoice.Status.OPEN) if invoice.status == Invoice.Status.DRAFT else "recorded"
    return "ignored"


def _forward(invoice: Invoice, status: str) -> str:
    if invoice.status == status:
        return f"already {status}"
    if not invoice.can_move_to(status):
        return f"kept {invoice.status}"
    invoice.move_to(status)
    audit_record(tenant=invoice.tenant, actor=SYSTEM, action=f"billing.invoice_{status}", target=invoice, data={"number": invoice.number})
    return status


def _refetch_status(invoice: Invoice, *, client=None) -> str | None:
    if not invoice.stripe_invoice_id or (client is None and not stripe_gateway.is_configured()):
        return None
    try:
        return stripe_gateway.invoice_retrieve(invoice.stripe_invoice_id, client=client).get("status")
    except stripe_gateway.GatewayError as exc:
        log.warning("Could not re-fetch %s: %s", invoice.stripe_invoice_id, exc)
        return None


def invoice_mark_paid(*, invoice: Invoice, now: datetime | None = None) -> str:
    """Mark paid (final) and lift a suspension that billing imposed, when nothing else is overdue."""
    if invoice.status == Invoice.Status.PAID:
        return "already paid"
    if not invoice.can_move_to(Invoice.Status.PAID):
        return f"kept {invoice.status}"
    invoice.move_to(Invoice.Status.PAID, at=now)
    audit_record(tenant=invoice.tenant, actor=SYSTEM, action="billing.invoice_paid", target=invoice, data={"number": invoice.number})
    tenant_restore_if_settled(tenant=invoice.tenant, now=now)
    return "paid"


def invoice_payment_failed(*, invoice: Invoice, now: datetime | None = None) -> str:
    """Start the dunning clock (first failure only) and tell the tenant's owners and admins."""
    now = now or timezone.now()
    first = invoice.payment_failed_at is None
    if first:
        Invoice.all_tenants.filter(pk=invoice.pk, payment_failed_at__isnull=True).update(payment_failed_at=now)
        invoice.payment_failed_at = now
    grace = BillingSettings.load().grace_days
    audit_record(tenant=invoice.tenant, actor=SYSTEM, action="billing.payment_failed", target=invoice,
                 data={"number": invoice.number, "grace_days": grace, "first_failure": first})
    _notify_admins(invoice, grace)
    return "payment failed"


def _notify_admins(invoice: Invoice, grace_days: int) -> None:
    tenant = invoice.tenant
    emails = list(
        Membership.objects.for_tenant(tenant).filter(role__in=[Role.OWNER, Role.ADMIN]).exclude(user__email="").values_list("user__email", flat=True)
    )
    if not emails:
        return
    url = settings.PUBLIC_URL + reverse("billing-invoice", args=[tenant.slug, invoice.pk])
    deadline = (invoice.payment_failed_at + timedelta(days=grace_days)).strftime("%d %B %Y")
    subject = f"Payment failed for invoice {invoice.number}"
    body = (
        f"The payment of invoice {invoice.number} ({invoice.total} {invoice.currency.upper()}) for {tenant.name} failed.\n\n"
        f"Pay it or update your payment method by {deadline}, or API access for {tenant.name} will be suspended:\n{url}\n"
    )
    transaction.on_commit(lambda: send_mail(subject, body, None, emails, fail_silently=True))


def tenant_restore_if_settled(*, tenant: Tenant, now: datetime | None = None) -> bool:
    """Reactivate a tenant that billing suspended, once no invoice is overdue. Returns True if restored."""
    account = billing_account_get(tenant=tenant)
    tenant.refresh_from_db()
    if not account.suspended_for_nonpayment or tenant.status != Tenant.Status.SUSPENDED:
        return False
    if _overdue(now).filter(tenant=tenant).exists():
        return False
    tenant_set_status(tenant=tenant, status=Tenant.Status.ACTIVE, actor=SYSTEM, reason="Overdue invoices paid")
    BillingAccount.objects.for_tenant(tenant).filter(pk=account.pk).update(suspended_for_nonpayment=False)
    return True


def _overdue(now: datetime | None):
    cutoff = (now or timezone.now()) - timedelta(days=BillingSettings.load().grace_days)
    # Batch code over every tenant (the dunning run): the unscoped manager is intended here.
    return Invoice.all_tenants.filter(status__in=[Invoice.Status.OPEN, Invoice.Status.UNCOLLECTIBLE], payment_failed_at__lte=cutoff)


def dunning_run(*, now: datetime | None = None) -> list[Tenant]:
    """Suspend each active tenant with an invoice whose payment failed more than the grace period ago."""
    suspended = []
    for invoice in _overdue(now).select_related("tenant").order_by("payment_failed_at"):
        tenant = invoice.tenant
        tenant.refresh_from_db()
        if tenant.status != Tenant.Status.ACTIVE:
            continue
        with transaction.atomic():
            tenant_set_status(
                tenant=tenant, status=Tenant.Status.SUSPENDED, actor=SYSTEM,
                reason=f"{SUSPENSION_PREFIX}: pay invoice {invoice.number} in the console",
            )
            account = billing_account_get(tenant=tenant)
            BillingAccount.objects.for_tenant(tenant).filter(pk=account.pk).update(suspended_for_nonpayment=True)
        suspended.append(tenant)
    return suspended


def stripe_reconcile(*, since: datetime | None = None, client=None) -> dict[str, int]:
    """Apply Stripe events we missed (GET /v1/events, default the last 3 days); retry unsent invoices."""
    counts = {"applied": 0, "duplicate": 0, "pushed": 0}
    if client is None and not stripe_gateway.is_configured():
        return counts
    since = since or timezone.now() - timedelta(days=3)
    for event in stripe_gateway.events_since(int(since.timestamp()), client=client):
        outcome = stripe_event_apply(event=event, source="reconcile", client=client)
        counts["duplicate" if outcome == "duplicate" else "applied"] += 1
    return counts
