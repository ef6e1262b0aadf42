"""The dashboard and billing pages as a tenant admin sees them (issue 14, items 4, 5, 7 and 10), in Debian's Chromium:
the dashboard's figures equal the Usage and Billing pages', prices read as money, operator internals stay hidden,
destructive actions ask first, a prompt is a draft until it is made live, and a key's expiry is listed as picked."""

from __future__ import annotations

import re
from datetime import date, datetime, timezone as dt_timezone
from pathlib import Path

import pytest
from django.utils import timezone

from billing import invoicing
from billing.models import Invoice, Price
from finetune.models import TrainingFile
from serving.models import BackendPool, BaseModel, UsageRecord
from tenants import services
from tenants.models import ApiKey, SystemPromptVersion
from tests.support.browser import sign_in

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

expect = pytest.importorskip("playwright.sync_api", reason="needs the 'playwright' package").expect


@pytest.fixture
def busy(world, settings):
    """acme today: 4 requests (one failed on our side), 1.35 USD billed, not rated yet; an unpaid January invoice
    with Stripe's hosted page; a 2,000,000-token monthly quota. globex has usage of its own."""
    settings.REDIS_URL = ""  # embedded mode: its banner is the operator's, not the tenant's
    base = BaseModel.objects.create(name="tiny-chat", hf_id="tiny/chat")
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev", gpu_hourly_cost_cents=200)
    Price.objects.create(base_model=base, effective_from=date(2020, 1, 1), input_price=100, output_price=200)
    now = timezone.now()
    for i, status in enumerate(("ok", "ok", "cancelled", "error")):
        UsageRecord.all_tenants.create(tenant=world.tenant, request_id=f"r{i}", endpoint="chat", model="tiny-chat", pool=pool,
                                       input_tokens=250_000, output_tokens=100_000, status=status, created_at=now)
    UsageRecord.all_tenants.create(tenant=world.other_tenant, request_id="g1", endpoint="chat", model="tiny-chat", pool=pool,
                                   input_tokens=9_000_000, status="ok", created_at=now)
    UsageRecord.all_tenants.create(tenant=world.tenant, request_id="jan", endpoint="chat", model="tiny-chat", pool=pool,
                                   input_tokens=1_000_000, status="ok", created_at=datetime(2026, 1, 5, tzinfo=dt_timezone.utc))
    [invoice] = invoicing.period_close(period=date(2026, 1, 1), now=datetime(2026, 2, 2, tzinfo=dt_timezone.utc), tenant=world.tenant)
    Invoice.all_tenants.filter(pk=invoice.pk).update(hosted_invoice_url="https://pay.example.test/i/1")
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=2_000_000, quota_window="month")
    return world


def data(page, selector: str, name: str) -> str:
    return page.locator(selector).first.get_attribute(name)


def test_dashboard_figures_equal_the_usage_and_billing_pages(page, busy):
    world = busy
    sign_in(page, world.admin.email)
    page.goto("/t/acme/")
    spend = data(page, "[data-spend-cents]", "data-spend-cents")
    forecast = data(page, "[data-forecast-cents]", "data-forecast-cents")
    requests_today = data(page, "[data-requests-today]", "data-requests-today")
    quota_percent = data(page, "[data-quota-percent]", "data-quota-percent")
    # 3 billed requests × (250,000 × 100 + 100,000 × 200) / 10⁶ ¢ = 135 ¢ (the error is not billed)
    assert spend == "135" and int(forecast) >= 135 and requests_today == "4" and quota_percent == "70.0"
    expect(page.locator("[data-error-rate]")).to_have_text("1 failed · 25.0 % error rate")
    expect(page.locator("[data-open-invoice]").get_by_role("link", name="Pay 1.00 USD")).to_have_attribute("href", "https://pay.example.test/i/1")
    expect(page.locator("main")).not_to_contain_text("Embedded mode")  # operator internals: staff only
    expect(page.locator("main")).not_to_contain_text("REDIS_URL")

    page.get_by_test_id("dash-spend").click()  # the figure links to its page
    expect(page.get_by_role("heading", level=1)).to_have_text("Billing")
    assert data(page, "[data-spend-cents]", "data-spend-cents") == spend == data(page, "[data-total-cents]", "data-total-cents")
    assert data(page, "[data-forecast-cents]", "data-forecast-cents") == forecast
    expect(page.locator("[data-price]").first).to_have_text(re.compile(r"1\.00 USD input\s*2\.00 USD output"))  # per 1M tokens, in money
    expect(page.locator("main")).not_to_contain_text("¢")
    expect(page.locator("main")).not_to_contain_text("T_in")
    expect(page.locator("[data-open-invoice]").get_by_role("link", name="Pay 1.00 USD")).to_be_visible()

    page.goto("/t/acme/")
    page.get_by_test_id("dash-today").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Usage")
    today = timezone.now().strftime("%Y-%m-%d")
    rows = page.locator("table tbody tr", has_text=today)
    assert sum(int(rows.nth(i).locator("td").nth(2).inner_text().replace(",", "")) for i in range(rows.count())) == int(requests_today)
    assert page.get_by_test_id("quota-percent").inner_text().replace("\u00a0", " ") == f"{quota_percent} %"


def test_the_planner_keeps_the_platforms_economics_to_staff(page, busy):
    world = busy
    sign_in(page, world.admin.email)
    page.goto(f"/t/acme/finetune/planner/?pool={BackendPool.objects.get().pk}&rank=8&memory_gb=1")
    expect(page.locator("main")).not_to_contain_text("per backend-hour")
    page.goto("/t/acme/limits/")
    expect(page.locator("main")).not_to_contain_text("Scheduling weight")


def test_deleting_a_file_asks_first(page, world, settings, tmp_path):
    settings.STORAGE_DIR = tmp_path / "storage"
    relative = f"tenants/{world.tenant.pk}/files/file-del.jsonl"
    (settings.STORAGE_DIR / relative).parent.mkdir(parents=True)
    (settings.STORAGE_DIR / relative).write_bytes(b'{"messages": []}\n')
    TrainingFile.all_tenants.create(id="file-del", tenant=world.tenant, filename="old.jsonl", bytes=17, path=relative, status="processed")
    sign_in(page, world.admin.email)
    page.goto("/t/acme/finetune/files/file-del/")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.get_by_role("button", name="Delete this file").click()
    expect(page.get_by_role("button", name="Delete this file")).to_be_visible()  # said no: still here
    assert asked and "cannot be recovered" in asked[0]
    assert TrainingFile.objects.for_tenant(world.tenant).filter(pk="file-del").exists()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete this file").click()
    expect(page.locator(".messages")).to_contain_text("Deleted old.jsonl")
    assert not TrainingFile.objects.for_tenant(world.tenant).filter(pk="file-del").exists()


def test_a_prompt_is_a_draft_tried_in_the_playground_then_made_live(page, world):
    services.system_prompt_save(tenant=world.tenant, text="Be brief.", note="live", actor=services.Actor(user=world.owner))
    sign_in(page, world.admin.email)
    page.goto("/t/acme/prompt/")
    page.get_by_label("System prompt").fill("Be kind.")
    page.get_by_role("button", name="Save draft").click()
    expect(page.get_by_role("status")).to_contain_text("Saved as draft version 2. It is not live yet")
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.text == "Be brief."  # saving changed nothing live

    page.get_by_role("link", name="Try v2 in the Playground").click()
    expect(page.locator("[data-trying]")).to_contain_text("Trying system prompt v2 (not live)")
    expect(page.locator("main details")).to_contain_text("Be kind.")
    page.locator("[data-trying]").get_by_role("link", name="Make v2 live…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Make system prompt v2 live?")
    expect(page.locator("main")).to_contain_text("in place of v1")
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 1  # the confirmation page changes nothing either
    page.get_by_role("button", name="Make v2 live").click()
    expect(page.get_by_role("status")).to_contain_text("Version 2 is now live")
    expect(page.locator('tr[data-version="2"] [data-active]')).to_be_visible()
    assert SystemPromptVersion.objects.for_tenant(world.tenant).count() == 2


def test_a_key_expiry_is_listed_as_picked(page, world):
    sign_in(page, world.admin.email)
    page.goto("/t/acme/keys/new/")
    page.get_by_label("Name").fill("summer")
    page.get_by_label("Expires on").fill("2027-06-30")
    page.get_by_role("button", name=re.compile("Create")).click()
    expect(page.locator("main")).to_contain_text("30 Jun 2027 (works until the end of that day, UTC)")
    page.goto("/t/acme/keys/")
    row = page.locator("tr", has_text="summer")
    expect(row).to_contain_text("30 Jun 2027")
    expect(row).not_to_contain_text("1 Jul 2027")
    assert ApiKey.objects.for_tenant(world.tenant).get(name="summer").expires_on == date(2027, 6, 30)
