"""Console pages of the serving app: usage with quota utilization, models and model settings, playground."""

from __future__ import annotations

import pytest
from django.urls import reverse

from serving.models import BackendPool, BaseModel, ModelConfig, UsageRecord
from tenants import services
from tenants.models import AuditEvent
from tests.support.users import PASSWORD


@pytest.fixture
def served(world):
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", context_length=1024)
    BackendPool.objects.create(name="shared", base_model=base, kind="dev")
    return base


def login(client, user):
    assert client.login(username=user.username, password=PASSWORD)


def test_usage_page_shows_rows_gauge_and_warning(client, world, served):
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=1000, quota_mode="soft", quota_window="month")
    for i, (inp, out) in enumerate([(300, 200), (250, 100)]):
        UsageRecord.all_tenants.create(tenant=world.tenant, request_id=f"r{i}", endpoint="chat", model="tiny-chat", input_tokens=inp, output_tokens=out, status="ok")
    UsageRecord.all_tenants.create(tenant=world.other_tenant, request_id="other", endpoint="chat", model="tiny-chat", input_tokens=10**6, output_tokens=0, status="ok")
    login(client, world.viewer)
    page = client.get(reverse("console-usage", args=["acme"]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "85.0 %" in html  # U = 850 / 1000, the other tenant's million tokens not counted
    assert "You have used 85 % of your quota" in html
    assert "tiny-chat" in html and "850" in html


def test_usage_page_without_usage_says_peak_zero(client, world, served):
    login(client, world.viewer)
    html = client.get(reverse("console-usage", args=["acme"])).content.decode()
    assert "Tokens per day (input + output), by model · y axis: tokens · peak 0 tokens" in html and "peak 1 " not in html


def test_usage_page_says_throttled_and_exhausted(client, world, served):
    UsageRecord.all_tenants.create(tenant=world.tenant, request_id="big", endpoint="chat", model="tiny-chat", input_tokens=1000, output_tokens=1, status="ok")
    login(client, world.viewer)
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=1000, quota_mode="soft")
    assert "your requests are throttled" in client.get(reverse("console-usage", args=["acme"])).content.decode()
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_mode="hard")
    assert "requests are refused" in client.get(reverse("console-usage", args=["acme"])).content.decode()


def _usage(tenant, request_id, *, days_ago=0, key=None, model="tiny-chat", tokens=(10, 5)):
    from datetime import timedelta

    from django.utils import timezone

    UsageRecord.all_tenants.create(tenant=tenant, request_id=request_id, endpoint="chat", model=model, api_key=key,
                                   input_tokens=tokens[0], output_tokens=tokens[1], status="ok",
                                   created_at=timezone.now() - timedelta(days=days_ago))


def test_usage_page_periods_and_rows_by_api_key(client, world, served):
    ci, _ = services.api_key_create(tenant=world.tenant, name="ci", scopes=["inference"], actor=services.SYSTEM)
    old, _ = services.api_key_create(tenant=world.tenant, name="old-prod", scopes=["inference"], actor=services.SYSTEM)
    services.api_key_revoke(key=old, actor=services.SYSTEM)
    _usage(world.tenant, "a", key=ci, tokens=(100, 20))
    _usage(world.tenant, "b", key=old, tokens=(7, 3), days_ago=10)
    _usage(world.tenant, "c", key=None, tokens=(1, 1), days_ago=50)  # the playground, 50 days ago
    _usage(world.other_tenant, "x", tokens=(10**6, 0))
    login(client, world.viewer)
    url = reverse("console-usage", args=["acme"])
    week = client.get(url, {"days": 7, "by": "key"})
    assert week.context["days"] == 7 and week.context["totals"]["input_tokens"] == 100
    assert [(r["key_name"], r["total_tokens"]) for r in week.context["rows"]] == [("ci", 120)]
    quarter = client.get(url, {"days": 90, "by": "key"})
    assert quarter.context["totals"] == {"requests": 3, "input_tokens": 108, "output_tokens": 24}
    html = quarter.content.decode()
    chart = quarter.context["usage_chart"]
    assert "Tokens per day, last 90 days" in html and len(chart["bars"]) == 90
    labelled = [b for b in chart["bars"] if b.show_label]
    assert 7 <= len(labelled) <= 12 and all(0 < b.center < 100 for b in labelled)  # about eight labels, centred under their bars
    assert ci.prefix in html and "revoked" in html and "Playground (console)" in html and "1,000,000" not in html
    assert client.get(url, {"days": "12345", "by": "nope"}).context["days"] == 30  # unknown choices: the defaults


def test_usage_export_is_csv_for_the_period_with_formulas_defused(client, world, served):
    import csv
    import io

    key, _ = services.api_key_create(tenant=world.tenant, name="=HYPERLINK(1)", scopes=["inference"], actor=services.SYSTEM)
    _usage(world.tenant, "a", key=key, tokens=(100, 20))
    _usage(world.tenant, "b", key=key, tokens=(1, 2))
    _usage(world.tenant, "c", key=None, model="ft:tiny-chat:acme:x:1", tokens=(5, 5), days_ago=3)
    _usage(world.tenant, "d", key=None, tokens=(9, 9), days_ago=40)  # outside 30 days
    _usage(world.other_tenant, "x", tokens=(10**6, 0))
    login(client, world.viewer)
    response = client.get(reverse("console-usage-export", args=["acme"]))
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="usage-acme-')
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [(r["model"], r["api_key_name"], r["requests"], r["total_tokens"]) for r in rows] == [
        ("ft:tiny-chat:acme:x:1", "(playground)", "1", "10"), ("tiny-chat", "'=HYPERLINK(1)", "2", "123")]
    assert rows[1]["api_key_prefix"] == key.prefix and rows[1]["input_tokens"] == "101"
    assert len(list(csv.reader(io.StringIO(client.get(reverse("console-usage-export", args=["acme"]), {"days": 90}).content.decode())))) == 4
    assert client.get(reverse("console-usage-export", args=["globex"])).status_code == 404


def test_models_page_lists_models_and_admin_saves_settings(client, world, served):
    login(client, world.admin)
    url = reverse("console-models", args=["acme"])
    assert "tiny-chat" in client.get(url).content.decode()
    data = {
        "default_model": "tiny-chat", "default_max_tokens": 100, "max_max_tokens": 200, "default_temperature": "0.7",
        "max_temperature": "1.5", "system_message_rule": "replace", "redact_emails": "on", "redact_patterns": "ACME-\\d+\n", "blocked_terms": "",
    }
    assert client.post(url, data).status_code == 302
    config = ModelConfig.objects.for_tenant(world.tenant).get()
    assert (config.default_model, config.max_max_tokens, config.redact_patterns, config.redact_emails) == ("tiny-chat", 200, ["ACME-\\d+"], True)
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="model_config.updated").exists()


def test_model_settings_errors_are_field_level_and_nothing_saved(client, world, served):
    login(client, world.admin)
    url = reverse("console-models", args=["acme"])
    bad = {"default_model": "gpt-9", "default_max_tokens": 500, "max_max_tokens": 100, "default_temperature": "3", "max_temperature": "1",
           "system_message_rule": "keep", "redact_patterns": "([unclosed", "blocked_terms": ""}
    page = client.post(url, bad)
    assert page.status_code == 200
    form = page.context["form"]
    assert {"default_model", "default_max_tokens", "default_temperature", "redact_patterns"} <= set(form.errors)
    assert ModelConfig.objects.for_tenant(world.tenant).get().max_max_tokens == 4096


def test_model_settings_refuse_patterns_too_big_to_match_fast(client, world, served):
    login(client, world.admin)
    url = reverse("console-models", args=["acme"])
    form = {"default_model": "tiny-chat", "default_max_tokens": 50, "max_max_tokens": 200, "default_temperature": "0.5",
            "max_temperature": "1.5", "system_message_rule": "keep", "blocked_terms": ""}
    page = client.post(url, {**form, "redact_patterns": "(?:(?:\\S+\\s?){1,30}){1,30}#\n"})
    assert page.status_code == 200
    assert "15,303 RE2 instructions; the limit is 500" in page.context["form"].errors["redact_patterns"][0]
    page = client.post(url, {**form, "redact_patterns": "".join("[A-Za-z0-9+/]{40,100}" + c + "\n" for c in "#@~%&!")})
    assert "together they compile to 2,190 RE2 instructions" in page.context["form"].errors["redact_patterns"][0]
    assert ModelConfig.objects.for_tenant(world.tenant).get().redact_patterns == []


def test_playground_issues_a_token_for_this_tenant_only(client, world, served):
    login(client, world.developer)
    page = client.get(reverse("console-playground", args=["acme"]))
    assert page.status_code == 200
    token = page.context["token"]
    assert services.playground_token_verify(token) == (world.tenant.pk, world.developer.pk)
    assert services.playground_token_verify(token[:-2] + "xx") is None
    cache_control = {part.strip() for part in page["Cache-Control"].split(",")}
    assert {"no-store", "private"} <= cache_control  # the page holds a bearer token: no cache may keep it
    login(client, world.viewer)
    assert client.get(reverse("console-playground", args=["acme"])).status_code == 403


def test_staff_live_pool_view_shows_shares_and_refuses_tenants(client, world, served):
    from django.contrib.auth import get_user_model

    pool = BackendPool.objects.get(name="shared")
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, weight=3)
    UsageRecord.all_tenants.create(tenant=world.tenant, request_id="a", endpoint="chat", model="tiny-chat", pool=pool, input_tokens=100, output_tokens=100, status="ok")
    UsageRecord.all_tenants.create(tenant=world.other_tenant, request_id="b", endpoint="chat", model="tiny-chat", pool=pool, input_tokens=100, output_tokens=0, status="ok")
    login(client, world.owner)
    assert client.get("/staff/pools/").status_code == 302  # a tenant owner is not staff: sent to the admin login
    staff = get_user_model().objects.create_user("staff@platform.test", "staff@platform.test", PASSWORD, is_staff=True)
    login(client, staff)
    html = client.get("/staff/pools/").content.decode()
    assert "shared" in html and "acme" in html and "globex" in html
    assert "75.0 %" in html  # acme: 300 of 400 service tokens; fair share by weight 3:1 is also 75 %


def test_usage_api_matches_the_console(world, served):
    from rest_framework.test import APIClient

    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=1000, quota_mode="hard")
    UsageRecord.all_tenants.create(tenant=world.tenant, request_id="r", endpoint="chat", model="tiny-chat", input_tokens=300, output_tokens=200, status="ok")
    _, key = services.api_key_create(tenant=world.tenant, name="read", scopes=["management:read"], actor=services.SYSTEM)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    body = api.get("/api/tenants/acme/usage/?days=7").json()
    assert body["rows"][0]["total_tokens"] == 500 and body["rows"][0]["model"] == "tiny-chat"
    assert body["quota"] == {**body["quota"], "state": "ok", "used_tokens": 500, "quota_tokens": 1000, "utilization_percent": 50.0}
    assert api.get("/api/tenants/acme/usage/?days=0").status_code == 400
    assert api.get("/api/tenants/globex/usage/").status_code == 404
