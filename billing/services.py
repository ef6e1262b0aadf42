"""Billing writes: Stripe customers and invoice pushes, staff voids, Stripe events (webhooks, reconciliation), dunning.

Webhooks and reconciliation are system input about any tenant, so they look invoices up with
`Invoice.all_tenants` by our own uuid (in the Stripe metadata) or by the stored Stripe id.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone as dt_timezone

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from billing import stripe_gateway
from billing.models import BillingAccount, BillingSettings, Invoice, InvoiceLine, StripeEvent
from common.queue import enqueue_on_commit
from tenants.models import Membership, Role, Tenant
from tenants.services import SYSTEM, Actor, audit_record, tenant_set_status

log = logging.getLogger(__name__)

SUSPENSION_PREFIX = "Payment overdue"
PAID_EVENTS = ("invoice.paid", "invoice.payment_succeeded")


def billing_account_get(*, tenant: Tenant) -> BillingAccount:
    account, _ = BillingAccount.objects.for_tenant(tenant).get_or_create()
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
    if invoice.status != Invoice.Status.OPEN or invoice.total_cents <= 0 or invoice.hosted_invoice_url or invoice.void_pending:
        return invoice
    tenant = invoice.tenant
    customer_id = stripe_customer_ensure(tenant=tenant, client=client)
    for line in InvoiceLine.objects.for_tenant(tenant).filter(invoice=invoice, stripe_invoice_item_id="").exclude(amount_cents=0):
        item_id = stripe_gateway.invoice_item_create(
            invoice_uuid=invoice.uuid, line_id=line.pk, customer_id=customer_id, amount_cents=line.amount_cents,
            currency=invoice.currency, description=line.description, client=client,
        )
        InvoiceLine.objects.for_tenant(tenant).filter(pk=line.pk).update(stripe_invoice_item_id=item_id)
        if _push_overtaken_by_void(invoice):
            return invoice
    if not invoice.stripe_invoice_id:
        invoice.stripe_invoice_id = stripe_gateway.invoice_create(
            invoice_uuid=invoice.uuid, number=invoice.number, customer_id=customer_id,
            days_until_due=BillingSettings.load().days_until_due, client=client,
        )
        Invoice.objects.for_tenant(tenant).filter(pk=invoice.pk).update(stripe_invoice_id=invoice.stripe_invoice_id)
        if _push_overtaken_by_void(invoice):
            return invoice
    # Stripe's document names the customer as ours does: it takes the customer's name when it finalizes.
    stripe_gateway.customer_name_set(invoice_uuid=invoice.uuid, customer_id=customer_id, name=invoice.billed_to_name, client=client)
    pushed = stripe_gateway.invoice_finalize(invoice_uuid=invoice.uuid, stripe_invoice_id=invoice.stripe_invoice_id, client=client)
    invoice.hosted_invoice_url = pushed.hosted_invoice_url
    invoice.delivery = Invoice.Delivery.SENT
    invoice.delivery_error = ""
    Invoice.objects.for_tenant(tenant).filter(pk=invoice.pk).update(
        hosted_invoice_url=invoice.hosted_invoice_url, delivery=invoice.delivery, delivery_error=""
    )
    _push_overtaken_by_void(invoice)
    return invoice


def _push_overtaken_by_void(invoice: Invoice) -> bool:
    """A void asked for while a push runs wins: the push stops, and the void's task runs (again) to remove
    what the push created. Checked after each stored Stripe id: the void's task reads those ids after the void
    is saved, so one of the two always sees the other's write."""
    if not invoice.own_row().filter(Q(pending_status=Invoice.Status.VOID) | Q(status=Invoice.Status.VOID)).exists():
        return False
    enqueue_on_commit("billing.tasks.invoice_status_sync", invoice.pk, invoice.tenant_id)
    return True


def invoice_push_failed(*, invoice: Invoice, error: str) -> None:
    Invoice.objects.for_tenant(invoice.tenant).filter(pk=invoice.pk).update(delivery_error=error[:300])


def portal_url(*, tenant: Tenant, return_url: str, client=None) -> str | None:
    """A Stripe Customer Portal URL for the tenant (None when Stripe or its portal is unavailable)."""
    if client is None and not stripe_gateway.is_configured():
        return None
    customer_id = stripe_customer_ensure(tenant=tenant, client=client)
    return stripe_gateway.portal_session_url(customer_id=customer_id, return_url=return_url, client=client)


# ---- Staff: void, mark uncollectible -------------------------------------------------------------
# Void = written off: the period stays closed (its usage is never billed again) and the amount and the reason
# go to the audit log. Uncollectible = bad debt for accounting: still payable, and dunning still applies.
# An invoice Stripe holds (or may hold) moves only when Stripe confirms: meanwhile `pending_status` says so.

_DONE = {Invoice.Status.VOID: "voided", Invoice.Status.UNCOLLECTIBLE: "marked uncollectible"}


def invoice_void(*, invoice: Invoice, reason: str, actor: Actor) -> str:
    """Staff: void an unpaid invoice (draft, open or uncollectible) and write its amount (cents) off.

    Without a Stripe counterpart it is void at once; otherwise it shows "void pending" and a task voids it at
    Stripe (or deletes the draft / pending items a push left) and then records it. Dunning stops at once: a
    tenant suspended only for this invoice is restored. Returns a message for staff; ValidationError if refused.
    """
    return _staff_status_request(invoice=invoice, status=Invoice.Status.VOID, reason=reason, actor=actor)


def invoice_mark_uncollectible(*, invoice: Invoice, reason: str, actor: Actor) -> str:
    """Staff: mark an open invoice uncollectible (bad debt). It stays payable; dunning is unchanged.

    Needs the invoice fully sent to Stripe, or never sent. Returns a message for staff; ValidationError if refused.
    """
    return _staff_status_request(invoice=invoice, status=Invoice.Status.UNCOLLECTIBLE, reason=reason, actor=actor)


def _staff_status_refusal(invoice: Invoice, status: str) -> str | None:
    number, done = invoice.number, _DONE[status]
    if invoice.status == Invoice.Status.PAID:
        return f"{number} is paid, so it cannot be {done}. To give money back, refund the payment in the Stripe dashboard."
    if invoice.status == Invoice.Status.VOID:
        return f"{number} is already void."
    if invoice.void_pending:
        return (f"{number} is already being voided: Stripe has not confirmed yet (asked {invoice.status_requested_at:%d %b %Y %H:%M} UTC). "
                "It is retried automatically; see its delivery error for Stripe's last answer.")
    if status == Invoice.Status.UNCOLLECTIBLE:
        if invoice.status == Invoice.Status.DRAFT:
            return f"{number} is a draft: it was never issued, so nothing is owed. Void it instead."
        if Invoice.Status.UNCOLLECTIBLE in (invoice.status, invoice.pending_status):
            return f"{number} is already {'being ' if invoice.pending_status else ''}marked uncollectible."
        if invoice.delivery == Invoice.Delivery.PENDING:
            return f"{number} is still being sent to Stripe. Mark it uncollectible once its delivery shows Sent, or void it."
    return None


def _at_stripe(invoice: Invoice) -> bool:
    """Stripe holds, or a running push may create, something payable for this invoice."""
    return bool(
        invoice.stripe_invoice_id or invoice.delivery == Invoice.Delivery.PENDING
        or InvoiceLine.objects.for_tenant(invoice.tenant).filter(invoice=invoice).exclude(stripe_invoice_item_id="").exists()
    )


def _staff_status_request(*, invoice: Invoice, status: str, reason: str, actor: Actor) -> str:
    reason = " ".join((reason or "").split())[:300]
    if not reason:
        raise ValidationError("Give a reason: it is kept with the invoice and in the audit log.")
    with transaction.atomic():
        invoice = invoice.own_row().select_for_update().select_related("tenant").get()
        refusal = _staff_status_refusal(invoice, status)
        if refusal:
            raise ValidationError(refusal)
        invoice.status_reason, invoice.status_requested_at = reason, timezone.now()
        if not _at_stripe(invoice):
            invoice.own_row().update(status_reason=reason, status_requested_at=invoice.status_requested_at)
            _staff_status_settle(invoice, status, actor=actor, reason=reason)
            return f"{invoice.number} is now {invoice.get_status_display().lower()}."
        invoice.own_row().update(pending_status=status, status_reason=reason, status_requested_at=invoice.status_requested_at)
        invoice.pending_status = status
        audit_record(tenant=invoice.tenant, actor=actor, action=f"billing.invoice_{status}_requested", target=invoice,
                     data={"number": invoice.number, "total_cents": invoice.total_cents, "reason": reason})
        if status == Invoice.Status.VOID:
            tenant_restore_if_settled(tenant=invoice.tenant, reason=f"Overdue invoice {invoice.number} voided")
        enqueue_on_commit("billing.tasks.invoice_status_sync", invoice.pk, invoice.tenant_id)
    return (f"{invoice.number}: Stripe is being asked to confirm; until it does, the invoice shows "
            f"“{invoice.get_pending_status_display()} pending” (retried automatically while Stripe is unreachable).")


def _staff_status_settle(invoice: Invoice, status: str, *, actor: Actor = SYSTEM, reason: str = "") -> str:
    """Move to void / uncollectible (forward only) and record it. A void writes the amount off and ends dunning."""
    if invoice.status == status:
        return f"already {status}"
    if not invoice.can_move_to(status):
        return f"kept {invoice.status}"
    invoice.move_to(status)
    data = {"number": invoice.number, "reason": reason or "done in Stripe, not from the platform"}
    data["written_off_cents" if status == Invoice.Status.VOID else "total_cents"] = invoice.total_cents
    audit_record(tenant=invoice.tenant, actor=actor, action=f"billing.invoice_{status}", target=invoice, data=data)
    log.info("Invoice %s %s (%s cents): %s", invoice.number, _DONE[status], invoice.total_cents, data["reason"])
    if status == Invoice.Status.VOID:
        if invoice.delivery == Invoice.Delivery.PENDING:  # never reached the customer: nothing left to send
            invoice.own_row().update(delivery=Invoice.Delivery.NOT_NEEDED)
        tenant_restore_if_settled(tenant=invoice.tenant, reason=f"Overdue invoice {invoice.number} voided")
    return status


def _requested_reason(invoice: Invoice, status: str) -> str:
    """The staff reason, when this is the status staff asked for (not one set in Stripe's dashboard)."""
    return invoice.status_reason if invoice.pending_status == status else ""


def invoice_status_sync(*, invoice: Invoice, client=None) -> str:
    """Carry a staff void / uncollectible to Stripe, then record it here. Safe to repeat (task retries, reconcile).

    Stripe's invoice is read first, so a retry after a lost answer, or after the webhook came first, calls
    nothing twice (and each POST carries a key from our uuid). If the customer paid first, it is marked paid.
    """
    invoice = invoice.own_row().select_related("tenant").get()
    target = invoice.pending_status or (Invoice.Status.VOID if invoice.status == Invoice.Status.VOID else "")
    if not target:
        return "nothing pending"
    if target == Invoice.Status.VOID:
        at_stripe = _void_at_stripe(invoice, client=client)
    else:
        at_stripe = _mark_uncollectible_at_stripe(invoice, client=client)
    with transaction.atomic():
        invoice = invoice.own_row().select_for_update().select_related("tenant").get()
        invoice.own_row().update(delivery_error="")
        if at_stripe == "paid":
            log.warning("Invoice %s was paid at Stripe before it could be %s; marking it paid.", invoice.number, _DONE[target])
            return invoice_mark_paid(invoice=invoice)
        settled = Invoice.Status.VOID if at_stripe == "void" else target
        return _staff_status_settle(invoice, settled, reason=_requested_reason(invoice, settled))


def _void_at_stripe(invoice: Invoice, *, client=None) -> str:
    """Leave nothing payable at Stripe: void the invoice, or delete a draft or a stopped push's pending items
    (Stripe voids only finalized invoices; pending items would be gathered into the tenant's next invoice).
    Returns "void", or "paid" when the payment came first."""
    if invoice.stripe_invoice_id:
        try:
            status = stripe_gateway.invoice_retrieve(invoice.stripe_invoice_id, client=client).get("status")
        except stripe_gateway.NotFound:
            return "void"  # its draft was deleted already
        if status in ("open", "uncollectible"):
            return stripe_gateway.invoice_void(invoice_uuid=invoice.uuid, stripe_invoice_id=invoice.stripe_invoice_id, client=client)
        if status != "draft":
            return status  # paid, or void already (a retry after a lost answer, or voided in Stripe)
    for item_id in InvoiceLine.objects.for_tenant(invoice.tenant).filter(invoice=invoice).exclude(stripe_invoice_item_id="").values_list("stripe_invoice_item_id", flat=True):
        stripe_gateway.invoice_item_delete(item_id, client=client)
    if invoice.stripe_invoice_id:
        stripe_gateway.invoice_draft_delete(invoice.stripe_invoice_id, client=client)
    return "void"


def _mark_uncollectible_at_stripe(invoice: Invoice, *, client=None) -> str:
    """Returns Stripe's status after the mark: "uncollectible", or "paid" / "void" when that came first."""
    if not invoice.stripe_invoice_id:
        raise stripe_gateway.GatewayError(f"{invoice.number} has no Stripe invoice yet; it is still being sent.")
    status = stripe_gateway.invoice_retrieve(invoice.stripe_invoice_id, client=client).get("status")
    if status == "open":
        return stripe_gateway.invoice_mark_uncollectible(invoice_uuid=invoice.uuid, stripe_invoice_id=invoice.stripe_invoice_id, client=client)
    if status == "draft":
        raise stripe_gateway.GatewayError(f"{invoice.number} is still a draft at Stripe; it is being sent.")
    return status


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
            invoice = invoice.own_row().select_for_update().select_related("tenant").get()
            outcome = _apply_invoice_event(event["type"], obj, invoice, client=client)
        record.invoice = invoice
        record.outcome = outcome[:200]
        record.save(update_fields=["invoice", "outcome"])
    return outcome


def _apply_invoice_event(kind: str, obj: dict, invoice: Invoice, *, client=None) -> str:
    if obj.get("id") and not invoice.stripe_invoice_id:
        invoice.stripe_invoice_id = obj["id"]
        invoice.own_row().update(stripe_invoice_id=obj["id"])
    if obj.get("hosted_invoice_url") and not invoice.hosted_invoice_url:
        invoice.own_row().update(hosted_invoice_url=obj["hosted_invoice_url"], delivery=Invoice.Delivery.SENT)
    if kind in PAID_EVENTS:
        return invoice_mark_paid(invoice=invoice)
    if kind == "invoice.payment_failed":
        if invoice.status in (Invoice.Status.PAID, Invoice.Status.VOID):
            return f"kept {invoice.status}"
        if invoice.void_pending:
            return "ignored: staff voided it; waiting for Stripe to confirm"
        # Order matters here (a payment may have succeeded since): ask Stripe for the invoice as it is now.
        current = _refetch_status(invoice, client=client)
        if current == "paid":
            return invoice_mark_paid(invoice=invoice)
        return invoice_payment_failed(invoice=invoice)
    if kind == "invoice.voided":
        return _staff_status_settle(invoice, Invoice.Status.VOID, reason=_requested_reason(invoice, Invoice.Status.VOID))
    if kind == "invoice.marked_uncollectible":
        return _staff_status_settle(invoice, Invoice.Status.UNCOLLECTIBLE, reason=_requested_reason(invoice, Invoice.Status.UNCOLLECTIBLE))
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
        invoice.own_row().filter(payment_failed_at__isnull=True).update(payment_failed_at=now)
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


def tenant_restore_if_settled(*, tenant: Tenant, now: datetime | None = None, reason: str = "Overdue invoices paid") -> bool:
    """Reactivate a tenant that billing suspended, once no invoice is overdue (paid or voided). True if restored."""
    account = billing_account_get(tenant=tenant)
    tenant.refresh_from_db()
    if not account.suspended_for_nonpayment or tenant.status != Tenant.Status.SUSPENDED:
        return False
    if _overdue(now).filter(tenant=tenant).exists():
        return False
    tenant_set_status(tenant=tenant, status=Tenant.Status.ACTIVE, actor=SYSTEM, reason=reason)
    BillingAccount.objects.for_tenant(tenant).filter(pk=account.pk).update(suspended_for_nonpayment=False)
    return True


def _overdue(now: datetime | None):
    cutoff = (now or timezone.now()) - timedelta(days=BillingSettings.load().grace_days)
    # Batch code over every tenant (the dunning run): the unscoped manager is intended here.
    # An invoice staff voided is not chased while Stripe confirms the void.
    return Invoice.all_tenants.filter(
        status__in=[Invoice.Status.OPEN, Invoice.Status.UNCOLLECTIBLE], payment_failed_at__lte=cutoff
    ).exclude(pending_status=Invoice.Status.VOID)


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
    counts = {"applied": 0, "duplicate": 0, "pushed": 0, "synced": 0}
    if client is None and not stripe_gateway.is_configured():
        return counts
    since = since or timezone.now() - timedelta(days=3)
    for event in stripe_gateway.events_since(int(since.timestamp()), client=client):
        outcome = stripe_event_apply(event=event, source="reconcile", client=client)
        counts["duplicate" if outcome == "duplicate" else "applied"] += 1
    return counts
