"""The base of the OpenAI-compatible /v1 views (Files, Fine-tuning jobs, adapters): the API-key view, OpenAI's error
shape for every error they raise, the JSON 404 of unknown /v1 paths, and the pagination they share.

/v1 views authenticate only with an API key holding the `finetune` scope; the tenant is the key's. Errors
use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` so the OpenAI SDK raises its usual
exceptions. Another tenant's file or job is a 404, exactly like one that does not exist.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db.models import Q
from django.http import Http404, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from common.openai_errors import error_body
from common.parsers import JSONParser  # bounded depth, no lone surrogates (as every JSON entry point)
from finetune import public_ids
from finetune.models import FineTuneJob, TrainingFile
from finetune.services import FinetuneError
from tenants import ratelimit
from tenants.api_auth import ApiKeyAuthentication
from tenants.api_base import SealedMethods
from tenants.api_refusals import MISSING_KEY, tenant_suspended
from tenants.models import ApiKey
from tenants.services import Actor

DEFAULT_LIMIT, MAX_LIMIT = 20, 100


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


# ---- pagination ----------------------------------------------------------------------------------


def page_by_public_id(request, qs, *, prefix: str, what: str, by: str) -> tuple[list, bool]:
    """(rows, has_more): up to `limit` rows of `qs` in descending `by` (a unique field), after the row that the `after`
    id names (`{prefix}-…`, finetune/public_ids.py). That row must be one of `qs`'s: a forged id or another job's
    answers 400, so ids cannot be probed."""
    limit = page_limit(request)
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


def page_by_created(qs, anchor, *, limit: int, ascending: bool = False) -> tuple[list, bool]:
    """(rows, has_more): up to `limit` rows of `qs` in (created_at, id) order, newest first unless `ascending`,
    after the `anchor` row (None: from the start). The id breaks ties, so pages never skip or repeat a row."""
    if anchor is not None:
        if ascending:
            qs = qs.filter(Q(created_at__gt=anchor.created_at) | Q(created_at=anchor.created_at, pk__gt=anchor.pk))
        else:
            qs = qs.filter(Q(created_at__lt=anchor.created_at) | Q(created_at=anchor.created_at, pk__lt=anchor.pk))
    rows = list(qs.order_by(*(("created_at", "pk") if ascending else ("-created_at", "-pk")))[: limit + 1])
    return rows[:limit], len(rows) > limit


def page_limit(request, *, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    raw = request.query_params.get("limit", default)
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        raise FinetuneError("limit must be an integer", param="limit") from None
    if not 1 <= limit <= maximum:
        raise FinetuneError(f"limit must be between 1 and {maximum:,}", param="limit")
    return limit


def unix_time(value) -> int | None:
    return int(value.timestamp()) if value else None
