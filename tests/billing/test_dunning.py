"""Dunning: a failed payment, the grace period, suspension, and automatic restoration on payment."""

from __future__ import annotations

from datetime import timedelta


from billing import services
from billing.models import BillingAccount, BillingSettings, Invoice
from tenants.models import AuditEvent
from tenants.services import SYSTEM, tenant_set_status
from tests.support.billing import invoice_event, post_webhook, utc


def test_payment_failed_then_grace_then_suspended_then_paid_restores(client, world, invoice, django_capture_on_commit_callbacks, mailoutbox):
    failed_at = utc(2026, 2, 10, 12)
    with django_capture_on_commit_callbacks(execute=True):
        services.invoice_payment_failed(invoice=invoice, now=failed_at)
    assert sorted(mailoutbox[0].to) == ["admin@acme.test", "owner@acme.test"]
    assert "ACME-202601" in mailoutbox[0].subject
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="billing.payment_failed").exists()

    assert services.dunning_run(now=failed_at + timedelta(days=6, hours=23)) == []  # still in grace (7 days)
    world.tenant.refresh_from_db()
    assert world.tenant.status == "active"

    assert services.dunning_run(now=failed_at + timedelta(days=7, minutes=1)) == [world.tenant]
    world.tenant.refresh_from_db()
    assert world.tenant.status == "suspended"
    assert world.tenant.suspended_reason == "Payment overdue: pay invoice ACME-202601 in the console"
    assert services.dunning_run(now=failed_at + timedelta(days=8)) == []  # once

    assert post_webhook(client, invoice_event("evt_paid", "invoice.paid", invoice)).status_code == 200
    world.tenant.refresh_from_db()
    assert world.tenant.status == "active"
    assert not BillingAccount.objects.for_tenant(world.tenant).get().suspended_for_nonpayment


def test_grace_period_is_a_setting(world, invoice):
    BillingSettings.objects.update_or_create(pk=1, defaults={"grace_days": 1})
    services.invoice_payment_failed(invoice=invoice, now=utc(2026, 2, 10))
    assert services.dunning_run(now=utc(2026, 2, 11, 0, 1)) == [world.tenant]


def test_payment_does_not_lift_a_suspension_staff_imposed(world, invoice):
    services.invoice_payment_failed(invoice=invoice, now=utc(2026, 2, 10))
    tenant_set_status(tenant=world.tenant, status="suspended", actor=SYSTEM, reason="Abuse")
    assert services.dunning_run(now=utc(2026, 3, 1)) == []  # already suspended, for another reason
    services.invoice_mark_paid(invoice=Invoice.objects.for_tenant(world.tenant).get())
    world.tenant.refresh_from_db()
    assert (world.tenant.status, world.tenant.suspended_reason) == ("suspended", "Abuse")
