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
AXE_OPTIONS = {"resultTypes": ["violations"], "rules": {"label-content-name-mismatch": {"enabled": True}}}


def seed(world) -> dict:
    """What a tenant in use has: keys, a pending invitation, two prompt versions, a month of usage on two models and
    two keys, rated cost, an invoice, a training file, a job with events, two versions of an adapter with a canary
    rollout; a pool with a backend."""
    from billing import rating
    from billing.models import Invoice, Price
    from finetune.models import FineTuneJob, JobEvent, TrainingFile
    from serving.models import Adapter, AdapterDeployment, AdapterRollout, Backend, BackendPool, BaseModel, UsageRecord
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
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:support:1", base_model=base, path="/nonexistent")
    v2 = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:support:2", base_model=base, path="/nonexistent")
    for version in (adapter, v2):  # a canary at 20 %: the Versions page's comparison, Promote and Roll back
        AdapterDeployment.all_tenants.create(tenant=world.tenant, adapter=version, pool=pool, state="active")
    AdapterRollout.all_tenants.create(tenant=world.tenant, name=adapter.name, current=adapter, canary=v2, canary_percent=20,
                                      canary_started_at=now - timedelta(days=30))
    from finetune.models import Evaluation, EvaluationRow

    evaluation = Evaluation.all_tenants.create(  # a finished evaluation: its table, chart and differing rows
        tenant=world.tenant, base_model=base, model=adapter.name, adapter=adapter, file=file, file_name=file.filename,
        status="succeeded", rows_total=2, rows_done=2,
        metrics={"base": {"rows": 2, "exact_match": 0.0, "contains": 0.5, "loss": 3.2},
                 "adapter": {"rows": 2, "exact_match": 1.0, "contains": 1.0, "loss": 0.4}, "differing_rows": 2})
    for i in range(2):
        EvaluationRow.all_tenants.create(tenant=world.tenant, evaluation=evaluation, index=i, line=i + 1,
                                         prompt=[{"role": "user", "content": f"Where is order {i}?"}],
                                         expected="Shipped today", base_answer="I do not know" if i else "It shipped today",
                                         adapter_answer="Shipped today", base_exact=False, adapter_exact=True,
                                         base_contains=bool(i == 0), adapter_contains=True, base_loss=3.2,
                                         adapter_loss=0.4, answer_tokens=3)
    return {"file": file, "job": job, "key": key, "adapter": adapter, "evaluation": evaluation}


def tenant_pages(world, data) -> list[str]:
    """Every page under /t/acme/ a GET can open, from the URL configuration itself (so a page added later is walked
    too), each object id taken from the seeded data; POST-only views (405), redirects and downloads are left out by
    `walk`. A pattern with an id that `seed` does not make is a test failure, so no page is skipped unseen."""
    from django.urls import get_resolver, reverse

    from billing.models import Invoice
    from tenants.models import Invitation, Membership

    ids = {
        "tenant_slug": "acme", "version": 1, "other_version": 2, "key_id": data["key"].pk,
        "membership_id": Membership.objects.for_tenant(world.tenant).get(user=world.developer).pk,
        "invitation_id": Invitation.objects.for_tenant(world.tenant).get().pk,
        "invoice_id": Invoice.objects.for_tenant(world.tenant).get().pk,
        "file_id": data["file"].pk, "job_id": data["job"].pk, "adapter_id": data["adapter"].pk,
        "evaluation_id": data["evaluation"].pk,
    }
    post_only_ids = {"delivery_id", "rollout_id"}  # a webhook delivery's only URL is its re-send, a rollout's promote and rollback (POST)
    urls, unknown = set(), set()
    resolver = get_resolver()
    for name in [k for k in resolver.reverse_dict if isinstance(k, str)]:
        for possibility, *_ in resolver.reverse_dict.getlist(name):
            for _, params in possibility:
                if not params or "tenant_slug" not in params:
                    continue
                if set(params) & post_only_ids:
                    continue
                if not set(params) <= ids.keys():
                    unknown.add(f"{name} {params}")
                    continue
                url = reverse(name, kwargs={p: ids[p] for p in params})
                if url.startswith("/t/acme/"):
                    urls.add(url)
    assert not unknown, f"seed() makes no object for these URL parameters: {sorted(unknown)}"
    return sorted(urls) + ["/t/acme/usage/?by=key&days=90", "/tenants/new/"]


STAFF_PAGES = ["/staff/pools/", "/staff/billing/allocation/"]
SIGNED_OUT_PAGES = ["/login/", "/signup/", "/password-reset/"]


def blocking_violations(page) -> list[str]:
    # label-content-name-mismatch is off by default in axe (experimental): on, a menu whose aria-label hides its
    # visible text (WCAG 2.5.3) is caught too.
    results = axe_sync.Axe().run(page, options=AXE_OPTIONS)
    found = []
    for v in results.response["violations"]:
        if v["impact"] in BLOCKING:
            targets = ", ".join(" ".join(n["target"]) if isinstance(n["target"], list) else str(n["target"]) for n in v["nodes"][:3])
            found.append(f"{v['id']} ({v['impact']}, {len(v['nodes'])}×: {targets})")
    return found


def walk(page, urls) -> dict[str, list[str]]:
    report = {}
    for url in urls:
        probe = page.request.get(url, max_redirects=0)  # the page's session; nothing rendered
        if probe.status in (302, 405) or "text/html" not in probe.headers.get("content-type", ""):
            continue  # a POST-only view, a redirect (to the payment portal, …), a CSV download
        response = page.goto(url)
        assert response.status == 200, f"{url}: {response.status}"
        WALKED.add(url)
        found = blocking_violations(page)
        if found:
            report[url] = found
    return report


WALKED: set[str] = set()


@pytest.mark.parametrize("mode", ["desktop", "phone", "dark"])
def test_every_console_page_has_no_serious_or_critical_violations(browser, console, world, mode):
    WALKED.clear()
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
        report |= walk(page, tenant_pages(world, data) + STAFF_PAGES)
        if mode == "phone":  # the navigation menu opened, too
            page.goto("/t/acme/")
            page.get_by_role("button", name="Menu").click()
            if found := blocking_violations(page):
                report["/t/acme/ (menu open)"] = found
    finally:
        context.close()
    print(f"axe-core ({mode}): {len(WALKED)} pages walked")
    assert len(WALKED) >= 30  # the URL configuration's pages, not an empty walk
    assert not report, "\n".join(f"{url}: {'; '.join(v)}" for url, v in report.items())
