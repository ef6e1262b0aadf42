"""Adapter versions and canary rollout through the management API (finetune/rollout.py), under
/api/tenants/<slug>/rollouts/. Any member (or a management:read key) reads; admins and owners (or a management:write
key) start, change, promote and roll back, as deploying is. Another tenant's rollout or adapter is a 404.

- `GET  rollouts/`: the tenant's rollouts, each with its versions' figures from the ledger.
- `POST rollouts/` `{"model": <a rollout's name or one of the tenant's adapter names>, "canary": <adapter id or name>,
  "percent": 1..100}`: start a canary (or change its share). With `"current": <adapter id or name>`, `model` is a new
  tenant-chosen name for that version (canary and percent then optional).
- `GET  rollouts/<id>/`; `POST rollouts/<id>/promote/`; `POST rollouts/<id>/rollback/`.
"""

from __future__ import annotations

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from finetune import rollout as ro
from serving.models import AdapterRollout
from tenants.api_base import TenantAPIView
from tenants.models import Role

START_SCHEMA = {"application/json": {"type": "object", "required": ["model"], "properties": {
    "current": {"oneOf": [{"type": "integer"}, {"type": "string"}],
                "description": "Name a version: `model` becomes a new name the tenant chose, served by this adapter."},
    "model": {"type": "string", "description": "The model name whose traffic is split (a rollout's, or an adapter's ft: name)."},
    "canary": {"oneOf": [{"type": "integer"}, {"type": "string"}], "description": "The new version: one of the tenant's adapters, by id or name."},
    "percent": {"type": "integer", "minimum": 1, "maximum": 100}}}}


def _error(exc: ro.RolloutError) -> Response:
    body = {"detail": exc.message}
    if exc.param:
        body["param"] = exc.param
    return Response(body, status=exc.status)


class _RolloutView(TenantAPIView):
    write_role = Role.ADMIN

    def rollout(self, rollout_id: int) -> AdapterRollout:
        return self.get_scoped_or_404(AdapterRollout, pk=rollout_id)


class RolloutListApi(_RolloutView):
    @extend_schema(operation_id="rollouts_list", tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def get(self, request, tenant_slug: str):
        """The tenant's rollouts: model name, current version, canary and share, and per version the requests, errors,
        error rate, tokens and p50 / p95 duration (ms) from the ledger since the canary started."""
        rows = self.scoped(AdapterRollout).select_related("current", "canary").order_by("name")
        return Response([ro.rollout_dict(r) for r in rows])

    @extend_schema(operation_id="rollouts_canary_start", tags=["Adapters"], request=START_SCHEMA, responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str):
        """Give a new version `percent` % of a model name's requests (the same canary again: change its share); with
        `current`, first name that version with `model`, a new name of the tenant's choosing (409 if it names one).
        Effective at the gateway's next configuration reload. 400 for a bad share, a canary on another base model or
        the current version itself; 404 for a model or adapter that is not this tenant's; 409 for an undeployed canary."""
        data = request.data if isinstance(request.data, dict) else {}
        model = str(data.get("model") or "")
        try:
            with transaction.atomic():  # a name and its first canary together, or neither
                rollout = None
                if data.get("current") not in (None, ""):
                    rollout = ro.rollout_create(tenant=self.ctx.tenant, actor=self.ctx.actor, name=model, current=data["current"])
                if rollout is None or data.get("canary") not in (None, ""):
                    rollout = ro.canary_start(tenant=self.ctx.tenant, actor=self.ctx.actor, model=model,
                                              canary=data.get("canary") or "", percent=data.get("percent"))
        except ro.RolloutError as exc:
            return _error(exc)
        return Response(ro.rollout_dict(rollout), status=201)


class RolloutDetailApi(_RolloutView):
    @extend_schema(operation_id="rollouts_get", tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def get(self, request, tenant_slug: str, rollout_id: int):
        """One rollout with its versions' figures."""
        return Response(ro.rollout_dict(self.rollout(rollout_id)))


class RolloutPromoteApi(_RolloutView):
    @extend_schema(operation_id="rollouts_promote", tags=["Adapters"], request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str, rollout_id: int):
        """The canary becomes the current version (100 % of the name's requests). 409 when there is no canary."""
        try:
            rollout = ro.canary_promote(tenant=self.ctx.tenant, actor=self.ctx.actor, rollout=self.rollout(rollout_id))
        except ro.RolloutError as exc:
            return _error(exc)
        return Response(ro.rollout_dict(rollout))


class RolloutRollbackApi(_RolloutView):
    @extend_schema(operation_id="rollouts_rollback", tags=["Adapters"], request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str, rollout_id: int):
        """Drop the canary: the current version serves 100 % again. 409 when there is no canary."""
        try:
            rollout = ro.canary_rollback(tenant=self.ctx.tenant, actor=self.ctx.actor, rollout=self.rollout(rollout_id))
        except ro.RolloutError as exc:
            return _error(exc)
        return Response(ro.rollout_dict(rollout))
