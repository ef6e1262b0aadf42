"""Alerts' Celery tasks: thin wrappers over billing.alerts (registered by billing.apps at start-up)."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from billing import alerts
from billing.alert_webhooks import DeliveryFailed
from tenants.models import WebhookDelivery


@shared_task(name="billing.alerts_check_all")
def alerts_check_all() -> int:
    """Fire newly crossed thresholds of every tenant with alert settings (beat: every minute)."""
    return alerts.alerts_check_all()


@shared_task(name="billing.alert_webhook_deliver", bind=True, max_retries=None)
def alert_webhook_deliver(self, delivery_id: int, tenant_id: int) -> str:
    """One attempt of a webhook delivery; retried with exponential backoff (10 s, 20 s, … at most 10 min) up to
    PLATFORM_WEBHOOK_ATTEMPTS attempts in all. A refused address is never retried."""
    delivery = WebhookDelivery.objects.for_tenant(tenant_id).filter(pk=delivery_id).first()
    if delivery is None:
        return "gone"
    attempts = settings.PLATFORM_WEBHOOK_ATTEMPTS
    try:
        return alerts.webhook_attempt(delivery=delivery, last_attempt=self.request.retries + 1 >= attempts)
    except DeliveryFailed as exc:
        raise self.retry(exc=exc, countdown=min(600, 10 * 2 ** self.request.retries)) from None
