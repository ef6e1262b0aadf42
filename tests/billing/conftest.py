"""Billing fixtures: a catalogue (base model, pools), an invoice, prices over a period, staff, and a fake Stripe.
Their helpers (prices, ledger rows, signed webhooks, the fakes) are in tests/support/billing.py."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace

import pytest

from billing import invoicing
from tenants.services import Actor
from tests.support.billing import WEBHOOK_SECRET, FakeInvoiceItems, FakeInvoices, price, usage, utc
from tests.support.billing import catalog  # noqa: F401 (the fixture, for the tests here; tests/test_dashboard.py imports it too)


@pytest.fixture(autouse=True)
def _billing_settings(settings):
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def invoice(world, catalog):
    """ACME-202601: January's open invoice, 100 ¢ (1 M input tokens at 100 ¢/M), not sent to Stripe.

    Test modules that need another invoice (e.g. one already at Stripe) define their own `invoice`."""
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)
    [inv] = invoicing.period_close(period=date(2026, 1, 1), now=utc(2026, 2, 2))
    return inv


@pytest.fixture
def staff(world) -> Actor:
    """Platform staff (the tenant's owner made superuser): the actor of admin changes."""
    world.owner.is_staff = world.owner.is_superuser = True
    world.owner.save()
    return Actor(user=world.owner)


@pytest.fixture
def fake_stripe():
    """A Stripe client whose invoices and invoice items are fakes (no server); see FakeInvoices."""
    return SimpleNamespace(v1=SimpleNamespace(invoices=FakeInvoices(), invoice_items=FakeInvoiceItems()))


@pytest.fixture
def prices(catalog):
    return [
        price(catalog.base, effective_from=date(2025, 12, 1), inp="15", out="60"),
        price(catalog.base, effective_from=date(2026, 1, 15), inp="12.5", out="47.333333"),  # mid-period change
        price(catalog.base, effective_from=date(2026, 1, 1), inp="30", out="90", adapter=catalog.adapter),
        price(catalog.base, effective_from=date(2026, 1, 10), inp="7.25", out="21", pool=catalog.dedicated),
        price(catalog.other_base, effective_from=date(2025, 12, 1), inp="101.000001", out="333.3"),
        price(catalog.base, effective_from=date(2026, 2, 1), inp="999", out="999"),  # not yet in force in January
    ]
