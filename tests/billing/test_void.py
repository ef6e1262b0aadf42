"""Staff void / mark uncollectible: refusals, the wait for Stripe, retries, webhooks, write-off and dunning."""

from __future__ import annotations

import json
from datetime import date

import pytest
from django.core.exceptions import ValidationError

from billing import invoicing, rating, services, stripe_gateway, tasks
from billing.models import BillingAccount, Invoice, InvoiceLine, StripeEvent
from tenants.models import AuditEvent
from tests.support.billing import invoice_event, post_webhook, usage, utc

JAN, FEB = date(2026, 1, 1), date(2026, 2, 1)
REASON = "Duplicate of the corrected invoice agreed with the customer"


@pytest.fixture
def at_stripe(invoice, fake_stripe, monkeypatch):
    """The invoice as sent: open at Stripe as in_test_1; the gateway's default client is the fake."""
    Invoice.all_tenants.filter(pk=invoice.pk).update(stripe_invoice_id="in_test_1", delivery=Invoice.Delivery.SENT,
                                                     hosted_invoice_url="https://invoice.stripe.test/in_test_1")
    invoice.refresh_from_db()
    fake_stripe.v1.invoices.put("in_test_1", "open")
    monkeypatch.setattr(stripe_gateway, "client", lambda: fake_stripe)
    return invoice


@pytest.fixture
def queued(monkeypatch):
    """Task ids enqueued by billing (instead of a broker)."""
    sent = []
    monkeypatch.setattr(tasks.invoice_status_sync, "delay", lambda pk, tenant_id: sent.append(("status_sync", pk)))
    monkeypatch.setattr(tasks.invoice_push, "delay", lambda pk, tenant_id: sent.append(("push", pk)))
    return sent


def _audit(tenant, action):
    return list(AuditEvent.objects.for_tenant(tenant).filter(action=action).order_by("id"))


def _run_task(invoice):
    """One delivery of the Celery task, as a worker runs it. Run eagerly, its automatic retries follow at once."""
    return tasks.invoice_status_sync.apply(args=[invoice.pk, invoice.tenant_id])


def test_void_a_draft_is_immediate_and_written_off(world, invoice, staff, django_capture_on_commit_callbacks, queued):
    Invoice.all_tenants.filter(pk=invoice.pk).update(status=Invoice.Status.DRAFT, finalized_at=None)
    invoice.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        message = services.invoice_void(invoice=invoice, reason=f"  {REASON} ", actor=staff)
    assert message == "ACME-202601 is now void."
    assert queued == []  # nothing at Stripe: no task
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status, invoice.status_reason) == ("void", "", REASON)
    assert invoice.voided_at is not None
    [event] = _audit(world.tenant, "billing.invoice_void")
    assert event.actor == world.owner and event.actor_is_staff
    assert event.data == {"number": "ACME-202601", "reason": REASON, "written_off_cents": 100}


def test_voided_usage_is_written_off_not_billed_again(world, catalog, invoice, staff):
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    assert invoicing.period_close(period=JAN, now=utc(2026, 3, 2)) == []  # January stays closed
    rating.rate_range(JAN, date(2026, 2, 28), now=utc(2026, 3, 1, 1))
    usage(world.tenant, at=utc(2026, 2, 3), pool=catalog.shared, inp=2_000_000)  # February's own usage: 200 ¢
    [february] = invoicing.period_close(period=FEB, now=utc(2026, 3, 2))
    assert february.total_cents == 200


def test_a_reason_is_required(invoice, staff):
    with pytest.raises(ValidationError, match="Give a reason"):
        services.invoice_void(invoice=invoice, reason="   ", actor=staff)
    invoice.refresh_from_db()
    assert invoice.status == "open"


def test_paid_and_void_invoices_are_refused_with_an_explanation(world, invoice, staff):
    services.invoice_mark_paid(invoice=invoice)
    with pytest.raises(ValidationError, match="ACME-202601 is paid, so it cannot be voided. To give money back, refund"):
        services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    with pytest.raises(ValidationError, match="is paid, so it cannot be marked uncollectible"):
        services.invoice_mark_uncollectible(invoice=invoice, reason=REASON, actor=staff)
    invoice.refresh_from_db()
    assert invoice.status == "paid" and invoice.status_reason == ""
    assert not _audit(world.tenant, "billing.invoice_void")


def test_uncollectible_refusals(invoice, staff):
    Invoice.all_tenants.filter(pk=invoice.pk).update(delivery=Invoice.Delivery.PENDING)
    with pytest.raises(ValidationError, match="still being sent to Stripe"):
        services.invoice_mark_uncollectible(invoice=invoice, reason=REASON, actor=staff)
    Invoice.all_tenants.filter(pk=invoice.pk).update(status=Invoice.Status.DRAFT)
    with pytest.raises(ValidationError, match="is a draft: it was never issued"):
        services.invoice_mark_uncollectible(invoice=invoice, reason=REASON, actor=staff)


def test_void_at_stripe_waits_for_stripe_and_voids_once_across_retries(world, client, at_stripe, staff, django_capture_on_commit_callbacks, queued):
    invoice = at_stripe
    with django_capture_on_commit_callbacks(execute=True):
        message = services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    assert "Stripe is being asked to confirm" in message and "“Void pending”" in message
    assert queued == [("status_sync", invoice.pk)]
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("open", "void")  # not void until Stripe says so
    assert [e.data["reason"] for e in _audit(world.tenant, "billing.invoice_void_requested")] == [REASON]

    fake = stripe_gateway.client().v1.invoices
    fake.fail["void"] = ["down"] * 13  # Stripe unreachable for the first try and all 12 retries
    assert _run_task(invoice).state == "FAILURE"
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("open", "void")  # still honest: waiting for Stripe
    assert invoice.delivery_error == "invoice void: Could not connect to Stripe (void, test)"
    assert fake.applied == []

    fake.fail["void"] = ["lost"]  # redelivered (reconcile): Stripe voids it, but the answer never arrives; the retry follows
    assert _run_task(invoice).state == "SUCCESS"  # the retry reads Stripe first: already void, so no second void
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status, invoice.delivery_error) == ("void", "", "")
    assert fake.applied == [("void", "in_test_1")]
    assert {c for c in fake.calls if c[0] == "void"} == {("void", f"invoice:{invoice.uuid}:void")}  # one key for every try
    assert len([c for c in fake.calls if c[0] == "void"]) == 14
    [written_off] = _audit(world.tenant, "billing.invoice_void")
    assert written_off.data == {"number": "ACME-202601", "reason": REASON, "written_off_cents": 100}

    # Stripe's webhook arrives after our call: recorded, nothing changes twice.
    assert post_webhook(client, invoice_event("evt_void_late", "invoice.voided", invoice)).json()["outcome"] == "already void"
    assert len(_audit(world.tenant, "billing.invoice_void")) == 1


def test_webhook_before_our_task_completes_the_void(world, client, at_stripe, staff, queued):
    invoice = at_stripe
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    stripe_gateway.client().v1.invoices.invoices["in_test_1"].status = "void"  # e.g. our call went through, then the worker died
    assert post_webhook(client, invoice_event("evt_void", "invoice.voided", invoice)).json()["outcome"] == "void"
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("void", "")
    [event] = _audit(world.tenant, "billing.invoice_void")
    assert event.data["reason"] == REASON and event.data["written_off_cents"] == 100

    assert _run_task(invoice).state == "SUCCESS"  # the queued task still runs: it finds the void done
    fake = stripe_gateway.client().v1.invoices
    assert fake.applied == [] and ("retrieve", "in_test_1") in fake.calls
    assert len(_audit(world.tenant, "billing.invoice_void")) == 1


def test_void_webhook_duplicates_and_late_events_change_nothing(world, client, at_stripe):
    invoice = at_stripe
    body = invoice_event("evt_v", "invoice.voided", invoice)
    assert post_webhook(client, body).json()["outcome"] == "void"
    assert post_webhook(client, body).json()["outcome"] == "duplicate"
    late = invoice_event("evt_u", "invoice.marked_uncollectible", invoice)
    assert post_webhook(client, late).json()["outcome"] == "kept void"
    invoice.refresh_from_db()
    assert invoice.status == "void"
    [event] = _audit(world.tenant, "billing.invoice_void")
    assert event.data["reason"] == "done in Stripe, not from the platform"  # voided in Stripe's dashboard
    assert StripeEvent.objects.filter(event_id="evt_v").count() == 1


def test_customer_paid_before_the_void_reached_stripe(world, at_stripe, staff, queued):
    invoice = at_stripe
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    stripe_gateway.client().v1.invoices.invoices["in_test_1"].status = "paid"
    assert _run_task(invoice).state == "SUCCESS"
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("paid", "")
    assert stripe_gateway.client().v1.invoices.applied == []
    assert not _audit(world.tenant, "billing.invoice_void")


def test_void_restores_a_tenant_suspended_only_for_that_invoice(world, catalog, at_stripe, staff, queued):
    invoice = at_stripe
    services.invoice_payment_failed(invoice=invoice, now=utc(2026, 2, 10))
    assert services.dunning_run(now=utc(2026, 2, 20)) == [world.tenant]
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    world.tenant.refresh_from_db()
    assert (world.tenant.status, world.tenant.suspended_reason) == ("active", "")  # dunning stops at once
    assert not BillingAccount.objects.for_tenant(world.tenant).get().suspended_for_nonpayment
    assert [e.data["reason"] for e in _audit(world.tenant, "tenant.reactivated")] == ["Overdue invoice ACME-202601 voided"]
    assert services.dunning_run(now=utc(2026, 2, 21)) == []  # not chased while Stripe confirms the void
    body = invoice_event("evt_fail", "invoice.payment_failed", invoice)
    assert services.stripe_event_apply(event=json.loads(body)).startswith("ignored: staff voided it")


def test_void_keeps_a_tenant_suspended_for_another_overdue_invoice(world, catalog, invoice, staff):
    usage(world.tenant, at=utc(2026, 2, 5), pool=catalog.shared, inp=1_000_000)
    [february] = invoicing.period_close(period=FEB, now=utc(2026, 3, 2))
    for inv in (invoice, february):
        services.invoice_payment_failed(invoice=inv, now=utc(2026, 3, 3))
    assert services.dunning_run(now=utc(2026, 3, 20)) == [world.tenant]
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    world.tenant.refresh_from_db()
    assert world.tenant.status == "suspended"
    services.invoice_mark_paid(invoice=Invoice.objects.for_tenant(world.tenant).get(pk=february.pk))
    world.tenant.refresh_from_db()
    assert world.tenant.status == "active"


def test_mark_uncollectible_at_stripe_keeps_it_payable_and_dunned(world, at_stripe, staff, queued):
    invoice = at_stripe
    services.invoice_mark_uncollectible(invoice=invoice, reason="Customer unreachable for 90 days", actor=staff)
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("open", "uncollectible")
    assert _run_task(invoice).state == "SUCCESS"
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("uncollectible", "")
    assert stripe_gateway.client().v1.invoices.applied == [("mark_uncollectible", "in_test_1")]
    [event] = _audit(world.tenant, "billing.invoice_uncollectible")
    assert event.data == {"number": "ACME-202601", "reason": "Customer unreachable for 90 days", "total_cents": 100}
    services.invoice_payment_failed(invoice=invoice, now=utc(2026, 2, 10))
    assert services.dunning_run(now=utc(2026, 2, 20)) == [world.tenant]  # still owed
    # And it can still be voided afterwards.
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    assert _run_task(invoice).state == "SUCCESS"
    invoice.refresh_from_db()
    assert invoice.status == "void"
    world.tenant.refresh_from_db()
    assert world.tenant.status == "active"


def test_a_void_stops_an_unfinished_push_and_removes_what_it_left_at_stripe(world, invoice, fake_stripe, monkeypatch, staff, queued):
    # A push created the line's invoice item and the Stripe draft, then Stripe went away before finalize.
    line = InvoiceLine.objects.for_tenant(world.tenant).get(invoice=invoice)
    InvoiceLine.objects.for_tenant(world.tenant).filter(pk=line.pk).update(stripe_invoice_item_id="ii_1")
    Invoice.all_tenants.filter(pk=invoice.pk).update(stripe_invoice_id="in_draft_1", delivery=Invoice.Delivery.PENDING)
    invoice.refresh_from_db()
    fake_stripe.v1.invoices.put("in_draft_1", "draft")
    fake_stripe.v1.invoice_items.pending.add("ii_1")
    monkeypatch.setattr(stripe_gateway, "client", lambda: fake_stripe)

    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    invoice.refresh_from_db()
    services.invoice_push(invoice=invoice, client=fake_stripe)  # the push's retry: the void wins, nothing is sent
    assert not any(c[0] == "finalize" for c in fake_stripe.v1.invoices.calls)
    assert _run_task(invoice).state == "SUCCESS"
    invoice.refresh_from_db()
    assert (invoice.status, invoice.delivery) == ("void", "not_needed")
    assert fake_stripe.v1.invoice_items.pending == set()  # would otherwise be gathered into the next invoice
    assert fake_stripe.v1.invoices.applied == [("delete", "in_draft_1")]  # Stripe voids only finalized invoices
    assert _run_task(invoice).state == "SUCCESS"  # a repeat finds everything gone and is fine


def test_push_overtaken_by_a_void_hands_over_to_the_void_task(world, invoice, fake_stripe, monkeypatch, staff, queued, django_capture_on_commit_callbacks):
    Invoice.all_tenants.filter(pk=invoice.pk).update(delivery=Invoice.Delivery.PENDING)
    invoice.refresh_from_db()
    monkeypatch.setattr(services, "stripe_customer_ensure", lambda **kw: "cus_1")

    def item_create(**kw):  # staff void while the push is creating the item
        services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
        fake_stripe.v1.invoice_items.pending.add("ii_race")
        return "ii_race"

    monkeypatch.setattr(stripe_gateway, "invoice_item_create", item_create)
    with django_capture_on_commit_callbacks(execute=True):
        services.invoice_push(invoice=invoice, client=fake_stripe)
    assert fake_stripe.v1.invoices.calls == []  # no invoice created after the void
    assert queued.count(("status_sync", invoice.pk)) == 2  # the void's own task, and once more from the push
    monkeypatch.setattr(stripe_gateway, "client", lambda: fake_stripe)
    assert _run_task(invoice).state == "SUCCESS"
    assert fake_stripe.v1.invoice_items.pending == set()


def test_reconcile_requeues_status_changes_stuck_at_stripe(settings, world, at_stripe, staff, queued, monkeypatch):
    settings.STRIPE_SECRET_KEY = "sk_test_x"
    monkeypatch.setattr(stripe_gateway, "events_since", lambda *a, **kw: [])
    services.invoice_void(invoice=at_stripe, reason=REASON, actor=staff)
    queued.clear()
    assert tasks.stripe_reconcile()["synced"] == 0  # just asked: its own task is on its way
    Invoice.all_tenants.filter(pk=at_stripe.pk).update(status_requested_at=utc(2026, 2, 2), delivery=Invoice.Delivery.PENDING,
                                                       closed_at=utc(2026, 2, 2))
    assert tasks.stripe_reconcile()["synced"] == 1
    assert queued == [("status_sync", at_stripe.pk)]  # and not a push: the void wins


def test_uncollectible_without_stripe_is_immediate_and_can_then_be_voided(world, invoice, staff):
    services.invoice_mark_uncollectible(invoice=invoice, reason="Bad debt", actor=staff)  # not at Stripe: at once
    invoice.refresh_from_db()
    assert invoice.status == "uncollectible"
    with pytest.raises(ValidationError, match="already marked uncollectible"):
        services.invoice_mark_uncollectible(invoice=invoice, reason="Again", actor=staff)
    services.invoice_void(invoice=invoice, reason=REASON, actor=staff)
    invoice.refresh_from_db()
    assert invoice.status == "void"
    assert [e.action for e in AuditEvent.objects.for_tenant(world.tenant).filter(action__startswith="billing.invoice_").order_by("id")] == [
        "billing.invoice_closed", "billing.invoice_uncollectible", "billing.invoice_void"]
