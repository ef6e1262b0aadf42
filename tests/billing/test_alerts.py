"""Budget and quota alerts (billing.alerts): once per threshold and period, by e-mail and signed webhook; webhooks
reach public addresses only, on every hop (billing.alert_webhooks)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from datetime import date

import pytest
from django.core import mail

from billing import alert_webhooks, alerts, spend
from tenants import services
from tenants.models import AlertEvent, Membership, WebhookDelivery
from tenants.services import Actor
from tests.support.billing import price, usage, utc
from tests.support.webhooks import Receiver

NOW = utc(2026, 1, 20, 12)


@pytest.fixture
def receiver(settings):
    settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = True
    r = Receiver()
    yield r
    r.close()


def _setup(world, catalog, *, budget_cents=100, webhook_url=""):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="200")  # 100 µ¢ per input token
    services.spend_budget_set(tenant=world.tenant, monthly_cents=budget_cents, mode="soft", actor=Actor(user=world.owner))
    admin = Membership.objects.for_tenant(world.tenant).get(user=world.admin)
    return services.alert_settings_update(tenant=world.tenant, actor=Actor(user=world.owner), thresholds=[50, 80, 100],
                                          recipient_ids=[admin.pk], webhook_url=webhook_url)


def test_each_threshold_fires_once_per_period_by_email(world, catalog, django_capture_on_commit_callbacks):
    def check(now=NOW):
        with django_capture_on_commit_callbacks(execute=True):
            return alerts.alerts_check(tenant=world.tenant, now=now)

    _setup(world, catalog)
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=600_000)  # 60 ¢ of a 100 ¢ budget
    fired = check()
    assert [(e.subject, e.threshold, e.used, e.limit) for e in fired] == [("budget", 50, 60, 100)]
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["admin@acme.test"]
    assert "Monthly budget: 50 % reached (0.60 of 1.00)" in mail.outbox[0].body
    assert check() == []  # not again
    usage(world.tenant, at=utc(2026, 1, 6), pool=catalog.shared, inp=500_000)  # 110 ¢
    assert [e.threshold for e in check()] == [80, 100]
    assert len(mail.outbox) == 3
    assert check(utc(2026, 2, 1, 1)) == []  # a new month: nothing used yet


def test_quota_and_key_budgets_alert_too(world, catalog):
    _setup(world, catalog, budget_cents=0)
    services.policy_update(tenant=world.tenant, actor=Actor(user=world.owner), quota_tokens=10_000)
    key, _ = services.api_key_create(tenant=world.tenant, name="ci", scopes=["inference"], actor=Actor(user=world.owner))
    services.api_key_controls_update(key=key, actor=Actor(user=world.owner), tenant_models=set(), monthly_token_budget=20_000,
                                     monthly_budget_cents=1)
    record = usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=9_000, out=1_000)  # 900,000 + 200,000 µ¢
    type(record).all_tenants.filter(pk=record.pk).update(api_key=key)
    fired = {(e.subject, e.scope, e.threshold) for e in alerts.alerts_check(tenant=world.tenant, now=NOW)}
    k = f"key:{key.pk}"
    assert fired == {("quota", "tenant", 50), ("quota", "tenant", 80), ("quota", "tenant", 100), ("key_tokens", k, 50),
                     ("key_budget", k, 50), ("key_budget", k, 80), ("key_budget", k, 100)}
    assert AlertEvent.objects.for_tenant(world.other_tenant).count() == 0


def test_spend_is_exact_in_microcents_per_key_and_rounds_a_fractional_price_up_per_request(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="0.5", out="3")
    key, _ = services.api_key_create(tenant=world.tenant, name="ci", scopes=["inference"], actor=Actor(user=world.owner))
    for inp in (1, 3):
        record = usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=inp, out=2)
        type(record).all_tenants.filter(pk=record.pk).update(api_key=key)
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1000, out=1000, status="error")  # not billed
    by_key = spend.ledger_usage_by_key(tenant=world.tenant, start=utc(2026, 1, 1), end=utc(2026, 2, 1))
    # ⌈1·0.5 + 2·3⌉ + ⌈3·0.5 + 2·3⌉ = 7 + 8 µ¢; the error's tokens count as usage, not as spend
    assert (by_key[key.pk].microcents, by_key[key.pk].tokens, by_key[key.pk].requests) == (15, 8, 2)
    assert (by_key[None].microcents, by_key[None].tokens) == (0, 2000)


def test_a_signed_webhook_reaches_the_tenants_receiver(world, catalog, receiver):
    config = _setup(world, catalog, webhook_url=receiver.url)
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=500_000)
    [event] = alerts.alerts_check(tenant=world.tenant, now=NOW)
    delivery = WebhookDelivery.objects.for_tenant(world.tenant).get(event=event)
    assert alerts.webhook_attempt(delivery=delivery, last_attempt=False) == "delivered"
    [(headers, body)] = receiver.requests
    timestamp = headers["X-Platform-Timestamp"]
    expected = "v1=" + hmac.new(config.webhook_secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["X-Platform-Signature"] == expected
    assert json.loads(body) | {} == {**json.loads(delivery.body)} and json.loads(body)["threshold_percent"] == 50
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("delivered", 1, 200)

    again = alerts.webhook_resend(delivery=delivery)
    assert alerts.webhook_attempt(delivery=again, last_attempt=False) == "delivered"
    assert len(receiver.requests) == 2 and receiver.requests[1][1] == body and again.resend_of_id == delivery.pk


def test_a_failing_receiver_is_retried_then_marked_failed(world, catalog, settings):
    settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = True
    failing = Receiver(status=500)
    try:
        _setup(world, catalog, webhook_url=failing.url)
        usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=500_000)
        [event] = alerts.alerts_check(tenant=world.tenant, now=NOW)
        delivery = WebhookDelivery.objects.for_tenant(world.tenant).get(event=event)
        with pytest.raises(alert_webhooks.DeliveryFailed):
            alerts.webhook_attempt(delivery=delivery, last_attempt=False)
        assert (delivery.status, delivery.attempts) == ("pending", 1)
        assert alerts.webhook_attempt(delivery=delivery, last_attempt=True) == "failed"
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts, delivery.last_error) == ("failed", 2, "the endpoint answered HTTP 500")
    finally:
        failing.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "169.254.169.254", "192.168.1.10", "172.16.0.1", "100.64.0.1",
                                     "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "0.0.0.0", "224.0.0.1"])
def test_webhooks_refuse_private_loopback_and_link_local_addresses(address):
    assert not alert_webhooks.address_allowed(address)
    with pytest.raises(alert_webhooks.Refused):
        alert_webhooks.deliver(url=f"https://[{address}]/hook" if ":" in address else f"https://{address}/hook", body=b"{}",
                               secret="s", delivery_id=1)


def test_a_public_address_is_allowed_and_a_name_resolving_to_a_private_one_is_refused(monkeypatch):
    assert alert_webhooks.address_allowed("93.184.215.14") and alert_webhooks.address_allowed("2606:4700::1111")
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
                                                                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))])
    with pytest.raises(alert_webhooks.Refused):  # one private answer among public ones is enough to refuse
        alert_webhooks.resolve_checked("hooks.example.com", 443)


@pytest.mark.parametrize("target", ["http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/", "https://[fd00::1]:8443/x", "https://10.0.0.1/x"])
def test_a_redirect_to_a_private_address_is_refused_and_not_followed(world, catalog, settings, target):
    settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = True  # the first hop is the local test receiver
    redirecting = Receiver(redirect_to=target)
    try:
        _setup(world, catalog, webhook_url=redirecting.url)
        usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=500_000)
        [event] = alerts.alerts_check(tenant=world.tenant, now=NOW)
        delivery = WebhookDelivery.objects.for_tenant(world.tenant).get(event=event)
        assert alerts.webhook_attempt(delivery=delivery, last_attempt=False) == "refused"
        assert len(redirecting.requests) == 1 and "not a public address" in delivery.last_error
    finally:
        redirecting.close()


def test_a_loopback_receiver_is_refused_without_the_tests_setting(world, catalog, settings):
    settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = True
    local = Receiver()
    try:
        _setup(world, catalog, webhook_url=local.url)
        usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=500_000)
        [event] = alerts.alerts_check(tenant=world.tenant, now=NOW)
        settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = False
        delivery = WebhookDelivery.objects.for_tenant(world.tenant).get(event=event)
        assert alerts.webhook_attempt(delivery=delivery, last_attempt=False) == "refused"
        assert local.requests == []
    finally:
        local.close()
