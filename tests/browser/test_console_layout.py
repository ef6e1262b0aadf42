"""The console at phone width and in dark mode, its charts, and the staff pools page updating in place (headless
Chromium). Screenshots go to /tmp/console-*.png for docs/console.md."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from tests.support.browser import sign_in

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

expect = pytest.importorskip("playwright.sync_api", reason="needs the 'playwright' package").expect

PHONE = {"width": 390, "height": 844}


@pytest.fixture
def phone(browser, console):
    context = browser.new_context(base_url=console.url, viewport=PHONE, is_mobile=True, has_touch=True)
    context.set_default_timeout(10_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def dark(browser, console):
    context = browser.new_context(base_url=console.url, viewport={"width": 1280, "height": 800}, color_scheme="dark")
    context.set_default_timeout(10_000)
    page = context.new_page()
    yield page
    context.close()


def month_of_usage(tenant, days: int = 30):
    """Usage on every day of the last month on two models through two keys: the Usage page's worst case."""
    from serving.models import UsageRecord
    from tenants import services

    keys = [services.api_key_create(tenant=tenant, name=name, scopes=["inference"], actor=services.SYSTEM)[0] for name in ("batch-jobs", "web-app")]
    now = timezone.now()
    n = 0
    for day in range(days):
        for model in ("tiny-chat", "ft:tiny-chat:acme:support:1"):
            for key in keys:
                n += 1
                UsageRecord.all_tenants.create(tenant=tenant, request_id=f"m{n}", endpoint="chat", model=model, api_key=key,
                                               input_tokens=1000 + 37 * day, output_tokens=200, status="ok",
                                               created_at=now - timedelta(days=day))
    return keys


def test_phone_navigation_is_a_menu_button_naming_the_current_page(phone, world):
    sign_in(phone, world.owner.email)
    phone.goto("/t/acme/usage/")
    nav = phone.get_by_role("navigation", name="Acme")
    button = nav.get_by_role("button", name=re.compile(r"^Menu"))
    expect(button).to_be_visible()
    expect(button).to_have_attribute("aria-expanded", "false")
    expect(button).to_contain_text("Usage")  # the current page, not off-screen in a sideways strip
    expect(nav.get_by_role("link", name="Members")).to_be_hidden()
    button.click()
    expect(button).to_have_attribute("aria-expanded", "true")
    expect(nav.get_by_role("link", name="Members")).to_be_visible()
    expect(nav.get_by_role("link", name="Settings")).to_be_in_viewport()
    phone.screenshot(path="/tmp/console-phone-menu.png")
    phone.keyboard.press("Escape")
    expect(button).to_have_attribute("aria-expanded", "false")
    expect(button).to_be_focused()
    nav_box = nav.bounding_box()
    assert nav_box["height"] < 80  # folded: the page starts right under the menu button
    nav.get_by_role("button", name=re.compile(r"^Menu")).click()
    nav.get_by_role("link", name="Members").click()
    expect(phone).to_have_url(re.compile(r"/t/acme/members/$"))
    expect(phone.get_by_role("button", name=re.compile(r"^Menu"))).to_contain_text("Members")
    # The desktop keeps its side nav: no button.
    phone.set_viewport_size({"width": 1280, "height": 800})
    expect(phone.get_by_role("navigation", name="Acme").get_by_role("button", name=re.compile(r"^Menu"))).to_be_hidden()
    expect(phone.get_by_role("navigation", name="Acme").get_by_role("link", name="Members")).to_be_visible()


def test_phone_tables_collapse_into_cards_with_their_actions_in_view(phone, world):
    from tenants import services

    services.api_key_create(tenant=world.tenant, name="ci-deploy", scopes=["inference"], actor=services.SYSTEM)
    sign_in(phone, world.owner.email)
    phone.goto("/t/acme/keys/")
    row = phone.get_by_role("row").filter(has_text="ci-deploy")
    revoke = row.get_by_role("link", name=re.compile("Revoke")).or_(row.get_by_role("button", name=re.compile("Revoke"))).first
    expect(revoke).to_be_in_viewport()  # no sideways scrolling to reach it
    state = row.locator("[data-label='State']")
    expect(state).to_contain_text("Active")
    expect(state).to_be_in_viewport()
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than the phone
    assert row.evaluate("r => getComputedStyle(r).display") == "grid"  # a card, still a row to screen readers:
    assert row.evaluate("r => r.getAttribute('role')") == "row"
    phone.screenshot(path="/tmp/console-phone-keys.png", full_page=True)


def test_usage_page_fits_a_phone(phone, world):
    month_of_usage(world.tenant)
    sign_in(phone, world.owner.email)
    phone.goto("/t/acme/usage/")
    expect(phone.get_by_role("heading", name="Tokens per day, last 30 days")).to_be_visible()
    height = phone.evaluate("document.documentElement.scrollHeight")
    width = phone.evaluate("document.documentElement.scrollWidth")
    phone.screenshot(path="/tmp/console-phone-usage.png", full_page=True)
    print(f"Usage page on a 390 px phone, a month of usage on two models: {height} px tall")
    assert width <= PHONE["width"]
    assert height < 2600, height  # was 3,800 px with a month of usage (and 14,000 as plain cards)
    # A long table shows its first rows on a phone, and the rest on request.
    cards = phone.locator("#table-h").locator("xpath=ancestor::section").get_by_role("row")
    expect(cards.filter(visible=True)).to_have_count(1 + 6)  # the (hidden) header row counts as a row: 6 cards shown
    phone.get_by_role("button", name="Show all 60 rows").click()
    expect(cards.filter(visible=True)).to_have_count(1 + 60)


def test_usage_chart_has_axes_no_stretching_and_a_table_view(page, world):
    month_of_usage(world.tenant, days=3)
    sign_in(page, world.owner.email)
    page.goto("/t/acme/usage/")
    figure = page.locator("figure.chart").filter(has_text="Tokens per day")
    svg = figure.locator("svg")
    assert svg.get_attribute("viewBox") is None and svg.get_attribute("preserveAspectRatio") is None
    expect(figure).to_contain_text("y axis: tokens")
    expect(figure.locator(".chart-y")).to_contain_text("0")
    expect(figure.get_by_role("list", name="Legend")).to_contain_text("tiny-chat")
    expect(figure.get_by_role("list", name="Legend")).to_contain_text("ft:tiny-chat:acme:support:1")
    # Three days of usage in a 30-day period: 27 zero marks, three bars of a normal width.
    assert figure.locator("rect.chart-zero").count() == 27
    widths = {round(b["width"]) for b in (r.bounding_box() for r in figure.locator("rect.chart-bar").all())}
    assert max(widths) < 40
    # The table view by keyboard: Tab to "Table view", Enter opens it.
    summary = figure.get_by_text("Table view")
    summary.focus()
    page.keyboard.press("Enter")
    table = figure.get_by_role("table")
    expect(table).to_be_visible()
    expect(table.get_by_role("columnheader", name="Total")).to_be_visible()
    expect(table.get_by_role("row")).to_have_count(31)  # header + 30 days
    page.get_by_role("link", name="By API key").click()
    legend = page.locator("figure.chart").filter(has_text="Tokens per day").get_by_role("list", name="Legend")
    expect(legend).to_contain_text("batch-jobs")
    expect(legend).to_contain_text("web-app")
    page.screenshot(path="/tmp/console-usage-desktop.png", full_page=True)


def test_quota_history_is_coloured_by_state(page, world):
    from tenants.models import Policy

    Policy.all_tenants.filter(tenant=world.tenant).update(quota_tokens=100_000, quota_window="month")
    month_of_usage(world.tenant, days=3)  # ~10,000 tokens a day
    sign_in(page, world.owner.email)
    page.goto("/t/acme/usage/")
    history = page.locator("figure.chart").filter(has_text="Utilization at the end of each day")
    expect(history).to_be_visible()
    states = history.locator("g.chart-bar-group").evaluate_all("gs => gs.map(g => g.getAttribute('class'))")
    assert all("chart-state-ok" in s for s in states)  # well under 80 %: not warning-orange
    fill = history.locator("g.chart-state-ok rect.chart-bar").first.evaluate("r => getComputedStyle(r).fill")
    assert fill != history.locator("line.chart-mark-warn").evaluate("l => getComputedStyle(l).stroke")
    expect(history.get_by_role("list", name="Legend")).to_contain_text("Below 80 %")


def test_dark_mode_is_honoured_across_the_console_and_its_charts(dark, world):
    month_of_usage(world.tenant, days=5)
    sign_in(dark, world.owner.email)
    for url in ("/t/acme/", "/t/acme/usage/", "/t/acme/keys/", "/t/acme/billing/"):
        dark.goto(url)
        bg = dark.evaluate("getComputedStyle(document.body).backgroundColor")
        card = dark.evaluate("getComputedStyle(document.querySelector('.card, main')).backgroundColor")
        text = dark.evaluate("getComputedStyle(document.body).color")
        assert _luminance(bg) < 0.1 and _luminance(card) < 0.15 and _luminance(text) > 0.6, (url, bg, card, text)
    dark.goto("/t/acme/usage/")
    label = dark.locator(".chart-y").first.evaluate("e => getComputedStyle(e).color")
    assert _luminance(label) > 0.3  # axis labels readable on the dark card
    dark.screenshot(path="/tmp/console-dark-usage.png", full_page=True)


def test_staff_pools_page_updates_in_place(page, world):
    from serving.models import Backend, BackendPool, BaseModel

    world.owner.is_staff = True
    world.owner.save()
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat")
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev")
    Backend.objects.create(pool=pool, url="http://127.0.0.1:9/")
    sign_in(page, world.owner.email)
    page.goto("/staff/pools/")
    expect(page.locator("meta[http-equiv=refresh]")).to_have_count(0)
    page.evaluate("window.__notReloaded = true")
    BackendPool.objects.create(name="second-pool", base_model=base, kind="dev")
    expect(page.get_by_role("heading", name=re.compile("second-pool"))).to_be_visible(timeout=15_000)
    assert page.evaluate("window.__notReloaded === true")  # the same document: updated, not reloaded


def _luminance(css: str) -> float:
    r, g, b = (int(x) / 255 for x in re.findall(r"\d+", css)[:3])
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_phone_top_bar_fits_a_longer_tenant_name(phone, world):
    # Found trying the console as a new tenant admin (docs/console.md): "Northwind phone" pushed the account menu
    # 27 px past a 390 px screen, so every page scrolled sideways. The tenant's name is cut with an ellipsis instead.
    world.tenant.name = "Northwind Traders Europe"
    world.tenant.save(update_fields=["name"])
    sign_in(phone, world.owner.email)
    for path in ("/t/acme/", "/t/acme/keys/", "/t/acme/billing/"):
        phone.goto(path)
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], path
        expect(phone.locator(".menu-right > summary")).to_be_in_viewport(ratio=1)
    expect(phone.locator(".topbar .menu:not(.menu-right) summary strong")).to_have_text("Northwind Traders Europe")
