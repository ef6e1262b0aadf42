"""OpenAI's Files API under /v1/files: upload a JSONL training file (validated by a worker), list, retrieve, delete,
download it, and (extension) its full validation report. Another tenant's file is a 404."""

from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.response import Response

from finetune import services, storage
from finetune.models import TrainingFile
from finetune.services import FinetuneError
from finetune.v1_base import OpenAIView, page_by_created, page_limit, unix_time
from serving import selectors as serving_selectors

FILES_MAX_LIMIT = 10_000  # OpenAI's range for listing files (1–10,000, and the default)


def file_data(file: TrainingFile) -> dict:
    """OpenAI's file object; `status` is `uploaded` while a worker validates it (extension: `progress`)."""
    return {"id": file.id, "object": "file", "bytes": file.bytes, "created_at": unix_time(file.created_at),
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
        limit = page_limit(request, default=FILES_MAX_LIMIT, maximum=FILES_MAX_LIMIT)
        qs = TrainingFile.objects.for_tenant(self.tenant)
        if request.query_params.get("purpose"):
            qs = qs.filter(purpose=request.query_params["purpose"])
        after = request.query_params.get("after")
        rows, has_more = page_by_created(qs, self.file_or_404(after) if after else None, limit=limit,
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
