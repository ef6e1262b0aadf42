"""Spend controls in a browser, enforced by the real gateway (issue 14, items 1-3): a tenant admin sets a hard monthly
budget and a key's monthly spend budget in the console and requests past each are refused (429 `insufficient_quota`,
through the official `openai` SDK); alerts crossing a threshold send an e-mail and a signed webhook whose delivery is
in the console's log and can be sent again; a key rotated in the console keeps its old secret for the grace period,
then the old one is refused with 401.

The console and the gateway are one ASGI app (`portal.asgi`, as deployed) under uvicorn in a thread, so the browser's
pages and the gateway read and write the same test database; a simulated dev backend answers behind the gateway.
Django's `live_server` cannot serve this: it has no gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core import mail
from django.utils import timezone

from billing import spend
from billing.models import format_cents
from serving.models import UsageRecord
from tenants import services
from tenants.models import WebhookDelivery
from tests.support.live_console import console_with_gateway, desktop_page
from tests.support.webhooks import Receiver
from tests.support.billing import price
from tests.support.browser import sign_in
from tests.support.gateway import make_base_model, make_pool, set_model_config, sim_backend, wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]
expect = pytest.importorskip("playwright.sync_api", reason="browser tests need the 'playwright' package").expect
openai = pytest.importorskip("openai", reason="these tests call the gateway with the official openai SDK")

# 5,000 ¢ per million tokens in and out: 5,000 µ¢ a token. A request (a short prompt, max_tokens 5, 6 tokens back at
# most) costs well under a tenth of a cent and reserves its bound (the prompt's bound + max_tokens) of about half a cent.
PRICE = "5000"


@pytest.fixture
def served(world):
    url, stop = sim_backend(sim_output_tokens=6)
    base = make_base_model()
    make_pool("shared", base, [url])
    set_model_config(world.tenant, default_model="tiny-chat")
    price(base, effective_from=date.today() - timedelta(days=40), inp=PRICE, out=PRICE)
    yield url
    stop()


@pytest.fixture
def server(transactional_db, dead_threads_connections_closed, settings, monkeypatch, served):
    """portal.asgi (console + gateway) under uvicorn; e-mail kept in memory."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    with console_with_gateway(settings, monkeypatch) as srv:
        yield srv


@pytest.fixture
def page(browser, server):
    with desktop_page(browser, server.url) as page:
        yield page


def client(server, secret: str):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=30)


def chat(server, secret: str):
    return client(server, secret).chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)


def gateway_sees(server, predicate, what: str):
    """Wait until the gateway's configuration snapshot (polled every 0.1 s) satisfies `predicate`."""
    assert wait_for(lambda: predicate(server.gateway.store.snapshot)), f"the gateway never saw {what}"


def key_entry(snap, key):
    return snap.keys.get(key.prefix)


def new_key(server, tenant, name: str = "test"):
    """A key of the tenant's (made as the console's Create key makes it), once the gateway knows it. Made again if the
    in-memory SQLite database was locked by the gateway's writes (wait_for: shared cache has no busy timeout)."""
    key, secret = wait_for(lambda: services.api_key_create(tenant=tenant, name=name, scopes=["inference"], actor=services.SYSTEM))
    gateway_sees(server, lambda snap: key_entry(snap, key) is not None, "the new key")
    return key, secret


def send_until_refused(server, secret: str, limit: int = 80):
    """Requests one after another until one is refused: (how many were served, the refusal)."""
    for served in range(limit):
        try:
            chat(server, secret)
        except openai.RateLimitError as exc:
            return served, exc
    raise AssertionError(f"{limit} requests were all served")


def ledger_month(tenant, served: int):
    """This month's ledger spend by key, once it holds all `served` requests."""
    start, end = spend.month_bounds()

    def done():
        usage = spend.ledger_usage_by_key(tenant=tenant, start=start, end=end)
        return usage if sum(u.requests for u in usage.values()) == served else None

    return wait_for(done) or spend.ledger_usage_by_key(tenant=tenant, start=start, end=end)


def test_a_hard_monthly_budget_and_a_keys_budget_set_in_the_console_refuse_requests_past_them(page, world, server):
    tenant = world.tenant
    key, secret = new_key(server, tenant)
    sign_in(page, world.admin.email)

    # The tenant's hard budget: 2 cents this month.
    page.goto("/t/acme/budget/")
    page.get_by_label("Monthly budget").fill("0.02")
    page.get_by_label("Hard (refuse requests past it)").check()
    page.get_by_role("button", name="Save budget").click()
    expect(page.locator("[data-hard]")).to_contain_text("0.02")
    gateway_sees(server, lambda snap: getattr(snap.budget_limits_for(tenant.pk, key_entry(snap, key)), "tenant_hard_microcents", 0)
                 == 2 * spend.MICROCENTS_PER_CENT, "the budget")

    served, refusal = send_until_refused(server, secret)
    assert served >= 2, served  # the budget held several requests, then refused
    assert (refusal.status_code, refusal.code) == (429, "insufficient_quota")
    assert "Your organisation has reached its monthly budget" in refusal.message
    assert refusal.response.headers.get("retry-after")
    spent = sum(u.microcents for u in ledger_month(tenant, served).values())
    assert 0 < spent <= 2 * spend.MICROCENTS_PER_CENT  # overshoot 0
    page.reload()  # the page's figure is the ledger's
    expect(page.locator("[data-spent]")).to_contain_text(format_cents(spend.cents_from_microcents(spent)))

    # Raise the tenant's budget; a second key gets a monthly spend budget of its own (1 cent) on its Limits page.
    page.get_by_label("Monthly budget").fill("5.00")
    page.get_by_role("button", name="Save budget").click()
    expect(page.locator("[data-hard]")).to_contain_text("5.00")
    gateway_sees(server, lambda snap: getattr(snap.budget_limits_for(tenant.pk, key_entry(snap, key)), "tenant_hard_microcents", 0)
                 == 500 * spend.MICROCENTS_PER_CENT, "the raised budget")
    limited, limited_secret = new_key(server, tenant, "limited")
    page.goto("/t/acme/keys/")
    page.get_by_role("link", name="Limits of limited").click()
    page.get_by_label("Spend per month").fill("0.01")
    page.get_by_role("button", name="Save limits").click()
    expect(page.get_by_text("Limits of “limited” saved.")).to_be_visible()
    gateway_sees(server, lambda snap: getattr(snap.budget_limits_for(tenant.pk, key_entry(snap, limited)), "key_month_microcents", 0)
                 == spend.MICROCENTS_PER_CENT, "the key's budget")

    before = served
    key_served, key_refusal = send_until_refused(server, limited_secret)
    assert key_served >= 1, key_served
    assert (key_refusal.status_code, key_refusal.code) == (429, "insufficient_quota")
    assert "This API key has reached its monthly spend budget" in key_refusal.message
    chat(server, secret)  # the tenant's other key is not held by that key's budget
    by_key = ledger_month(tenant, before + key_served + 1)
    assert 0 < by_key[limited.pk].microcents <= 1 * spend.MICROCENTS_PER_CENT  # overshoot 0
    page.goto("/t/acme/keys/")
    row = page.locator(f'tr[data-key-prefix="{limited.prefix}"]')  # its requests and spend this month, from the ledger
    expect(row.locator("[data-requests]")).to_have_text(str(key_served))
    expect(row.locator("[data-spend]")).to_have_text(f"{format_cents(spend.cents_from_microcents(by_key[limited.pk].microcents))} USD")
    expect(row).to_contain_text("% of its budget")


@pytest.fixture
def receiver(settings):
    settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = True
    r = Receiver(status=204, path="/hooks/llm")
    yield r
    r.close()


@pytest.fixture
def eager_tasks():
    """Celery tasks run where they are queued (as a worker would run them, at once): the webhook deliveries."""
    from portal.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def signed(headers: dict, body: bytes, secret: str) -> bool:
    expected = "v1=" + hmac.new(secret.encode(), headers["X-Platform-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Platform-Signature"], expected)


def test_crossing_a_threshold_sends_an_email_and_a_signed_webhook_shown_in_the_delivery_log_and_resent(
        page, world, server, receiver, eager_tasks):
    from billing.alert_tasks import alerts_check_all

    tenant = world.tenant
    key, secret = new_key(server, tenant)
    sign_in(page, world.owner.email)
    page.goto("/t/acme/budget/")
    page.get_by_label("Monthly budget").fill("0.01")
    page.get_by_label("Soft (alerts only)").check()
    page.get_by_role("button", name="Save budget").click()
    expect(page.locator("[data-budget]")).to_contain_text("soft")

    page.goto("/t/acme/alerts/")
    page.get_by_label("Thresholds (%)").fill("50")
    page.get_by_label("admin@acme.test (admin)").check()
    page.get_by_label("Webhook URL").fill(receiver.url)
    page.get_by_role("button", name="Save alert settings").click()
    expect(page.get_by_text("Alert settings saved.")).to_be_visible()
    webhook_secret = page.locator("[data-webhook-secret]").inner_text().strip()
    assert webhook_secret

    # Half of the cent spent through the gateway (a soft budget refuses nothing), then the minute's check runs.
    served = 0
    while sum(u.microcents for u in ledger_month(tenant, served).values()) < spend.MICROCENTS_PER_CENT // 2:
        chat(server, secret)
        served += 1
        assert served < 60
    assert wait_for(alerts_check_all) == 1  # the minute's check (Celery beat)

    [email] = mail.outbox
    assert email.to == ["admin@acme.test"] and "50" in email.subject + email.body
    [(headers, body)] = receiver.requests
    assert signed(headers, body, webhook_secret)  # the secret the console shows
    payload = json.loads(body)
    assert (payload["type"], payload["tenant"], payload["threshold_percent"], payload["unit"]) == (
        "alert.threshold_crossed", "acme", 50, "cents")
    assert alerts_check_all() == 0 and len(receiver.requests) == 1  # once per threshold and period

    # The console shows the alert and the delivery; Re-send sends the same body again, newly signed, as a new delivery.
    page.reload()
    [first] = wait_for(lambda: list(WebhookDelivery.objects.for_tenant(tenant)))
    row = page.locator(f'tr[data-delivery="{first.pk}"]')
    expect(row).to_contain_text("Delivered")
    expect(row).to_contain_text("HTTP 204")
    expect(page.locator("section", has_text="Alerts sent")).to_contain_text("50")
    row.get_by_role("button", name=f"Re-send delivery {first.pk}").click()
    again = wait_for(lambda: WebhookDelivery.objects.for_tenant(tenant).exclude(pk=first.pk).first())
    expect(page.get_by_text(f"Delivery {first.pk} queued again as delivery {again.pk}.")).to_be_visible()
    assert wait_for(lambda: len(receiver.requests) == 2)
    headers2, body2 = receiver.requests[1]
    assert body2 == body and signed(headers2, body2, webhook_secret)
    assert headers2["X-Platform-Delivery"] != headers["X-Platform-Delivery"]
    page.reload()
    expect(page.locator(f'tr[data-delivery="{again.pk}"]')).to_contain_text(f"re-send of {first.pk}")
    expect(page.locator(f'tr[data-delivery="{again.pk}"]')).to_contain_text("Delivered")


def test_a_key_rotated_in_the_console_keeps_its_old_secret_for_the_grace_period_then_refuses_it(page, world, server, monkeypatch):
    from serving.gateway import auth

    key, old = new_key(server, world.tenant)
    chat(server, old)
    sign_in(page, world.admin.email)
    page.goto("/t/acme/keys/")
    page.get_by_role("link", name="Rotate test").click()
    page.get_by_label("Keep the old secret working for").select_option(label="1 hour")
    page.get_by_role("button", name="Rotate key").click()
    expect(page.get_by_role("heading", name="Key “test” rotated")).to_be_visible()
    new = page.locator("[data-secret]").input_value()
    assert new != old and new.startswith(key.prefix + "_")
    expect(page.get_by_text("The old secret is accepted until")).to_be_visible()

    gateway_sees(server, lambda snap: key_entry(snap, key).previous_valid_until is not None, "the rotation")
    chat(server, new)  # the new secret works
    chat(server, old)  # and the old one, during the grace period

    # The gateway's clock past the grace's end (an hour and a minute later): the old secret is refused, the new one works.
    later = timezone.now() + timedelta(hours=1, minutes=1)
    monkeypatch.setattr(auth, "timezone", SimpleNamespace(now=lambda: later))
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(server, old)
    assert (refused.value.status_code, refused.value.code) == (401, "invalid_api_key")
    chat(server, new)
    assert wait_for(lambda: UsageRecord.objects.for_tenant(world.tenant).filter(api_key=key).count() == 4)  # one key's usage
