"""Console pages, API and the staff allocation page: content, isolation (outsider 404) and roles (viewer 403)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from django.utils import timezone

from billing import invoicing, periods, rating, selectors, services
from billing.models import Invoice
from tests.support.billing import price, usage, utc


@pytest.fixture
def billed(world, catalog):
    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="200")
    now = timezone.now()
    usage(world.tenant, at=now, pool=catalog.shared, inp=1_000_000, out=1_000_000)  # 300 ¢
    usage(world.other_tenant, at=now, pool=catalog.shared, inp=3_000_000)  # 300 ¢
    rating.rate_day(periods.utc_today(now))
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)
    [inv] = invoicing.period_close(period=date(2026, 1, 1), now=utc(2026, 2, 2), tenant=world.tenant)
    Invoice.all_tenants.filter(pk=inv.pk).update(hosted_invoice_url="https://pay.example.test/i/1")
    return inv


def test_usage_page_shows_cost_so_far_with_chart(client, world, billed):
    client.force_login(world.viewer)
    page = client.get(f"/t/{world.tenant.slug}/billing/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-total-cents="300"' in html and "<svg" in html and "tiny-chat" in html
    assert "Manage payment methods" not in html  # viewer; and Stripe is not configured
    first = timezone.now().date().replace(day=1)
    last = periods.next_period(first) - timedelta(days=1)
    assert f"{first:%-d %b} – {last:%-d %b %Y} (UTC)" in html  # the period's last day, not the next month's first
    # One bar per day of the period so far, days without usage included; money in the tooltips and the peak.
    chart = page.context["chart"]
    today = periods.utc_today(timezone.now())
    assert len(chart["bars"]) == today.day and chart["bars"][-1].title == f"{today:%d %b}: 3.00 USD"
    assert chart["peak_label"] == "3.00 USD" and "peak 3.00 USD" in html


def test_usage_page_speaks_the_configured_currency(client, world, billed):
    from billing.models import BillingSettings

    BillingSettings.objects.update_or_create(pk=1, defaults={"currency": "eur"})
    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/billing/").content.decode()
    assert "3.00 EUR</span>" in html and "3.00 EUR</strong>" in html and "peak 3.00 EUR" in html  # (an issued invoice keeps its own)
    assert "1.00 EUR input" in html and "2.00 EUR output" in html  # per million tokens, in the currency


def test_usage_page_without_usage_points_to_the_usage_page(client, world, catalog):
    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/billing/").content.decode()
    assert "No usage this period yet." in html and f'href="/t/{world.tenant.slug}/usage/"' in html


def test_usage_page_counts_todays_ledger_before_the_rating_run(client, world, catalog):
    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="200")
    usage(world.tenant, at=timezone.now(), pool=catalog.shared, inp=1_000_000)  # in the ledger, not rated yet: 100 ¢
    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/billing/").content.decode()
    assert 'data-total-cents="100"' in html and 'data-spend-cents="100"' in html and "No usage this period yet." not in html


def test_invoice_pages(client, world, billed):
    client.force_login(world.viewer)
    base = f"/t/{world.tenant.slug}/billing/invoices/"
    assert "ACME-202601" in client.get(base).content.decode()
    detail = client.get(f"{base}{billed.pk}/").content.decode()
    assert 'href="https://pay.example.test/i/1"' in detail and "Pay" in detail
    assert "1 Jan – 31 Jan 2026 (UTC)" in detail  # the period's last day, not the next period's first
    printable = client.get(f"{base}{billed.pk}/print/").content.decode()
    assert "@media print" in printable and "ACME-202601" in printable


def test_invoice_pages_show_a_void_pending_at_stripe_then_void(client, world, billed, staff):
    client.force_login(world.viewer)
    slug, base = world.tenant.slug, f"/t/{world.tenant.slug}/billing/invoices/"
    assert f'<div class="banner banner-warn" data-open-invoice="{billed.number}"' in client.get(f"/t/{slug}/billing/").content.decode()  # a styled class
    Invoice.all_tenants.filter(pk=billed.pk).update(stripe_invoice_id="in_1", delivery="sent")
    services.invoice_void(invoice=billed, reason="Goodwill after the outage", actor=staff)  # Stripe must confirm first
    listing = client.get(base).content.decode()
    assert 'data-status="void-pending"' in listing and "Being voided" in listing and "<del>1.00</del>" in listing
    detail = client.get(f"{base}{billed.pk}/").content.decode()
    assert "data-void" in detail and "do not pay it" in detail and "data-pay" not in detail
    assert "data-open-invoice" not in client.get(f"/t/{slug}/billing/").content.decode()  # no longer shown as unpaid
    api = f"/api/tenants/{slug}/billing/invoices/{billed.pk}/"
    assert client.get(api).json()["status"] == "open" and client.get(api).json()["void_pending"] is True

    Invoice.all_tenants.get(pk=billed.pk).move_to(Invoice.Status.VOID)  # Stripe confirmed
    listing = client.get(base).content.decode()
    assert 'data-status="void"' in listing and "nothing to pay" in listing and "<del>1.00</del>" in listing
    detail = client.get(f"{base}{billed.pk}/").content.decode()
    assert "This invoice was voided on" in detail and "data-pay" not in detail
    data = client.get(api).json()
    assert (data["status"], data["void_pending"]) == ("void", False) and data["voided_at"]


def test_outsider_gets_404_everywhere(client, world, billed):
    client.force_login(world.outsider)
    slug = world.tenant.slug
    for url in (f"/t/{slug}/billing/", f"/t/{slug}/billing/invoices/", f"/t/{slug}/billing/invoices/{billed.pk}/",
                f"/t/{slug}/billing/invoices/{billed.pk}/print/", f"/api/tenants/{slug}/billing/usage/",
                f"/api/tenants/{slug}/billing/invoices/{billed.pk}/"):
        assert client.get(url).status_code == 404, url
    assert client.post(f"/t/{slug}/billing/payment-methods/").status_code == 404
    # acme's invoice id under the outsider's own tenant
    assert client.get(f"/t/{world.other_tenant.slug}/billing/invoices/{billed.pk}/").status_code == 404
    assert client.get(f"/api/tenants/{world.other_tenant.slug}/billing/invoices/{billed.pk}/").status_code == 404


def test_viewer_gets_403_on_writes(client, world, billed):
    client.force_login(world.viewer)
    slug = world.tenant.slug
    for url in (f"/t/{slug}/billing/payment-methods/", f"/t/{slug}/billing/", f"/t/{slug}/billing/invoices/{billed.pk}/"):
        assert client.post(url).status_code == 403, url


def test_payment_methods_without_stripe_explains(client, world, billed):
    client.force_login(world.admin)
    response = client.post(f"/t/{world.tenant.slug}/billing/payment-methods/", follow=True)
    assert response.status_code == 200
    assert "Online payment is not available yet" in response.content.decode()
    assert "Stripe" not in response.content.decode()  # the tenant's words, not the operator's


def test_api_reads_for_members(client, world, billed):
    client.force_login(world.viewer)
    data = client.get(f"/api/tenants/{world.tenant.slug}/billing/usage/").json()
    assert data["total_cents"] == 300 and data["lines"][0]["model"] == "tiny-chat"
    listing = client.get(f"/api/tenants/{world.tenant.slug}/billing/invoices/").json()
    assert [i["number"] for i in listing["results"]] == ["ACME-202601"]
    detail = client.get(f"/api/tenants/{world.tenant.slug}/billing/invoices/{billed.pk}/").json()
    assert detail["total_cents"] == 100 and detail["lines"][0]["amount_cents"] == 100


def test_cost_allocation_formula(world, catalog, billed):
    pools, tenants = selectors.cost_allocation(period=date(2026, 1, 1), now=utc(2026, 3, 1))
    shared = next(p for p in pools if p.pool == catalog.shared)
    assert shared.cost_cents == 1 * 31 * 24 * 200  # backends × hours × ¢/h
    [acme] = shared.rows
    assert (acme.weighted_tokens, acme.share, acme.cost_cents, acme.revenue_cents) == (1_000_000, 1, shared.cost_cents, 100)
    # Current month: both tenants share the pool by weighted tokens (input + 2·output): 3 M each → ½.
    pools, _ = selectors.cost_allocation(period=selectors.current_period())
    shares = {r.tenant.slug: r.share for p in pools if p.pool == catalog.shared for r in p.rows}
    assert shares == {"acme": pytest.approx(0.5), "globex": pytest.approx(0.5)}


def test_allocation_page_is_staff_only(client, world, billed):
    client.force_login(world.owner)
    assert client.get("/staff/billing/allocation/").status_code == 302  # to the admin login
    world.owner.is_staff = True
    world.owner.save()
    page = client.get("/staff/billing/allocation/?period=2026-01")
    assert page.status_code == 200 and 'data-tenant="acme"' in page.content.decode()


def test_unpaid_banner_offers_payment_only_where_the_invoice_page_does(client, world, billed):
    client.force_login(world.viewer)
    slug = world.tenant.slug
    link = f'href="/t/{slug}/billing/invoices/{billed.pk}/">'
    html = client.get(f"/t/{slug}/billing/").content.decode()
    assert 'data-pay href="https://pay.example.test/i/1"' in html and "Pay 1.00 USD" in html  # Pay on the page (Stripe's hosted page)
    assert f"{link}View invoice</a>" in html
    Invoice.all_tenants.filter(pk=billed.pk).update(hosted_invoice_url="")  # Stripe not configured: "contact support to pay"
    html = client.get(f"/t/{slug}/billing/").content.decode()
    assert f"{link}View invoice</a>" in html and "data-pay" not in html and "Online payment is not available yet" in html
    assert "data-pay" not in client.get(f"/t/{slug}/billing/invoices/{billed.pk}/").content.decode()


OFFLINE = "Online payment is not available yet"


def test_without_stripe_the_billing_page_says_once_how_to_pay(client, world, billed, monkeypatch):
    """An admin's Billing page without Stripe: with an unpaid invoice its banner says how to pay it (and the page's
    note does not repeat it); without one, the note; an invoice still being sent to Stripe promises its Pay button."""
    from billing import stripe_gateway

    monkeypatch.setattr(stripe_gateway, "is_configured", lambda: False)
    client.force_login(world.admin)
    url = f"/t/{world.tenant.slug}/billing/"
    Invoice.all_tenants.filter(pk=billed.pk).update(hosted_invoice_url="", delivery=Invoice.Delivery.NOT_SENT)
    html = client.get(url).content.decode()
    assert html.count(OFFLINE) == 1 and html.count("data-offline-payment") == 1
    banner = html[html.index(f'data-open-invoice="{billed.number}"'):]
    banner = banner[:banner.index("</div>")]
    assert f"{OFFLINE}: contact support to pay, quoting invoice {billed.number}." in banner

    Invoice.all_tenants.filter(pk=billed.pk).update(delivery=Invoice.Delivery.PENDING)  # Stripe's link not back yet
    html = client.get(url).content.decode()
    assert OFFLINE not in html and "reload this page in a minute for its Pay button" in html

    Invoice.all_tenants.get(pk=billed.pk).move_to(Invoice.Status.PAID)
    html = client.get(url).content.decode()
    assert "data-open-invoice" not in html and html.count(OFFLINE) == 1
    assert f"{OFFLINE}: invoices are settled with support." in html
    client.force_login(world.viewer)
    assert OFFLINE not in client.get(url).content.decode()  # nothing a viewer can act on


def test_allocation_page_links_only_to_months_that_have_started_and_have_usage(client, world, billed, staff):
    client.force_login(world.owner)  # staff
    current = selectors.current_period()
    following = periods.next_period(current)

    html = client.get("/staff/billing/allocation/").content.decode()
    assert f"?period={following:%Y-%m}" not in html  # next month has not started
    assert f'href="?period={periods.previous_period(current):%Y-%m}"' in html

    html = client.get("/staff/billing/allocation/?period=2026-01").content.decode()  # the first month with usage
    assert 'href="?period=2026-02"' in html and "?period=2025-12" not in html

    response = client.get(f"/staff/billing/allocation/?period={following:%Y-%m}", follow=True)
    html = response.content.decode()
    assert f"Cost allocation — {current:%B %Y}" in html and "has not started" in html
    assert f"?period={following:%Y-%m}" not in html

    assert client.get("/staff/billing/allocation/?period=0001-01").status_code == 200  # no month before it to link to


def test_payment_methods_open_stripes_customer_portal_for_admins(client, world, billed, monkeypatch):
    from billing import stripe_gateway

    monkeypatch.setattr(stripe_gateway, "is_configured", lambda: True)
    monkeypatch.setattr(services, "portal_url", lambda *, tenant, return_url: f"https://billing.stripe.test/p/{tenant.slug}?back={return_url}")
    client.force_login(world.viewer)
    assert "Manage payment methods" not in client.get(f"/t/{world.tenant.slug}/billing/").content.decode()  # admins only
    client.force_login(world.admin)
    html = client.get(f"/t/{world.tenant.slug}/billing/").content.decode()
    assert "Manage payment methods" in html and "Online payment is not available yet: invoices" not in html
    response = client.post(f"/t/{world.tenant.slug}/billing/payment-methods/")
    assert response.status_code == 302 and response.url == "https://billing.stripe.test/p/acme?back=http://testserver/t/acme/billing/"


def test_billing_lists_the_price_of_every_model_the_tenant_may_call_and_the_models_page_links_to_it(client, world, catalog):
    """A new tenant sees what a request will cost before making one: Billing's Prices table, per model it may call
    (what the gateway routes for it), input and output per million tokens in the currency, formatted as the
    breakdown's; the Models page links to it."""
    import re

    from serving.models import ModelConfig

    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="200")
    price(catalog.other_base, effective_from=date(2020, 1, 1), inp="7.5", out="1234")
    price(catalog.other_base, effective_from=timezone.now().date() + timedelta(days=2), inp="1", out="1")  # not yet
    client.force_login(world.viewer)

    def prices(url):
        html = client.get(url).content.decode()
        assert html.count("<table data-price-list>") == 1
        rows = re.findall(r'<tr data-price-model="([^"]+)">(.*?)</tr>', html, re.S)
        return {m: " ".join(re.sub(r"<[^>]+>", " ", cells).split()) for m, cells in rows}

    expected = {"big-chat": "big-chat 0.075 USD 12.34 USD", "tiny-chat": "tiny-chat 1.00 USD 2.00 USD"}
    assert prices(f"/t/{world.tenant.slug}/billing/") == expected  # no usage yet: the breakdown is empty
    # The Models page (serving, a layer below billing) links to the list rather than importing it.
    assert f'href="/t/{world.tenant.slug}/billing/#prices-h"' in client.get(f"/t/{world.tenant.slug}/models/").content.decode()
    rows, currency = selectors.price_list(tenant=world.tenant)
    assert [r.model for r in rows] == ["big-chat", "tiny-chat"] and currency == "USD"

    # Only the models this tenant may call: with its allowed models narrowed, the other one is not priced for it.
    config, _ = ModelConfig.objects.for_tenant(world.tenant).get_or_create(tenant=world.tenant)
    config.allowed_models = ["tiny-chat"]
    config.save()
    assert prices(f"/t/{world.tenant.slug}/billing/") == {"tiny-chat": "tiny-chat 1.00 USD 2.00 USD"}
    assert [r.model for r in selectors.price_list(tenant=world.other_tenant)[0]] == ["big-chat", "tiny-chat"]  # not another's


def test_usage_page_cost_chart_is_split_by_model_like_the_usage_chart(client, world, catalog):
    """The cost per day stacks one segment per model (as the Usage page's tokens chart does), each in money; the
    bar's total is the day's cost. A single model keeps plain bars."""
    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="200")
    price(catalog.other_base, effective_from=date(2020, 1, 1), inp="50", out="50")
    now = timezone.now()
    usage(world.tenant, at=now, pool=catalog.shared, inp=1_000_000, out=1_000_000)  # tiny-chat 300 ¢
    usage(world.tenant, at=now, model="big-chat", pool=catalog.big, inp=2_000_000)  # big-chat 100 ¢
    usage(world.other_tenant, at=now, model="big-chat", pool=catalog.big, inp=9_000_000)  # another tenant's: not here
    cost = selectors.period_cost_so_far(tenant=world.tenant)
    today = periods.utc_today(now)
    assert cost.daily_model_cents[today] == {"tiny-chat": 300, "big-chat": 100}
    assert sum(cost.daily_model_cents[today].values()) == cost.daily_cents[today]

    client.force_login(world.viewer)
    page = client.get(f"/t/{world.tenant.slug}/billing/")
    chart = page.context["chart"]
    assert chart.stacked and chart.series == ["tiny-chat", "big-chat"]  # the largest first
    bar = chart.bars[-1]
    assert bar.title == f"{today:%d %b}: 4.00 USD (total)"
    assert [s.title for s in bar.segments] == [f"{today:%d %b}: tiny-chat 3.00 USD", f"{today:%d %b}: big-chat 1.00 USD"]
    assert chart.rows[-1] == (f"{today:%d %b}", ["3.00 USD", "1.00 USD"], "4.00 USD")
    html = page.content.decode()
    assert "tiny-chat" in html and "big-chat" in html
