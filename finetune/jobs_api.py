"""OpenAI's Fine-tuning Jobs API under /v1/fine_tuning/jobs: create (and, extension, preview the cost of), list,
retrieve and cancel jobs, list a job's events and checkpoints. Another tenant's job is a 404."""

from __future__ import annotations

import json

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from finetune import services
from finetune.errors import FinetuneError
from finetune.models import FineTuneJob, JobCheckpoint, JobEvent, SystemPromptSnapshot
from finetune.v1_base import OpenAIView, page_by_created, page_by_public_id, page_limit, unix_time


class JobInput(serializers.Serializer):
    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    suffix = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=64)
    seed = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=2**31 - 1)
    hyperparameters = serializers.DictField(required=False, allow_null=True)
    method = serializers.DictField(required=False, allow_null=True)
    lora = serializers.DictField(required=False, allow_null=True)
    metadata = serializers.DictField(required=False, allow_null=True, child=serializers.CharField(max_length=512))
    integrations = serializers.ListField(required=False, allow_null=True)
    # Extension: start from one of the tenant's adapters or checkpoints (finetune/continuation.py).
    from_checkpoint = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=300)
    # Extension: the system prompt every example is rendered with: "tenant" (default: the one the gateway serves),
    # "none", or a saved version number (finetune/system_prompts.py; checked there, 400 with param system_prompt).
    system_prompt = serializers.JSONField(required=False, allow_null=True)

    def validate(self, attrs):
        kind, hyperparameters = parse_method(attrs.get("method") or None, attrs.get("hyperparameters"))
        attrs.update(method_type=kind, hyperparameters=hyperparameters)
        if attrs.get("integrations"):
            raise serializers.ValidationError({"integrations": "integrations are not supported"})
        return attrs


METHODS = ("supervised", "dpo")


def _method_error(message: str, param: str) -> FinetuneError:
    return FinetuneError(message, param=param, code="invalid_method")


def parse_method(method: dict | None, hyperparameters: dict | None) -> tuple[str, dict | None]:
    """OpenAI's `method` → (its type, the hyperparameters as requested).

    `{"type": "supervised", "supervised": {"hyperparameters": {...}}}` or `{"type": "dpo", "dpo": {"hyperparameters":
    {"beta", ...}}}`; without `method` the job is supervised with the top-level `hyperparameters` (still accepted, as
    by OpenAI), which also serve when the method gives none. 400 `invalid_method` with the field at fault; a
    hyperparameter's own errors (services.resolve_hyperparameters) name it (`beta`, `n_epochs`, …) as for supervised
    jobs."""
    if method is None:
        return "supervised", hyperparameters
    kind = method.get("type", "supervised")
    if kind not in METHODS:
        also = " (reinforcement fine-tuning is not offered here)" if kind == "reinforcement" else ""
        raise _method_error(f"method.type must be 'supervised' or 'dpo', got {json.dumps(kind)}{also}", "method.type")
    for key in sorted(set(method) - {"type", kind}):
        where = f"; with type {kind!r} the settings go under method.{kind}" if key in METHODS else ""
        raise _method_error(f"method has an unexpected key {key!r}{where}", f"method.{key}")
    settings = method.get(kind) or {}
    if not isinstance(settings, dict):
        raise _method_error(f"method.{kind} must be an object like {{\"hyperparameters\": {{...}}}}", f"method.{kind}")
    for key in sorted(set(settings) - {"hyperparameters"}):
        raise _method_error(f"method.{kind} has an unexpected key {key!r}; allowed: hyperparameters", f"method.{kind}.{key}")
    requested = settings.get("hyperparameters") or {}
    if not isinstance(requested, dict):
        raise _method_error(f"method.{kind}.hyperparameters must be an object", f"method.{kind}.hyperparameters")
    return kind, requested or hyperparameters


def _parse(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def job_data(job: FineTuneJob) -> dict:
    hp = job.hyperparameters
    error = {"code": job.error_code, "message": job.error_message, "param": job.error_param or None} if job.error_code else None
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": unix_time(job.created_at),
        "finished_at": unix_time(job.finished_at), "estimated_finish": unix_time(job.estimated_finish), "error": error,
        "fine_tuned_model": job.fine_tuned_model or None, "model": job.base_model.name,
        "organization_id": job.tenant.slug, "result_files": [], "seed": job.seed, "status": job.status,
        "trained_tokens": job.trained_tokens, "training_file": job.training_file_id,
        "validation_file": job.validation_file_id, "hyperparameters": hp,
        "method": {"type": job.method, job.method: {"hyperparameters": hp}},
        "metadata": job.metadata or None, "integrations": [], "user_provided_suffix": job.suffix or None,
        # extensions
        "lora": job.lora, "estimated_cost_cents": job.estimated_cost_cents,
        "progress": {"step": job.step, "total_steps": job.total_steps, "train_loss": job.train_loss},
        "system_prompt": job.system_prompt_data,
    }


def event_data(event: JobEvent) -> dict:
    return {"id": event.public_id, "object": "fine_tuning.job.event", "created_at": unix_time(event.created_at),
            "level": event.level, "message": event.message, "type": event.type, "data": event.data or None}


# OpenAI's checkpoint `metrics`; the valid_* and full_valid_* ones only for a job with a validation file (both over the
# whole file at the epoch's end here), the others on the epoch's last step.
CHECKPOINT_METRICS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                      "full_valid_loss", "full_valid_mean_token_accuracy")


# A DPO job's checkpoints add its preference metrics (extension: OpenAI's list has none for them).
DPO_METRICS = ("train_reward_margin", "train_reward_accuracy", "train_chosen_reward", "train_rejected_reward",
               "valid_reward_margin", "valid_reward_accuracy")


def checkpoint_data(job: FineTuneJob, ckpt: JobCheckpoint) -> dict:
    metrics = {k: ckpt.metrics.get(k) for k in CHECKPOINT_METRICS if ckpt.metrics.get(k) is not None}
    metrics.update({k: ckpt.metrics[k] for k in DPO_METRICS if ckpt.metrics.get(k) is not None})
    name = job.fine_tuned_model or f"ft:{job.base_model.name}:{job.tenant.slug}:{job.suffix}:{job.id[6:14]}"
    return {"id": ckpt.public_id, "object": "fine_tuning.job.checkpoint", "created_at": unix_time(ckpt.created_at),
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{ckpt.step}", "step_number": ckpt.step,
            "metrics": metrics, "fine_tuning_job_id": job.id}


class JobListApi(OpenAIView):
    @extend_schema(operation_id="fine_tuning_jobs_list", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request):
        """OpenAI-compatible: list the key's tenant's fine-tuning jobs, newest first; page with `limit` (1–100, default
        20) and `after` (a job id). API key with the finetune scope (401 without a key, 403 without the scope or for
        a suspended tenant). 400 for a bad `limit`.
        """
        limit = page_limit(request)
        qs = FineTuneJob.objects.for_tenant(self.tenant).select_related("base_model", "tenant")
        after = request.query_params.get("after")
        rows, has_more = page_by_created(qs, self.job_or_404(after) if after else None, limit=limit)
        return Response({"object": "list", "data": [job_data(j) for j in rows], "has_more": has_more})

    @extend_schema(operation_id="fine_tuning_jobs_create", tags=["Fine-tuning"], request=JobInput, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        """OpenAI-compatible: create a fine-tuning job and queue it (supervised method only; extensions: `lora`,
        `from_checkpoint` to start from one of the tenant's adapters or checkpoints of the same base model: `ft:…`,
        `ftckpt-…` or `ftjob-…`, keeping its rank and target modules; 404 `checkpoint_not_found`; and `system_prompt`:
        "tenant" (default: train with the system prompt the gateway serves), "none" or a saved version number, 400
        `invalid_system_prompt`; the job's `system_prompt` says {version, rule} or null). API
        key with the finetune scope. 400 for invalid fields or hyperparameters, a training/validation file with
        problems (`invalid_file`) or one still being validated (`file_not_ready`, with its progress); 404 for an
        unknown model or file; 429 when the tenant already has its maximum of queued or running jobs.
        """
        data = _parse(JobInput, request)
        job = services.finetune_job_create(
            tenant=self.tenant, actor=self.actor, model=data["model"], training_file=data["training_file"],
            validation_file=data.get("validation_file") or None, suffix=data.get("suffix") or "", seed=data.get("seed"),
            hyperparameters=data.get("hyperparameters"), lora=data.get("lora"), metadata=data.get("metadata"),
            from_checkpoint=data.get("from_checkpoint") or None, method=data["method_type"],
            system_prompt=data.get("system_prompt"))
        return Response(job_data(FineTuneJob.objects.for_tenant(self.tenant).select_related("base_model", "tenant").get(pk=job.pk)))


class JobEstimateApi(OpenAIView):
    """Extension: the price and time preview of a job before launching it (same input as a job)."""

    @extend_schema(operation_id="fine_tuning_jobs_estimate", tags=["Fine-tuning"], request=JobInput, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        """Extension: preview a job's cost (cents) and duration before creating it; same body and same 400/404 errors
        as creating one, and nothing is created. API key with the finetune scope.
        """
        data = _parse(JobInput, request)
        plan = services.finetune_job_plan(tenant=self.tenant, model=data["model"], training_file=data["training_file"],
                                          validation_file=data.get("validation_file") or None,
                                          hyperparameters=data.get("hyperparameters"), lora=data.get("lora"),
                                          from_checkpoint=data.get("from_checkpoint") or None,
                                          method=data["method_type"], system_prompt=data.get("system_prompt"))
        return Response({"object": "fine_tuning.job.estimate", "model": plan.base_model.name, "method": data["method_type"],
                         "training_file": plan.training_file.id, "hyperparameters": plan.hyperparameters,
                         "lora": plan.lora, "examples": plan.tokens["examples"],
                         "tokens_per_epoch": plan.tokens["total_tokens"], "tokens_estimated": plan.tokens["estimated"],
                         "system_prompt": SystemPromptSnapshot.describe(**plan.system_prompt),
                         "system_prompt_tokens": plan.tokens["system_prompt_tokens"], **plan.estimate})


class JobDetailApi(OpenAIView):
    @extend_schema(operation_id="fine_tuning_jobs_retrieve", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request, job_id: str):
        """OpenAI-compatible: one fine-tuning job, with progress (extension). API key with the finetune scope. 404 for
        a job id that is not the key's tenant's.
        """
        return Response(job_data(self.job_or_404(job_id)))


class JobCancelApi(OpenAIView):
    @extend_schema(operation_id="fine_tuning_jobs_cancel", request=None, tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def post(self, request, job_id: str):
        """OpenAI-compatible: cancel a job that has not finished; a running one stops within about a second and only
        completed steps are billed. API key with the finetune scope. 404 for a job id that is not the key's
        tenant's; 409 when the job has already finished.
        """
        job = services.finetune_job_cancel(tenant=self.tenant, actor=self.actor, job=self.job_or_404(job_id))
        return Response(job_data(job))


class JobEventsApi(OpenAIView):
    @extend_schema(operation_id="fine_tuning_jobs_events", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request, job_id: str):
        """OpenAI-compatible: a job's events, newest first; page with `limit` (1–100, default 20) and `after` (an event
        id). API key with the finetune scope. 400 for a bad `limit` or `after`; 404 for a job id that is not the
        key's tenant's.
        """
        job = self.job_or_404(job_id)
        qs = JobEvent.objects.for_tenant(self.tenant).filter(job=job)
        rows, has_more = page_by_public_id(request, qs, prefix=JobEvent.PUBLIC_ID_PREFIX, what="an event", by="id")
        return Response({"object": "list", "data": [event_data(e) for e in rows], "has_more": has_more})


class JobCheckpointsApi(OpenAIView):
    @extend_schema(operation_id="fine_tuning_jobs_checkpoints", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request, job_id: str):
        """OpenAI-compatible: a job's checkpoints with their metrics, latest step first; page with `limit` (1–100,
        default 20) and `after` (a checkpoint id). API key with the finetune scope. 400 for a bad `limit` or
        `after`; 404 for a job id that is not the key's tenant's.
        """
        job = self.job_or_404(job_id)
        qs = JobCheckpoint.objects.for_tenant(self.tenant).filter(job=job)
        rows, has_more = page_by_public_id(request, qs, prefix=JobCheckpoint.PUBLIC_ID_PREFIX, what="a checkpoint",
                                            by="step")
        return Response({"object": "list", "data": [checkpoint_data(job, c) for c in rows], "has_more": has_more})
