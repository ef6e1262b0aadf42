"""Console pages of the spend controls: API keys with their usage, spend and limits, key rotation, the monthly budget,
and alerts (settings, what fired, the webhook delivery log with re-send).

Here rather than in tenants.views because they read the ledger and the price list (apps are layers: tenants sees
neither). Every view is a `tenant_view`; objects are looked up inside the URL's tenant, so another tenant's id is a 404.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from billing import alerts, spend
from billing.control_forms import AlertSettingsForm, BudgetForm, KeyControlsForm, KeyRotateForm, to_cents
from billing.models import BillingSettings, format_cents
from serving.views import model_names_for
from tenants import services
from tenants.access import TenantContext, tenant_view
from tenants.forms import apply_service_errors
from tenants.models import AlertEvent, ApiKey, BudgetMode, Membership, Role, WebhookDelivery

DELIVERY_LOG_SIZE = 50


def _currency() -> str:
    return BillingSettings.load().currency.upper()


def _render(request, ctx: TenantContext, template: str, section: str, context: dict | None = None, status: int = 200):
    return render(request, template, {"tenant": ctx.tenant, "section": section, "can_write": ctx.can(Role.ADMIN),
                                      "currency": _currency(), **(context or {})}, status=status)


def _key(ctx: TenantContext, key_id: int) -> ApiKey:
    return get_object_or_404(ApiKey.objects.for_tenant(ctx.tenant).select_related("tenant"), pk=key_id)


def _money(cents: int) -> str:
    return format_cents(cents)


# ---- API keys ------------------------------------------------------------------------------------


@tenant_view()
def keys(request, ctx: TenantContext):
    """Every key with this month's requests, tokens and spend (from the ledger), its own limits, and its state."""
    rows = spend.keys_with_usage(tenant=ctx.tenant, keys=ApiKey.objects.for_tenant(ctx.tenant).select_related("created_by"))
    return _render(request, ctx, "console/keys.html", "keys", {"rows": rows, "keys": [r.key for r in rows]})


@tenant_view(read=Role.ADMIN)
def key_controls(request, ctx: TenantContext, key_id: int):
    key = _key(ctx, key_id)
    names = model_names_for(ctx.tenant)
    initial = {"requests_per_minute": key.requests_per_minute or None, "tokens_per_minute": key.tokens_per_minute or None,
               "monthly_token_budget": key.monthly_token_budget or None,
               "monthly_budget": key.monthly_budget_cents / 100 if key.monthly_budget_cents else None,
               "allowed_models": key.allowed_models}
    form = KeyControlsForm(request.POST or None, initial=initial, models=sorted(set(names) | set(key.allowed_models)))
    form.fields["monthly_budget"].label += f" ({_currency()})"
    if request.method == "POST" and form.is_valid():
        try:
            services.api_key_controls_update(key=key, actor=ctx.actor, tenant_models=names, **form.changes())
        except ValidationError as exc:
            apply_service_errors(form, exc, aliases={"monthly_budget_cents": "monthly_budget"})
        else:
            messages.success(request, f"Limits of “{key.name}” saved. The gateway applies them within seconds.")
            return redirect("console-keys", tenant_slug=ctx.tenant.slug)
    return _render(request, ctx, "console/key_limits.html", "keys", {"key": key, "form": form}, status=400 if form.is_bound else 200)


@tenant_view(read=Role.ADMIN)
def key_rotate(request, ctx: TenantContext, key_id: int):
    key = _key(ctx, key_id)
    form = KeyRotateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key, secret = services.api_key_rotate(key=key, grace=form.grace_period, actor=ctx.actor)
        except ValidationError as exc:
            apply_service_errors(form, exc)
        else:
            # Rendered straight from the POST (never cached): the new secret exists only in this response.
            return _render(request, ctx, "console/key_rotated.html", "keys", {"key": key, "secret": secret})
    return _render(request, ctx, "console/key_rotate.html", "keys", {"key": key, "form": form}, status=400 if form.is_bound else 200)


# ---- monthly budget ------------------------------------------------------------------------------


@tenant_view()
def budget(request, ctx: TenantContext):
    """This month's spend against the tenant's budget and the staff ceiling; admins set the budget and its mode."""
    tenant = ctx.tenant
    state = spend.budget_in_force(tenant=tenant)
    form = BudgetForm(request.POST or None, initial={"monthly": state.budget_cents / 100 if state.budget_cents else None, "mode": state.mode})
    form.fields["monthly"].label += f" ({_currency()})"  # the amount's currency, where it is typed
    if request.method == "POST" and form.is_valid():
        try:
            services.spend_budget_set(tenant=tenant, monthly_cents=to_cents(form.cleaned_data["monthly"]), mode=form.cleaned_data["mode"], actor=ctx.actor)
        except ValidationError as exc:
            apply_service_errors(form, exc, aliases={"monthly_cents": "monthly"})
        else:
            messages.success(request, "Budget saved.")
            return redirect("console-budget", tenant_slug=tenant.slug)
    used = spend.tenant_month_usage(tenant=tenant)
    limit = state.alert_cents
    context = {
        "form": form if ctx.can(Role.ADMIN) else None, "state": state, "used": used, "spent": _money(used.cents),
        "budget": _money(state.budget_cents) if state.budget_cents else None,
        "ceiling": _money(state.ceiling_cents) if state.ceiling_cents else None,
        "hard": _money(state.hard_cents) if state.hard_cents else None, "hard_mode": state.mode == BudgetMode.HARD,
        "percent": min(100, used.microcents * 100 // (limit * spend.MICROCENTS_PER_CENT)) if limit else None,
    }
    return _render(request, ctx, "console/budget.html", "budget", context, status=400 if form.is_bound else 200)


# ---- alerts --------------------------------------------------------------------------------------


@tenant_view(read=Role.ADMIN)
def alerts_page(request, ctx: TenantContext):
    tenant = ctx.tenant
    config = services.alert_settings_get(tenant=tenant)
    members = Membership.objects.for_tenant(tenant).select_related("user").order_by("user__email")
    initial = {"thresholds": ", ".join(str(t) for t in config.thresholds),
               "recipients": [str(m.pk) for m in config.recipients.all()], "webhook_url": config.webhook_url}
    form = AlertSettingsForm(request.POST or None, initial=initial, members=members)
    if request.method == "POST" and form.is_valid():
        try:
            services.alert_settings_update(tenant=tenant, actor=ctx.actor, thresholds=form.cleaned_data["thresholds"],
                                           recipient_ids=[int(i) for i in form.cleaned_data["recipients"]],
                                           webhook_url=form.cleaned_data["webhook_url"].strip())
        except ValidationError as exc:
            apply_service_errors(form, exc, aliases={"recipient_ids": "recipients"})
        else:
            messages.success(request, "Alert settings saved.")
            return redirect("console-alerts", tenant_slug=tenant.slug)
    events = AlertEvent.objects.for_tenant(tenant).select_related("api_key")[:DELIVERY_LOG_SIZE]
    deliveries = WebhookDelivery.objects.for_tenant(tenant).select_related("event")[:DELIVERY_LOG_SIZE]
    return _render(request, ctx, "console/alerts.html", "budget", {
        "form": form, "config": config, "events": [(e, alerts.describe(e)) for e in events], "deliveries": deliveries,
    }, status=400 if form.is_bound else 200)


@tenant_view(read=Role.ADMIN)
@require_POST
def webhook_resend(request, ctx: TenantContext, delivery_id: int):
    delivery = get_object_or_404(WebhookDelivery.objects.for_tenant(ctx.tenant), pk=delivery_id)
    again = alerts.webhook_resend(delivery=delivery)
    messages.success(request, f"Delivery {delivery.pk} queued again as delivery {again.pk}.")
    return redirect("console-alerts", tenant_slug=ctx.tenant.slug)


@tenant_view(read=Role.ADMIN)
@require_POST
def webhook_secret_rotate(request, ctx: TenantContext):
    services.alert_webhook_secret_rotate(tenant=ctx.tenant, actor=ctx.actor)
    messages.success(request, "A new signing secret is in use; update your receiver.")
    return redirect("console-alerts", tenant_slug=ctx.tenant.slug)
