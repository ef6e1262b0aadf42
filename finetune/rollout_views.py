"""The console's page of adapter versions and canary rollouts (finetune/rollout.py), under t/<tenant_slug>/finetune/.

Every member reads the rollouts and their comparison; admins and owners start a canary, change its share, promote it
and roll it back (as deploying is). The writes are the API's (`finetune.rollout`).
"""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from finetune import rollout as ro
from finetune.views import _render
from serving.models import Adapter, AdapterDeployment, AdapterRollout
from tenants.access import TenantContext, tenant_view
from tenants.models import Role


def _rollout(ctx: TenantContext, rollout_id: int) -> AdapterRollout:
    rollout = AdapterRollout.objects.for_tenant(ctx.tenant).select_related("current", "canary").filter(pk=rollout_id).first()
    if rollout is None:
        raise Http404("No such rollout.")
    return rollout


@tenant_view(write=Role.ADMIN)
def rollouts(request, ctx: TenantContext):
    if request.method == "POST" and request.POST.get("current"):
        try:
            rollout = ro.rollout_create(tenant=ctx.tenant, actor=ctx.actor, name=request.POST.get("model", ""),
                                        current=request.POST["current"])
        except ro.RolloutError as exc:
            if exc.status == 404:
                raise Http404(exc.message) from None
            messages.error(request, exc.message)
        else:
            messages.success(request, f"{rollout.name} now answers with {rollout.current.name}.")
        return redirect("finetune-rollouts", ctx.tenant.slug)
    if request.method == "POST":
        try:
            rollout = ro.canary_start(tenant=ctx.tenant, actor=ctx.actor, model=request.POST.get("model", ""),
                                      canary=request.POST.get("canary", ""), percent=request.POST.get("percent"))
        except ro.RolloutError as exc:
            if exc.status == 404:
                raise Http404(exc.message) from None
            messages.error(request, exc.message)
        else:
            messages.success(request, f"{rollout.canary.name} now takes {rollout.canary_percent} % of {rollout.name}'s "
                                      "requests (from the gateway's next configuration reload).")
        return redirect("finetune-rollouts", ctx.tenant.slug)
    rows = [{"rollout": r, "versions": ro.comparison(r)}
            for r in AdapterRollout.objects.for_tenant(ctx.tenant).select_related("current", "canary").order_by("name")]
    adapters = list(Adapter.objects.for_tenant(ctx.tenant).select_related("base_model").order_by("name"))
    deployed = set(AdapterDeployment.objects.for_tenant(ctx.tenant).exclude(state=AdapterDeployment.State.FAILED)
                   .values_list("adapter_id", flat=True))
    names = [r["rollout"].name for r in rows] + [a.name for a in adapters if a.name not in {r["rollout"].name for r in rows}]
    return _render(request, ctx, "finetune/rollouts.html", {
        "rows": rows, "model_names": names, "canaries": [a for a in adapters if a.pk in deployed], "adapters": adapters})


@require_POST
@tenant_view(write=Role.ADMIN)
def rollout_promote(request, ctx: TenantContext, rollout_id: int):
    try:
        rollout = ro.canary_promote(tenant=ctx.tenant, actor=ctx.actor, rollout=_rollout(ctx, rollout_id))
        messages.success(request, f"{rollout.current.name} now serves all of {rollout.name}'s requests.")
    except ro.RolloutError as exc:
        messages.error(request, exc.message)
    return redirect("finetune-rollouts", ctx.tenant.slug)


@require_POST
@tenant_view(write=Role.ADMIN)
def rollout_rollback(request, ctx: TenantContext, rollout_id: int):
    try:
        rollout = ro.canary_rollback(tenant=ctx.tenant, actor=ctx.actor, rollout=_rollout(ctx, rollout_id))
        messages.success(request, f"Rolled back: {rollout.current.name} serves all of {rollout.name}'s requests again.")
    except ro.RolloutError as exc:
        messages.error(request, exc.message)
    return redirect("finetune-rollouts", ctx.tenant.slug)
