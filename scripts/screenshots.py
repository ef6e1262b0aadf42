"""The console's screenshots in docs/console.md, taken in Debian's Chromium (headless, through Playwright).

Against a console started by scripts/up.sh (a fresh clone is best: a new database), e.g.

    PORT=8730 BACKEND_PORT=8731 bash scripts/up.sh &
    .venv/bin/python scripts/screenshots.py --url http://127.0.0.1:8730

1. A new tenant admin's first visit: signs up a new organisation, then the dashboard, Billing (and Budget & alerts,
   API keys) at 1280x800 and as a phone (390x844, touch), then the Playground on each (one message at temperature 0.2,
   max_tokens 48, its answer awaited): docs/img/first-visit-*.jpg.
2. With --seed (the script then writes to the console's database: run it with the same PLATFORM_VAR_DIR /
   DATABASE_URL as the console, and the same code: from the clone): that tenant given usage today (one request
   failed on the platform's side), last month's usage closed into an unpaid invoice, and a monthly token quota; the
   dashboard and Billing at 1280 wide, whole pages: docs/img/console-dashboard.jpg and console-billing.jpg.

Prints each page's load time (navigation to network idle), console errors and failed requests. JPEG, quality 80.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]  # as tests/support/browser.py
PASSWORD = "screenshots-" + uuid.uuid4().hex[:12]
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 1}


class Visit:
    """One browser context (desktop or phone) with its console errors and failed requests recorded."""

    def __init__(self, browser, url: str, device: dict, name: str):
        self.context = browser.new_context(base_url=url, **device)
        self.context.set_default_timeout(60_000)
        self.page = self.context.new_page()
        self.name, self.problems = name, []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))

    def goto(self, path: str) -> float:
        start = time.monotonic()
        response = self.page.goto(path, wait_until="networkidle")
        elapsed = time.monotonic() - start
        print(f"  {self.name}: {path} {response.status} in {elapsed:.2f} s")
        return elapsed

    def shot(self, out: Path, *, full_page: bool = False) -> None:
        self.page.screenshot(path=str(out), type="jpeg", quality=80, full_page=full_page)
        print(f"  {self.name}: wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def sign_up(visit: Visit, email: str, org: str) -> str:
    page = visit.page
    visit.goto("/signup/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Organisation name").fill(org)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url("**/t/*/", wait_until="networkidle")
    return page.url.rstrip("/").rsplit("/", 1)[-1]


def sign_in(visit: Visit, email: str) -> None:
    page = visit.page
    visit.goto("/login/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/t/*/", wait_until="networkidle")


def playground(visit: Visit, slug: str, message: str) -> None:
    page = visit.page
    visit.goto(f"/t/{slug}/playground/")
    # A short, sober answer: the defaults (temperature 1, 256 tokens) take minutes on a busy CPU and ramble.
    page.get_by_label("temperature").fill("0.2")
    page.get_by_label("max_tokens").fill("48")
    page.get_by_label("Your message").fill(message)
    start = time.monotonic()
    page.get_by_role("button", name="Send").click()
    try:
        page.locator("#pg-status-a").filter(has_text="output tokens").wait_for(timeout=180_000)
    except Exception:
        page.screenshot(path=f"/tmp/screenshots-playground-{visit.name}.png")
        raise SystemExit(f"{visit.name}: no answer in the Playground: {page.locator('#pg-status-a').inner_text()!r}, "
                         f"{page.locator('#pg-status').inner_text()!r} (/tmp/screenshots-playground-{visit.name}.png)")
    status = page.locator("#pg-status-a").inner_text()
    print(f"  {visit.name}: answered in {time.monotonic() - start:.1f} s: {status}")


def first_visit(browser, url: str, out: Path, email: str, org: str) -> str:
    print("First visit")
    desktop = Visit(browser, url, DESKTOP, "desktop")
    slug = sign_up(desktop, email, org)
    phone = Visit(browser, url, PHONE, "phone")
    sign_in(phone, email)
    visits = ((desktop, "desktop"), (phone, "phone"))
    for visit, suffix in visits:  # both dashboards before any request: as a new tenant sees them
        visit.goto(f"/t/{slug}/")
        visit.shot(out / f"first-visit-dashboard-{suffix}.jpg")
        visit.goto(f"/t/{slug}/billing/")
        visit.shot(out / f"first-visit-billing-{suffix}.jpg")
        for path in (f"/t/{slug}/budget/", f"/t/{slug}/keys/"):
            visit.goto(path)
    for visit, suffix in visits:
        playground(visit, slug, "What is the capital of France?")
        visit.shot(out / f"first-visit-playground-{suffix}.jpg")
    for visit in (desktop, phone):
        print(f"  {visit.name}: " + ("; ".join(visit.problems) if visit.problems else "no console errors, no failed requests"))
        visit.context.close()
    return slug


def seed(slug: str) -> None:
    """Usage today (five requests: one cancelled by the client, one an error on the platform's side), last month's usage
    invoiced and unpaid, a monthly quota of 2,000,000 tokens: what the busy-tenant screenshots show."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    # Playwright's sync API runs an event loop in this thread; nothing here is async (as tests/browser/conftest.py).
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    import django

    django.setup()
    from datetime import datetime, timedelta, timezone as dt_timezone

    from django.utils import timezone

    from billing import invoicing
    from serving.models import BackendPool, UsageRecord
    from tenants import services
    from tenants.models import Tenant

    tenant = Tenant.objects.get(slug=slug)
    pool = BackendPool.objects.filter(dedicated_tenant__isnull=True).select_related("base_model").first()
    model = pool.base_model.name
    now = timezone.now()
    for i, status in enumerate(("ok", "ok", "ok", "cancelled", "error")):
        UsageRecord.all_tenants.create(tenant=tenant, request_id=f"shot-{uuid.uuid4().hex[:8]}-{i}", endpoint="chat",
                                       model=model, pool=pool, input_tokens=250_000, output_tokens=100_000, status=status,
                                       created_at=now - timedelta(minutes=10 * i))
    first = now.date().replace(day=1)
    previous = (first - timedelta(days=1)).replace(day=1)
    UsageRecord.all_tenants.create(tenant=tenant, request_id=f"shot-{uuid.uuid4().hex[:8]}-last-month", endpoint="chat",
                                   model=model, pool=pool, input_tokens=1_000_000, output_tokens=200_000, status="ok",
                                   created_at=datetime(previous.year, previous.month, 5, 12, tzinfo=dt_timezone.utc))
    # Unpaid, as every invoice is in the embedded setup (no Stripe: no payment page, and the page says so).
    invoices = invoicing.period_close(period=previous, now=now, tenant=tenant)
    services.policy_update(tenant=tenant, actor=services.SYSTEM, quota_tokens=2_000_000, quota_window="month")
    print(f"Seeded {slug}: 5 requests today on {model}, {len(invoices)} invoice(s) for {previous:%B %Y}")


def busy(browser, url: str, out: Path, email: str, slug: str) -> None:
    print("Busy tenant")
    desktop = Visit(browser, url, DESKTOP, "desktop")
    sign_in(desktop, email)
    desktop.goto(f"/t/{slug}/")
    desktop.shot(out / "console-dashboard.jpg", full_page=True)
    desktop.goto(f"/t/{slug}/billing/")
    desktop.shot(out / "console-billing.jpg", full_page=True)
    print(f"  {desktop.name}: " + ("; ".join(desktop.problems) if desktop.problems else "no console errors, no failed requests"))
    desktop.context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the console (scripts/up.sh)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--org", default="Northwind Traders")
    parser.add_argument("--seed", action="store_true", help="then seed usage and an unpaid invoice: console-*.jpg")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    email = f"admin-{uuid.uuid4().hex[:6]}@northwind.test"
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        slug = first_visit(browser, args.url, args.out, email, args.org)
        if args.seed:
            seed(slug)
            busy(browser, args.url, args.out, email, slug)
        browser.close()


if __name__ == "__main__":
    main()
