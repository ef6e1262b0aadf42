"""Console pages of the serving app: usage and quota, models and model settings, the playground."""

from __future__ import annotations

from django.contrib import messages
from django.db import transaction
from django.db.models import Q
from django.shortcuts import redirect, render

from portal.charts import bar_chart
from serving import selectors
from serving.forms import ModelConfigForm
from serving.models import Adapter, AdapterDeployment, BackendPool, BaseModel, ModelConfig
from tenants.access import TenantContext, tenant_view
from tenants.models import Role
from tenants.services import PLAYGROUND_ROLE, audit_record, playground_token_issue


def _render(request, ctx: TenantContext, template: str, section: str, context: dict):
    return render(request, template, {"tenant": ctx.tenant, "section": section, "can_write": ctx.can(Role.ADMIN), **context})


@tenant_view()
def usage(request, ctx: TenantContext):
    days = 30
    rows = selectors.usage_by_day_and_model(ctx.tenant, days=days)
    daily = selectors.daily_totals(rows, days=days)
    quota = selectors.quota_status(ctx.tenant)
    history = selectors.utilization_history(ctx.tenant, quota, daily)
    totals = {
        "requests": sum(r["requests"] for r in rows),
        "input_tokens": sum(r["input_tokens"] for r in rows),
        "output_tokens": sum(r["output_tokens"] for r in rows),
    }
    return _render(
        request,
        ctx,
        "serving/usage.html",
        "usage",
        {
            "rows": list(reversed(rows)),
            "totals": totals,
            "quota": quota,
            "usage_chart": bar_chart([(d.strftime("%m-%d"), v) for d, v in daily], unit=" tokens"),
            "history_chart": bar_chart(history, unit=" %") if history else None,
        },
    )


def model_names_for(tenant) -> list[str]:
    """The model names a tenant can call now: its base models that a pool serves for it, and its deployed adapters
    on a base model it may use (the gateway's rule: an adapter follows its base model's availability)."""
    served = set(
        BackendPool.objects.filter(Q(dedicated_tenant__isnull=True) | Q(dedicated_tenant=tenant)).values_list("base_model_id", flat=True)
    )
    usable = selectors.base_models_for_tenant(tenant)
    allowed = {bm.pk for bm in usable}
    bases = {bm.name for bm in usable if bm.pk in served}
    adapters = (AdapterDeployment.objects.for_tenant(tenant).filter(adapter__base_model_id__in=allowed)
                .values_list("adapter__name", flat=True).distinct())
    return sorted(bases) + sorted(adapters)


@tenant_view(read=Role.VIEWER, write=Role.ADMIN)
def models_page(request, ctx: TenantContext):
    tenant = ctx.tenant
    config, _ = ModelConfig.objects.for_tenant(tenant).get_or_create()
    names = model_names_for(tenant)
    form = ModelConfigForm(request.POST or None, instance=config, model_choices=names)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            form.save()
            audit_record(tenant=tenant, actor=ctx.actor, action="model_config.updated", target=config, data={"fields": form.changed_data})
        messages.success(request, "Model settings saved. The gateway applies them within a second.")
        return redirect("console-models", tenant.slug)
    dedicated = dict(BackendPool.objects.filter(dedicated_tenant=tenant).values_list("base_model__name", "name"))
    bases = [{"model": m, "dedicated_pool": dedicated.get(m.name)} for m in BaseModel.objects.filter(name__in=names)]
    adapters = Adapter.objects.for_tenant(tenant).select_related("base_model")
    deployed = set(AdapterDeployment.objects.for_tenant(tenant).values_list("adapter_id", flat=True))
    return _render(
        request,
        ctx,
        "serving/models.html",
        "models",
        {"form": form, "bases": bases, "adapters": adapters, "deployed": deployed, "config": config},
    )


@tenant_view(read=PLAYGROUND_ROLE, write=PLAYGROUND_ROLE)
def playground(request, ctx: TenantContext):
    """Try the tenant's models with its system prompt, streamed, through the real gateway."""
    tenant = ctx.tenant
    config = ModelConfig.objects.for_tenant(tenant).first()
    return _render(
        request,
        ctx,
        "serving/playground.html",
        "playground",
        {
            "model_names": model_names_for(tenant),
            "default_model": config.default_model if config else "",
            "token": playground_token_issue(tenant=tenant, user=request.user),
            "system_prompt": tenant.active_prompt.text if tenant.active_prompt_id else "",
            "max_tokens": config.default_max_tokens if config else 256,
        },
    )
