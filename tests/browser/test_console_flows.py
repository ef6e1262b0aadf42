"""The console as a new user meets it, in headless Chromium: sign up, invite, keys, system prompt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core import mail

from tenants.models import ApiKey, Membership, Tenant
from tests.conftest import PASSWORD

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

    page.get_by_role("link", name=re.compile("back to keys")).click()
    assert secret not in page.content()
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
    page.get_by_role("button", name="Save as new version").click()
    expect(page.get_by_role("status")).to_contain_text("Saved as version 1")

    page.get_by_label("System prompt").fill("You are Initech's assistant.\nAnswer in detail.")
    page.get_by_role("button", name="Save as new version").click()
    expect(page.locator('tr[data-version="2"] [data-active]')).to_be_visible()

    page.locator('tr[data-version="1"]').get_by_role("button", name=re.compile("Activate")).click()
    expect(page.get_by_role("status")).to_contain_text("Version 1 is now active")
    expect(page.locator('tr[data-version="1"] [data-active]')).to_be_visible()
    expect(page.locator('tr[data-version="2"] [data-active]')).to_have_count(0)
    expect(page.get_by_label("System prompt")).to_have_value("You are Initech's assistant.\nAnswer briefly.")

    page.locator('tr[data-version="2"]').get_by_role("link", name=re.compile(r"^Diff")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Changes from v1 to v2")
    expect(page.locator(".diff-del")).to_contain_text("Answer briefly.")
    expect(page.locator(".diff-add")).to_contain_text("Answer in detail.")
    expect(page.locator(".diff-same")).to_contain_text("You are Initech's assistant.")
