"""Console: merged models on the Adapters page (t/<slug>/finetune/adapters/): for a tenant with a dedicated pool,
"Merge for <pool>" on each adapter of that pool's base model (admins and owners, as deploying), and the merged
models with their state, size and the GPU memory the pool needs for them (finetune.planning.merged_model_plan)."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from finetune import merge, planning
from serving.models import Adapter, BackendPool, MergedModel
from tenants.access import TenantContext, tenant_view
from tenants.models import Role


def adapters_context(ctx: TenantContext, rows: list[dict]) -> dict:
    """Each row's `merge_pool` (the dedicated pool a merge of it would serve on, or None) and `merged` (its merged
    models), and the page's `merged_models` with their plans."""
    has_dedicated = BackendPool.objects.dedicated_to(ctx.tenant).exists()
    pools: dict[int, BackendPool | None] = {}
    for row in rows:
        base = row["adapter"].base_model
        if has_dedicated and base.pk not in pools:
            try:
                pools[base.pk] = merge.dedicated_pool_for(ctx.tenant, base)
            except merge.MergeRefused:
                pools[base.pk] = None
    merged = list(MergedModel.objects.for_tenant(ctx.tenant).select_related("adapter__base_model", "pool__base_model"))
    for row in rows:
        row["merge_pool"] = pools.get(row["adapter"].base_model_id)
        row["merged"] = [m for m in merged if m.adapter_id == row["adapter"].pk]
    return {"merged_models": [{"merged": m, "plan": planning.merged_model_plan(pool=m.pool, merged=m)} for m in merged],
            "has_dedicated_pool": has_dedicated}


@require_POST
@tenant_view(write=Role.ADMIN)
def adapter_merge(request, ctx: TenantContext, adapter_id: int):
    adapter = Adapter.objects.for_tenant(ctx.tenant).select_related("base_model").filter(pk=adapter_id).first()
    if adapter is None:
        raise Http404("No such adapter.")
    try:
        merged = merge.merged_model_request(tenant=ctx.tenant, adapter=adapter, actor=ctx.actor)
    except merge.MergeRefused as exc:
        messages.error(request, exc.message)
    else:
        merged.refresh_from_db()
        messages.success(request, f"{adapter.name} for {merged.pool.name}: {merged.get_state_display()}.")
    return redirect("finetune-adapters", ctx.tenant.slug)
