"""The tenant's dashboard: what a tenant admin comes to see first, each figure linking to the page it comes from.

Every figure is read by the same function as on its own page, so they agree: spend and forecast by
`billing.selectors.spend_so_far` (the Billing page), quota by `serving.selectors.quota_status` and today's requests
by `serving.selectors.usage_by_day_and_model` (the Usage page), the money budget by `billing.spend` (the Budget page:
micro-cents per request, so it may differ from the invoice-rounded spend by under a cent per line).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Q
from django.shortcuts import render
from django.utils import timezone

from billing import periods, selectors as billing_selectors, spend
from billing.models import format_cents
from finetune.models import FineTuneJob
from serving import selectors as serving_selectors
from serving.admission import WARN_FRACTION
from serving.models import AdapterDeployment, UsageRecord
from tenants.access import TenantContext, tenant_view
from tenants.models import AlertSettings, ApiKey, Invitation, Membership, Role, Tenant

RECENT_ITEMS = 5  # running jobs and deployed adapters listed
# Requests that failed on the platform's side. A client that hung up (cancelled) is not an error of ours.
FAILED_STATUSES = (UsageRecord.Status.ERROR, UsageRecord.Status.INTERRUPTED)


@dataclass(frozen=True)
class Today:
    """Today's requests (UTC day) from the usage ledger, and how many failed on the platform's side."""

    requests: int
    failed: int

    @property
    def error_rate_percent(self) -> Decimal | None:
        """Failed / requests in percent, one decimal; None without requests."""
        if not self.requests:
            return None
        return (Decimal(100 * self.failed) / Decimal(self.requests)).quantize(Decimal("0.1"))


def requests_today(tenant: Tenant, now: datetime | None = None) -> Today:
    """Today's requests as the Usage page counts them (its rows for today), and the failed ones among them."""
    today = periods.utc_today(now)
    rows = serving_selectors.usage_by_day_and_model(tenant, days=1, today=today)
    start, _ = periods.day_bounds(today)
    failed = UsageRecord.objects.for_tenant(tenant).filter(created_at__gte=start, status__in=FAILED_STATUSES).count()
    return Today(requests=sum(r["requests"] for r in rows), failed=failed)


@dataclass(frozen=True)
class BudgetGauge:
    """This month's spend against the money budget in force, as the Budget page reads it (billing.spend)."""

    spent_cents: int
    limit_cents: int
    percent: int  # whole percent, at most 100 (the Budget page's figure)
    hard: bool  # requests are refused past `limit_cents`

    @property
    def spent(self) -> str:
        return format_cents(self.spent_cents)

    @property
    def limit(self) -> str:
        return format_cents(self.limit_cents)


def budget_gauge(tenant: Tenant, now: datetime | None = None) -> BudgetGauge | None:
    """None when the tenant has no budget and no ceiling."""
    state = spend.budget_in_force(tenant=tenant)
    limit = state.alert_cents
    if not limit:
        return None
    used = spend.tenant_month_usage(tenant=tenant, now=now)
    return BudgetGauge(spent_cents=used.cents, limit_cents=limit, percent=min(100, used.microcents * 100 // (limit * spend.MICROCENTS_PER_CENT)),
                       hard=state.hard_cents == limit)


def alert_thresholds(tenant: Tenant) -> list[int]:
    """The tenant's alert thresholds (percent of each budget and quota), ascending; [] when none are set."""
    config = AlertSettings.objects.for_tenant(tenant).first()
    return sorted(config.thresholds) if config and config.thresholds else []


def _percent_width(percent) -> str:
    """A gauge's fill width (CSS percent, 0–100, dot decimal whatever the locale)."""
    return f"{min(max(float(percent or 0), 0.0), 100.0):.1f}"


@tenant_view()
def dashboard(request, ctx: TenantContext):
    tenant = ctx.tenant
    spend = billing_selectors.spend_so_far(tenant=tenant)
    quota = serving_selectors.quota_status(tenant)
    now = timezone.now()
    active_keys = ApiKey.objects.for_tenant(tenant).filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    context = {
        "tenant": tenant,
        "section": "dashboard",
        "can_write": ctx.can(Role.ADMIN),
        "spend": spend,
        "quota": quota,
        "quota_width": _percent_width(quota["percent"]),
        "budget": budget_gauge(tenant, now),
        # The gauges' mark, said in words (a hover title means nothing on a phone or to a screen reader).
        "warn_percent": round(WARN_FRACTION * 100),
        "alert_thresholds": alert_thresholds(tenant),
        "today": requests_today(tenant, now),
        "unpaid_invoices": list(billing_selectors.unpaid_invoices(tenant=tenant)),
        "running_jobs": list(FineTuneJob.objects.for_tenant(tenant).filter(status__in=FineTuneJob.ACTIVE_STATUSES)
                             .select_related("base_model").order_by("-created_at")[:RECENT_ITEMS]),
        "deployments": list(AdapterDeployment.objects.for_tenant(tenant).select_related("adapter", "pool")
                            .order_by("-created_at")[:RECENT_ITEMS]),
        "member_count": Membership.objects.for_tenant(tenant).count(),
        "active_key_count": active_keys.count(),
        "active_prompt": tenant.active_prompt,
        "pending_invitations": sum(1 for i in Invitation.objects.for_tenant(tenant) if i.state == "pending") if ctx.can(Role.ADMIN) else None,
    }
    return render(request, "console/dashboard.html", context)
