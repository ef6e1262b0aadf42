"""Period close: one invoice per tenant and month, its lines, frozen periods, forward-only states."""

from __future__ import annotations

from datetime import date

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import IntegrityError, transaction

from billing import invoicing, rating
from billing.models import DailyUsage, InvalidTransition, Invoice, InvoiceLine
from tests.support.billing import price, usage, utc

JAN, FEB = date(2026, 1, 1), date(2026, 2, 1)


@pytest.fixture
def january(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="300", train="0")
    price(catalog.base, effective_from=date(2026, 1, 1), inp="200", out="500", adapter=catalog.adapter)
    usage(world.tenant, at=utc(2026, 1, 5, 9), pool=catalog.shared, inp=1_000_000, out=500_000)  # 100 + 150 = 250 ¢
    usage(world.tenant, at=utc(2026, 1, 6, 9), pool=catalog.shared, adapter=catalog.adapter.name, inp=10_000, out=10_001)  # 2 + 5.0005 → 7 ¢
    usage(world.tenant, at=utc(2026, 1, 7, 9), pool=catalog.shared, inp=5, out=5, status="error")  # not billed
    usage(world.other_tenant, at=utc(2026, 1, 8, 9), pool=catalog.shared, inp=2_000_000)  # 200 ¢
    return world


def test_a_fine_tuned_model_is_named_once_on_its_line(world, catalog):
    name = catalog.adapter.name  # the gateway records model = adapter = the ft: name
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="300")
    usage(world.tenant, at=utc(2026, 1, 5, 9), model=name, adapter=name, pool=catalog.shared, inp=1_000_000)
    [invoice] = invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2))
    [line] = InvoiceLine.objects.for_tenant(world.tenant).filter(invoice=invoice)
    assert line.description == f"{name}: 1,000,000 input + 0 output tokens (05 Jan–05 Jan)" and line.amount_cents == 100


def test_close_issues_one_invoice_per_tenant_with_lines(january):
    invoices = invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2))
    assert len(invoices) == 2
    acme = Invoice.objects.for_tenant(january.tenant).get()
    assert (acme.number, acme.status, acme.total_cents, acme.delivery) == ("ACME-202601", "open", 257, "not_sent")
    assert (acme.period_start, acme.period_end) == (JAN, FEB)
    lines = list(InvoiceLine.objects.for_tenant(january.tenant).filter(invoice=acme).order_by("adapter"))
    assert [(l.adapter, l.input_tokens, l.output_tokens, l.amount_cents) for l in lines] == [
        ("", 1_000_000, 500_000, 250),
        ("ft:tiny-chat:acme:support:1", 10_000, 10_001, 7),
    ]
    assert "1,000,000 input + 500,000 output tokens" in lines[0].description


def test_close_is_idempotent_and_unique_per_tenant_and_period(january):
    first = invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2))
    assert invoicing.period_close(period=JAN, now=utc(2026, 2, 2)) == []
    assert invoicing.invoice_close(tenant=january.tenant, period=JAN) == next(i for i in first if i.tenant_id == january.tenant.pk)
    with pytest.raises(IntegrityError), transaction.atomic():
        Invoice.all_tenants.create(tenant=january.tenant, number="DUP", period_start=JAN, period_end=FEB, closed_at=utc(2026, 2, 2))


def test_a_period_that_has_not_ended_cannot_be_closed(january):
    with pytest.raises(ValidationError):
        invoicing.period_close(period=JAN, now=utc(2026, 1, 31, 23, 59))


def test_late_usage_goes_to_the_next_period(january, catalog):
    invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2))
    acme_jan = Invoice.objects.for_tenant(january.tenant).get(period_start=JAN)
    # A January request written to the ledger after the close (e.g. a gateway flushing late).
    usage(january.tenant, at=utc(2026, 1, 31, 23, 59), pool=catalog.shared, inp=1_000_000)  # 100 ¢
    for _ in range(2):  # rerating twice must not double it
        rating.rate_range(date(2026, 1, 30), date(2026, 2, 1), now=utc(2026, 2, 1, 3))
    late = DailyUsage.objects.for_tenant(january.tenant).get(day=date(2026, 1, 31))
    assert (late.period, late.input_tokens) == (FEB, 1_000_000)
    acme_jan.refresh_from_db()
    assert acme_jan.total_cents == 257  # the closed invoice is frozen
    assert rating.period_cost(tenant=january.tenant, period=JAN).total_cents == 257
    assert rating.period_cost(tenant=january.tenant, period=FEB).total_cents == 100
    # Its own January rows did not move either.
    assert set(DailyUsage.objects.for_tenant(january.tenant).exclude(day=date(2026, 1, 31)).values_list("period", flat=True)) == {JAN}
    invoicing.period_close(period=FEB, now=utc(2026, 3, 1, 2))
    assert Invoice.objects.for_tenant(january.tenant).get(period_start=FEB).total_cents == 100


def test_states_only_move_forward(january):
    invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2))
    invoice = Invoice.objects.for_tenant(january.tenant).get()
    with pytest.raises(InvalidTransition):
        invoice.move_to(Invoice.Status.DRAFT)
    assert invoice.move_to(Invoice.Status.UNCOLLECTIBLE)
    assert invoice.move_to(Invoice.Status.PAID)
    assert invoice.move_to(Invoice.Status.PAID) is False  # a repeat is a no-op
    for backwards in (Invoice.Status.OPEN, Invoice.Status.VOID, Invoice.Status.UNCOLLECTIBLE, Invoice.Status.DRAFT):
        with pytest.raises(InvalidTransition):
            invoice.move_to(backwards)
    invoice.refresh_from_db()
    assert invoice.status == "paid" and invoice.paid_at is not None


def test_stale_object_cannot_overwrite_a_concurrent_move(january):
    invoicing.period_close(period=JAN, now=utc(2026, 2, 1, 2))
    a = Invoice.objects.for_tenant(january.tenant).get()
    b = Invoice.objects.for_tenant(january.tenant).get()
    a.move_to(Invoice.Status.PAID)
    with pytest.raises(InvalidTransition):
        b.move_to(Invoice.Status.VOID)  # b still thinks "open"; the claim re-reads and refuses
    a.refresh_from_db()
    assert a.status == "paid"


def test_no_usage_means_no_invoice_and_zero_totals_need_no_payment(world, catalog):
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=10)  # no price set: a 0 ¢ line
    [invoice] = invoicing.period_close(period=JAN, now=utc(2026, 2, 2))
    assert (invoice.total_cents, invoice.status, invoice.delivery) == (0, "paid", "not_needed")
    assert not Invoice.objects.for_tenant(world.other_tenant).exists()


def test_management_command_closes_a_period(january, capsys):
    call_command("billing_close_period", "--period", "2026-01")
    assert "2 invoice(s)" in capsys.readouterr().out
