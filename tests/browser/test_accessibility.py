"""axe-core on every console page, with data present so tables, charts and lists render: zero serious or critical
violations, at desktop width, at phone width and in dark mode (colours change there, so contrast is checked again).

axe-core's script comes from the `axe-playwright-python` package (a test dependency, vendored in its wheel): nothing is
downloaded at test time. It is injected with `page.evaluate`, which the console's Content-Security-Policy allows.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone

from tests.support.browser import sign_in

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

axe_sync = pytest.importorskip("axe_playwright_python.sync_playwright", reason="needs the 'axe-playwright-python' package (pip install -e .[test])")

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
BLOCKING = {"serious", "critical"}


def seed(world) -> dict:
    """What a tenant in use has: keys, a pending invitation, two prompt versions, a month of usage on two models and
    two keys, rated cost, an invoice, a training file, a job with events, an adapter; a pool with a backend."""
    from billing import rating
    from billing.models import Invoice, Price
    from finetune.models import FineTuneJob, JobEvent, TrainingFile
    from serving.models import Adapter, Backend, BackendPool, BaseModel, UsageRecord
    from tenants import services

    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", context_length=1024)
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev")
    Backend.objects.create(pool=pool, url="http://127.0.0.1:9/")
    Price.objects.create(base_model=base, effective_from=date(2025, 1, 1), input_price=Decimal(50), output_price=Decimal(150),
                         training_price=Decimal(0))
    key, _ = services.api_key_create(tenant=world.tenant, name="batch-jobs", scopes=["inference"], actor=services.SYSTEM)
    other_key, _ = services.api_key_create(tenant=world.tenant, name="web-app", scopes=["inference"], actor=services.SYSTEM)
    services.invitation_create(tenant=world.tenant, email="new@acme.test", role="developer", actor=services.SYSTEM)
    services.system_prompt_save(tenant=world.tenant, text="You are terse.", note="first", actor=services.SYSTEM)
    services.system_prompt_save(tenant=world.tenant, text="You are terse and kind.", note="second", actor=services.SYSTEM)
    now = timezone.now()
    for i in range(12):
        UsageRecord.all_tenants.create(tenant=world.tenant, request_id=f"a11y-{i}", endpoint="chat", pool=pool,
                                       model="tiny-chat" if i % 3 else "ft:tiny-chat:acme:support:1",
                                       api_key=key if i % 2 else other_key, input_tokens=1000 + 10 * i, output_tokens=400,
                                       status="ok", created_at=now - timedelta(days=i * 2))
    for i in range(0, 4):
        rating.rate_day((now - timedelta(days=i)).date())
    Invoice.all_tenants.create(tenant=world.tenant, number="ACME-202601", period_start=date(2026, 1, 1), period_end=date(2026, 2, 1),
                               closed_at=now)
    file = TrainingFile.all_tenants.create(tenant=world.tenant, filename="support.jsonl", bytes=2048, path="x.jsonl",
                                           status=TrainingFile.Status.PROCESSED)
    job = FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=base, training_file=file, status=FineTuneJob.Status.RUNNING,
                                         hyperparameters={"n_epochs": 3, "batch_size": 8}, lora={"rank": 16})
    for i in range(30):
        JobEvent.all_tenants.create(tenant=world.tenant, job=job, message=f"step {i}: loss {2 - i / 20:.2f}")
    Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:support:1", base_model=base, path="/nonexistent")
    return {"file": file, "job": job, "key": key}


def tenant_pages(data) -> list[str]:
    t = "/t/acme/"
    return [
        t, t + "settings/", t + "members/", t + "members/leave/", t + "keys/", t + "keys/new/", t + f"keys/{data['key'].pk}/revoke/",
        t + "prompt/", t + "prompt/1/", t + "prompt/diff/1/2/", t + "limits/", t + "audit/", t + "models/", t + "playground/",
        t + "usage/", t + "usage/?by=key&days=90", t + "billing/", t + "billing/invoices/",
        t + "finetune/files/", t + f"finetune/files/{data['file'].pk}/", t + "finetune/jobs/", t + "finetune/jobs/new/",
        t + f"finetune/jobs/{data['job'].pk}/",
        t + "finetune/adapters/", t + "finetune/planner/", "/tenants/new/",
    ]


STAFF_PAGES = ["/staff/pools/", "/staff/billing/allocation/"]
SIGNED_OUT_PAGES = ["/login/", "/signup/", "/password-reset/"]


def blocking_violations(page) -> list[str]:
    results = axe_sync.Axe().run(page)
    found = []
    for v in results.response["violations"]:
        if v["impact"] in BLOCKING:
            targets = ", ".join(" ".join(n["target"]) if isinstance(n["target"], list) else str(n["target"]) for n in v["nodes"][:3])
            found.append(f"{v['id']} ({v['impact']}, {len(v['nodes'])}×: {targets})")
    return found


def walk(page, urls) -> dict[str, list[str]]:
    report = {}
    for url in urls:
        response = page.goto(url)
        assert response.status == 200, f"{url}: {response.status}"
        found = blocking_violations(page)
        if found:
            report[url] = found
    return report


def invoice_url(world) -> str:
    from billing.models import Invoice

    return f"/t/acme/billing/invoices/{Invoice.objects.for_tenant(world.tenant).get().pk}/"


@pytest.mark.parametrize("mode", ["desktop", "phone", "dark"])
def test_every_console_page_has_no_serious_or_critical_violations(browser, console, world, mode):
    data = seed(world)
    world.owner.is_staff = True
    world.owner.save()
    context = browser.new_context(base_url=console.url, viewport=PHONE if mode == "phone" else DESKTOP,
                                  color_scheme="dark" if mode == "dark" else "light")
    context.set_default_timeout(10_000)
    page = context.new_page()
    try:
        report = walk(page, SIGNED_OUT_PAGES)
        sign_in(page, world.owner.email)
        report |= walk(page, tenant_pages(data) + [invoice_url(world)] + STAFF_PAGES)
        if mode == "phone":  # the navigation menu opened, too
            page.goto("/t/acme/")
            page.get_by_role("button", name="Menu").click()
            if found := blocking_violations(page):
                report["/t/acme/ (menu open)"] = found
    finally:
        context.close()
    assert not report, "\n".join(f"{url}: {'; '.join(v)}" for url, v in report.items())
