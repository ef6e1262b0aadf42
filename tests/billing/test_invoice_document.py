"""An issued invoice is a document: what it shows is stored when it is issued, not read from the tenant as it is now."""

from __future__ import annotations

from datetime import date

import pytest

from billing import invoicing
from tenants.services import tenant_rename
from tests.support.billing import price, usage, utc

JAN, FEB = date(2026, 1, 1), date(2026, 2, 1)


@pytest.fixture
def renamed(world, catalog, staff):
    """January invoiced to "Acme"; then the tenant is renamed; February invoiced to the new name."""
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)
    [jan] = invoicing.period_close(period=JAN, now=utc(2026, 2, 2))
    tenant_rename(tenant=world.tenant, name="Acme Robotics GmbH", actor=staff)
    usage(world.tenant, at=utc(2026, 2, 5), pool=catalog.shared, inp=1_000_000)
    [feb] = invoicing.period_close(period=FEB, now=utc(2026, 3, 2))
    return jan, feb


def test_invoice_keeps_the_name_it_was_billed_to(client, world, renamed):
    jan, feb = renamed
    assert (jan.billed_to_name, feb.billed_to_name) == ("Acme", "Acme Robotics GmbH")
    client.force_login(world.viewer)
    base = f"/t/{world.tenant.slug}/billing/invoices/"
    for invoice, name in ((jan, "Acme"), (feb, "Acme Robotics GmbH")):
        detail = client.get(f"{base}{invoice.pk}/").content.decode()
        assert f"<dt>Billed to</dt><dd>{name}</dd>" in detail
        printable = client.get(f"{base}{invoice.pk}/print/").content.decode()
        assert f"<dt>Billed to</dt><dd>{name}</dd>" in printable
        assert client.get(f"/api/tenants/{world.tenant.slug}/billing/invoices/{invoice.pk}/").json()["billed_to_name"] == name
    assert "Robotics" not in client.get(f"{base}{jan.pk}/print/").content.decode()


@pytest.mark.slow  # runs the real migrations, which the fast lane (--nomigrations) does not apply
@pytest.mark.django_db(transaction=True)
def test_migration_fills_the_name_of_invoices_issued_before_it():
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor
    from django.utils import timezone

    executor = MigrationExecutor(connection)
    executor.migrate([("billing", "0003_price_starts_tomorrow_by_default")])
    apps = executor.loader.project_state([("billing", "0003_price_starts_tomorrow_by_default")]).apps
    tenant = apps.get_model("tenants", "Tenant").objects.create(slug="initech", name="Initech")
    apps.get_model("billing", "Invoice").all_tenants.create(
        tenant_id=tenant.pk, number="INITECH-202601", period_start=JAN, period_end=FEB, closed_at=timezone.now())
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    from billing.models import Invoice

    assert Invoice.all_tenants.get(number="INITECH-202601").billed_to_name == "Initech"
