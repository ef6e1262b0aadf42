"""The tenant dashboard (portal/dashboard.py): its figures are its pages' figures, and it is the tenant's own."""

from __future__ import annotations

import re
from datetime import date

import pytest
from django.utils import timezone

from billing import invoicing
from billing.models import Invoice
from finetune.models import FineTuneJob, TrainingFile
from serving.models import AdapterDeployment
from tests.support.billing import catalog, price, usage, utc  # noqa: F401  (catalog is a fixture)


@pytest.fixture(autouse=True)
def _billing_settings(settings):
    settings.STRIPE_SECRET_KEY = ""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def attr(html: str, name: str) -> str:
    return re.search(rf'{name}="([^"]*)"', html).group(1)


@pytest.fixture
def busy(world, catalog):
    """acme: 4 requests today (one failed on our side), one rated earlier this month; globex: its own usage."""
    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="200")
    now = timezone.now()
    for status in ("ok", "ok", "cancelled", "error"):
        usage(world.tenant, at=now, pool=catalog.shared, inp=250_000, out=100_000, status=status)
    usage(world.other_tenant, at=now, pool=catalog.shared, inp=9_000_000)
    return world


def test_dashboard_figures_equal_the_billing_and_usage_pages(client, busy):
    world = busy
    client.force_login(world.viewer)
    slug = world.tenant.slug
    dash = client.get(f"/t/{slug}/").content.decode()
    billing = client.get(f"/t/{slug}/billing/").content.decode()
    usage_page = client.get(f"/t/{slug}/usage/")
    # 3 billed requests (the error is not billed): 3 × (25 + 20) ¢ = 135 ¢, not rated yet
    assert attr(dash, "data-spend-cents") == attr(billing, "data-spend-cents") == attr(billing, "data-total-cents") == "135"
    assert attr(dash, "data-forecast-cents") == attr(billing, "data-forecast-cents")
    assert int(attr(dash, "data-forecast-cents")) >= 135
    quota = usage_page.context["quota"]
    assert attr(dash, "data-quota-used") == str(quota["used"]) == str(4 * 350_000)
    today = timezone.now().date()
    assert attr(dash, "data-requests-today") == str(sum(r["requests"] for r in usage_page.context["rows"] if r["day"] == today)) == "4"
    assert attr(dash, "data-error-rate") == "25.0"  # 1 of 4 failed on the platform's side (a hang-up is not ours)


def test_dashboard_quota_gauge(client, world):
    from tenants import services

    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=1_000)
    usage(world.tenant, at=timezone.now(), inp=850)
    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/").content.decode()
    assert 'data-quota-percent="85.0"' in html and 'class="gauge-fill warn" style="width: 85.0%"' in html


def test_dashboard_offers_to_pay_an_unpaid_invoice(client, world, catalog):
    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="100")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000)
    [inv] = invoicing.period_close(period=date(2026, 1, 1), now=utc(2026, 2, 2), tenant=world.tenant)
    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/").content.decode()
    assert f'data-open-invoice="{inv.number}"' in html and "Online payment is not available yet" in html and "data-pay" not in html
    Invoice.all_tenants.filter(pk=inv.pk).update(hosted_invoice_url="https://pay.example.test/i/1")
    html = client.get(f"/t/{world.tenant.slug}/").content.decode()
    assert 'data-pay href="https://pay.example.test/i/1"' in html and f'href="/t/{world.tenant.slug}/billing/invoices/{inv.pk}/"' in html
    Invoice.all_tenants.get(pk=inv.pk).move_to(Invoice.Status.PAID)
    assert "data-open-invoice" not in client.get(f"/t/{world.tenant.slug}/").content.decode()


def test_dashboard_lists_running_jobs_and_deployed_adapters_with_links(client, world, catalog):
    file = TrainingFile.all_tenants.create(tenant=world.tenant, filename="t.jsonl", path="x", status="processed")
    job = FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=catalog.base, training_file=file, hyperparameters={}, lora={},
                                         status=FineTuneJob.Status.RUNNING, step=3, total_steps=10)
    FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=catalog.base, training_file=file, hyperparameters={}, lora={},
                                   status=FineTuneJob.Status.SUCCEEDED)
    AdapterDeployment.all_tenants.create(tenant=world.tenant, adapter=catalog.adapter, pool=catalog.shared, state="active")
    other_file = TrainingFile.all_tenants.create(tenant=world.other_tenant, filename="t.jsonl", path="y", status="processed")
    other_job = FineTuneJob.all_tenants.create(tenant=world.other_tenant, base_model=catalog.base, training_file=other_file,
                                               hyperparameters={}, lora={}, status=FineTuneJob.Status.RUNNING)
    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/").content.decode()
    assert f'href="/t/{world.tenant.slug}/finetune/jobs/{job.id}/"' in html and "step 3 of 10" in html
    assert html.count("/finetune/jobs/ftjob") == 1 and other_job.id not in html  # running only, this tenant's only
    assert catalog.adapter.name in html and f'href="/t/{world.tenant.slug}/finetune/adapters/"' in html


def test_dashboard_is_the_tenants_own(client, busy):
    world = busy
    client.force_login(world.outsider)
    assert client.get(f"/t/{world.tenant.slug}/").status_code == 404
    html = client.get(f"/t/{world.other_tenant.slug}/").content.decode()
    assert attr(html, "data-spend-cents") == "900" and attr(html, "data-requests-today") == "1"  # globex's figures, not acme's


def test_dashboard_budget_gauge_reads_as_the_budget_page(client, busy):
    world = busy
    from tenants.models import Policy

    client.force_login(world.viewer)
    html = client.get(f"/t/{world.tenant.slug}/").content.decode()
    assert "No money budget is set." in html and "data-budget-percent" not in html
    Policy.objects.for_tenant(world.tenant).update(budget_ceiling_cents=1_000)  # 10.00 USD, hard
    html = client.get(f"/t/{world.tenant.slug}/").content.decode()
    budget_page = client.get(f"/t/{world.tenant.slug}/budget/")
    assert attr(html, "data-budget-percent") == str(budget_page.context["percent"]) == "13"  # 135 ¢ of 1,000 ¢
    assert "1.35 of 10.00 USD — requests are refused past it" in html


def test_dashboard_quota_window_names_its_last_day(client, world):
    from tenants import services

    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=1_000, quota_window="month")
    client.force_login(world.viewer)
    response = client.get(f"/t/{world.tenant.slug}/")
    quota = response.context["quota"]
    last = quota["window_last_day"]
    assert quota["window_end"].day == 1 and last.month == quota["window_start"].month  # the window ends at the next 1st, exclusive
    assert (quota["window_end"].date() - last).days == 1
    assert f'– {last.day} {last:%b %Y}, UTC' in response.content.decode()  # the month's last day, not the next 1st
    assert f'– {last.day} {last:%b %Y}, UTC' in client.get(f"/t/{world.tenant.slug}/usage/").content.decode()  # as Usage says


def test_dashboard_says_in_words_what_the_gauges_mark_is_and_where_alerts_fire(client, world):
    """The mark at 80 % had only a hover title: a phone or a screen reader got nothing. A legend line says it, with
    the tenant's alert thresholds when it has alert settings."""
    from tenants import services
    from tenants.models import AlertSettings

    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=1_000)
    client.force_login(world.viewer)
    url = f"/t/{world.tenant.slug}/"
    html = client.get(url).content.decode()
    legend = re.search(r"<p [^>]*data-gauge-legend>(.*?)</p>", html, re.S).group(1)
    text = " ".join(re.sub(r"<[^>]+>", "", legend).split())
    assert text == "The line across each gauge marks 80 %: past it the gauge turns amber. No alerts are set (Alerts)."
    assert 'class="gauge-mark" title="80 %: warning" aria-hidden="true"' in html

    AlertSettings.objects.for_tenant(world.tenant).create(tenant=world.tenant, thresholds=[100, 50, 90])
    AlertSettings.objects.for_tenant(world.other_tenant).create(tenant=world.other_tenant, thresholds=[10])  # another tenant's: not shown
    html = client.get(url).content.decode()
    legend = re.search(r"<p [^>]*data-gauge-legend>(.*?)</p>", html, re.S).group(1)
    assert " ".join(re.sub(r"<[^>]+>", "", legend).split()).endswith("Alerts at 50 %, 90 %, 100 % (Alerts).")

