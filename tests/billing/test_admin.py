"""Staff invoice tools in the admin: void and mark uncollectible, each with a required reason."""

from __future__ import annotations

from datetime import date

from billing import invoicing, services
from billing.models import Invoice
from tests.support.billing import usage, utc

REASON = "Duplicate of the corrected invoice agreed with the customer"


def test_admin_void_button_asks_for_a_reason(client, world, invoice, staff):
    client.force_login(world.owner)
    url = f"/admin/billing/invoice/{invoice.pk}/void/"
    change = client.get(f"/admin/billing/invoice/{invoice.pk}/change/").content.decode()
    assert f'href="{url}"' in change and "Mark uncollectible…" in change
    form = client.get(url)
    assert form.status_code == 200 and "writes the amount off" in form.content.decode()
    assert "This field is required" in client.post(url, {"apply": "1", "reason": ""}).content.decode()
    invoice.refresh_from_db()
    assert invoice.status == "open"
    response = client.post(url, {"apply": "1", "reason": REASON}, follow=True)
    assert "ACME-202601 is now void." in response.content.decode()
    invoice.refresh_from_db()
    assert (invoice.status, invoice.status_reason) == ("void", REASON)
    assert "Void…" not in client.get(f"/admin/billing/invoice/{invoice.pk}/change/").content.decode()


def test_admin_action_voids_each_and_explains_refusals(client, world, catalog, invoice, staff):
    usage(world.other_tenant, at=utc(2026, 1, 9), pool=catalog.shared, inp=1_000_000)
    [paid] = invoicing.period_close(period=date(2026, 1, 1), now=utc(2026, 2, 2))
    services.invoice_mark_paid(invoice=paid)
    client.force_login(world.owner)
    selected = {"action": "void_selected", "_selected_action": [invoice.pk, paid.pk]}
    page = client.post("/admin/billing/invoice/", selected).content.decode()
    assert "Give a reason" not in page and 'name="reason"' in page and "GLOBEX-202601" in page
    response = client.post("/admin/billing/invoice/", {**selected, "apply": "1", "reason": REASON}, follow=True)
    text = response.content.decode()
    assert "ACME-202601 is now void." in text
    assert "Not changed: GLOBEX-202601 is paid, so it cannot be voided." in text
    assert Invoice.all_tenants.get(pk=invoice.pk).status == "void" and Invoice.all_tenants.get(pk=paid.pk).status == "paid"


def test_admin_requires_staff(client, world, invoice):
    client.force_login(world.admin)  # a tenant admin is not platform staff
    response = client.post(f"/admin/billing/invoice/{invoice.pk}/void/", {"apply": "1", "reason": REASON})
    assert response.status_code == 302 and "/login/" in response["Location"]
    invoice.refresh_from_db()
    assert invoice.status == "open"
