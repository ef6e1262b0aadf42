"""Uploading a tenant's own LoRA adapter (finetune/byo.py) through the API.

- `/v1/adapters` (platform extension beside OpenAI's Files and Fine-tuning; API key with the `finetune` scope, the
  key's tenant; OpenAI's error shape): POST uploads, GET lists the tenant's adapters.
- `/api/tenants/<slug>/adapters/upload/` (management API; admins and owners, or a management:write key, as deploying
  is): POST uploads; refusals are `{"detail", "code", "param", "problems"}`.

Both take multipart: `file` once (a .zip or .tar holding adapter_config.json and adapter_model.safetensors) or twice
(the two files), `model` (the base model's public name; optional when the config's base_model_name_or_path names it),
`suffix` (in the model name, as a job's), `deploy` ("true" / "false"; default: as the tenant's model settings deploy
finished jobs).
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from finetune import byo
from finetune.v1_base import OpenAIView
from finetune.services import FinetuneError
from serving.models import Adapter, AdapterDeployment
from tenants.api_base import TenantAPIView
from tenants.models import Role

UPLOAD_SCHEMA = {"multipart/form-data": {"type": "object", "properties": {
    "file": {"type": "array", "items": {"type": "string", "format": "binary"},
             "description": "One .zip / .tar holding adapter_config.json and adapter_model.safetensors, or those two files."},
    "model": {"type": "string", "description": "The base model's public name (default: the one the config names)."},
    "suffix": {"type": "string"}, "deploy": {"type": "boolean"}}, "required": ["file"]}}


def _flag(value, param: str) -> bool | None:
    if value in (None, ""):
        return None
    if str(value).lower() in ("true", "1", "yes", "on"):
        return True
    if str(value).lower() in ("false", "0", "no", "off"):
        return False
    raise FinetuneError(f"{param} must be true or false, got {value!r}", param=param)


def _upload(request, *, tenant, actor) -> byo.UploadOutcome:
    return byo.adapter_upload(tenant=tenant, actor=actor, parts=byo.parts_from_files(request.FILES.getlist("file")),
                              model=request.data.get("model") or None, suffix=request.data.get("suffix") or None,
                              deploy=_flag(request.data.get("deploy"), "deploy"))


def adapter_object(adapter: Adapter) -> dict:
    """An adapter as /v1 shows it: `id` is the model name to call."""
    deployments = AdapterDeployment.objects.for_tenant(adapter.tenant_id).filter(adapter=adapter).select_related("pool")
    return {"id": adapter.name, "object": "adapter", "created_at": int(adapter.created_at.timestamp()),
            "base_model": adapter.base_model.name, "source": adapter.source, "rank": adapter.rank,
            "alpha": adapter.alpha, "target_modules": adapter.target_modules, "parameters": adapter.parameters,
            "bytes": adapter.size_bytes,
            "deployments": [{"pool": d.pool.name, "state": d.state, "error": d.error} for d in deployments]}


def _outcome_data(outcome: byo.UploadOutcome) -> dict:
    return {**adapter_object(outcome.adapter), "not_deployed": outcome.not_deployed or None}


class AdapterListV1Api(OpenAIView):
    parser_classes = [MultiPartParser]
    expensive_methods = frozenset({"POST"})  # an upload: at least PLATFORM_API_EXPENSIVE_COST, one unit per MiB

    @extend_schema(operation_id="adapters_v1_list", tags=["Adapters"], responses=OpenApiTypes.OBJECT)
    def get(self, request):
        """Platform extension: the key's tenant's adapters (trained and uploaded), newest first, with where each is
        deployed. API key with the finetune scope."""
        rows = Adapter.objects.for_tenant(self.tenant).select_related("base_model")
        return Response({"object": "list", "data": [adapter_object(a) for a in rows], "has_more": False})

    @extend_schema(operation_id="adapters_v1_upload", tags=["Adapters"], request=UPLOAD_SCHEMA, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        """Platform extension: upload your own PEFT LoRA for one of your base models; it is checked (shapes against
        the base model, rank within its pool, safetensors only, size) before anything is stored, then deployed like
        a fine-tuned one. 201 with the adapter (`id` is the model name to call; `not_deployed` says why it is not
        deployed, if it is not). 400 with the reason (which file, setting or tensor; expected vs got shape); 404 for
        an unknown `model`; 409 when no pool serves the base model; 413 past PLATFORM_FINETUNE_MAX_ADAPTER_BYTES."""
        outcome = _upload(request, tenant=self.tenant, actor=self.actor)
        return Response(_outcome_data(outcome), status=status.HTTP_201_CREATED)


class AdapterUploadApi(TenantAPIView):
    """Upload the tenant's own LoRA adapter (admin+, or a management:write key)."""

    write_role = Role.ADMIN
    parser_classes = [MultiPartParser]
    expensive_methods = frozenset({"POST"})

    @extend_schema(operation_id="adapters_upload", tags=["Adapters"], request=UPLOAD_SCHEMA, responses=OpenApiTypes.OBJECT)
    def post(self, request, tenant_slug: str):
        """Upload a PEFT LoRA (multipart `file`: one .zip / .tar, or adapter_config.json and adapter_model.safetensors;
        `model`, `suffix`, `deploy`), checked against the base model and its pool before it is stored, then deployed as
        a trained adapter is. 201 with the adapter; 400 / 409 / 413 `{"detail", "code", "param", "problems"}` with every
        problem found; 403 below admin; 404 when the tenant is not yours or `model` is not one of its base models."""
        try:
            outcome = _upload(request, tenant=self.ctx.tenant, actor=self.ctx.actor)
        except FinetuneError as exc:
            return Response({"detail": exc.message, "code": exc.code, "param": exc.param,
                             "problems": getattr(exc, "problems", [exc.message])}, status=exc.status)
        return Response(_outcome_data(outcome), status=status.HTTP_201_CREATED)
