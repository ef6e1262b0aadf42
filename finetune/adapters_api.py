"""The management API's adapter endpoints under /api/tenants/<slug>/adapters/: list the tenant's adapters with their
deployments, deploy one to the tenant's pool for its base model, take one off every pool. (Uploads: byo_api.py.)"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response

from finetune import deploy
from serving.models import Adapter, AdapterDeployment
from tenants.api_base import TenantAPIView
from tenants.models import Role


def adapter_data(adapter: Adapter) -> dict:
    deployments = AdapterDeployment.objects.for_tenant(adapter.tenant_id).filter(adapter=adapter).select_related("pool")
    return {"id": adapter.pk, "name": adapter.name, "base_model": adapter.base_model.name, "source": adapter.source,
            "rank": adapter.rank,
            "alpha": adapter.alpha, "target_modules": adapter.target_modules, "parameters": adapter.parameters,
            "size_bytes": adapter.size_bytes, "created_at": adapter.created_at,
            "deployments": [{"pool": d.pool.name, "state": d.state, "error": d.error} for d in deployments]}


class AdapterListApi(TenantAPIView):
    """The tenant's fine-tuned adapters and where they are deployed."""

    @extend_schema(operation_id="adapters_list", tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def get(self, request, tenant_slug: str):
        """The tenant's fine-tuned adapters and the pools they are deployed to, with each deployment's state (not
        paginated). Any member, or an API key with management:read or management:write. 404 when the tenant is not
        yours.
        """
        return Response([adapter_data(a) for a in self.scoped(Adapter).select_related("base_model")])


class AdapterDeployApi(TenantAPIView):
    """Publish an adapter to the tenant's pool for its base model (admin+, or a management:write key)."""

    write_role = Role.ADMIN

    @extend_schema(operation_id="adapters_deploy", request=None, tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str, adapter_id: int):
        """Deploy an adapter to the tenant's pool for its base model (a dedicated pool, else the shared one).
        Idempotent. Admins and owners, or an API key with management:write. 403 when under-privileged; 404 for an
        adapter id that is not this tenant's; 409 when the base model is no longer available to the tenant or no
        pool serves it.
        """
        adapter = self.get_scoped_or_404(Adapter, pk=adapter_id)
        try:
            deployment = deploy.adapter_deploy(tenant=self.ctx.tenant, adapter=adapter, actor=self.ctx.actor)
        except deploy.DeployError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response({"adapter": adapter.name, "pool": deployment.pool.name, "state": deployment.state,
                         "error": deployment.error})


class AdapterUndeployApi(TenantAPIView):
    write_role = Role.ADMIN

    @extend_schema(operation_id="adapters_undeploy", request=None, tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str, adapter_id: int):
        """Take an adapter off every pool it is deployed to; `undeployed_from` lists those pools (empty when it was not
        deployed). Admins and owners, or an API key with management:write. 403 when under-privileged; 404 for an
        adapter id that is not this tenant's.
        """
        adapter = self.get_scoped_or_404(Adapter, pk=adapter_id)
        removed = deploy.adapter_undeploy(tenant=self.ctx.tenant, adapter=adapter, actor=self.ctx.actor)
        return Response({"adapter": adapter.name, "undeployed_from": removed})
