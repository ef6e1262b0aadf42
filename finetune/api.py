"""The OpenAI-compatible Files and Fine-tuning Jobs API under /v1/, and adapter deployment under /api/.

/v1 views authenticate only with an API key holding the `finetune` scope; the tenant is the key's. Errors
use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` so the OpenAI SDK raises its usual
exceptions. Another tenant's file or job is a 404, exactly like one that does not exist.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db.models import Q
from django.http import FileResponse, Http404, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from finetune import deploy, public_ids, services, storage
from finetune.models import FineTuneJob, JobCheckpoint, JobEvent, TrainingFile
from finetune.services import FinetuneError
from serving import selectors as serving_selectors
from serving.models import Adapter, AdapterDeployment
from tenants import ratelimit
from tenants.api_base import SealedMethods, TenantAPIView
from tenants.api_auth import ApiKeyAuthentication
from tenants.api_refusals import MISSING_KEY, tenant_suspended
from tenants.models import ApiKey, Role
from common.openai_errors import error_body
from common.parsers import JSONParser  # bounded depth, no lone surrogates (as every JSON entry point)
from tenants.services import Actor

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
FILES_MAX_LIMIT = 10_000  # OpenAI's range for listing files (1–10,000, and the default)


# ---- errors --------------------------------------------------------------------------------------

def openai_error(message: str, status_code: int, code: str | None = None, param: str | None = None) -> Response:
    return Response(error_body(message, status_code, code, param), status=status_code)


@csrf_exempt
def unknown_url(request, *args, **kwargs) -> JsonResponse:
    """Any other path under /v1/ (routed last): OpenAI's JSON 404 naming the method and path, never Django's HTML
    page. It serves no data, so it needs no key."""
    method, path = request.method, request.path
    message = f"Invalid URL ({method} {path})."
    if path.endswith("/") and _is_v1_route(path.rstrip("/")):
        message += f" Remove the trailing slash: {method} {path.rstrip('/')}."
    else:  # the gateway's own paths reach Django only when it runs without ASGI
        from serving.gateway import is_gateway_path

        if is_gateway_path({"path": path, "method": method}):
            message += " The inference gateway serves it, only under ASGI: run `uvicorn portal.asgi:application`."
    return JsonResponse(error_body(message, 404, "unknown_url"), status=404)


def _is_v1_route(path: str) -> bool:
    try:
        return resolve(path).url_name != "v1-unknown-url"
    except Resolver404:
        return False


def _first_error(detail, prefix: str = "") -> tuple[str | None, str]:
    """(param, message) of the first field error in a DRF validation detail."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            param = key if key != "non_field_errors" else None
            inner, message = _first_error(value, f"{prefix}.{key}" if prefix else key)
            return (inner or param), message
    if isinstance(detail, list) and detail:
        return _first_error(detail[0], prefix)
    return (prefix or None), str(detail)


def openai_exception_handler(exc, context):
    """DRF exception handler of the /v1 views only: every error in OpenAI's shape."""
    if isinstance(exc, FinetuneError):
        return openai_error(exc.message, exc.status, exc.code, exc.param)
    if isinstance(exc, Http404):
        return openai_error(str(exc) or "Not found.", 404, "not_found")
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):  # raised with the shared code
        response = openai_error(str(exc.detail), 401, exc.get_codes())
        response["WWW-Authenticate"] = "Bearer"
        return response
    if isinstance(exc, exceptions.PermissionDenied):  # raised with its code: insufficient_scope, tenant_suspended
        return openai_error(str(exc.detail), 403, exc.get_codes())
    if isinstance(exc, DjangoPermissionDenied):
        return openai_error(str(exc) or "You may not do this.", 403, "insufficient_scope")
    if isinstance(exc, exceptions.ValidationError):
        param, message = _first_error(exc.detail)
        return openai_error(f"{param}: {message}" if param else message, 400, "invalid_request", param)
    if isinstance(exc, exceptions.Throttled):  # tenants/ratelimit.py: OpenAI's rate-limit error, with Retry-After
        response = openai_error(str(exc.detail), 429, "rate_limit_exceeded")
        if exc.wait is not None:
            response["Retry-After"] = str(exc.wait)
        return response
    if isinstance(exc, exceptions.APIException):
        return openai_error(str(exc.detail), exc.status_code, exc.default_code)
    return None


# ---- the /v1 base --------------------------------------------------------------------------------


class IgnoreAccept(DefaultContentNegotiation):
    """Like OpenAI, /v1 ignores `Accept`: it answers JSON, or a file's bytes from /content. The SDK downloads a file
    with `Accept: application/binary`; negotiating would answer 406 before the view ran (even for another tenant's
    file, instead of its 404)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class OpenAIView(SealedMethods, APIView):
    """Base of the /v1 fine-tuning views: API key with the `finetune` scope; the tenant is the key's.

    `initial()` sets `self.tenant` from the key; views reach rows only through `file_or_404()` / `job_or_404()` or
    `Model.objects.for_tenant(self.tenant)`. Like TenantAPIView's, those methods cannot be overridden.
    """

    authentication_classes = [ApiKeyAuthentication]
    permission_classes: list = []
    renderer_classes = [JSONRenderer]
    content_negotiation_class = IgnoreAccept
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    pagination_class = None

    _FINAL = ("dispatch", "initial", "file_or_404", "job_or_404", "get_exception_handler")

    def get_exception_handler(self):
        return openai_exception_handler

    def initial(self, request, *args, **kwargs):
        if not hasattr(self, request.method.lower()):  # before the key, as the gateway does: routes are public
            allowed = [m for m in self.allowed_methods if m not in ("HEAD", "OPTIONS")]
            raise exceptions.MethodNotAllowed(request.method, f"Use {' or '.join(allowed)} on {request.path}.")
        super().initial(request, *args, **kwargs)
        key = request.auth
        if not isinstance(key, ApiKey):
            raise exceptions.NotAuthenticated(MISSING_KEY.message, code=MISSING_KEY.code)
        if not key.has_scope(ApiKey.Scope.FINETUNE):
            raise exceptions.PermissionDenied("This API key lacks the 'finetune' scope. Create a key with that scope in the console.",
                                              code="insufficient_scope")
        if not key.tenant.is_active:
            refusal = tenant_suspended(key.tenant.slug, key.tenant.suspended_reason, disabled="fine-tuning")
            raise exceptions.PermissionDenied(refusal.message, code=refusal.code)
        self.tenant = key.tenant
        self.actor = Actor(key=key)
        # The tenant's API bucket (shared with /api/), before the handler parses a body: 429 `rate_limit_exceeded`.
        ratelimit.charge(tenant=self.tenant, cost=ratelimit.cost_of(self, request), request=request)

    def file_or_404(self, file_id: str) -> TrainingFile:
        file = TrainingFile.objects.for_tenant(self.tenant).filter(pk=file_id).first()
        if file is None:
            raise FinetuneError(f"No such File object: {file_id}", status=404, param="file_id", code="file_not_found")
        return file

    def job_or_404(self, job_id: str) -> FineTuneJob:
        job = FineTuneJob.objects.for_tenant(self.tenant).select_related("base_model", "tenant").filter(pk=job_id).first()
        if job is None:
            raise FinetuneError(f"No such fine-tuning job: {job_id}", status=404, param="fine_tuning_job_id", code="job_not_found")
        return job


def _page_by_public_id(request, qs, *, prefix: str, what: str, by: str) -> tuple[list, bool]:
    """(rows, has_more): up to `limit` rows of `qs` in descending `by` (a unique field), after the row that the `after`
    id names (`{prefix}-…`, finetune/public_ids.py). That row must be one of `qs`'s: a forged id or another job's
    answers 400, so ids cannot be probed."""
    limit = _limit(request)
    after = request.query_params.get("after")
    if after:
        pk = public_ids.decode(prefix, after)
        anchor = qs.filter(pk=pk).first() if pk is not None else None
        if anchor is None:
            raise FinetuneError(f"after must be the id of {what} of this job ({prefix}-…), as a previous page gave it",
                                param="after")
        qs = qs.filter(**{f"{by}__lt": getattr(anchor, by)})
    rows = list(qs.order_by(f"-{by}")[: limit + 1])
    return rows[:limit], len(rows) > limit


def _page_by_created(qs, anchor, *, limit: int, ascending: bool = False) -> tuple[list, bool]:
    """(rows, has_more): up to `limit` rows of `qs` in (created_at, id) order, newest first unless `ascending`,
    after the `anchor` row (None: from the start). The id breaks ties, so pages never skip or repeat a row."""
    if anchor is not None:
        if ascending:
            qs = qs.filter(Q(created_at__gt=anchor.created_at) | Q(created_at=anchor.created_at, pk__gt=anchor.pk))
        else:
            qs = qs.filter(Q(created_at__lt=anchor.created_at) | Q(created_at=anchor.created_at, pk__lt=anchor.pk))
    rows = list(qs.order_by(*(("created_at", "pk") if ascending else ("-created_at", "-pk")))[: limit + 1])
    return rows[:limit], len(rows) > limit


def _limit(request, *, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    raw = request.query_params.get("limit", default)
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        raise FinetuneError("limit must be an integer", param="limit") from None
    if not 1 <= limit <= maximum:
        raise FinetuneError(f"limit must be between 1 and {maximum:,}", param="limit")
    return limit


def _ts(value) -> int | None:
    return int(value.timestamp()) if value else None


# ---- files ---------------------------------------------------------------------------------------


def file_data(file: TrainingFile) -> dict:
    """OpenAI's file object; `status` is `uploaded` while a worker validates it (extension: `progress`)."""
    return {"id": file.id, "object": "file", "bytes": file.bytes, "created_at": _ts(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": file.status,
            "status_details": _problem_summary(file) if file.status == TrainingFile.Status.ERROR else None,
            "progress": {"percent": file.progress_percent, "lines_validated": file.lines_validated,
                         "bytes_validated": file.bytes_validated}}


def _problem_summary(file: TrainingFile) -> str:
    problems = file.validation.get("problems", [])
    n = len(problems) + file.validation.get("problems_omitted", 0)
    first = problems[0] if problems else None
    where = f"line {first['line']}: " if first and first.get("line") else ""
    return f"{n} problem(s); first: {where}{first['message'] if first else ''}. See /v1/files/{file.id}/validation."


class FileListApi(OpenAIView):
    expensive_methods = frozenset({"POST"})  # an upload: at least PLATFORM_API_EXPENSIVE_COST, one unit per MiB

    @extend_schema(operation_id="files_list", tags=["Files"], responses=OpenApiTypes.OBJECT,
                   parameters=[OpenApiParameter("order", str, enum=["asc", "desc"], description="By creation time; default desc."),
                               OpenApiParameter("limit", int, description="1–10,000 (default 10,000)."),
                               OpenApiParameter("after", str, description="A file id: the page starts after it."),
                               OpenApiParameter("purpose", str, description="Only files with this purpose.")])
    def get(self, request):
        """OpenAI-compatible: list the key's tenant's files by creation time, `order` `desc` (newest first, the
        default) or `asc`. Filter with `purpose`; page with `limit` (1–10,000, default 10,000) and `after` (a file id:
        the next page starts after it, in the same order). API key with the finetune scope (401 without a key, 403
        without the scope or for a suspended tenant). 400 for a bad `order` or `limit`; 404 for an `after` that is
        not one of the tenant's files.
        """
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise FinetuneError(f"order must be 'asc' (oldest first) or 'desc' (newest first, the default), not {order!r}",
                                param="order")
        limit = _limit(request, default=FILES_MAX_LIMIT, maximum=FILES_MAX_LIMIT)
        qs = TrainingFile.objects.for_tenant(self.tenant)
        if request.query_params.get("purpose"):
            qs = qs.filter(purpose=request.query_params["purpose"])
        after = request.query_params.get("after")
        rows, has_more = _page_by_created(qs, self.file_or_404(after) if after else None, limit=limit,
                                          ascending=order == "asc")
        return Response({"object": "list", "data": [file_data(f) for f in rows], "has_more": has_more,
                         "first_id": rows[0].id if rows else None, "last_id": rows[-1].id if rows else None})

    @extend_schema(operation_id="files_create", tags=["Files"], request={"multipart/form-data": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["fine-tune"]}}, "required": ["file", "purpose"]}}, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        """OpenAI-compatible: upload a JSONL training file (multipart: `file`, `purpose`=fine-tune; extension: `model`,
        a base model whose tokenizer counts the tokens). The answer comes once the file is stored, with status
        `uploaded`: a worker validates it, then GET /v1/files/{id} says `processed`, or `error` with `status_details`
        (the SDK's `files.wait_for_processing(id)` waits for that; `progress` says how far it is). API key with the
        finetune scope. 400 for a missing file or purpose, or a purpose other than fine-tune; 404 for an unknown
        `model`; 413 over the upload limit; 429 `too_many_pending_files` while PLATFORM_FINETUNE_MAX_PENDING_FILES
        of the tenant's uploads wait to be validated (they are validated one at a time, in upload order), or
        `rate_limit_exceeded` past its API rate; 503 when storage fails.
        """
        services.training_file_upload_check(tenant=self.tenant)  # 429 before the body is parsed
        upload = request.FILES.get("file")
        if upload is None:
            raise FinetuneError("file is required: send the JSONL file as multipart form field 'file'", param="file",
                                code="missing_file")
        purpose = request.data.get("purpose")
        if not purpose:
            raise FinetuneError("purpose is required; use 'fine-tune'", param="purpose", code="missing_purpose")
        base_model = None
        if request.data.get("model"):  # extension: count tokens with this base model's tokenizer at validation
            base_model = next((bm for bm in serving_selectors.base_models_for_tenant(self.tenant)
                               if bm.name == request.data["model"]), None)
            if base_model is None:
                raise FinetuneError(f"The model '{request.data['model']}' does not exist or you do not have access to it.",
                                    status=404, param="model", code="model_not_found")
        file = services.training_file_upload(tenant=self.tenant, actor=self.actor, filename=upload.name,
                                             content=upload, purpose=purpose, base_model=base_model)
        return Response(file_data(file), status=status.HTTP_200_OK)


class FileDetailApi(OpenAIView):
    @extend_schema(operation_id="files_retrieve", tags=["Files"], responses=OpenApiTypes.OBJECT)
    def get(self, request, file_id: str):
        """OpenAI-compatible: one file; `status` `uploaded` while it is validated (extension: `progress`), then
        `processed` or `error`. API key with the finetune scope. 404 for a file id that is not the key's tenant's.
        """
        return Response(file_data(self.file_or_404(file_id)))

    @extend_schema(operation_id="files_delete", tags=["Files"], responses={200: OpenApiTypes.OBJECT})  # OpenAI answers 200 with a body
    def delete(self, request, file_id: str):
        """OpenAI-compatible: delete a file and its contents. API key with the finetune scope. 404 for a file id that
        is not the key's tenant's; 409 while a fine-tuning job uses the file.
        """
        file = self.file_or_404(file_id)
        services.training_file_delete(tenant=self.tenant, actor=self.actor, file=file)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContentApi(OpenAIView):
    @extend_schema(operation_id="files_content", tags=["Files"], responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request, file_id: str):
        """OpenAI-compatible: download the file's bytes as uploaded. API key with the finetune scope. 404 for a file id
        that is not the key's tenant's.
        """
        file = self.file_or_404(file_id)
        # Streamed from storage in blocks (a file may be hundreds of MB): never read whole into the web process.
        return FileResponse(storage.training_file_open(file), as_attachment=True, filename=file.filename,
                            content_type="application/octet-stream")


class FileValidationApi(OpenAIView):
    """Extension: the full validation report (every problem with line, path, code, message), stats, token counts."""

    @extend_schema(operation_id="files_validation", tags=["Files"], responses=OpenApiTypes.OBJECT)
    def get(self, request, file_id: str):
        """Extension: the file's full validation report (every problem with line, path, code and message), its
        statistics and token counts; while it is validated, `status` `uploaded`, its `progress` and no report yet.
        API key with the finetune scope. 404 for a file id that is not the key's tenant's.
        """
        file = self.file_or_404(file_id)
        return Response({"object": "file.validation", "id": file.id, "status": file.status, **file.validation,
                         "token_counts": file.token_counts, "progress": file_data(file)["progress"]})


# ---- jobs ----------------------------------------------------------------------------------------


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

    def validate(self, attrs):
        method = attrs.get("method") or None
        if method is not None:
            if method.get("type", "supervised") != "supervised":
                raise serializers.ValidationError({"method": "only the 'supervised' method is supported"})
            settings = method.get("supervised") or {}
            if not isinstance(settings, dict) or not isinstance(settings.get("hyperparameters", {}) or {}, dict):
                raise serializers.ValidationError({"method": "method.supervised.hyperparameters must be an object"})
            attrs["hyperparameters"] = settings.get("hyperparameters") or attrs.get("hyperparameters")
        if attrs.get("integrations"):
            raise serializers.ValidationError({"integrations": "integrations are not supported"})
        return attrs


def _parse(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def job_data(job: FineTuneJob) -> dict:
    hp = job.hyperparameters
    error = {"code": job.error_code, "message": job.error_message, "param": job.error_param or None} if job.error_code else None
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": _ts(job.created_at),
        "finished_at": _ts(job.finished_at), "estimated_finish": _ts(job.estimated_finish), "error": error,
        "fine_tuned_model": job.fine_tuned_model or None, "model": job.base_model.name,
        "organization_id": job.tenant.slug, "result_files": [], "seed": job.seed, "status": job.status,
        "trained_tokens": job.trained_tokens, "training_file": job.training_file_id,
        "validation_file": job.validation_file_id, "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "metadata": job.metadata or None, "integrations": [], "user_provided_suffix": job.suffix or None,
        # extensions
        "lora": job.lora, "estimated_cost_cents": job.estimated_cost_cents,
        "progress": {"step": job.step, "total_steps": job.total_steps, "train_loss": job.train_loss},
    }


def event_data(event: JobEvent) -> dict:
    return {"id": event.public_id, "object": "fine_tuning.job.event", "created_at": _ts(event.created_at),
            "level": event.level, "message": event.message, "type": event.type, "data": event.data or None}


def checkpoint_data(job: FineTuneJob, ckpt: JobCheckpoint) -> dict:
    metrics = {k: ckpt.metrics.get(k) for k in ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                                                 "valid_mean_token_accuracy") if ckpt.metrics.get(k) is not None}
    name = job.fine_tuned_model or f"ft:{job.base_model.name}:{job.tenant.slug}:{job.suffix}:{job.id[6:14]}"
    return {"id": ckpt.public_id, "object": "fine_tuning.job.checkpoint", "created_at": _ts(ckpt.created_at),
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{ckpt.step}", "step_number": ckpt.step,
            "metrics": metrics, "fine_tuning_job_id": job.id}


class JobListApi(OpenAIView):
    @extend_schema(operation_id="fine_tuning_jobs_list", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request):
        """OpenAI-compatible: list the key's tenant's fine-tuning jobs, newest first; page with `limit` (1–100, default
        20) and `after` (a job id). API key with the finetune scope (401 without a key, 403 without the scope or for
        a suspended tenant). 400 for a bad `limit`.
        """
        limit = _limit(request)
        qs = FineTuneJob.objects.for_tenant(self.tenant).select_related("base_model", "tenant")
        after = request.query_params.get("after")
        rows, has_more = _page_by_created(qs, self.job_or_404(after) if after else None, limit=limit)
        return Response({"object": "list", "data": [job_data(j) for j in rows], "has_more": has_more})

    @extend_schema(operation_id="fine_tuning_jobs_create", tags=["Fine-tuning"], request=JobInput, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        """OpenAI-compatible: create a fine-tuning job and queue it (supervised method only; extensions: `lora`, and
        `from_checkpoint` to start from one of the tenant's adapters or checkpoints of the same base model: `ft:…`,
        `ftckpt-…` or `ftjob-…`, keeping its rank and target modules; 404 `checkpoint_not_found`). API
        key with the finetune scope. 400 for invalid fields or hyperparameters, a training/validation file with
        problems (`invalid_file`) or one still being validated (`file_not_ready`, with its progress); 404 for an
        unknown model or file; 429 when the tenant already has its maximum of queued or running jobs.
        """
        data = _parse(JobInput, request)
        job = services.finetune_job_create(
            tenant=self.tenant, actor=self.actor, model=data["model"], training_file=data["training_file"],
            validation_file=data.get("validation_file") or None, suffix=data.get("suffix") or "", seed=data.get("seed"),
            hyperparameters=data.get("hyperparameters"), lora=data.get("lora"), metadata=data.get("metadata"),
            from_checkpoint=data.get("from_checkpoint") or None)
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
                                          from_checkpoint=data.get("from_checkpoint") or None)
        return Response({"object": "fine_tuning.job.estimate", "model": plan.base_model.name,
                         "training_file": plan.training_file.id, "hyperparameters": plan.hyperparameters,
                         "lora": plan.lora, "examples": plan.tokens["examples"],
                         "tokens_per_epoch": plan.tokens["total_tokens"], "tokens_estimated": plan.tokens["estimated"],
                         **plan.estimate})


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
        rows, has_more = _page_by_public_id(request, qs, prefix=JobEvent.PUBLIC_ID_PREFIX, what="an event", by="id")
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
        rows, has_more = _page_by_public_id(request, qs, prefix=JobCheckpoint.PUBLIC_ID_PREFIX, what="a checkpoint",
                                            by="step")
        return Response({"object": "list", "data": [checkpoint_data(job, c) for c in rows], "has_more": has_more})


# ---- adapters (management API, /api/tenants/<slug>/adapters/...) -----------------------------------


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
