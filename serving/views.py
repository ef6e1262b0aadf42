"""Console pages of the serving app: usage and quota, models and model settings, the playground."""

from __future__ import annotations

import csv
from datetime import timedelta

from django.contrib import messages
from django.db import transaction
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render

from common.charts import bar_chart, stacked_chart
from serving import selectors
from serving.forms import ModelConfigForm
from serving.models import Adapter, AdapterDeployment, BackendPool, BaseModel, ModelConfig
from serving.routing import tenant_routes
from tenants.access import TenantContext, tenant_view
from tenants.models import Role, SystemPromptVersion
from tenants.services import PLAYGROUND_ROLE, audit_record, playground_token_issue


def _render(request, ctx: TenantContext, template: str, section: str, context: dict):
    return render(request, template, {"tenant": ctx.tenant, "section": section, "can_write": ctx.can(Role.ADMIN), **context})


USAGE_PERIODS = (7, 30, 90)  # days the Usage page and its export offer
USAGE_GROUPS = {"model": "model", "key": "API key"}


def _usage_days(request) -> int:
    raw = request.GET.get("days", "")
    return int(raw) if raw in {str(d) for d in USAGE_PERIODS} else 30


@tenant_view()
def usage(request, ctx: TenantContext):
    days = _usage_days(request)
    by = request.GET.get("by") if request.GET.get("by") in USAGE_GROUPS else "model"
    # The quota history needs the last 30 days (a month window's days so far), whatever period is shown.
    model_rows = selectors.usage_by_day_and_model(ctx.tenant, days=max(days, 30))
    first = selectors.first_day(days)
    shown = [r for r in model_rows if r["day"] >= first]
    quota = selectors.quota_status(ctx.tenant)
    history = selectors.utilization_history(ctx.tenant, quota, selectors.daily_totals(model_rows, days=30))
    daily = selectors.daily_totals(shown, days=days)
    rows = shown if by == "model" else selectors.usage_by_day_and_key(ctx.tenant, days=days)
    totals = {
        "requests": sum(r["requests"] for r in shown),
        "input_tokens": sum(r["input_tokens"] for r in shown),
        "output_tokens": sum(r["output_tokens"] for r in shown),
    }
    return _render(
        request,
        ctx,
        "serving/usage.html",
        "usage",
        {
            "days": days,
            "periods": USAGE_PERIODS,
            "by": by,
            "groups": USAGE_GROUPS,
            "group_label": USAGE_GROUPS[by],
            "rows": list(reversed(rows)),
            "totals": totals,
            "quota": quota,
            "usage_chart": stacked_chart([d.strftime("%m-%d") for d, _ in daily], _daily_series(rows, by, [d for d, _ in daily]), unit=" tokens"),
            "history_chart": bar_chart(history, unit=" %", thresholds=QUOTA_THRESHOLDS) if history else None,
        },
    )


# The quota history's colours: the gateway's warning at 80 % (selectors.quota_status) and the quota itself.
QUOTA_THRESHOLDS = ((80, "warn", "80 % or more: warning"), (100, "over", "100 %: quota used up"))


def _daily_series(rows: list[dict], by: str, days: list) -> list[tuple[str, list[int]]]:
    """Tokens per day split by model or by API key (the table's grouping), every day present."""
    index = {day: i for i, day in enumerate(days)}
    series: dict[str, list[int]] = {}
    for r in rows:
        if r["day"] not in index:
            continue
        if by == "key":
            name = f"{r['key_name']} ({r['key_prefix']}…)" if r["key_id"] else "Playground (console)"
        else:
            name = r["model"]
        series.setdefault(name, [0] * len(days))[index[r["day"]]] += r["total_tokens"]
    return list(series.items()) or [("", [0] * len(days))]


CSV_COLUMNS = ("day", "model", "api_key_name", "api_key_prefix", "requests", "input_tokens", "output_tokens", "total_tokens")


@tenant_view()
def usage_export(request, ctx: TenantContext):
    """The Usage page's period as CSV: one row per UTC day, model and API key (the Playground's rows have no key)."""
    days = _usage_days(request)
    rows = selectors.usage_export_rows(ctx.tenant, days=days)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    first = selectors.first_day(days)
    response["Content-Disposition"] = f'attachment; filename="usage-{ctx.tenant.slug}-{first:%Y%m%d}-{first + timedelta(days=days - 1):%Y%m%d}.csv"'
    writer = csv.writer(response)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["day"].isoformat(), r["model"], _csv_text(r["key_name"] if r["key_id"] else "(playground)"), r["key_prefix"],
                         r["requests"], r["input_tokens"], r["output_tokens"], r["total_tokens"]])
    return response


def _csv_text(value: str) -> str:
    """Text a spreadsheet will not run as a formula (key names are typed by tenant admins)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def served_base_models(tenant) -> list[tuple[BaseModel, BackendPool]]:
    """(base model, its pool) for each base model the gateway routes for the tenant (serving.routing)."""
    bases = [r for r in tenant_routes(tenant).values() if r.adapter is None]
    models = {bm.name: bm for bm in BaseModel.objects.filter(name__in=[r.base_model for r in bases])}
    pools = BackendPool.objects.in_bulk([r.pool_id for r in bases])
    return [(models[r.base_model], pools[r.pool_id]) for r in bases]


def model_names_for(tenant) -> list[str]:
    """The model names a tenant can call now: exactly what the gateway routes for it (serving.routing), its base
    models first, then its adapters."""
    routes = tenant_routes(tenant).values()
    return sorted(r.name for r in routes if r.adapter is None) + sorted(r.name for r in routes if r.adapter is not None)


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
    bases = [{"model": m, "dedicated_pool": pool.name if pool.dedicated_tenant_id == tenant.pk else None}
             for m, pool in served_base_models(tenant)]
    adapters = Adapter.objects.for_tenant(tenant).select_related("base_model")
    deployed = set(AdapterDeployment.objects.for_tenant(tenant).values_list("adapter_id", flat=True))
    return _render(
        request,
        ctx,
        "serving/models.html",
        "models",
        {"form": form, "bases": bases, "adapters": adapters, "deployed": deployed, "config": config},
    )


# A tried prompt travels in the page's token, in the Authorization header: proxies commonly refuse header lines past
# 8 KiB. Natural text compresses about threefold, so prompts of some 15,000 characters fit.
PLAYGROUND_TRY_TOKEN_MAX_CHARS = 8000
# An ad-hoc system prompt typed into the page for one try (the same token mechanism), at most this long, and its token
# within PLAYGROUND_TRY_TOKEN_MAX_CHARS as well.
PLAYGROUND_OVERRIDE_MAX_CHARS = 10_000


@tenant_view(read=PLAYGROUND_ROLE, write=PLAYGROUND_ROLE)
def playground(request, ctx: TenantContext):
    """Try the tenant's models with its system prompt, streamed, through the real gateway: a conversation, sampling
    parameters, two models side by side, and the code for what was sent (static/console/playground.js).

    `?prompt=<version>` tries that version of the system prompt (a draft) instead of the live one: the page's token
    carries its text. A POST (`system_prompt=<text>`, from the page's "System prompt for this try"; admins and owners)
    answers JSON `{"token": …}`: a token of the same kind carrying that ad-hoc text (empty: no system prompt), or a 400
    `{"error": …}` when it is too long; `prompt=<version>` renews a saved version's token; `reset=1` gives the plain
    token back, with the live prompt's text."""
    if request.method == "POST":
        return _playground_override(request, ctx)
    tenant = ctx.tenant
    config = ModelConfig.objects.for_tenant(tenant).first()
    trying = None
    if request.GET.get("prompt", "").isdigit():
        trying = SystemPromptVersion.objects.for_tenant(tenant).filter(version=int(request.GET["prompt"])).first()
        if trying is None:
            raise Http404("No such version of the system prompt.")
        if trying.pk == tenant.active_prompt_id:
            trying = None  # the live one: nothing to override
    token = playground_token_issue(tenant=tenant, user=request.user, system_prompt=trying.text if trying else None)
    trying_refused = None
    if trying is not None and len(token) > PLAYGROUND_TRY_TOKEN_MAX_CHARS:
        trying_refused, trying = trying, None
        token = playground_token_issue(tenant=tenant, user=request.user)
    model_names = model_names_for(tenant)
    default_model = config.default_model if config and config.default_model in model_names else (model_names[0] if model_names else "")
    adapters = [m for m in model_names if m.startswith("ft:")]
    return _render(
        request,
        ctx,
        "serving/playground.html",
        "playground",
        {
            "model_names": model_names,
            "default_model": default_model,
            # Compare with: the first adapter beside a base model (base vs adapter), else another model.
            "compare_model": next((m for m in adapters if m != default_model), None)
                             or next((m for m in model_names if m != default_model), default_model),
            "token": token,
            "trying": trying,
            "trying_refused": trying_refused,
            "system_prompt": trying.text if trying else (tenant.active_prompt.text if tenant.active_prompt_id else ""),
            "max_tokens": config.default_max_tokens if config else 256,
            "max_max_tokens": config.max_max_tokens if config else 4096,
            "default_temperature": config.default_temperature if config else 1,
            "max_temperature": config.max_temperature if config else 2,
            "override_max_chars": PLAYGROUND_OVERRIDE_MAX_CHARS,
            "can_override": ctx.can(Role.ADMIN),  # may write the tenant's system prompt, so may type one to try
        },
    )


def _playground_override(request, ctx: TenantContext) -> JsonResponse:
    """The page's token, as JSON: for an ad-hoc system prompt (admins and owners, who may write the tenant's prompt:
    a developer could otherwise drop the prompt an admin set), for a saved version (`prompt=<version>`: a renewal of
    a `?prompt=` page's token), or the plain one (`reset`)."""
    tenant = ctx.tenant
    if request.POST.get("reset"):
        live = tenant.active_prompt.text if tenant.active_prompt_id else ""
        return JsonResponse({"token": playground_token_issue(tenant=tenant, user=request.user), "system_prompt": live})
    if request.POST.get("prompt", "").isdigit():
        version = SystemPromptVersion.objects.for_tenant(tenant).filter(version=int(request.POST["prompt"])).first()
        if version is None:
            return JsonResponse({"error": "No such version of the system prompt."}, status=404)
        token = playground_token_issue(tenant=tenant, user=request.user, system_prompt=version.text)
        if len(token) > PLAYGROUND_TRY_TOKEN_MAX_CHARS:
            return JsonResponse({"error": f"System prompt v{version.version} is too long to try here."}, status=400)
        return JsonResponse({"token": token, "system_prompt": version.text})
    text = request.POST.get("system_prompt")
    if text is None:
        return JsonResponse({"error": "Send system_prompt (the text to try), prompt=<version> or reset=1."}, status=400)
    if not ctx.can(Role.ADMIN):
        return JsonResponse({"error": "Only admins and owners can try a system prompt of their own; try a saved version "
                                      "from the System prompt page."}, status=403)
    text = text.replace("\r\n", "\n")
    if len(text) > PLAYGROUND_OVERRIDE_MAX_CHARS:
        return JsonResponse({"error": f"The system prompt to try is {len(text):,} characters; at most "
                                      f"{PLAYGROUND_OVERRIDE_MAX_CHARS:,} can be tried here."}, status=400)
    token = playground_token_issue(tenant=ctx.tenant, user=request.user, system_prompt=text)
    if len(token) > PLAYGROUND_TRY_TOKEN_MAX_CHARS:
        return JsonResponse({"error": "This system prompt is too long to try here (it does not fit in a request header); "
                                      "shorten it."}, status=400)
    return JsonResponse({"token": token, "system_prompt": text})
