"""The management API's merged models (finetune/merge.py) under /api/tenants/<slug>/: list them, ask for an adapter
merged for the tenant's dedicated pool."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response

from finetune import merge, planning
from serving.models import Adapter, MergedModel
from tenants.api_base import TenantAPIView
from tenants.models import Role


def merged_data(merged: MergedModel) -> dict:
    plan = planning.merged_model_plan(pool=merged.pool, merged=merged)
    return {"id": merged.pk, "adapter": merged.adapter.name, "base_model": merged.adapter.base_model.name,
            "pool": merged.pool.name, "state": merged.state, "error": merged.error, "parameters": merged.parameters,
            "size_bytes": merged.size_bytes, "weights_bytes": merged.weights_bytes, "dtype": merged.dtype,
            "created_at": merged.created_at, "finished_at": merged.finished_at, "serving_since": merged.serving_since,
            "gpu_memory": {k: plan[k] for k in ("weights_gpu_bytes", "kv_cache_bytes", "need_bytes", "gpu_memory_bytes",
                                                "available_bytes", "fits")}}


class MergedModelListApi(TenantAPIView):
    """The tenant's merged models (isolated tenancy: adapters merged into their base weights for a dedicated pool)."""

    @extend_schema(operation_id="merged_models_list", tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def get(self, request, tenant_slug: str):
        """Each merged model with its state (queued, merging, ready, serving, failed), size and the GPU memory its
        dedicated pool needs for it (not paginated). Any member, or an API key with management:read or
        management:write. 404 when the tenant is not yours."""
        rows = self.scoped(MergedModel).select_related("adapter__base_model", "pool__base_model")
        return Response([merged_data(m) for m in rows])


class AdapterMergeApi(TenantAPIView):
    """Merge an adapter into its base weights for the tenant's dedicated pool (admin+, or a management:write key)."""

    write_role = Role.ADMIN

    @extend_schema(operation_id="adapters_merge", request=None, tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str, adapter_id: int):
        """Queue the merge on a worker (202 with the merged model; asking again returns it as it is, a failed one is
        tried again). Once `ready`, the platform team restarts the dedicated pool's backends on it and it serves the
        adapter's name. Admins and owners, or an API key with management:write. 403 when under-privileged; 404 for an
        adapter id that is not this tenant's; 409 `no_dedicated_pool`, `base_model_not_served` or
        `base_weights_missing`, with the reason."""
        adapter = self.get_scoped_or_404(Adapter, pk=adapter_id)
        try:
            merged = merge.merged_model_request(tenant=self.ctx.tenant, adapter=adapter, actor=self.ctx.actor)
        except merge.MergeRefused as exc:
            return Response({"detail": exc.message, "code": exc.code}, status=exc.status)
        merged.refresh_from_db()
        return Response(merged_data(merged), status=status.HTTP_202_ACCEPTED)
