"""Stripe webhooks: signed on the raw body, applied once, in order-insensitive, forward-only fashion."""

from __future__ import annotations

import time
from datetime import date

import pytest

from billing import invoicing
from billing.models import Invoice, StripeEvent
from tenants.models import AuditEvent
from tests.support.billing import invoice_event, post_webhook, price, sign, usage, utc


@pytest.fixture
def invoice(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)
    [inv] = invoicing.period_close(period=date(2026, 1, 1), now=utc(2026, 2, 2))
    Invoice.all_tenants.filter(pk=inv.pk).update(stripe_invoice_id="in_test_1")
    inv.refresh_from_db()
    return inv


def test_valid_paid_event_marks_the_invoice_paid(client, invoice):
    response = post_webhook(client, invoice_event("evt_1", "invoice.paid", invoice))
    assert response.status_code == 200
    invoice.refresh_from_db()
    assert invoice.status == "paid"
    assert StripeEvent.objects.get(event_id="evt_1").invoice_id == invoice.pk


def test_duplicate_event_has_its_effect_once(client, invoice, django_capture_on_commit_callbacks, mailoutbox):
    body = invoice_event("evt_dup", "invoice.payment_failed", invoice)
    with django_capture_on_commit_callbacks(execute=True):
        assert post_webhook(client, body).status_code == 200
        second = post_webhook(client, body, sign(body))
    assert second.status_code == 200 and second.json()["outcome"] == "duplicate"
    assert StripeEvent.objects.filter(event_id="evt_dup").count() == 1
    assert AuditEvent.objects.for_tenant(invoice.tenant).filter(action="billing.payment_failed").count() == 1
    assert len(mailoutbox) == 1


def test_paid_then_payment_failed_stays_paid(client, invoice, mailoutbox):
    now = int(time.time())
    assert post_webhook(client, invoice_event("evt_paid", "invoice.paid", invoice, created=now)).status_code == 200
    late = invoice_event("evt_failed", "invoice.payment_failed", invoice, created=now - 60)
    assert post_webhook(client, late).json()["outcome"] == "kept paid"
    invoice.refresh_from_db()
    assert invoice.status == "paid" and invoice.payment_failed_at is None
    assert mailoutbox == []
    assert post_webhook(client, invoice_event("evt_void", "invoice.voided", invoice)).json()["outcome"] == "kept paid"


def test_stale_timestamp_is_rejected(client, invoice):
    body = invoice_event("evt_old", "invoice.paid", invoice)
    response = post_webhook(client, body, sign(body, timestamp=int(time.time()) - 301))
    assert response.status_code == 400
    invoice.refresh_from_db()
    assert invoice.status == "open" and not StripeEvent.objects.exists()


def test_future_timestamp_is_rejected(client, invoice):
    # Stripe's library refuses only old timestamps: a signature made for tomorrow stayed replayable until then.
    body = invoice_event("evt_future", "invoice.paid", invoice)
    response = post_webhook(client, body, sign(body, timestamp=int(time.time()) + 3600))
    assert response.status_code == 400
    invoice.refresh_from_db()
    assert invoice.status == "open" and not StripeEvent.objects.exists()


@pytest.mark.parametrize("body", [
    b"[]", b'"text"', b"null", b"{}", b'{"id": 7, "type": "invoice.paid"}', b'{"id": "evt_x", "type": ["a"]}',
    b'{"id": "evt_x", "type": "invoice.paid", "created": "soon"}', b'{"id": "evt_x", "type": "invoice.paid", "created": 1e40}',
    b'{"id": "evt_x", "type": "invoice.paid", "data": "x"}', b'{"id": "evt_x", "type": "invoice.paid", "data": {"object": [1]}}',
    b"[" * 100_000 + b"]" * 100_000, b'{"id": "evt_x", "type": "invoice.paid", "data": ' + b'{"a": ' * 100 + b"1" + b"}" * 101,
    b'{"id": "evt_\\ud800", "type": "invoice.paid"}', b'{"id": "evt_x", "type": "invoice.\\udfff"}',
])
def test_signed_but_malformed_bodies_are_a_400_not_a_500(client, invoice, body):
    response = post_webhook(client, body)
    assert response.status_code == 400, response.content[:300]
    assert b"Not an event" in response.content  # signed: a malformed event, not a bad signature
    invoice.refresh_from_db()
    assert invoice.status == "open" and not StripeEvent.objects.exists()


def test_tampered_body_is_rejected(client, invoice):
    body = invoice_event("evt_t", "invoice.paid", invoice)
    header = sign(body)
    response = post_webhook(client, body.replace(b'"invoice.paid"', b'"invoice.voided"'), header)
    assert response.status_code == 400
    assert post_webhook(client, body, sign(body, secret="whsec_wrong")).status_code == 400
    assert post_webhook(client, body, "").status_code == 400
    invoice.refresh_from_db()
    assert invoice.status == "open"


def test_events_for_unknown_invoices_are_recorded_and_ignored(client, invoice):
    body = b'{"id": "evt_x", "object": "event", "type": "customer.created", "created": %d, "data": {"object": {"id": "cus_1"}}}' % int(time.time())
    assert post_webhook(client, body).json()["outcome"] == "ignored"
    assert StripeEvent.objects.filter(event_id="evt_x").exists()


def test_webhook_only_accepts_post(client):
    assert client.get("/webhooks/stripe/").status_code == 405
