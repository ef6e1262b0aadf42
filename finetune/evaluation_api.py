"""Evaluations under /v1/fine_tuning/evaluations (a platform extension: OpenAI has no such endpoint for fine-tunes):
create, list and retrieve evaluations of the key's tenant, and list an evaluation's rows. API key with the finetune
scope; errors in OpenAI's shape; another tenant's evaluation is a 404, exactly like one that does not exist."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from finetune import evaluation as evaluations
from finetune.errors import FinetuneError
from finetune.models import Evaluation, EvaluationRow
from finetune.v1_base import OpenAIView, page_by_created, page_limit, unix_time


class EvaluationInput(serializers.Serializer):
    model = serializers.CharField(max_length=300, help_text="ft:…, ft:…:ckpt-step-N, ftckpt-… or ftjob-…")
    file = serializers.CharField(max_length=64, help_text="A processed chat file (file-…)")
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1,
                                          max_value=evaluations.MAX_TOKENS_LIMIT)
    system_prompt = serializers.JSONField(required=False, allow_null=True,
                                          help_text='"tenant" (default: the one the gateway serves), "none" or a version')


def evaluation_data(e: Evaluation) -> dict:
    metrics = e.metrics or {}
    return {
        "id": e.id, "object": "fine_tuning.evaluation", "created_at": unix_time(e.created_at),
        "finished_at": unix_time(e.finished_at), "status": e.status, "model": e.model,
        "base_model": e.base_model.name, "file": e.file_id, "max_tokens": e.max_tokens,
        "progress": {"rows_done": e.rows_done, "rows_total": e.rows_total},
        "rows_skipped": e.rows_skipped, "system_prompt": e.system_prompt_data,
        "metrics": {side: metrics[side] for side in ("base", "adapter")} if metrics else None,
        "differing_rows": metrics.get("differing_rows"),
        "error": {"code": e.error_code, "message": e.error_message} if e.error_code else None,
    }


def row_data(r: EvaluationRow) -> dict:
    return {"object": "fine_tuning.evaluation.row", "index": r.index, "line": r.line, "prompt": r.prompt,
            "expected": r.expected, "differs": r.differs, "answer_tokens": r.answer_tokens,
            "base": {"answer": r.base_answer, "exact_match": r.base_exact, "contains": r.base_contains,
                     "loss": r.base_loss},
            "adapter": {"answer": r.adapter_answer, "exact_match": r.adapter_exact, "contains": r.adapter_contains,
                        "loss": r.adapter_loss}}


class _EvaluationView(OpenAIView):
    def evaluation_or_404(self, evaluation_id: str) -> Evaluation:
        found = Evaluation.objects.for_tenant(self.tenant).select_related("base_model").filter(pk=evaluation_id).first()
        if found is None:
            raise FinetuneError(f"No such evaluation: {evaluation_id}", status=404, param="evaluation_id",
                                code="evaluation_not_found")
        return found


class EvaluationListApi(_EvaluationView):
    @extend_schema(operation_id="fine_tuning_evaluations_list", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request):
        """Extension: the key's tenant's evaluations, newest first; page with `limit` (1–100, default 20) and `after`
        (an evaluation id). API key with the finetune scope. 400 for a bad `limit`; 404 for an `after` that is not
        one of the tenant's evaluations.
        """
        limit = page_limit(request)
        after = request.query_params.get("after")
        qs = Evaluation.objects.for_tenant(self.tenant).select_related("base_model")
        rows, has_more = page_by_created(qs, self.evaluation_or_404(after) if after else None, limit=limit)
        return Response({"object": "list", "data": [evaluation_data(e) for e in rows], "has_more": has_more})

    @extend_schema(operation_id="fine_tuning_evaluations_create", tags=["Fine-tuning"], request=EvaluationInput,
                   responses=OpenApiTypes.OBJECT)
    def post(self, request):
        """Extension: queue an evaluation of one of the tenant's adapters or checkpoints (`model`: `ft:…`,
        `ft:…:ckpt-step-N`, `ftckpt-…` or `ftjob-…`) on one of its processed chat files (`file`): each row's last
        assistant message is the expected answer; base model and adapter answer greedily (at most `max_tokens`,
        default 64, up to 512) and are scored by exact match, contains and loss; every prompt carries the system
        prompt `system_prompt` names ("tenant", the default: the one the gateway serves; "none"; or a version number;
        400 `invalid_system_prompt`), as the gateway would send it. API key with the finetune scope.
        400 for invalid fields or a file not ready (`file_not_ready`) or with problems (`invalid_file`); 404 for a
        model (`model_not_found`) or file (`file_not_found`) that is not the tenant's; 429 past the tenant's
        queued or running evaluations.
        """
        serializer = EvaluationInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        created = evaluations.evaluation_create(tenant=self.tenant, actor=self.actor, model=data["model"],
                                                file=data["file"], max_tokens=data.get("max_tokens"),
                                                system_prompt=data.get("system_prompt"))
        return Response(evaluation_data(self.evaluation_or_404(created.id)))


class EvaluationDetailApi(_EvaluationView):
    @extend_schema(operation_id="fine_tuning_evaluations_retrieve", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request, evaluation_id: str):
        """Extension: one evaluation: its status, progress (rows done of total) and, once succeeded, the metrics of
        base and adapter side by side. API key with the finetune scope. 404 for an id that is not the key's tenant's.
        """
        return Response(evaluation_data(self.evaluation_or_404(evaluation_id)))


class EvaluationRowsApi(_EvaluationView):
    @extend_schema(operation_id="fine_tuning_evaluations_rows", tags=["Fine-tuning"], responses=OpenApiTypes.OBJECT)
    def get(self, request, evaluation_id: str):
        """Extension: an evaluation's rows in file order (prompt, expected, each side's answer and scores); `differing=
        true` keeps only rows whose two answers differ; page with `limit` (1–100, default 20) and `after` (the last
        `index` of the previous page). API key with the finetune scope. 400 for a bad `limit`, `after` or
        `differing`; 404 for an id that is not the key's tenant's.
        """
        evaluation = self.evaluation_or_404(evaluation_id)
        limit = page_limit(request)
        differing = request.query_params.get("differing", "false")
        if differing not in ("true", "false"):
            raise FinetuneError("differing must be true or false", param="differing")
        qs = (evaluations.differing_rows(evaluation) if differing == "true"
              else EvaluationRow.objects.for_tenant(self.tenant).filter(evaluation=evaluation))
        after = request.query_params.get("after")
        if after is not None:
            if not after.isdigit():
                raise FinetuneError("after must be a row index, as a previous page gave it", param="after")
            qs = qs.filter(index__gt=int(after))
        rows = list(qs.order_by("index")[: limit + 1])
        return Response({"object": "list", "data": [row_data(r) for r in rows[:limit]], "has_more": len(rows) > limit})
