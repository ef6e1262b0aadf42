"""The spend controls in the console and the management API: keys with usage and spend, key limits, rotation,
the monthly budget within the staff ceiling, alert settings and the webhook delivery log."""

from __future__ import annotations

from datetime import date

from django.urls import reverse
from rest_framework.test import APIClient

from billing import alerts
from tenants import services
from tenants.models import AlertEvent, ApiKey, AuditEvent, SpendBudget, WebhookDelivery
from tenants.services import Actor
from tests.support.billing import price, usage
from django.utils import timezone


def url(name, **kwargs):
    return reverse(name, kwargs={"tenant_slug": "acme", **kwargs})


def _key(world, name="ci"):
    return services.api_key_create(tenant=world.tenant, name=name, scopes=["inference"], actor=Actor(user=world.owner))


def test_the_keys_page_shows_each_keys_usage_and_spend_this_month(client, world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="200")
    used, _ = _key(world, "used")
    idle, _ = _key(world, "idle")
    record = usage(world.tenant, at=timezone.now(), pool=catalog.shared, inp=30_000, out=10_000)  # 3,000,000 + 2,000,000 µ¢ = 5 ¢
    type(record).all_tenants.filter(pk=record.pk).update(api_key=used)
    client.force_login(world.viewer)
    page = client.get(url("console-keys")).content.decode()
    row = page.split(f'data-key-prefix="{used.prefix}"')[1].split("</tr>")[0]
    assert '<span data-requests>1</span>' in row and '<span data-tokens>40,000</span>' in row and "0.05 USD" in row
    idle_row = page.split(f'data-key-prefix="{idle.prefix}"')[1].split("</tr>")[0]
    assert '<span data-tokens>0</span>' in idle_row and "0.00 USD" in idle_row
    assert "Rotate" not in page  # a viewer sees no write actions


def test_an_admin_sets_a_keys_limits_and_a_viewer_cannot(client, world, catalog):
    key, _ = _key(world)
    client.force_login(world.viewer)
    assert client.get(url("console-key-limits", key_id=key.pk)).status_code == 403
    client.force_login(world.admin)
    form = {"requests_per_minute": "30", "tokens_per_minute": "", "monthly_token_budget": "100000", "monthly_budget": "12.50",
            "allowed_models": ["tiny-chat"]}
    assert client.post(url("console-key-limits", key_id=key.pk), form).status_code == 302
    key.refresh_from_db()
    assert (key.requests_per_minute, key.tokens_per_minute, key.monthly_token_budget, key.monthly_budget_cents, key.allowed_models) == (
        30, 0, 100_000, 1250, ["tiny-chat"])
    refused = client.post(url("console-key-limits", key_id=key.pk), {**form, "allowed_models": ["not-ours"]})
    assert refused.status_code == 400


def test_rotation_in_the_console_shows_the_new_secret_once_and_keeps_the_old_one_for_the_grace(client, world):
    key, old = _key(world)
    client.force_login(world.admin)
    page = client.post(url("console-key-rotate", key_id=key.pk), {"grace": "3600"})
    assert page.status_code == 200 and page["Cache-Control"].startswith("max-age=0")
    new = page.content.decode().split('data-secret')[0].rsplit('value="', 1)[1].split('"')[0]
    assert new.startswith(key.prefix) and new != old
    assert services.api_key_authenticate(new).pk == services.api_key_authenticate(old).pk == key.pk
    assert "old secret valid until" in client.get(url("console-keys")).content.decode()
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="api_key.rotated").count() == 1


def test_the_budget_page_sets_a_budget_within_the_ceiling(client, world, catalog):
    services.policy_update(tenant=world.tenant, actor=Actor(user=world.owner), budget_ceiling_cents=5000)
    client.force_login(world.viewer)
    page = client.get(url("console-budget")).content.decode()
    assert "50.00 USD (hard)" in page and "Save budget" not in page
    assert client.post(url("console-budget"), {"monthly": "10", "mode": "hard"}).status_code == 403
    client.force_login(world.admin)
    too_much = client.post(url("console-budget"), {"monthly": "50.01", "mode": "hard"})
    assert too_much.status_code == 400 and "ceiling" in too_much.content.decode()
    assert client.post(url("console-budget"), {"monthly": "20", "mode": "hard"}).status_code == 302
    assert SpendBudget.objects.for_tenant(world.tenant).get().monthly_cents == 2000
    assert "20.00 USD" in client.get(url("console-budget")).content.decode()


def test_alert_settings_and_resend_are_for_admins(client, world, catalog):
    client.force_login(world.developer)
    assert client.get(url("console-alerts")).status_code == 403
    client.force_login(world.admin)
    admin_membership = services.Membership.objects.for_tenant(world.tenant).get(user=world.admin)
    response = client.post(url("console-alerts"), {"thresholds": "25, 90", "recipients": [str(admin_membership.pk)],
                                                   "webhook_url": "https://hooks.example.com/llm"})
    assert response.status_code == 302
    config = services.alert_settings_get(tenant=world.tenant)
    assert config.thresholds == [25, 90] and config.webhook_secret.startswith("whsec_")
    assert client.post(url("console-alerts"), {"thresholds": "25", "webhook_url": "http://hooks.example.com/"}).status_code == 400
    event = AlertEvent.objects.for_tenant(world.tenant).create(tenant=world.tenant, subject="budget", scope="tenant", period="202601",
                                                               threshold=25, used=1, limit=4)
    first = WebhookDelivery.objects.for_tenant(world.tenant).create(tenant=world.tenant, event=event, url=config.webhook_url,
                                                                     body=alerts.event_body(event), status="failed")
    assert f'data-delivery="{first.pk}"' in client.get(url("console-alerts")).content.decode()
    assert client.post(url("console-webhook-resend", delivery_id=first.pk)).status_code == 302
    again = WebhookDelivery.objects.for_tenant(world.tenant).exclude(pk=first.pk).get()
    assert (again.resend_of_id, again.body, again.status) == (first.pk, first.body, "pending")


def test_the_api_sets_key_limits_rotates_and_sets_the_budget(world, catalog):
    key, _ = _key(world)
    admin = APIClient()
    admin.force_login(world.admin)
    base = f"/api/tenants/acme/keys/{key.pk}/"
    response = admin.patch(base + "limits/", {"monthly_budget_cents": 500, "allowed_models": ["tiny-chat"]}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["monthly_budget_cents"] == 500 and response.json()["month_spend_microcents"] == 0
    assert admin.patch(base + "limits/", {"allowed_models": ["big-secret"]}, format="json").status_code == 400
    rotated = admin.post(base + "rotate/", {"grace_seconds": 60}, format="json").json()
    assert rotated["secret"].startswith(key.prefix) and rotated["previous_valid_until"]
    assert admin.put("/api/tenants/acme/budget/", {"monthly_cents": 900, "mode": "soft"}, format="json").json()["monthly_cents"] == 900

    viewer = APIClient()
    viewer.force_login(world.viewer)
    assert viewer.get(base + "limits/").status_code == 200
    assert viewer.patch(base + "limits/", {"monthly_budget_cents": 1}, format="json").status_code == 403
    assert viewer.post(base + "rotate/", {"grace_seconds": 0}, format="json").status_code == 403
    assert viewer.get("/api/tenants/acme/alerts/").status_code == 403
    outsider = APIClient()
    outsider.force_login(world.outsider)
    assert outsider.get(base + "limits/").status_code == 404
    other_key, _ = services.api_key_create(tenant=world.other_tenant, name="g", scopes=["inference"], actor=Actor(user=world.outsider))
    assert admin.patch(f"/api/tenants/acme/keys/{other_key.pk}/limits/", {"monthly_budget_cents": 1}, format="json").status_code == 404
    assert ApiKey.objects.for_tenant(world.other_tenant).get().monthly_budget_cents == 0


def test_amounts_are_written_as_elsewhere_in_the_console_and_the_inputs_name_their_currency(client, world):
    # Found trying the console as a new tenant admin: the dashboard and Billing write "0.00 USD", the Budget and
    # API keys pages wrote "USD 0.00", and the budget's input did not say in which currency to type it.
    client.force_login(world.admin)
    key, _ = services.api_key_create(tenant=world.tenant, name="k", scopes=["inference"], actor=services.SYSTEM)
    budget = client.get("/t/acme/budget/").content.decode()
    assert "0.00 USD" in budget and "USD 0.00" not in budget
    assert "Monthly budget (USD)" in budget
    assert "Spend per month (USD)" in client.get(f"/t/acme/keys/{key.pk}/limits/").content.decode()
    keys = client.get("/t/acme/keys/").content.decode()
    assert "0.00 USD" in keys and "USD 0.00" not in keys
