"""Budget and quota alerts: each threshold (e.g. 50 / 80 / 100 %) of a budget or quota fires once per period.

What is measured, from the usage ledger (billing.spend), for tenants with alert settings:
- the tenant's spend this month against its budget (its own, else the staff ceiling), in cents;
- the tenant's tokens in its quota window (day or month) against its token quota in force;
- each key's spend this month against its monthly budget, and its tokens against its monthly token budget.
A crossed threshold is an AlertEvent; its unique constraint (tenant, subject, scope, period, threshold) makes it
fire once however often or concurrently the check runs. A new event is e-mailed to the chosen members and, when the
tenant set a webhook URL, delivered there signed (billing.alert_webhooks), with retries on a Celery task.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing import spend
from billing.alert_webhooks import DeliveryFailed, Refused, deliver
from common.queue import enqueue_on_commit
from serving.admission import window_id
from tenants.models import AlertEvent, AlertSettings, ApiKey, Policy, Tenant, WebhookDelivery
from tenants.selectors import effective_quota_tokens

log = logging.getLogger(__name__)
DELIVER_TASK = "billing.alert_tasks.alert_webhook_deliver"


@dataclass(frozen=True)
class Measure:
    subject: str
    scope: str  # "tenant" or "key:<id>"
    period: str
    used: int  # µ¢ for money, tokens otherwise
    limit: int  # same unit as used
    key: ApiKey | None = None

    @property
    def money(self) -> bool:
        return self.subject in (AlertEvent.Subject.BUDGET, AlertEvent.Subject.KEY_BUDGET)

    def reported(self, value: int) -> int:
        return spend.cents_from_microcents(value) if self.money else value


def measures_for(*, tenant: Tenant, now: datetime | None = None) -> list[Measure]:
    """Every budget and quota of the tenant that has a limit, with what is used of it now."""
    start, end = spend.month_bounds(now)
    month = window_id("month", now)
    by_key = spend.ledger_usage_by_key(tenant=tenant, start=start, end=end)
    out: list[Measure] = []
    budget = spend.budget_in_force(tenant=tenant)
    if budget.alert_cents:
        used = sum(u.microcents for u in by_key.values())
        out.append(Measure(AlertEvent.Subject.BUDGET, "tenant", month, used, budget.alert_cents * spend.MICROCENTS_PER_CENT))
    policy = Policy.objects.for_tenant(tenant).first()
    quota = effective_quota_tokens(policy) if policy else 0
    if quota:
        used = spend.quota_window_tokens(tenant=tenant, window=policy.quota_window, now=now)
        out.append(Measure(AlertEvent.Subject.QUOTA, "tenant", window_id(policy.quota_window, now), used, quota))
    keys = ApiKey.objects.for_tenant(tenant).filter(revoked_at__isnull=True).exclude(monthly_budget_cents=0, monthly_token_budget=0)
    for key in keys:
        usage = by_key.get(key.pk, spend.Usage())
        if key.monthly_budget_cents:
            out.append(Measure(AlertEvent.Subject.KEY_BUDGET, f"key:{key.pk}", month, usage.microcents,
                               key.monthly_budget_cents * spend.MICROCENTS_PER_CENT, key))
        if key.monthly_token_budget:
            out.append(Measure(AlertEvent.Subject.KEY_TOKENS, f"key:{key.pk}", month, usage.tokens, key.monthly_token_budget, key))
    return out


def alerts_check(*, tenant: Tenant, now: datetime | None = None) -> list[AlertEvent]:
    """Fire every threshold newly crossed (once per subject, period and threshold). Returns the new events."""
    config = AlertSettings.objects.for_tenant(tenant).first()
    if config is None or not config.thresholds:
        return []
    fired = []
    for measure in measures_for(tenant=tenant, now=now):
        for threshold in sorted(config.thresholds):
            if measure.used * 100 < threshold * measure.limit:
                break
            event = _fire(tenant, config, measure, threshold)
            if event is not None:
                fired.append(event)
    return fired


def _fire(tenant: Tenant, config: AlertSettings, measure: Measure, threshold: int) -> AlertEvent | None:
    """Record the event (None when it already fired) and send it, in one transaction."""
    try:
        with transaction.atomic():
            event = AlertEvent.objects.for_tenant(tenant).create(
                tenant=tenant, subject=measure.subject, api_key=measure.key, scope=measure.scope, period=measure.period,
                threshold=threshold, used=measure.reported(measure.used), limit=measure.reported(measure.limit))
            _notify(tenant, config, event)
    except IntegrityError:
        return None  # fired before (or by a concurrent check)
    return event


def describe(event: AlertEvent) -> str:
    """The alert in one sentence: "Monthly budget: 80 % reached (8.12 of 10.00) for 202612"."""
    what = event.get_subject_display()
    if event.api_key_id:
        what += f" of key “{event.api_key.name}” ({event.api_key.prefix}…)"
    if event.subject in (AlertEvent.Subject.BUDGET, AlertEvent.Subject.KEY_BUDGET):
        figures = f"{event.used / 100:,.2f} of {event.limit / 100:,.2f}"
    else:
        figures = f"{event.used:,} of {event.limit:,} tokens"
    return f"{what}: {event.threshold} % reached ({figures}) in period {event.period}"


def event_body(event: AlertEvent) -> str:
    """The webhook's JSON body (amounts in cents for budgets, tokens for quotas)."""
    money = event.subject in (AlertEvent.Subject.BUDGET, AlertEvent.Subject.KEY_BUDGET)
    return json.dumps({
        "type": "alert.threshold_crossed",
        "alert_id": event.pk,
        "tenant": event.tenant.slug,
        "subject": event.subject,
        "key": event.api_key.prefix if event.api_key_id else None,
        "period": event.period,
        "threshold_percent": event.threshold,
        "used": event.used,
        "limit": event.limit,
        "unit": "cents" if money else "tokens",
        "created_at": event.created_at.isoformat(),
    }, separators=(",", ":"))


def _notify(tenant: Tenant, config: AlertSettings, event: AlertEvent) -> None:
    sentence = describe(event)
    emails = sorted({m.user.email for m in config.recipients.select_related("user") if m.user.email and m.user.is_active})
    if emails:
        link = f"{settings.PUBLIC_URL}/t/{tenant.slug}/alerts/"
        transaction.on_commit(lambda: send_mail(
            subject=f"Usage alert: {event.get_subject_display()} at {event.threshold} %",
            message=f"{sentence}.\n\nTeam: “{tenant.name[:80]}” (console id: {tenant.slug}).\nAlerts and budgets: {link}\n",
            from_email=None, recipient_list=emails, fail_silently=True))
    if config.webhook_url:
        delivery = WebhookDelivery.objects.for_tenant(tenant).create(tenant=tenant, event=event, url=config.webhook_url, body=event_body(event))
        enqueue_on_commit(DELIVER_TASK, delivery.pk, tenant.pk, robust=True)


def webhook_resend(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send a past delivery's body again, to the tenant's current webhook URL, as a new delivery (logged apart)."""
    config = AlertSettings.objects.for_tenant(delivery.tenant_id).first()
    url = config.webhook_url if config and config.webhook_url else delivery.url
    with transaction.atomic():
        again = WebhookDelivery.objects.for_tenant(delivery.tenant_id).create(
            tenant_id=delivery.tenant_id, event=delivery.event, url=url, body=delivery.body, resend_of=delivery)
        enqueue_on_commit(DELIVER_TASK, again.pk, delivery.tenant_id, robust=True)
    return again


def webhook_attempt(*, delivery: WebhookDelivery, last_attempt: bool) -> str:
    """One attempt of a delivery: delivered, refused (never retried) or failed; raises DeliveryFailed when it is to be
    retried (not `last_attempt`). The secret is read at the attempt: a rotated secret signs the retries."""
    if delivery.status in (WebhookDelivery.Status.DELIVERED, WebhookDelivery.Status.REFUSED):
        return delivery.status
    config = AlertSettings.objects.for_tenant(delivery.tenant_id).first()
    secret = config.webhook_secret if config else ""
    delivery.attempts += 1
    try:
        delivery.response_status = deliver(url=delivery.url, body=delivery.body.encode(), secret=secret, delivery_id=delivery.pk)
    except Refused as exc:
        delivery.status, delivery.last_error = WebhookDelivery.Status.REFUSED, str(exc)[:300]
    except DeliveryFailed as exc:
        delivery.last_error = str(exc)[:300]
        delivery.status = WebhookDelivery.Status.FAILED if last_attempt else WebhookDelivery.Status.PENDING
        delivery.save(update_fields=["attempts", "status", "last_error"])
        if not last_attempt:
            raise
        return delivery.status
    else:
        delivery.status, delivery.delivered_at, delivery.last_error = WebhookDelivery.Status.DELIVERED, timezone.now(), ""
    delivery.save(update_fields=["attempts", "status", "last_error", "response_status", "delivered_at"])
    return delivery.status


def alerts_check_all(*, now: datetime | None = None) -> int:
    """Check every tenant that has alert settings (the beat task, every minute). Returns the events fired."""
    fired = 0
    # all_tenants: a batch over every tenant with alert settings; each check is scoped to its tenant.
    for tenant_id in AlertSettings.all_tenants.values_list("tenant_id", flat=True):
        tenant = Tenant.objects.get(pk=tenant_id)
        try:
            fired += len(alerts_check(tenant=tenant, now=now))
        except Exception:
            log.exception("alerts check failed for tenant %s", tenant.slug)
    return fired
