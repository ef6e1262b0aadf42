"""The console as a new user meets it, in headless Chromium: sign up, invite, keys, system prompt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core import mail

from tenants.models import ApiKey, Membership, Tenant
from tests.support.users import PASSWORD

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

expect = pytest.importorskip("playwright.sync_api", reason="needs the 'playwright' package").expect


def sign_up(page, email: str, org: str | None = None):
    """Fill the sign-up form as a person would. Without `org`, the page must be in 'join by invitation' mode."""
    page.get_by_label("Email").fill(email)
    if org:
        page.get_by_label("Organisation name").fill(org)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()


def side_nav(page, label: str):
    return page.locator("nav.sidebar").get_by_role("link", name=label, exact=True)


def test_sign_up_lands_on_dashboard(page):
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_role("link", name="Create an account").click()
    page.get_by_label("Organisation name").fill("Initech Labs")
    expect(page.get_by_label("URL name")).to_have_value("initech-labs")  # suggested while typing
    sign_up(page, "peter@initech.test", org="Initech Labs")
    expect(page).to_have_url(re.compile(r"/t/initech-labs/$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Initech Labs")
    expect(page.get_by_role("status")).to_contain_text("You are its owner")
    expect(page.locator(".sidebar a[aria-current=page]")).to_have_text("Dashboard")
    page.screenshot(path="/tmp/console-dashboard.png", full_page=True)
    assert Membership.objects.for_tenant(Tenant.objects.get(slug="initech-labs")).get().role == "owner"


def test_invited_person_signs_up_accepts_and_is_listed(page, browser, console):
    page.goto("/signup/")
    sign_up(page, "owner@initech.test", org="Initech")
    side_nav(page, "Members").click()
    page.get_by_label("Email").fill("milton@initech.test")
    page.get_by_label("Role", exact=True).select_option("developer")
    page.get_by_role("button", name="Send invitation").click()
    expect(page.get_by_role("status")).to_contain_text("Invitation sent to milton@initech.test")
    expect(page.locator("#inv-h + .table-wrap")).to_contain_text("milton@initech.test")

    link = re.search(r"https?://\S+/invitations/\S+/", mail.outbox[-1].body).group(0)
    assert link.startswith(console.url)
    other = browser.new_context()
    try:
        guest = other.new_page()
        guest.goto(link)
        expect(guest.get_by_role("heading", level=1)).to_have_text("Join Initech")
        expect(guest.locator(".facts")).to_contain_text("Developer")
        guest.get_by_role("link", name="Create an account").click()
        expect(guest.get_by_label("Email")).to_have_value("milton@initech.test")
        sign_up(guest, "milton@initech.test")
        guest.get_by_role("button", name="Accept invitation").click()
        expect(guest).to_have_url(re.compile(r"/t/initech/$"))
        expect(guest.get_by_role("status")).to_contain_text("You joined Initech as developer")
    finally:
        other.close()

    page.reload()
    row = page.locator("tr", has_text="milton@initech.test")
    expect(row).to_contain_text("Developer")
    expect(page.locator("#inv-h ~ .empty")).to_contain_text("No pending invitations")


def test_key_secret_is_shown_once_and_revoked(page):
    page.goto("/signup/")
    sign_up(page, "bill@initech.test", org="Initech")
    side_nav(page, "API keys").click()
    expect(page.get_by_text("No API keys yet.")).to_be_visible()
    page.get_by_role("link", name="Create your first key").click()
    page.get_by_label("Name").fill("production")
    page.get_by_label("Fine-tuning").check()
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("Your new API key").input_value()
    assert secret.startswith("mtl_")
    expect(page.get_by_role("alert")).to_contain_text("shown only once")
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("[data-copy-status]")).to_have_text("Copied to the clipboard.")
    expect(page.get_by_role("link", name=re.compile("back to keys"))).to_be_visible()
    page.reload()  # the browser posts the form again: no second key, and the secret is not shown again
    expect(page.get_by_role("status")).to_contain_text("already submitted")
    expect(page).to_have_url(re.compile(r"/keys/$"))
    assert secret not in page.content() and ApiKey.objects.for_tenant(Tenant.objects.get(slug="initech")).count() == 1
    row = page.locator("tr", has_text="production")
    expect(row.locator(".state")).to_have_text("Active")
    page.screenshot(path="/tmp/console-keys.png", full_page=True)

    row.get_by_role("link", name=re.compile("Revoke")).click()
    page.get_by_role("button", name="Revoke key").click()
    expect(page.get_by_role("status")).to_contain_text("is revoked")
    expect(page.locator("tr", has_text="production").locator(".state")).to_have_text("Revoked")
    assert ApiKey.objects.for_tenant(Tenant.objects.get(slug="initech")).get().revoked_at is not None


def test_prompt_edits_roll_back_and_diff(page):
    page.goto("/signup/")
    sign_up(page, "joanna@initech.test", org="Initech")
    side_nav(page, "System prompt").click()
    editor = page.get_by_label("System prompt")
    editor.fill("You are Initech's assistant.\nAnswer briefly.")
    expect(page.locator("[data-count]")).to_have_text("44")
    page.get_by_label("Note").fill("first draft")
    page.get_by_role("button", name="Save draft").click()
    expect(page.get_by_role("status")).to_contain_text("Saved as draft version 1")
    page.get_by_role("link", name="Make v1 live…").click()
    page.get_by_role("button", name="Make v1 live").click()
    expect(page.get_by_role("status")).to_contain_text("Version 1 is now live")

    page.get_by_label("System prompt").fill("You are Initech's assistant.\nAnswer in detail.")
    page.get_by_role("button", name="Save draft").click()
    side_nav(page, "System prompt").click()
    expect(page.locator('tr[data-version="2"] [data-draft]')).to_be_visible()
    expect(page.locator('tr[data-version="1"] [data-active]')).to_be_visible()  # the draft is not live

    page.locator('tr[data-version="2"]').get_by_role("link", name=re.compile("Make live")).click()
    page.get_by_role("button", name="Make v2 live").click()
    expect(page.get_by_role("status")).to_contain_text("Version 2 is now live")
    page.locator('tr[data-version="1"]').get_by_role("link", name=re.compile("Make live")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Make system prompt v1 live?")
    page.get_by_role("button", name="Make v1 live").click()
    expect(page.get_by_role("status")).to_contain_text("Version 1 is now live")
    expect(page.locator('tr[data-version="1"] [data-active]')).to_be_visible()
    expect(page.locator('tr[data-version="2"] [data-active]')).to_have_count(0)

    page.locator('tr[data-version="2"]').get_by_role("link", name=re.compile(r"^Diff")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Changes from v1 to v2")
    expect(page.locator(".diff-del")).to_contain_text("Answer briefly.")
    expect(page.locator(".diff-add")).to_contain_text("Answer in detail.")
    expect(page.locator(".diff-same")).to_contain_text("You are Initech's assistant.")


def test_usage_period_grouping_and_csv_download(page):
    from datetime import timedelta

    from django.utils import timezone

    from serving.models import UsageRecord
    from tenants import services

    page.goto("/signup/")
    sign_up(page, "milton@initech.test", org="Initech")
    tenant = Tenant.objects.get(slug="initech")
    key, _ = services.api_key_create(tenant=tenant, name="batch-jobs", scopes=["inference"], actor=services.SYSTEM)
    for i, days_ago in enumerate([0, 1, 45]):
        UsageRecord.all_tenants.create(tenant=tenant, request_id=f"u{i}", endpoint="chat", model="tiny-chat", api_key=key,
                                       input_tokens=1000, output_tokens=500, status="ok",
                                       created_at=timezone.now() - timedelta(days=days_ago))
    side_nav(page, "Usage").click()
    expect(page.get_by_role("heading", name="Tokens per day, last 30 days")).to_be_visible()
    expect(page.locator("dl.facts")).to_contain_text("Input tokens2,000")  # 2 requests in 30 days
    page.get_by_role("navigation", name="Period").get_by_role("link", name="90 days").click()
    expect(page.get_by_role("heading", name="Tokens per day, last 90 days")).to_be_visible()
    expect(page.locator("dl.facts")).to_contain_text("Input tokens3,000")
    page.get_by_role("link", name="By API key").click()
    expect(page.get_by_role("heading", name="Per day and API key")).to_be_visible()
    expect(page.locator("section[aria-labelledby=table-h] tbody tr")).to_have_count(3)
    expect(page.locator("section[aria-labelledby=table-h] tbody tr").first).to_contain_text("batch-jobs")
    page.screenshot(path="/tmp/console-usage.png", full_page=True)
    with page.expect_download() as info:
        page.get_by_role("link", name="Download CSV").click()
    download = info.value
    assert download.suggested_filename.startswith("usage-initech-") and download.suggested_filename.endswith(".csv")
    lines = Path(download.path()).read_text().splitlines()
    assert lines[0].startswith("day,model,api_key_name") and len(lines) == 4  # the 90 days shown: 3 rows
